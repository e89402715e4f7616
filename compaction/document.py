"""The document a compaction reads: its prefill (K/V, a sample of its own queries) and what methods add to it
(reference queries, eviction scores, local surprisal), computed once and shared by every method and ratio
(memoized by `queries.document_state`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvcat import prompts
from kvcat.inference import Prefill, local_surprisal
from kvcat.models import LoadedModel

from . import spans


@dataclass
class DocumentState:
    """Everything a compaction method needs about one document, computed once."""

    ids: torch.Tensor  # [N] token ids
    prefill: Prefill  # K/V and (a sample of) the context's own queries
    prefill_s: float  # seconds the prefill took
    query_pos: torch.Tensor  # [n] positions of the context queries kept in prefill.queries (sorted)
    queries: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # mode -> per layer [H, n, d]
    query_s: dict[str, float] = field(default_factory=dict)  # mode -> extra seconds to get them
    scores: dict[tuple, torch.Tensor] = field(default_factory=dict)  # eviction scores, shared across ratios
    context_sample: bool = True  # prefill.queries hold a sample of the whole context (else the last ones)
    keep_queries: bool = False  # memoize streamed reconstruction queries (benchmarks: many ratios, one document)
    streamed_s: float = 0.0  # seconds the last streaming compaction spent computing its queries
    surprisal: dict[int, torch.Tensor] = field(default_factory=dict)  # context -> local surprisal [N]
    surprisal_s: dict[int, float] = field(default_factory=dict)  # context -> seconds to compute it
    template: torch.Tensor | None = None  # positions of the chat template's tokens (`spans.template_positions`)
    units: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # max_unit -> sentences (`spans.units`)

    def fact_units(self, lm: LoadedModel, max_unit: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The template's positions and the document's sentences (chunks of at most `max_unit` tokens),
        computed once."""
        if self.template is None:
            head = prompts.context_ids(lm.tokenizer, "")
            self.template = spans.template_positions(self.ids.tolist(), lm.tokenizer, head)
        if max_unit not in self.units:
            self.units[max_unit] = spans.units(self.ids.tolist(), lm.tokenizer, max_unit, self.template)
        return self.template, self.units[max_unit]

    def local_surprisal(self, lm: LoadedModel, context: int) -> torch.Tensor:
        """Each token's surprisal given only its last `context`+ tokens (`inference.local_surprisal`, windows
        of 4 x context), computed once (its seconds in surprisal_s)."""
        if context not in self.surprisal:
            start = time.perf_counter()
            self.surprisal[context] = local_surprisal(lm, self.ids, context, 4 * context).cpu()
            self.surprisal_s[context] = time.perf_counter() - start
        return self.surprisal[context]

    @property
    def num_tokens(self) -> int:
        return self.prefill.num_tokens
