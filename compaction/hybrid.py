"""Retrieval heads kept whole beside compacted ones: the budgets of a hybrid cache.

A few KV heads copy answers out of documents (`heads`, the model's profile); a query-agnostic method keeps facts
at high ratios when those heads still see the whole document (KVzip's global allocation does this implicitly,
DuoAttention explicitly). A paged engine stores the same t slots for every head, so a whole head's other N - t
tokens go to side slots (`kvcat.cache.SideHeads`), and to keep the bytes of a ratio r the other heads get fewer
slots: with n heads of which k are whole, k N + (n - k) t' = n N / r. `base.package` makes the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcat.models import LoadedModel

from . import heads
from .base import CompactionError


@dataclass
class WholeHeads:
    """A method's parameter `whole_share`, mixed in before `Method`: the share of the cache's bytes spent on
    retrieval heads kept whole."""

    whole_share: float = 0.0
    """Share of the cache's bytes spent on retrieval heads kept (nearly) whole, the best by the head profile:
    floor(whole_share x heads x whole_ratio / ratio) of them, each holding N / whole_ratio slots (t in the paged
    blocks, the rest as side slots); the other heads get fewer slots, so that the bytes held stay N / ratio per
    head on average (a hybrid cache)."""
    whole_ratio: float = 1.0
    """The retrieval heads' own ratio: 1 keeps every token; above 1 they are compacted too, by the method."""

    def check_whole_share(self, spreads_budgets: bool) -> None:
        if not self.whole_share < 1:
            raise CompactionError(f"parameter 'whole_share' of {self.name!r} is a share of the bytes below 1, got "
                                  f"{self.whole_share!r}")
        if not self.whole_ratio >= 1:
            raise CompactionError(f"parameter 'whole_ratio' of {self.name!r} is a ratio of at least 1, got "
                                  f"{self.whole_ratio!r}")
        if self.whole_share and spreads_budgets:
            raise CompactionError(f"whole_share keeps retrieval heads whole beside equal budgets; {self.name!r} "
                                  "with these parameters spreads its slots over the heads itself")

    def whole_budgets(self, lm: LoadedModel, num_tokens: int, t: int) -> torch.Tensor | None:
        """[num_layers, num_kv_heads] budgets with the best k heads at N / whole_ratio and the others at t', for
        an average of t per head in bytes; None where whole_share keeps no head whole at this ratio."""
        n, wide = lm.spec.num_layers * lm.spec.num_kv_heads, max(1, round(num_tokens / self.whole_ratio))
        k = int(self.whole_share * n * t / wide)
        narrow = round((n * t - k * wide) / (n - k)) if k else t
        if k == 0 or narrow >= wide:
            return None
        budgets = torch.full((lm.spec.num_layers, lm.spec.num_kv_heads), max(1, narrow))
        budgets[heads.top_heads(lm, k)] = wide
        return budgets

    def paged_width(self, budgets: torch.Tensor, num_tokens: int) -> int:
        """The others' t': the retrieval heads' further slots are side slots."""
        return int(budgets.min()) if self.whole_share else super().paged_width(budgets, num_tokens)
