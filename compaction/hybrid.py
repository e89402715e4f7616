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
    """Share of the cache's bytes spent on retrieval heads kept whole (every token: t in the paged blocks, the
    rest in side slots), the best by the head profile: floor(whole_share x heads / ratio) of them; the other
    heads get fewer slots, so that the bytes held stay N / ratio per head on average (a hybrid cache)."""

    def check_whole_share(self, spreads_budgets: bool) -> None:
        if not self.whole_share < 1:
            raise CompactionError(f"parameter 'whole_share' of {self.name!r} is a share of the bytes below 1, got "
                                  f"{self.whole_share!r}")
        if self.whole_share and spreads_budgets:
            raise CompactionError(f"whole_share keeps retrieval heads whole beside equal budgets; {self.name!r} "
                                  "with these parameters spreads its slots over the heads itself")

    def whole_budgets(self, lm: LoadedModel, num_tokens: int, t: int) -> torch.Tensor | None:
        """[num_layers, num_kv_heads] budgets with the best k heads at N (kept whole) and the others at t', for an
        average of t per head in bytes; None where whole_share keeps no head whole at this ratio."""
        n = lm.spec.num_layers * lm.spec.num_kv_heads
        k = int(self.whole_share * n * t / num_tokens)
        if k == 0:
            return None
        budgets = torch.full((lm.spec.num_layers, lm.spec.num_kv_heads), max(1, round((n * t - k * num_tokens) /
                                                                                      (n - k))))
        budgets[heads.top_heads(lm, k)] = num_tokens
        return budgets
