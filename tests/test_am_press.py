"""The kvpress-style press over the AM solver, on random tensors: kvpress's call shape, the shapes it returns,
and equality with kvcat's AM-HAK head solver without beta on the same input."""

import inspect

import pytest
import torch

from kvcat.compaction import base, get_method
from kvcat.compaction.am import AMHAK
from kvcat.compaction.press import AMPress

BATCH, KV_HEADS, HEADS, N, D, HIDDEN = 2, 2, 4, 96, 16, 32


class _Attention(torch.nn.Module):
    """The parts of a Llama-style attention module the press reads."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(HIDDEN, HEADS * D, bias=False)
        self.head_dim, self.scaling = D, D ** -0.5


def _inputs(seed=0):
    torch.manual_seed(seed)
    module = _Attention()
    hidden = torch.randn(BATCH, N, HIDDEN)
    keys, values = torch.randn(BATCH, KV_HEADS, N, D) * 1.5, torch.randn(BATCH, KV_HEADS, N, D)
    angles = torch.arange(N)[:, None] * 10000 ** (-torch.arange(0, D, 2) / D)[None]
    emb = torch.cat([angles, angles], -1)[None].expand(BATCH, N, D)
    return module, hidden, keys, values, {"position_embeddings": (emb.cos(), emb.sin())}


def test_press_has_kvpress_call_shape():
    assert list(inspect.signature(AMPress.compress).parameters) == [
        "self", "module", "hidden_states", "keys", "values", "attentions", "kwargs"]


def test_press_returns_am_without_beta():
    module, hidden, keys, values, kwargs = _inputs()
    press = AMPress(compression_ratio=0.75)
    k, v = press.compress(module, hidden, keys, values, None, kwargs)
    t = 24  # N (1 - compression_ratio)
    assert k.shape == v.shape == (BATCH, KV_HEADS, t, D)
    q = press.reference_queries(module, hidden, kwargs)
    half = D // 2  # RoPE by hand: the module's projection, rotated
    raw = module.q_proj(hidden).view(BATCH, N, HEADS, D).transpose(1, 2)
    cos, sin = (x[:, None] for x in kwargs["position_embeddings"])
    torch.testing.assert_close(q, raw * cos + torch.cat([-raw[..., half:], raw[..., :half]], -1) * sin)
    am = get_method("am-hak", fit_beta=False, refit_values=True, score="rms")  # kvcat's AM without beta
    for i in range(BATCH):
        for h, qh in enumerate(base.group_queries(q[i], KV_HEADS, am.max_queries)):
            s = am.solve_head(keys[i, h], values[i, h], qh, t, scale=module.scaling)
            assert torch.all(s.beta == 0)
            assert torch.equal(k[i, h], s.keys) and torch.equal(v[i, h], s.values)
            assert torch.equal(s.keys, keys[i, h, s.indices])  # a subset of the original keys
            assert not torch.equal(s.values, values[i, h, s.indices])  # ... with refit values


def test_press_refuses_beta():
    with pytest.raises(ValueError, match="beta"):
        AMPress(0.5, AMHAK())


def test_press_keeps_everything_at_ratio_zero_or_on_tiny_inputs():
    module, hidden, keys, values, kwargs = _inputs()
    assert AMPress().compress(module, hidden, keys, values, None, kwargs) == (keys, values)
    short = AMPress(compression_ratio=0.1)  # 2 tokens: no slot to lose
    k, v = short.compress(module, hidden[:, :2], keys[:, :, :2], values[:, :, :2], None,
                          {"position_embeddings": tuple(x[:, :2] for x in kwargs["position_embeddings"])})
    assert k.shape[2] == v.shape[2] == 2
