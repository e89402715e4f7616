"""beta in served attention: a CPU_ATTN subclass registered over the stock one by a vLLM general plugin.

The stock CPU kernel has no per-key additive bias. `KvcatCPUAttentionImpl` runs the stock kernel for the
whole batch, then, for the rows of requests whose context carries a non-zero beta (looked up in the KV
connector metadata bound for this step, keyed by the request's first block id), takes the context's t slots
from the worker's float32 copy and the request's own tokens from its paged blocks, adds beta to the logits
of the first t key columns (`beta_attention`), and replaces those output rows. Requests without a context
(or with beta = 0 everywhere) keep the stock kernel's output untouched, so the subclass is a no-op for
plain chat. This runs on every step of such a request (decode included), so it is a handful of batched
float32 ops per layer: two matmuls, one softmax, no mask tensor at decode.

`kvcat.server.vllm_adapter.plugin.register` (the `vllm.general_plugins` entry point, called by vLLM in
every process) routes CPU_ATTN here; `KVCAT_BETA_BACKEND=0` skips it (stock kernels: the beta-free mode).
"""

from __future__ import annotations

import torch

from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl


class KvcatCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)
        if attn_metadata is None or self.attn_type != AttentionType.DECODER:
            return output
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        if not has_kv_transfer_group():
            return output
        meta = getattr(get_kv_transfer_group(), "_connector_metadata", None)
        beta_map = getattr(meta, "beta", None)
        if not beta_map:
            return output
        from kvcat.server.vllm_adapter.connector import WORKER_CONTEXTS, layer_index

        layout = WORKER_CONTEXTS.layout
        qsl = attn_metadata.query_start_loc.tolist()
        seq_lens = attn_metadata.seq_lens.tolist()
        table = attn_metadata.block_table
        firsts = table[: len(qsl) - 1, 0].tolist()
        li = None
        for r, first in enumerate(firsts):
            ref = beta_map.get(first)
            if ref is None:
                continue
            a, b = qsl[r], qsl[r + 1]
            if b <= a:
                continue
            try:
                ctx = WORKER_CONTEXTS.get(ref.path, ref.key, ref.shift)
            except Exception:  # noqa: BLE001  (the connector reported its blocks invalid: the request fails)
                continue
            if not ctx.has_bias:
                continue
            if li is None:
                li = layer_index(layer.layer_name)
            # the context's slots come from the worker's copy (the values the connector wrote, in float32);
            # only the request's own tokens are gathered from the paged blocks
            k_new, v_new = layout.gather(kv_cache, table[r], seq_lens[r], start=ctx.num_slots)
            k = torch.cat([ctx.keys[li], k_new.float()], dim=1)  # [H, s, D]
            v = torch.cat([ctx.values[li], v_new.float()], dim=1)
            out = beta_attention(query[a:b], k, v, ctx.beta[li], self.scale)
            output[a:b].copy_(out.reshape(output[a:b].shape))
        return output


def beta_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Causal attention of the n newest positions' queries [n, Hq, D] over all s keys and values [H, s, D]
    (float32; grouped queries: query head j reads KV head j // (Hq / H)), with `beta` [H, t] added to the
    logits of the first t keys. Returns [n, Hq, D] in the query's dtype."""
    n, num_heads, dim = query.shape
    kv_heads, s, _ = keys.shape
    groups, t = num_heads // kv_heads, beta.shape[1]
    q = query.float().view(n, kv_heads, groups, dim).permute(1, 2, 0, 3).reshape(kv_heads, groups * n, dim)
    logits = torch.bmm(q, keys.transpose(1, 2)).mul_(scale)  # [H, groups * n, s]
    logits[..., :t] += beta[:, None, :]
    if n > 1:  # query i (position s - n + i) sees keys up to its own position
        logits.view(kv_heads, groups, n, s)[..., s - n:] += torch.full((n, n), float("-inf")).triu_(1)
    out = torch.bmm(torch.softmax(logits, dim=-1), values)
    return out.view(kv_heads, groups, n, dim).permute(2, 0, 1, 3).reshape(n, num_heads, dim).to(query.dtype)


class KvcatCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return KvcatCPUAttentionImpl
