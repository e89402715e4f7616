"""beta in served attention: a CPU_ATTN subclass registered over the stock one by a vLLM general plugin.

The stock CPU kernel has no per-key additive bias. `KvcatCPUAttentionImpl` runs the stock kernel for the
whole batch, then, for the rows of requests whose context carries a non-zero beta (looked up in the KV
connector metadata bound for this step, keyed by the request's first block id), gathers that request's
K/V from its paged blocks, adds beta to the logits of the first t key columns, runs causal SDPA, and
replaces those output rows. Requests without a context (or with beta = 0 everywhere) keep the stock
kernel's output untouched, so the subclass is a no-op for plain chat.

`kvcat.server.vllm_adapter.plugin.register` (the `vllm.general_plugins` entry point, called by vLLM in
every process) routes CPU_ATTN here; `KVCAT_BETA_BACKEND=0` skips it (stock kernels: the beta-free mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
            n, s = b - a, seq_lens[r]
            t = ctx.num_slots
            # the context's slots come from the worker's copy (identical to what the connector wrote);
            # only the request's own tokens are gathered from the paged blocks
            k_new, v_new = layout.gather(kv_cache, table[r], s, start=t)
            k = torch.cat([ctx.keys[li], k_new], dim=1)  # [H, s, D]
            v = torch.cat([ctx.values[li], v_new], dim=1)
            q = query[a:b].transpose(0, 1)  # [Hq, n, D]
            groups = self.num_heads // self.num_kv_heads
            rows = torch.arange(s - n, s)[:, None]
            cols = torch.arange(s)[None, :]
            mask = torch.zeros(n, s, dtype=torch.float32).masked_fill(cols > rows, float("-inf"))
            bias = ctx.beta[li].repeat_interleave(groups, dim=0)  # [Hq, t]
            mask = mask.expand(self.num_heads, n, s).clone()
            mask[..., :t] += bias[:, None, :]
            out = F.scaled_dot_product_attention(q.float()[None], k.float()[None], v.float()[None],
                                                 attn_mask=mask[None], scale=self.scale,
                                                 enable_gqa=groups > 1)
            out = out[0].transpose(0, 1).to(output.dtype)  # [n, Hq, D]
            output[a:b].copy_(out.reshape(output[a:b].shape))
        return output


class KvcatCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return KvcatCPUAttentionImpl
