"""Attention Matching methods for a whole model: AM-HAK, AM-HAK-fast, AM-OMP and AM-OMP-fast.

Each wraps a per-head solver from `solvers.py`: for every layer and KV head, the head's keys/values and the
reference queries of its GQA group (a deterministic subsample: `max_queries`, or the 4 per slot a fit needs
where that is more) go in, one Solution (C_k, beta, C_v) comes out.

What a compacted cache keeps is decided by two things a later question cannot tell us in advance:
- reference queries (`queries`): "repeat" reconstructs the whole document chunk by chunk
  (`queries.Reconstruction`, run one layer at a time), and every copy query scores the keys
  (`attention.KeyScores`: max or RMS attention weight) while a sample of them is fitted on;
- salient tokens (`salient_frac` of every head's budget): the document's least predictable spans
  (`solvers.salient_tokens`), where planted facts, names and numbers sit. Keys ranked by attention alone
  drop them at 8x: every token of a copy gets the same attention from its copy query. The surprisal is
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

import torch

from kvcat.heap import release_free_memory
from kvcat.models import LoadedModel

from . import budgets as budgets_mod
from .base import Method, Progress, attention_scale, group_queries, pad_layer, register
from .eviction import global_counts
from .queries import QUERY_MODES, DocumentState, LayerQueries, get_queries
from .solvers import FIT_MIN_QUERIES_PER_SLOT, SOLVERS, Solution, salient_tokens

log = logging.getLogger(__name__)

# Shared by every AM method; see benchmarks/NOTES.md for the tune-split figures behind each value.
COMMON = {"queries": "repeat", "budgets": "uniform", "max_queries": 4096, "sink": 4, "recent": 16,
          "recent_frac": 0.0, "on_policy": False, "select_on": "last", "salient_frac": 0.5, "salient_window": 32,
          "salient_context": 0}


class AMMethod(Method):
    solver: str = ""
    choices = {"queries": tuple(QUERY_MODES), "budgets": ("uniform", "nonuniform", "global"),
               "score": ("rms", "mean", "max"), "select_on": ("last", "holdout")}

    def head_budgets(self, lm: LoadedModel, state: DocumentState, t: int) -> torch.Tensor:
        if self.params["budgets"] == "global":  # KVzip's allocation: one top-k over every head's key scores
            get_queries(lm, state, "repeat")  # records the reconstruction's key scores (all layers at once)
            L, H = lm.spec.num_layers, lm.spec.num_kv_heads
            if ("reconstruction", 0) in state.scores:
                scores = torch.stack([state.scores[("reconstruction", i)].per_kv_head(H, "max") for i in range(L)])
                return global_counts(scores, t * L * H)
        return budgets_mod.head_budgets(lm, state.num_tokens, t, self.params["budgets"])

    @property
    def streams_queries(self) -> bool:
        return True  # solve_layers takes its reference queries one layer at a time (LayerQueries)

    @property
    def local_context(self) -> int:
        """The context of the local surprisal the salient spans read (0: none, the prefill's is read)."""
        return self.params["salient_context"] if self.params["salient_frac"] > 0 else 0

    @property
    def needs_token_nll(self) -> bool:
        return self.params["salient_frac"] > 0 and self.local_context == 0

    def prepare(self, lm: LoadedModel, state: DocumentState) -> None:
        super().prepare(lm, state)
        if self.local_context:
            state.local_surprisal(lm, self.local_context)

    def input_seconds(self, state: DocumentState) -> float:
        return super().input_seconds(state) + state.surprisal_s.get(self.local_context, 0.0)

    def salient(self, state: DocumentState, t: int, memo: dict) -> torch.Tensor | None:
        """The document's salient tokens a head of budget t keeps (salient_frac of t; see
        `solvers.salient_tokens`), computed once per budget. The surprisal is the prefill's (given the whole
        prefix) with salient_context 0, else given only that many tokens before each token."""
        count = round(self.params["salient_frac"] * t)
        nll = state.surprisal.get(self.local_context) if self.local_context else state.prefill.token_nll
        if count == 0 or nll is None:
            return None
        if count not in memo:
            memo[count] = salient_tokens(nll, count, self.params["salient_window"])
        return memo[count]

    def solver_kwargs(self) -> dict:
        skip = set(COMMON) | {"queries", "score_last"}
        extra = {"score_weight": self.params["score_last"]} if "score_last" in self.params else {}
        return {k: v for k, v in self.params.items() if k not in skip} | extra | {"sink": self.params["sink"]}

    def wants_last(self) -> bool:
        return self.params["select_on"] == "last" or self.params.get("score_last", 0) > 0

    def key_scores(self, source: LayerQueries, layer: int, num_kv_heads: int) -> torch.Tensor | None:
        """[num_kv_heads, N] key ranks recorded by every reconstruction query, for solvers that rank keys by
        attention (HAK); None where the solver picks keys itself (OMP) or the mode has no reconstruction."""
        return None

    def solve_layers(self, lm: LoadedModel, state: DocumentState, budgets: torch.Tensor,
                     progress: Progress | None) -> list[list[Solution]]:
        solve = SOLVERS[self.solver]
        scale = attention_scale(lm)
        source = LayerQueries(lm, state, self.params["queries"])
        last = get_queries(lm, state, "last") if self.wants_last() else None
        on_last = self.params["select_on"] == "last"
        out: list[list[Solution]] = []
        salient: dict[int, torch.Tensor] = {}
        for layer in range(lm.spec.num_layers):
            q = source(layer)
            K, V = state.prefill.keys[layer], state.prefill.values[layer]
            lq = group_queries(last[layer], lm.spec.num_kv_heads) if last is not None else [None] * len(K)
            heads = []
            ks = self.key_scores(source, layer, lm.spec.num_kv_heads)
            # the fitted sample: max_queries, raised to the FIT_MIN_QUERIES_PER_SLOT a fit needs wherever the
            # document has that many (else a long document at a low ratio silently kept eviction values)
            cap = max(self.params["max_queries"], FIT_MIN_QUERIES_PER_SLOT * int(budgets[layer].max()))
            for h, qh in enumerate(group_queries(q, lm.spec.num_kv_heads, cap)):
                score = {"score_queries": lq[h]} if "score_last" in self.params else {}
                if ks is not None:
                    score["key_scores"] = ks[h]
                t = int(budgets[layer, h])
                recent = max(self.params["recent"], round(self.params["recent_frac"] * t))
                heads.append(solve(K[h], V[h], qh, t, scale=scale, validation=lq[h] if on_last else None,
                                   **score, **self.solver_kwargs(), recent=recent,
                                   keep=self.salient(state, t, salient)))
            out.append(heads)
            source.advance(pad_layer(heads) if self.params["on_policy"] else None)
            release_free_memory()  # the layer's solve buffers (else the heap creeps: +100 MB over 30 layers)
            if progress:
                progress(layer + 1, lm.spec.num_layers)
        state.query_s[self.params["queries"]] = source.seconds  # charged to this compaction (compact_state)
        state.streamed_s = source.stream.seconds if source.stream is not None else 0.0  # ... and run by it
        skipped = sum(s.underdetermined for layer in out for s in layer)
        if skipped:
            log.warning("%s: %d of %d heads kept eviction values: the document has fewer than %d reference "
                        "queries per slot (a shorter document or a higher ratio fits)", self.name, skipped,
                        sum(len(layer) for layer in out), FIT_MIN_QUERIES_PER_SLOT)
        return out


@register
class AMHAK(AMMethod):
    """AM with highest-attention keys: salient tokens, then the keys the reconstruction's copy queries attend
    to most (max weight), NNLS beta clamped to [e^-3, e^3] on a sample of those queries, values kept (a
    least-squares C_v with refit_values=True)."""

    name = "am-hak"
    solver = "hak"
    defaults = {**COMMON, "max_queries": 2048, "score": "max", "fit_beta": True, "beta_bounds": (-3.0, 3.0),
                "nnls_iters": 2, "refit_values": False, "ridge": 1e-6, "holdout_every": 5, "score_last": 0.0}

    def key_scores(self, source: LayerQueries, layer: int, num_kv_heads: int) -> torch.Tensor | None:
        rec = source.key_scores(layer)
        if rec is None or self.params["score"] == "mean":
            return None
        return rec.per_kv_head(num_kv_heads, self.params["score"])


@register
class AMHAKFast(AMHAK):
    """AM-HAK without the reconstruction pass: the prefill's own (sampled) queries are fitted on and the
    context's last queries rank the keys besides the salient tokens (about 1.6x the prefill's time)."""

    name = "am-hak-fast"
    defaults = {**AMHAK.defaults, "queries": "context", "score_last": 1.0}


@register
class AMOMP(AMMethod):
    """AM with orthogonal matching pursuit on the attention mass (weights up to e^3, drops beta < -7)."""

    name = "am-omp"
    solver = "omp"
    # weights at most e^3 ("upper"), as HAK's bound (benchmarks/NOTES.md). Not re-tuned since the salient
    # tokens and the whole-document reconstruction came in: it keeps its choice of every slot.
    defaults = {**COMMON, "salient_frac": 0.0, "k_choice": 1, "refit_every": 1, "upper": 3.0, "drop_below": -7.0,
                "refit_values": True, "ridge": 1e-6, "holdout_every": 5, "score_last": 0.0}


@register
class AMOMPFast(AMOMP):
    """AM-OMP selecting 4 keys per step and refitting the weights every 2 steps."""

    name = "am-omp-fast"
    solver = "omp"
    defaults = {**AMOMP.defaults, "k_choice": 4, "refit_every": 2}
