"""A transformers attention function that adds a per-slot bias (beta) and can record queries.

Registered once under the name "kvcat" through transformers' AttentionInterface, so no model code is
copied or patched: a model opts in with `model.config._attn_implementation = "kvcat"` (see `use_kvcat_attention`).
Per-call inputs travel as forward kwargs, which transformers passes down to every attention call:

- `kvcat_bias`: a list with one entry per layer (or None): an additive bias on the first t key columns, of
  shape [num_kv_heads, t] (the same for every query row: beta of a compacted cache) or
  [num_kv_heads, q_len, t] (row-specific: train-time masks). -inf removes a slot.
- `kvcat_queries`: a dict that collects each layer's post-RoPE queries [num_heads, q_len, head_dim]: a list
  per layer, or a `QueryBuffer` placed there beforehand (filled in place, see its docstring).
- `kvcat_query_rows`: optional long tensor of query rows to record (the rest are never copied, so a long
  prefill that keeps a sample of its queries does not hold all of them at once).
- `kvcat_observer`: a callable `(layer, query, key, value)` given each layer's detached post-RoPE tensors
  [batch, heads, len, head_dim] (training policies score KV slots with it).
- `kvcat_key_scores`: a dict layer -> `KeyScores`: that layer's attention is computed explicitly (not by
  SDPA) and its weights on the first keys (the context) are accumulated per key, at no second pass.

`kvcat_bias` entries may also carry a batch dimension, [batch, num_kv_heads, q_len, t], for a different
row-specific bias per sequence (train-time masks); a bias that requires grad is differentiated through.

Transformers builds no mask for an implementation it does not know, so this function makes its own causal
mask; it therefore supports batch size 1 or equal-length batches without padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTN_NAME = "kvcat"
_registered = False


def kvcat_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    if attention_mask is not None:
        raise ValueError("kvcat attention builds its own causal mask; padded batches are not supported")
    layer = module.layer_idx
    captured = kwargs.get("kvcat_queries")
    if captured is not None:
        rows = kwargs.get("kvcat_query_rows")
        q = query[0].detach()
        captured.setdefault(layer, []).append(q if rows is None else q[:, rows])
    observer = kwargs.get("kvcat_observer")
    if observer is not None:
        observer(layer, query.detach(), key.detach(), value.detach())
    biases = kwargs.get("kvcat_bias")
    bias = biases[layer] if biases is not None else None
    q_len, k_len = query.shape[-2], key.shape[-2]
    groups = query.shape[1] // key.shape[1]
    scores = kwargs.get("kvcat_key_scores")
    if scores is not None and layer in scores:
        if bias is not None:
            raise ValueError("kvcat_key_scores scores a plain (unbiased) cache")
        out = scores[layer].attend(query, key, value, scaling, _causal(q_len, k_len, query))
        return out.transpose(1, 2).contiguous(), None

    if bias is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=q_len > 1 and q_len == k_len,
                                             scale=scaling, enable_gqa=groups > 1,
                                             attn_mask=None if q_len == k_len or q_len == 1
                                             else _causal(q_len, k_len, query))
    else:
        batched = bias.dim() == 4  # [batch, kv_heads, q, t]: one train-time mask per sequence
        lead = (bias.shape[0], query.shape[1]) if batched else (query.shape[1],)
        mask = _causal(q_len, k_len, query).expand(*lead, q_len, k_len).clone()
        t = bias.shape[-1]
        bias = bias.to(query.dtype).repeat_interleave(groups, dim=int(batched))  # KV head -> its query heads
        mask[..., :t] = mask[..., :t] + (bias[:, None, :] if bias.dim() == 2 else bias)
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=groups > 1,
                                             attn_mask=mask if batched else mask.unsqueeze(0))
    return out.transpose(1, 2).contiguous(), None


class QueryBuffer:
    """One layer's recorded queries [num_heads, n, head_dim], allocated before the forward pass and filled
    chunk by chunk. Views appended to a list would keep each layer's whole query tensor alive between that
    pass's short-lived buffers, leaving the heap fragmented: a 782-token pass over a 4,096-token SmolLM2
    context held about 50 MB of slack beside its 52 MB of queries."""

    def __init__(self, num_heads: int, n: int, head_dim: int, device, dtype=torch.float32):
        self.data = torch.empty(num_heads, n, head_dim, device=device, dtype=dtype)
        self.filled = 0

    def append(self, q: torch.Tensor) -> None:
        end = self.filled + q.shape[1]
        if end > self.data.shape[1]:
            raise ValueError(f"query buffer holds {self.data.shape[1]} rows; {end} were recorded")
        self.data[:, self.filled:end] = q
        self.filled = end


class KeyScores:
    """What a layer's recorded queries pay the first `n` keys (a context, followed by the queries' own
    tokens): per query head and key, the largest attention weight and the sum of squared weights, accumulated
    over the calls of a pass. Scoring keys while the pass computes its attention anyway costs no second
    [queries x keys] product; the weights of one call ([heads, q, keys]) are the largest buffer."""

    def __init__(self, num_heads: int, n: int, device=None):
        self.max = torch.zeros(num_heads, n, device=device)
        self.sumsq = torch.zeros(num_heads, n, device=device)
        self.count = 0

    def attend(self, query, key, value, scaling: float, mask: torch.Tensor) -> torch.Tensor:
        """Attention of query [1, H, q, d] over key/value [1, Hkv, T, d] (T >= n) with an additive mask
        [q, T]; returns [1, H, q, d] like SDPA, and records the weights on the first n keys."""
        groups = query.shape[1] // key.shape[1]
        k = key[0].repeat_interleave(groups, dim=0)
        v = value[0].repeat_interleave(groups, dim=0)
        w = torch.baddbmm(mask.expand(query.shape[1], -1, -1), query[0], k.transpose(1, 2), alpha=scaling)
        w = torch.softmax(w, dim=-1)
        out = torch.bmm(w, v)[None]
        ctx = w[:, :, :self.max.shape[1]]
        torch.maximum(self.max, ctx.amax(dim=1), out=self.max)
        self.sumsq += ctx.square_().sum(dim=1)
        self.count += query.shape[2]
        return out

    def per_kv_head(self, num_kv_heads: int, score: str) -> torch.Tensor:
        """[num_kv_heads, n]: over each GQA group's query heads, the max weight ("max") or the root mean
        squared weight ("rms")."""
        h, n = self.max.shape
        if score == "max":
            return self.max.view(num_kv_heads, h // num_kv_heads, n).amax(dim=1)
        if score == "rms":
            sq = self.sumsq.view(num_kv_heads, h // num_kv_heads, n).sum(dim=1)
            return (sq / max(self.count * (h // num_kv_heads), 1)).sqrt_()
        raise ValueError(f"key scores are 'max' or 'rms', not {score!r}")


def _causal(q_len: int, k_len: int, like: torch.Tensor) -> torch.Tensor:
    """Additive causal mask for the last q_len of k_len positions: [q_len, k_len] of 0 / -inf."""
    rows = torch.arange(q_len, device=like.device)[:, None] + (k_len - q_len)
    cols = torch.arange(k_len, device=like.device)[None, :]
    return torch.zeros(q_len, k_len, dtype=like.dtype, device=like.device).masked_fill(
        cols > rows, float("-inf"))


def use_kvcat_attention(model) -> None:
    """Route a transformers model's attention through `kvcat_attention` (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, kvcat_attention)
        _registered = True
    model.config._attn_implementation = ATTN_NAME
    for sub in model.modules():
        if hasattr(sub, "config") and sub.config is not model.config:
            sub.config._attn_implementation = ATTN_NAME
