"""beta in served attention: the stock attention backend's impl, subclassed by a vLLM general plugin.

No stock kernel has a per-key additive bias. `BetaAttentionMixin.forward` runs the stock kernel for the
whole batch, then, for the rows of requests whose context carries a non-zero beta (looked up in this step's
beta map, which the KV connector hands to `worker_contexts.WORKER` when vLLM binds its metadata, keyed by the
request's first block id), takes the context's t slots
from the worker's float32 copy and the request's own tokens from the previous step's copy plus this step's
keys and values (`StepState`), adds beta to the logits of the first t key columns (`beta_attention`), and
replaces those output rows. A hybrid context's side slots (retrieval heads kept whole, held by the worker
beside the paged blocks) join those keys the same way, after the t slots. Requests without a context (or with
beta = 0 everywhere) keep the stock kernel's
output untouched, so the subclass is a no-op for plain chat, and so are layers whose beta is zero. This runs
on every step of such a request (decode included), so it is a handful of batched float32 ops per layer: two
matmuls, one softmax, no mask at decode.

Why recompute rows in torch rather than fuse the bias into each kernel: the same code serves every backend
and device (CPU_ATTN here; FLASH_ATTN and TRITON_ATTN in `attention_cuda.py`), and its math is tested on
this machine against the transformers reference. The price is a second attention over the rows that have a
beta; on CUDA it needs attention outside captured graphs, which the connector asks of vLLM
(`requires_piecewise_for_cudagraph`: the layers between attention calls stay in CUDA graphs).

`kvcat.server.vllm_adapter.plugin.register` (the `vllm.general_plugins` entry point, called by vLLM in
every process) routes the platform's backends here; `KVCAT_BETA_BACKEND=0` skips it (stock kernels: the
beta-free mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from kvcat.server.engine_api import ContextTransfer
from kvcat.server.vllm_adapter.worker_contexts import WORKER, LoadedContext, layer_index


class BetaAttentionMixin:
    """Put before a stock AttentionImpl in the bases: its forward, then beta on the rows that carry one."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)
        if attn_metadata is None or self.attn_type != AttentionType.DECODER or not WORKER.beta:
            return output
        layout = WORKER.layout
        rows = STEP.rows(WORKER.beta, attn_metadata, layout.block_size)  # once per step, shared by the layers
        if not rows:
            return output
        li = layer_index(layer.layer_name)
        for row in rows:
            ctx = row.context
            if not ctx.layer_has_bias[li]:
                continue  # beta = 0 and no side slots in this layer: the stock kernel's output is already exact
            a, b = row.start, row.stop
            # the context's slots come from the worker's copy (the values the connector wrote, in float32), the
            # request's own tokens from the previous step's copy plus this step's keys and values
            k_own, v_own = STEP.own_tokens(row, li, key, value, kv_cache, layout)
            ks, vs, bias = [ctx.keys[li]], [ctx.values[li]], ctx.beta[li]
            if ctx.side_beta[li] is not None:  # a hybrid's side slots follow the paged ones (as in `layer_view`)
                ks.append(ctx.side_keys[li].float())
                vs.append(ctx.side_values[li].float())
                bias = torch.cat([bias, ctx.side_beta[li]], 1)
            k = torch.cat([*ks, k_own], dim=1)  # [H, s, D]
            v = torch.cat([*vs, v_own], dim=1)
            out = beta_attention(query[a:b], k, v, bias, self.scale)
            output[a:b].copy_(out.reshape(output[a:b].shape))
        return output


class KvcatCPUAttentionImpl(BetaAttentionMixin, CPUAttentionBackendImpl):
    pass


@dataclass
class BetaRow:
    """One batch row of this step whose context carries beta: its context, query rows start:stop, sequence
    length, block table row, and the blocks holding its last token before this step and its last token."""

    context: LoadedContext
    key: str  # its ContextTransfer's salt
    start: int
    stop: int
    seq_len: int
    blocks: torch.Tensor
    block_before: int
    block_last: int


class StepState:
    """What the beta path computes once per engine step instead of once per layer: the rows it applies to
    (from the attention metadata and the step's beta map), and each request's own tokens' K/V per layer,
    kept from one step to the next so that a decode step appends one token instead of gathering them all from
    the paged blocks (that gather was most of the beta path's time).

    Own-token entries are keyed by (context, layer, the block holding the last token covered, the count).
    Sound because such a block is either the request's own partial block (no other request writes it) or a
    full prefix-cache block, whose hash covers every earlier token: whoever holds it has the same tokens, so
    the same K/V. Only the previous step's entries are looked up; older ones are dropped."""

    def __init__(self):
        self.step, self._rows, self.previous, self.current = None, None, {}, {}

    def rows(self, beta: dict[int, ContextTransfer], attn_metadata, block_size: int) -> list[BetaRow]:
        if beta is not self.step:  # the beta map is a new object every step
            self.step, self._rows, self.previous, self.current = beta, None, self.current, {}
        if self._rows is None:
            self._rows = _beta_rows(beta, attn_metadata, block_size)
        return self._rows

    def own_tokens(self, row: BetaRow, li: int, key, value, kv_cache: torch.Tensor, layout
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [H, s - t, D] (float32) of a request's tokens after its t context slots: the previous step's
        copy with this step's tokens appended, or (a request's first step, or one that was not scheduled last
        step) gathered from the paged blocks."""
        t, n, dim = row.context.num_slots, row.stop - row.start, layout.head_dim
        before = row.seq_len - n - t  # the request's tokens already in the paged blocks before this step
        found = self.previous.get((row.key, li, row.block_before, before)) if before else ()
        if found is None or key is None:
            k_own, v_own = (x.float() for x in layout.gather(kv_cache, row.blocks, row.seq_len, start=t))
        else:
            step = [x[row.start:row.stop].reshape(n, -1, dim).transpose(0, 1).float() for x in (key, value)]
            k_own, v_own = (torch.cat([old, new], dim=1) for old, new in zip(found, step)) if found else step
        self.current[(row.key, li, row.block_last, row.seq_len - t)] = (k_own, v_own)
        return k_own, v_own


def _beta_rows(beta: dict[int, ContextTransfer], attn_metadata, block_size: int) -> list[BetaRow]:
    qsl = attn_metadata.query_start_loc.tolist()
    seq_lens = attn_metadata.seq_lens.tolist()
    table = attn_metadata.block_table
    rows = []
    for r, first in enumerate(table[: len(qsl) - 1, 0].tolist()):
        context = beta.get(first)
        a, b, s = qsl[r], qsl[r + 1], seq_lens[r]
        if context is None or b <= a:
            continue
        try:
            ctx = WORKER.get(context, fresh=False)
        except Exception:  # noqa: BLE001  (the connector reported its blocks invalid: the request fails)
            continue
        if ctx.has_bias:
            before = table[r, max(s - (b - a) - 1, 0) // block_size]
            rows.append(BetaRow(ctx, context.salt, a, b, s, table[r], int(before),
                                int(table[r, (s - 1) // block_size])))
    return rows


STEP = StepState()


def beta_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Causal attention of the n newest positions' queries [n, Hq, D] over all s keys and values [H, s, D]
    (float32; grouped queries: query head j reads KV head j // (Hq / H)), with `beta` [H, t] added to the
    logits of the first t keys. Returns [n, Hq, D] in the query's dtype. A decode step (n = 1) is five ops."""
    n, num_heads, dim = query.shape
    kv_heads, s, _ = keys.shape
    groups, t = num_heads // kv_heads, beta.shape[1]
    q = query.float().view(n, kv_heads, groups, dim)
    q = q.view(kv_heads, groups, dim) if n == 1 else q.permute(1, 2, 0, 3).reshape(kv_heads, groups * n, dim)
    bias = F.pad(beta, (0, s - t))[:, None, :]  # [H, 1, s]: beta on the context's keys, 0 on the request's own
    logits = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=scale)  # [H, groups * n, s]
    if n > 1:  # query i (position s - n + i) sees keys up to its own
        logits.view(kv_heads, groups, n, s)[..., s - n:] += torch.full((n, n), float("-inf"),
                                                                        device=logits.device).triu_(1)
    out = torch.bmm(torch.softmax(logits, dim=-1), values)
    out = out.view(1, num_heads, dim) if n == 1 else out.view(kv_heads, groups, n, dim).permute(2, 0, 1, 3)
    return out.reshape(n, num_heads, dim).to(query.dtype)


class KvcatCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return KvcatCPUAttentionImpl
