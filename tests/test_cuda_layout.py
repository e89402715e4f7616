"""The CUDA serving path, checked here without a GPU (issue 25): no kernel runs, every shape and stride is vLLM's.

- The compacted-cache write and read (`FlashPagedLayout`) against each CUDA backend's own `do_kv_cache_update`
  code, on per-layer KV tensors built by vLLM's own allocator functions for every `KVCacheLayout` the backend
  accepts. The CUDA cache-write op cannot run on CPU, so it is replaced by its documented semantics (slot s is
  row s % block_size of block s // block_size of the views it is given): what is tested is the views and
  strides, which are the part kvcat owns.
- The beta path's rows and a request's own tokens read from such a cache, then its attention against PyTorch's
  SDPA with the bias (the same `beta_attention` the CPU engine runs; the live test in test_server.py checks it
  against the transformers reference through a real engine).
- The classes the plugin registers for CUDA compose with vLLM's impls; the connector asks for piecewise graphs.
What this does not show, a GPU run does: `scripts/gpu_check.sh`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("vllm")

BLOCK, HEADS, DIM, LAYERS, BLOCKS = 16, 3, 8, 2, 6


def _scatter(key, value, key_cache, value_cache, slot_mapping, *args):
    """What `reshape_and_cache_flash` (and its Triton twin) do, in torch: the stand-in for the CUDA op."""
    slots = slot_mapping[slot_mapping >= 0]
    block, offset = slots // key_cache.shape[1], slots % key_cache.shape[1]
    key_cache[block, offset] = key[: len(slots)].to(key_cache.dtype)
    value_cache[block, offset] = value[: len(slots)].to(value_cache.dtype)


def _backends():
    from vllm.v1.attention.backends import flash_attn, triton_attn

    return {"FLASH_ATTN": (flash_attn, "reshape_and_cache_flash", flash_attn.FlashAttentionBackend,
                           flash_attn.FlashAttentionImpl),
            "TRITON_ATTN": (triton_attn, "triton_reshape_and_cache_flash", triton_attn.TritonAttentionBackend,
                            triton_attn.TritonAttentionImpl)}


def _cases():
    from vllm.v1.kv_cache_layout import KVCacheLayout

    out = []
    for name, (_, _, backend, _) in _backends().items():
        for layout in backend.supported_kv_cache_layouts() or list(KVCacheLayout):
            out.append(pytest.param(name, layout, id=f"{name}-{layout.name}"))
    return out


def _layer_caches(layout, dtype=torch.float32) -> list[torch.Tensor]:
    """The per-layer KV tensors vLLM's allocator gives a worker for `layout` (one buffer shared by the layers)."""
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheTensor, compute_layout_strides,
                                            create_kv_cache_views)

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=dtype)
    layer_stride, block_stride, *_ = compute_layout_strides(spec, BLOCKS, LAYERS, layout)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    tensor = KVCacheTensor(size=spec.page_size_bytes * BLOCKS * LAYERS, layers=names,
                           layer_stride=layer_stride, block_stride=block_stride)
    return create_kv_cache_views(torch.zeros(tensor.size, dtype=torch.int8), spec, BLOCKS, layout, tensor)


def _layer(name: str, monkeypatch):
    """An attention layer whose impl is the backend's own class (its do_kv_cache_update code), with the CUDA op
    replaced by `_scatter`."""
    module, op, _, impl_cls = _backends()[name]
    monkeypatch.setattr(module, op, _scatter, raising=False)
    from vllm.v1.attention.backend import AttentionType

    impl = object.__new__(impl_cls)
    impl.__dict__.update(attn_type=AttentionType.DECODER, head_size=DIM, kv_cache_dtype="auto",
                         _is_per_token_head_quant=False, num_kv_heads=HEADS)
    return SimpleNamespace(impl=impl, _k_scale=torch.ones(1), _v_scale=torch.ones(1))


@pytest.mark.parametrize("backend,layout", _cases())
def test_flash_layout_round_trip_through_each_backends_write(backend, layout, monkeypatch):
    from kvcat.server.vllm_adapter.layout import FlashPagedLayout

    caches = _layer_caches(layout)
    assert all(c.shape == (BLOCKS, HEADS, BLOCK, 2 * DIM) for c in caches)
    paged, layer = FlashPagedLayout(BLOCK, DIM), _layer(backend, monkeypatch)
    gen = torch.Generator().manual_seed(1)
    n, start = 2 * BLOCK + 5, 7  # from slot 7 of a 3-block table, into a non-contiguous block order
    table = torch.tensor([4, 1, 3])
    pos = torch.arange(start, start + n)
    slots = table[pos // BLOCK] * BLOCK + pos % BLOCK
    k, v = torch.randn(n, HEADS, DIM, generator=gen), torch.randn(n, HEADS, DIM, generator=gen)
    paged.write(caches[0], k, v, slots, layer)

    gk, gv = paged.gather(caches[0], table, start + n, start=start)
    assert torch.equal(gk, k.transpose(0, 1)) and torch.equal(gv, v.transpose(0, 1))
    assert not caches[1].any(), "a write to layer 0 reached layer 1 of the shared buffer"
    # where the backends' kernels read it: the physical-order view of the layer, K then V in each token's row
    physical = caches[0].permute(*layout.layer_view_order)
    order = [("B", "H", "N")[i] for i in layout.layer_view_order[:3]]
    row = physical.permute(order.index("B"), order.index("N"), order.index("H"), 3)[table[1], 0]  # slot 16
    assert torch.equal(row[:, :DIM], k[BLOCK - start]) and torch.equal(row[:, DIM:], v[BLOCK - start])
    paged.self_test(HEADS, torch.float32, layer, like=caches[1])


def test_beta_rows_and_own_tokens_read_from_a_flash_layout(tmp_path, monkeypatch):
    """A request over a t-slot context with beta, in its second step: the rows the beta path finds, the
    request's own tokens it reads from an NHD cache, and the attention it computes equal SDPA with the bias."""
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from kvcat.cache import CompactCache
    from kvcat.server.engine_api import ContextTransfer
    from kvcat.server.vllm_adapter import attention
    from kvcat.server.vllm_adapter.attention import StepState, beta_attention
    from kvcat.server.vllm_adapter.worker_contexts import WorkerContexts
    from kvcat.server.vllm_adapter.layout import FlashPagedLayout

    gen = torch.Generator().manual_seed(2)
    t, own, q_heads = 20, 9, 2 * HEADS
    ctx = CompactCache(keys=[torch.randn(HEADS, t, DIM, generator=gen) for _ in range(LAYERS)],
                       values=[torch.randn(HEADS, t, DIM, generator=gen) for _ in range(LAYERS)],
                       beta=[torch.randn(HEADS, t, generator=gen) for _ in range(LAYERS)],
                       num_tokens=t, model_fingerprint="test", method="test")
    path = str(ctx.save(tmp_path / "ctx.kvc"))
    cache, layer = _layer_caches(KVCacheLayout.LBNHC)[0], _layer("FLASH_ATTN", monkeypatch)
    paged = FlashPagedLayout(BLOCK, DIM)
    contexts = WorkerContexts()
    contexts.layout = paged
    monkeypatch.setattr(attention, "WORKER", contexts)

    table = torch.tensor([[5, 2, 0]])
    seq = t + own
    k_own, v_own = torch.randn(own, HEADS, DIM, generator=gen), torch.randn(own, HEADS, DIM, generator=gen)
    pos = torch.arange(t, seq)
    paged.write(cache, k_own, v_own, table[0, pos // BLOCK] * BLOCK + pos % BLOCK, layer)  # before attention
    beta = {5: ContextTransfer("ctx", path, t, t, "key")}
    step = 3  # this step's query rows: the request's last 3 tokens (rows 1..3 of the batch: row 0 is another)
    attn = SimpleNamespace(query_start_loc=torch.tensor([0, 1, 1 + step]), seq_lens=torch.tensor([4, seq]),
                           block_table=torch.cat([torch.tensor([[1, 0, 0]]), table]))

    rows = StepState().rows(beta, attn, BLOCK)
    assert [(r.start, r.stop, r.seq_len) for r in rows] == [(1, 1 + step, seq)]
    key = torch.zeros(1 + step, HEADS * DIM)
    key[1:] = k_own[-step:].reshape(step, -1)
    k_got, v_got = StepState().own_tokens(rows[0], 0, key, None, cache, paged)  # first step: from the blocks
    assert torch.equal(k_got, k_own.transpose(0, 1)) and torch.equal(v_got, v_own.transpose(0, 1))

    q = torch.randn(step, q_heads, DIM, generator=gen)
    keys, values = torch.cat([ctx.keys[0], k_got], 1), torch.cat([ctx.values[0], v_got], 1)
    out = beta_attention(q, keys, values, rows[0].context.beta[0], DIM ** -0.5)
    mask = F.pad(ctx.beta[0], (0, own)).repeat_interleave(q_heads // HEADS, 0)[:, None, :].expand(-1, step, -1)
    mask = mask.masked_fill(torch.arange(seq)[None, :] > torch.arange(seq - step, seq)[:, None], float("-inf"))
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask[None],
                                         scale=DIM ** -0.5, enable_gqa=True)[0].transpose(0, 1)
    assert torch.allclose(out, ref, atol=1e-5)


def test_cuda_beta_backends_compose_with_vllms_impls():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from kvcat.server.vllm_adapter import attention_cuda
    from kvcat.server.vllm_adapter.attention import BetaAttentionMixin
    from kvcat.server.vllm_adapter.plugin import BACKENDS

    for name, (_, _, backend, impl) in _backends().items():
        ours = getattr(attention_cuda, BACKENDS["cuda"][name].rsplit(".", 1)[1])
        assert issubclass(ours, backend) and AttentionBackendEnum[name]
        cls = ours.get_impl_cls()
        assert issubclass(cls, impl) and cls.forward is BetaAttentionMixin.forward
        assert cls.__mro__.index(BetaAttentionMixin) < cls.__mro__.index(impl)


def test_connector_asks_vllm_for_eager_attention_only_with_beta():
    from kvcat.server.vllm_adapter.connector import KvcatConnector

    assert KvcatConnector.requires_piecewise_for_cudagraph({"beta": True})
    assert not KvcatConnector.requires_piecewise_for_cudagraph({"beta": False})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it)")
def test_flash_layout_round_trip_with_the_real_cuda_op():
    """On a GPU: the same round trip through vLLM's compiled reshape_and_cache_flash."""
    from vllm import _custom_ops as ops
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from kvcat.server.vllm_adapter.layout import FlashPagedLayout

    for layout in (KVCacheLayout.LBNHC, KVCacheLayout.LBHNC):
        cache = _layer_caches(layout, torch.bfloat16)[0].cuda()
        paged = FlashPagedLayout(BLOCK, DIM)
        impl = SimpleNamespace(do_kv_cache_update=lambda layer, k, v, kv, s: ops.reshape_and_cache_flash(
            k, v, *paged.views(kv), s, "auto", layer._k_scale, layer._v_scale))
        layer = SimpleNamespace(impl=impl, _k_scale=torch.ones(1, device="cuda"),
                                _v_scale=torch.ones(1, device="cuda"))
        paged.self_test(HEADS, torch.bfloat16, layer, like=cache)
