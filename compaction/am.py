"""Attention Matching methods for a whole model: AM-HAK, AM-HAK-fast, AM-OMP and AM-OMP-fast.

Each wraps a per-head solver from `solvers.py`: for every layer and KV head, the head's keys/values and the
reference queries of its GQA group (a deterministic subsample: `max_queries`, or the 4 per slot a fit needs
where that is more) go in, one Solution (C_k, beta, C_v) comes out.

What a compacted cache keeps is decided by two things a later question cannot tell us in advance:
- reference queries (`queries`): "repeat" reconstructs the whole document chunk by chunk
  (`queries.Reconstruction`, run one layer at a time), and every copy query scores the keys
  (`attention.KeyScores`: max or RMS attention weight) while a sample of them is fitted on;
- salient tokens (`salient_frac` of every head's budget; all of a retrieval head's, `retrieval_share`): the
  document's least predictable spans, as windows (`solvers.salient_tokens`) or whole sentences
  (`spans.fact_spans`), where planted facts, names and numbers sit; the retrieval heads are those that copy
  answers out of documents (`heads`, a per-model profile measured once on tune cases). Keys ranked by
  attention alone drop them at 8x: every token of a copy gets the same attention from its copy query. The surprisal is
  the prefill's (given the whole prefix); `salient_context=C` scores each token given only the C-4C tokens
  before it instead (one more pass), so that facts of a repeated form (a list of like facts) stay salient
  after the first; off: no better on the tune split (benchmarks/NOTES.md).
Each head keeps its fitted beta / C_v only where they beat plain eviction values on the context's own last
queries (`select_on="last"`). Per-head budgets are uniform by default: vLLM's paged blocks hold every KV head
of a layer for each slot, so a served cache costs its widest head. `budgets="nonuniform"` (a per-model
sensitivity profile) and `"global"` (KVzip's one top-k over every head's reconstruction scores) are for
offline use.
With `on_policy=True` each layer's queries come from a model whose earlier layers already run on their
compacted cache (the reconstruction advances over it: no extra passes).
Why the defaults are what they are: benchmarks/NOTES.md (chosen on the tune split).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from kvcat.heap import release_free_memory
from kvcat.models import LoadedModel

from . import budgets as budgets_mod
from . import heads, spans
from .base import Method, Progress, attention_scale, group_queries, pad_layer
from .document import DocumentState
from .eviction import global_counts
from .fit import FIT_MIN_QUERIES_PER_SLOT, Solution
from .hybrid import WholeHeads
from .queries import LayerQueries, QueryMode, get_queries
from .registry import register
from .solvers import hak, omp, salient_tokens

log = logging.getLogger(__name__)


@dataclass
class AMMethod(WholeHeads, Method):
    """What every AM method shares: reference queries, budgets, forced and salient tokens, the fit's judge.
    Subclasses give the per-head solver (`solve_head`). See benchmarks/NOTES.md for the figures behind each
    default."""

    queries: QueryMode = "repeat"
    """Reference queries fitted on and ranking the keys (`queries.QUERY_MODES`)."""
    budgets: Literal["uniform", "nonuniform", "global"] = "uniform"
    """Slots per head: equal (a paged engine's layout), a per-model sensitivity profile, or one global top-k."""
    max_queries: int = 4096
    """Reference queries fitted per KV head: a seeded sample, raised to 4 per slot where the document has them."""
    sink: int = 4
    """First tokens every head keeps (attention sinks)."""
    recent: int = 16
    """Last tokens every head keeps."""
    recent_frac: float = 0.0
    """... or this fraction of the head's budget, where that is more."""
    on_policy: bool = False
    """Each layer's queries come from a model whose earlier layers already run on their compacted cache."""
    select_on: Literal["last", "holdout"] = "last"
    """What judges each head's fit against plain eviction values: the context's last queries or held-out ones."""
    salient_frac: float = 0.5
    """Share of every head's budget kept for the document's least predictable spans (`solvers.salient_tokens`)."""
    salient_window: int = 32
    """salient_unit="window": tokens per span whose mean surprisal ranks it."""
    salient_unit: Literal["window", "sentence"] = "window"
    """Salient tokens as the top windows of mean surprisal, or as whole sentences ranked by their peak
    surprisal, each taken once (`spans.fact_spans`)."""
    max_unit: int = 48
    """salient_unit="sentence": longer sentences are cut into chunks of this many tokens (cut at 32, a long
    sentence loses what its value belongs to: benchmarks/NOTES.md, 2026-12-08)."""
    peak_run: int = 4
    """salient_unit="sentence": a sentence's peak is its most surprising run of this many tokens."""
    salient_rank: spans.UnitRank = "peak"
    """salient_unit="sentence": sentences ranked by their peak, their mean surprisal, or each in turn
    (`spans.unit_order`)."""
    retrieval_share: float = 0.0
    """Share of KV heads that are retrieval heads (the model's head profile, `heads`): they spend
    retrieval_salient_frac of their slots on salient tokens, the other heads salient_frac."""
    retrieval_salient_frac: float = 1.0
    """Share of a retrieval head's budget kept for salient tokens."""
    keep_template: bool = False
    """Every head keeps the chat template's tokens (system prompt, turn markers), outside the salient share."""
    salient_context: int = 0
    """Surprisal given only this many tokens before each token (one more pass); 0: the prefill's own."""
    refit_values: bool = False
    """Fit C_v by least squares (else the kept keys' own values)."""
    ridge: float = 1e-6
    """Ridge of the least-squares fits, relative to their normal matrix's mean diagonal."""
    holdout_every: int = 5
    """With select_on="holdout": every k-th reference query is held out to judge the fit."""
    score_last: float = 0.0
    """Weight of the context's last queries in the key choice (the reference queries': 1 - score_last)."""

    at_least_one: ClassVar[tuple[str, ...]] = ("max_queries", "max_unit", "peak_run")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_whole_share(spreads_budgets=self.budgets != "uniform")

    def head_budgets(self, lm: LoadedModel, state: DocumentState, t: int) -> torch.Tensor:
        whole = self.whole_budgets(lm, state.num_tokens, t)
        if whole is not None:
            return whole
        if self.budgets == "global":  # KVzip's allocation: one top-k over every head's key scores
            get_queries(lm, state, "repeat")  # records the reconstruction's key scores (all layers at once)
            L, H = lm.spec.num_layers, lm.spec.num_kv_heads
            if ("reconstruction", 0) in state.scores:
                scores = torch.stack([state.scores[("reconstruction", i)].per_kv_head(H, "max") for i in range(L)])
                return global_counts(scores, t * L * H)
        return budgets_mod.head_budgets(lm, state.num_tokens, t, self.budgets)

    @property
    def streams_queries(self) -> bool:
        return True  # solve_layers takes its reference queries one layer at a time (LayerQueries)

    @property
    def local_context(self) -> int:
        """The context of the local surprisal the salient spans read (0: none, the prefill's is read)."""
        return self.salient_context if self.salient_frac > 0 else 0

    @property
    def needs_token_nll(self) -> bool:
        return self.salient_frac > 0 and self.local_context == 0

    def prepare(self, lm: LoadedModel, state: DocumentState) -> None:
        super().prepare(lm, state)
        if self.local_context:
            state.local_surprisal(lm, self.local_context)
        if self.keep_template or self.salient_unit == "sentence":
            state.fact_units(lm, self.max_unit)
        self.prepare_model(lm)

    def prepare_model(self, lm: LoadedModel) -> None:
        if self.retrieval_share or self.whole_share:
            heads.load_profile(lm)  # measured once per model (tune cases), then read from disk

    def input_seconds(self, state: DocumentState) -> float:
        return super().input_seconds(state) + state.surprisal_s.get(self.local_context, 0.0)

    def salient(self, state: DocumentState, t: int, memo: dict, frac: float | None = None) -> torch.Tensor | None:
        """The positions a head of budget t keeps whatever attention says, most important first (computed once
        per count): the chat template's (keep_template), then `frac` (default salient_frac) of t salient tokens,
        by window (`solvers.salient_tokens`) or by sentence (`spans.fact_spans`). The surprisal is the
        prefill's (given the whole prefix) with salient_context 0, else given only that many tokens before
        each token."""
        count = round((self.salient_frac if frac is None else frac) * t)
        if count not in memo:
            nll = state.surprisal.get(self.local_context) if self.local_context else state.prefill.token_nll
            parts = [state.template] if self.keep_template and state.template is not None else []
            if count and nll is not None:
                parts.append(spans.fact_spans(nll, state.units[self.max_unit], count, self.peak_run,
                                                 rank=self.salient_rank)
                             if self.salient_unit == "sentence" else salient_tokens(nll, count, self.salient_window))
            memo[count] = torch.cat(parts) if parts else None
        return memo[count]

    def key_scores(self, source: LayerQueries, layer: int, num_kv_heads: int) -> torch.Tensor | None:
        """[num_kv_heads, N] key ranks recorded by every reconstruction query, for solvers that rank keys by
        attention (HAK); None where the solver picks keys itself (OMP) or the mode has no reconstruction."""
        return None

    def fitted_queries(self, t: int) -> int:
        """Reference queries fitted per head of budget t: max_queries, raised to the FIT_MIN_QUERIES_PER_SLOT a
        fit needs wherever the document has that many (else a long document at a low ratio kept eviction values)."""
        return max(self.max_queries, FIT_MIN_QUERIES_PER_SLOT * t)

    def recent_tokens(self, t: int) -> int:
        """Last tokens a head of budget t keeps."""
        return max(self.recent, round(self.recent_frac * t))

    def solve_head(self, K: torch.Tensor, V: torch.Tensor, Q: torch.Tensor, t: int, *, scale: float,
                   validation: torch.Tensor | None = None, score_queries: torch.Tensor | None = None,
                   key_scores: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> Solution:
        """One KV head: keys K, values V [N, d], fitted reference queries Q [n, d], t slots -> its Solution."""
        raise NotImplementedError

    def solve_layers(self, lm: LoadedModel, state: DocumentState, budgets: torch.Tensor,
                     progress: Progress | None) -> list[list[Solution]]:
        scale = attention_scale(lm)
        source = LayerQueries(lm, state, self.queries)
        last = get_queries(lm, state, "last") if self.select_on == "last" or self.score_last > 0 else None
        on_last = self.select_on == "last"
        out: list[list[Solution]] = []
        salient: dict[int, torch.Tensor] = {}
        retrieval = heads.retrieval_heads(lm, self.retrieval_share) if self.retrieval_share else None
        for layer in range(lm.spec.num_layers):
            q = source(layer)
            K, V = state.prefill.keys[layer], state.prefill.values[layer]
            lq = group_queries(last[layer], lm.spec.num_kv_heads) if last is not None else [None] * len(K)
            solved = []
            ks = self.key_scores(source, layer, lm.spec.num_kv_heads)
            solved_here = budgets[layer][budgets[layer] < state.num_tokens]  # heads kept whole are not fitted
            cap = self.fitted_queries(int(solved_here.max()) if solved_here.numel() else 1)
            for h, qh in enumerate(group_queries(q, lm.spec.num_kv_heads, cap)):
                t = int(budgets[layer, h])
                if t >= state.num_tokens:  # a head kept whole: every key, beta 0, its own values
                    solved.append(Solution(K[h], torch.zeros(t, device=K.device), V[h], torch.arange(t)))
                    continue
                frac = self.retrieval_salient_frac if retrieval is not None and retrieval[layer, h] else None
                solved.append(self.solve_head(K[h], V[h], qh, t, scale=scale, validation=lq[h] if on_last else None,
                                              score_queries=lq[h], key_scores=ks[h] if ks is not None else None,
                                              keep=self.salient(state, t, salient, frac)))
            out.append(solved)
            source.advance(pad_layer(solved) if self.on_policy else None)
            release_free_memory()  # the layer's solve buffers (else the heap creeps: +100 MB over 30 layers)
            if progress:
                progress(layer + 1, lm.spec.num_layers)
        state.query_s[self.queries] = source.seconds  # charged to this compaction (compact_state)
        state.streamed_s = source.stream.seconds if source.stream is not None else 0.0  # ... and run by it
        skipped = sum(s.underdetermined for layer in out for s in layer)
        if skipped:
            log.warning("%s: %d of %d heads kept eviction values: the document has fewer than %d reference "
                        "queries per slot (a shorter document or a higher ratio fits)", self.name, skipped,
                        sum(len(layer) for layer in out), FIT_MIN_QUERIES_PER_SLOT)
        return out


@register
@dataclass
class AMHAK(AMMethod):
    """AM with highest-attention keys: salient tokens, then the keys the reconstruction's copy queries attend
    to most (max weight), NNLS beta clamped to [e^-3, e^3] on a sample of those queries, values kept (a
    least-squares C_v with refit_values=True)."""

    name: ClassVar[str] = "am-hak"

    max_queries: int = 2048
    score: Literal["rms", "mean", "max"] = "max"
    """Key rank: max or RMS attention weight over every copy query, or the mean over the fitted sample."""
    fit_beta: bool = True
    """Fit beta (off: beta = 0, what stock attention kernels can serve)."""
    beta_bounds: tuple[float, float] = (-3.0, 3.0)
    """Bounds of beta: the mass weights lie in [e^lo, e^hi]."""
    nnls_iters: int = 2
    """Projected-gradient steps after the clamped least-squares weights."""

    def key_scores(self, source: LayerQueries, layer: int, num_kv_heads: int) -> torch.Tensor | None:
        rec = source.key_scores(layer)
        if rec is None or self.score == "mean":
            return None
        return rec.per_kv_head(num_kv_heads, self.score)

    def solve_head(self, K, V, Q, t, *, scale, validation=None, score_queries=None, key_scores=None,
                   keep=None) -> Solution:
        return hak(K, V, Q, t, scale=scale, score=self.score, sink=self.sink, recent=self.recent_tokens(t),
                   fit_beta=self.fit_beta, beta_bounds=self.beta_bounds, nnls_iters=self.nnls_iters,
                   refit_values=self.refit_values, ridge=self.ridge, holdout_every=self.holdout_every,
                   validation=validation, score_queries=score_queries, score_weight=self.score_last,
                   key_scores=key_scores, keep=keep)


@register
@dataclass
class AMHAKFast(AMHAK):
    """AM-HAK without the reconstruction pass: the prefill's own (sampled) queries are fitted on (about 1.6x
    the prefill's time). Its salient tokens are whole sentences (`spans`), and every head spends all its slots
    besides the sinks and the last tokens on them (the context's last queries rank any slot left): a fact is
    read only where all the heads that read together hold it (benchmarks/NOTES.md, 2026-12-08). On the tune
    split: sentences in the retrieval heads' slots kept 0.44 of 0.59 at 8x where windows in every head kept
    0.28 (2026-12-07); sentences of up to 48 tokens instead of 32 took another tune set from 0.38 to 0.53 at 8x
    and 0.17 to 0.25 at 16x, and every head's slots on them (not only the retrieval heads') to 0.57 and 0.30
    (2026-12-08). am-hak keeps the windows: not re-tuned."""

    name: ClassVar[str] = "am-hak-fast"

    queries: QueryMode = "context"
    score_last: float = 1.0
    salient_unit: Literal["window", "sentence"] = "sentence"
    salient_frac: float = 1.0


@register
@dataclass
class AMOMP(AMMethod):
    """AM with orthogonal matching pursuit on the attention mass (weights up to e^3, drops beta < -7).
    Not re-tuned since the salient tokens and the whole-document reconstruction came in (salient_frac 0)."""

    name: ClassVar[str] = "am-omp"

    salient_frac: float = 0.0
    refit_values: bool = True
    k_choice: int = 1
    """Keys added per pursuit step."""
    refit_every: int = 1
    """Pursuit steps between refits of the weights."""
    upper: float = 3.0
    """Largest beta (log mass weight) of a kept key: e^3, HAK's bound (benchmarks/NOTES.md)."""
    drop_below: float = -7.0
    """Keys whose beta falls below this are dropped and replaced (at most 3 rounds)."""

    at_least_one: ClassVar[tuple[str, ...]] = (*AMMethod.at_least_one, "k_choice", "refit_every")

    def solve_head(self, K, V, Q, t, *, scale, validation=None, score_queries=None, key_scores=None,
                   keep=None) -> Solution:  # OMP picks its keys itself: no key_scores
        return omp(K, V, Q, t, scale=scale, sink=self.sink, recent=self.recent_tokens(t), k_choice=self.k_choice,
                   refit_every=self.refit_every, upper=self.upper, drop_below=self.drop_below,
                   refit_values=self.refit_values, ridge=self.ridge, holdout_every=self.holdout_every,
                   validation=validation, score_queries=score_queries, score_weight=self.score_last, keep=keep)


@register
@dataclass
class AMOMPFast(AMOMP):
    """AM-OMP selecting 4 keys per step and refitting the weights every 2 steps."""

    name: ClassVar[str] = "am-omp-fast"

    k_choice: int = 4
    refit_every: int = 2
