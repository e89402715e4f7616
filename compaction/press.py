"""Attention Matching as a kvpress-style press: `compress(module, hidden_states, keys, values, attentions, kwargs)`
returns the compacted (keys, values), on plain tensors, so that kvpress users can try AM's key choice and value
refit in their own pipeline. kvcat does not depend on kvpress; to hook it into a kvpress pipeline, mix it
into kvpress's base press (docs/compaction-methods.md):

    @dataclass
    class AMKVPress(AMPress, BasePress):  # from kvpress import BasePress
        pass

What the press cannot do is the third part of AM: beta, the additive attention bias per kept slot that
matches the attention mass of the evicted keys. kvpress's cache holds keys and values only, so the press
solves without it (the values are fitted for beta = 0): what it returns is kvcat's AM-HAK head solver
(`am.AMHAK.solve_head`) with fit_beta=False on the same queries. kvcat's own methods keep beta in the cache
(`CompactCache.beta`) and serve it through an attention bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .am import AMHAK
from .base import CompactionError, group_queries, slots_per_head


def _am_without_beta() -> AMHAK:
    return AMHAK(fit_beta=False, refit_values=True, score="rms")


@dataclass
class AMPress:
    """AM-HAK without beta for kvpress: per KV head, keep the keys the context's own queries attend to most
    (plus sink and recent tokens), then refit the kept values by least squares so that attention outputs
    match the full cache's on those queries (Zweiger et al., arXiv 2602.16284).

    keys, values: [batch, num_kv_heads, N, head_dim] (post-RoPE keys, as a cache holds them); the result has
    t = round(N (1 - compression_ratio)) slots per head. The reference queries are the context's own: the
    module's query projection of `hidden_states`, rotated by kwargs["position_embeddings"] (Llama-style
    attention modules: q_proj, optional q_norm, head_dim)."""

    compression_ratio: float = 0.0
    """Fraction of the tokens removed (kvpress's convention; kvcat's ratio is 1 / (1 - compression_ratio))."""
    am: AMHAK = field(default_factory=_am_without_beta)
    """The head solver's settings (key rank `score`, `max_queries`, `sink`, `recent`, `refit_values`, ...):
    RMS key rank (the paper's HAK) and refit values by default; fit_beta must be False."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        if self.am.fit_beta:
            raise ValueError("a kvpress cache cannot hold beta: give the press an AMHAK with fit_beta=False")

    @torch.no_grad()
    def reference_queries(self, module: torch.nn.Module, hidden_states: torch.Tensor,
                          kwargs: dict[str, Any]) -> torch.Tensor:
        """Post-RoPE queries [batch, num_heads, N, head_dim] of the context, as the module computes them."""
        b, n, _ = hidden_states.shape
        q = module.q_proj(hidden_states).view(b, n, -1, module.head_dim)
        if getattr(module, "q_norm", None) is not None:
            q = module.q_norm(q)
        q = q.transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        return apply_rotary_pos_emb(q, q, cos, sin)[0]

    @torch.no_grad()
    def compress(self, module: torch.nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, attentions: torch.Tensor | None, kwargs: dict[str, Any]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The compacted (keys, values) [batch, num_kv_heads, t, head_dim]; `attentions` is not read."""
        if self.compression_ratio == 0:
            return keys, values
        batch, num_kv_heads, n, _ = keys.shape
        try:
            t = slots_per_head(n, ratio=1 / (1 - self.compression_ratio))
        except CompactionError:  # too short to lose a slot at this ratio
            return keys, values
        scale = getattr(module, "scaling", keys.shape[-1] ** -0.5)
        queries = self.reference_queries(module, hidden_states, kwargs)
        out_k, out_v = [], []
        for i in range(batch):
            heads = [self.am.solve_head(keys[i, h], values[i, h], qh, t, scale=scale)
                     for h, qh in enumerate(group_queries(queries[i], num_kv_heads, self.am.fitted_queries(t)))]
            out_k.append(torch.stack([s.keys for s in heads]))
            out_v.append(torch.stack([s.values for s in heads]))
        return torch.stack(out_k), torch.stack(out_v)
