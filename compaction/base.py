"""The compaction method interface: one dataclass per method, its parameters typed fields with defaults.

    method = AMHAK(queries="repeat")                           # or get_method("am-hak", queries="repeat")
    cache = method.compact(lm, context_ids, ratio=10)          # or target_tokens=...
    fn = method.compressor(10); cache = fn(lm, context_ids)    # a "prefix -> cache" function for eval

A method sees the document's memoized state (prefill K/V and reference queries, see `queries.document_state`)
and per-head budgets, and returns one `Solution` (C_k, beta, C_v, indices) per layer and KV head; this module
checks the input and the parameters (their annotations: types and Literal choices), pads heads with different
counts (beta = -inf) and packages a `CompactCache`. Budgets: t = round(N / ratio) slots per head on average
(`slots_per_head`); a method may spread them unevenly across heads (the mean stays t). The name registry that
the CLI, the server and the benchmarks use is `registry.py`; how to add a method: docs/compaction-methods.md.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import Field, dataclass, fields, replace
from functools import cache
from types import UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import torch

from kvcat.cache import CompactCache, SideHeads
from kvcat.inference import ContextTooLongError
from kvcat.models import LoadedModel

from .document import DocumentState
from .fit import Solution
from .queries import document_state, get_queries

Progress = Callable[[int, int], None]  # (layers done, layers total)


class CompactionError(ValueError):
    """Bad input to a compaction: ratio, budget, empty or too long document, unknown method or parameter."""


# --------------------------------------------------------------------------------------------------
# Input checks


def slots_per_head(num_tokens: int, ratio: float | None = None, target_tokens: int | None = None) -> int:
    """Average slots per head for an N-token context: round(N / ratio), or target_tokens. Must be in [1, N).
    The one place a ratio becomes a budget: the methods, the CLI and the server call it."""
    if (ratio is None) == (target_tokens is None):
        raise CompactionError("give exactly one of ratio and target_tokens")
    if ratio is not None:
        try:
            ratio = float(ratio)
        except (TypeError, ValueError):
            raise CompactionError(f"ratio must be a number, got {ratio!r}") from None
        if not ratio > 1.0 or ratio != ratio or ratio == float("inf"):
            raise CompactionError(f"ratio must be a finite number above 1 (N / kept slots), got {ratio}")
        t = max(1, int(round(num_tokens / ratio)))
    else:
        if isinstance(target_tokens, bool) or int(target_tokens) != target_tokens or target_tokens < 1:
            raise CompactionError(f"target_tokens must be a positive integer, got {target_tokens!r}")
        t = int(target_tokens)
    if t >= num_tokens:
        raise CompactionError(f"a budget of {t} slots per head does not compact a {num_tokens}-token "
                              "document; use a smaller budget or a larger ratio")
    return t


def as_context_ids(lm: LoadedModel, context_ids) -> torch.Tensor:
    """Token ids as a 1-D long tensor (CPU), checked against the model's vocabulary and context window."""
    if isinstance(context_ids, str):
        raise CompactionError("compact() takes token ids; tokenize the text first")
    ids = torch.as_tensor(context_ids, dtype=torch.long).flatten().cpu() if not isinstance(
        context_ids, torch.Tensor) else context_ids.detach().long().flatten().cpu()
    if ids.numel() == 0:
        raise CompactionError("the document is empty: nothing to compact")
    if ids.numel() < 2:
        raise CompactionError("the document has a single token: nothing to compact")
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise CompactionError(f"token ids must lie in [0, {vocab}) for this model")
    if ids.numel() > lm.spec.max_positions:
        raise ContextTooLongError(ids.numel(), lm.spec.max_positions)
    return ids


def attention_scale(lm: LoadedModel) -> float:
    try:
        return float(lm.model.model.layers[0].self_attn.scaling)
    except AttributeError:
        return lm.spec.head_dim ** -0.5


def group_queries(q: torch.Tensor, num_kv_heads: int, max_queries: int | None = None,
                  seed: int = 0) -> list[torch.Tensor]:
    """[num_heads, n, d] -> per KV head [g * n', d]: the queries of its group, at most `max_queries`."""
    heads, n, d = q.shape
    g = heads // num_kv_heads
    out = []
    gen = torch.Generator().manual_seed(seed)
    for h in range(num_kv_heads):
        qh = q[h * g:(h + 1) * g].reshape(g * n, d)
        if max_queries is not None and qh.shape[0] > max_queries:
            pick = torch.randperm(qh.shape[0], generator=gen)[:max_queries].sort().values
            qh = qh[pick.to(qh.device)]
        out.append(qh)
    return out


def uniform_budgets(num_layers: int, num_kv_heads: int, t: int) -> torch.Tensor:
    return torch.full((num_layers, num_kv_heads), t, dtype=torch.long)


def pad_layer(layer: Sequence[Solution], width: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's per-head Solutions as (keys [H, w, d], values [H, w, d], beta [H, w]) in float32, heads
    with fewer slots padded with beta = -inf (a slot attention never sees)."""
    width = width or max(len(s.indices) for s in layer)
    d, dev = layer[0].keys.shape[1], layer[0].keys.device
    k = torch.zeros(len(layer), width, d, device=dev)
    v = torch.zeros(len(layer), width, d, device=dev)
    b = torch.full((len(layer), width), float("-inf"), device=dev)
    for h, s in enumerate(layer):
        m = len(s.indices)
        k[h, :m], v[h, :m], b[h, :m] = s.keys.float(), s.values.float(), s.beta.float()
    return k, v, b


def fit_stats(solutions: Sequence[Sequence[Solution]]) -> dict:
    """How many heads carry a fit, in all and per layer: a non-zero beta, least-squares values, or fits skipped
    for too few reference queries (the head then holds plain eviction values)."""
    def count(test) -> list[int]:
        return [sum(bool(test(s)) for s in layer) for layer in solutions]

    per_layer = {"beta_fitted": count(lambda s: (s.beta != 0).any()), "values_refit": count(lambda s: s.values_refit),
                 "underdetermined": count(lambda s: s.underdetermined)}
    return {"heads": sum(len(layer) for layer in solutions), **{k: sum(v) for k, v in per_layer.items()},
            "per_layer": per_layer}


def split_layer(layer: Sequence[Solution], width: int) -> tuple[list[Solution], SideHeads | None]:
    """One layer's Solutions cut at `width` slots: the first `width` of every head (the paged part), and the
    rest of the heads that hold more as side slots (None where none does)."""
    def part(s: Solution, cut: slice) -> Solution:
        return replace(s, keys=s.keys[cut], values=s.values[cut], beta=s.beta[cut], indices=s.indices[cut])

    wide = [h for h, s in enumerate(layer) if len(s.indices) > width]
    paged = [part(s, slice(None, width)) for s in layer]
    if not wide:
        return paged, None
    k, v, b = pad_layer([part(layer[h], slice(width, None)) for h in wide])
    return paged, SideHeads(torch.tensor(wide, dtype=torch.long), k, v, b)


def package(solutions: Sequence[Sequence[Solution]], num_tokens: int, fingerprint: str, method: str,
            params: dict, info: dict, paged_width: int | None = None) -> CompactCache:
    """Per layer, per head Solutions -> CompactCache, padding shorter heads with beta = -inf. Heads with more
    than `paged_width` slots (retrieval heads kept whole) keep the rest as side slots: a hybrid cache."""
    widest = max(len(s.indices) for layer in solutions for s in layer)
    width = min(paged_width or widest, widest)
    split = [split_layer(layer, width) for layer in solutions]
    keys, values, betas = zip(*(pad_layer(paged, width) for paged, _ in split))
    side = [s for _, s in split]
    info = {**info, "fit": fit_stats(solutions)}
    return CompactCache(keys=list(keys), values=list(values), beta=list(betas), num_tokens=num_tokens,
                        model_fingerprint=fingerprint, method=method, params=params, info=info,
                        side=side if any(s is not None for s in side) else [])


# --------------------------------------------------------------------------------------------------
# Parameters: the dataclass fields of a method


@cache
def parameters(cls: type) -> tuple[Field, ...]:
    """A method class's parameters: its dataclass fields set by the constructor, in declaration order."""
    return tuple(f for f in fields(cls) if f.init)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _conforms(hint: Any, value: Any) -> bool:
    """Whether a parameter value has its annotated type (ints pass for floats, lists for tuples)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (Union, UnionType):
        return any(_conforms(a, value) for a in args)
    if origin is tuple:
        return isinstance(value, (tuple, list)) and len(value) == len(args) and all(map(_conforms, args, value))
    if hint is type(None):
        return value is None
    if isinstance(value, bool) or hint is bool:
        return hint is bool and isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def check_parameter(method: type[Method], f: Field, value: Any) -> None:
    """Refuse a value of the wrong type, outside its Literal choices, or negative where the default is not
    (below 1 for the names in `at_least_one`), naming the parameter."""
    hint = _hints(method)[f.name]
    if not _conforms(hint, value):
        if get_origin(hint) is Literal:
            raise CompactionError(f"parameter {f.name!r} of {method.name!r} is one of "
                                  f"{', '.join(map(str, get_args(hint)))}; got {value!r}")
        raise CompactionError(f"parameter {f.name!r} of {method.name!r} should be like {f.default!r}, got {value!r}")
    default, low = f.default, 1 if f.name in method.at_least_one else 0
    if isinstance(default, (int, float)) and not isinstance(default, bool) and default >= 0 and (
            not value >= low or value == float("inf")):
        raise CompactionError(f"parameter {f.name!r} of {method.name!r} must be a finite number >= {low}, "
                              f"got {value!r}")


# --------------------------------------------------------------------------------------------------
# The interface


@dataclass
class Method(ABC):
    """One compaction method. Subclasses are dataclasses: they set `name`, declare their parameters as typed
    fields with defaults (checked on construction) and implement `solve_layers`."""

    name: ClassVar[str] = ""
    at_least_one: ClassVar[tuple[str, ...]] = ()  # numeric parameters that must be >= 1 (the others >= 0)

    def __post_init__(self) -> None:
        for f in parameters(type(self)):
            check_parameter(type(self), f, getattr(self, f.name))

    @property
    def params(self) -> dict[str, Any]:
        """Every parameter by name: recorded in the cache, part of memo keys and of on-the-fly context ids."""
        return {f.name: getattr(self, f.name) for f in parameters(type(self))}

    # ---- what a subclass provides ---------------------------------------------------------------------
    @property
    def query_mode(self) -> str | None:
        """Which reference queries the method needs beyond the prefill: its `queries` parameter, where it has
        one (None: only K/V and context queries)."""
        return getattr(self, "queries", None)

    @property
    def streams_queries(self) -> bool:
        """Whether `solve_layers` computes its reference queries itself, one layer at a time."""
        return False

    @property
    def needs_token_nll(self) -> bool:
        """Whether the method reads each document token's surprisal (`Prefill.token_nll`)."""
        return False

    @property
    def needs_context_sample(self) -> bool:
        """Whether the method reads the context's own queries across the whole document (not only the last)."""
        return "context" in (self.query_mode or "")

    def prepare_model(self, lm: LoadedModel) -> None:
        """Load (or measure, once per model, then store) what the method reads about the model itself rather than
        the document, such as a head profile; a server calls it at start so no request waits for it."""

    def prepare(self, lm: LoadedModel, state: DocumentState) -> None:
        """Compute what the method reads from the document beyond its prefill, memoized in `state` (reference
        queries; a method may add more). Runs before a compaction's clock starts: `input_seconds` charges it
        to every compaction that reads it, computed now or earlier for another ratio or method."""
        if self.query_mode and not self.streams_queries:
            get_queries(lm, state, self.query_mode)

    def input_seconds(self, state: DocumentState) -> float:
        """Seconds spent on `prepare`'s inputs (and on streamed queries) for this document."""
        return state.query_s.get(self.query_mode, 0.0) if self.query_mode else 0.0

    def head_budgets(self, lm: LoadedModel, state: DocumentState, t: int) -> torch.Tensor:
        """[num_layers, num_kv_heads] slots per head; mean t. Uniform unless overridden."""
        return uniform_budgets(lm.spec.num_layers, lm.spec.num_kv_heads, t)

    def paged_width(self, budgets: torch.Tensor, num_tokens: int) -> int:
        """Slots every head keeps in a paged engine's blocks: the widest head's (the others padded); a hybrid
        method keeps fewer, the wider heads' further slots then side slots (`package`)."""
        return int(budgets.max())

    @abstractmethod
    def solve_layers(self, lm: LoadedModel, state: DocumentState, budgets: torch.Tensor,
                     progress: Progress | None) -> list[list[Solution]]:
        """Per layer, per KV head Solutions with len(indices) == budgets[l, h] (or fewer)."""

    # ---- the public entry points ----------------------------------------------------------------------
    def compact(self, lm: LoadedModel, context_ids, ratio: float | None = None,
                target_tokens: int | None = None, progress: Progress | None = None) -> CompactCache:
        """Compact one document (token ids) to about N / ratio (or target_tokens) slots per head."""
        ids = as_context_ids(lm, context_ids)
        t = slots_per_head(ids.numel(), ratio, target_tokens)
        state = document_state(lm, ids, context_sample=self.needs_context_sample, token_nll=self.needs_token_nll)
        return self.compact_state(lm, state, t, ratio=ratio, target_tokens=target_tokens,
                                  progress=progress)

    def compact_state(self, lm: LoadedModel, state: DocumentState, t: int, ratio: float | None = None,
                      target_tokens: int | None = None, progress: Progress | None = None) -> CompactCache:
        """Compact a document whose state (K/V, queries) is already computed to t slots per head on average
        (also the block of new tokens in incremental compaction, `incremental.extend`)."""
        self.prepare(lm, state)
        start = time.perf_counter()
        budgets = self.head_budgets(lm, state, t)
        solutions = self.solve_layers(lm, state, budgets, progress)
        # a streaming method records its queries' seconds while solving; memoized inputs are charged as well
        extra_s = self.input_seconds(state)
        solve_s = time.perf_counter() - start - (state.streamed_s if self.streams_queries else 0.0)
        info = {"prefill_s": round(state.prefill_s, 4), "queries_s": round(extra_s, 4),
                "solve_s": round(solve_s, 4), "compact_s": round(state.prefill_s + extra_s + solve_s, 4),
                "budget": t}
        params = {**{k: v for k, v in self.params.items() if _jsonable(v)},
                  "ratio": ratio, "target_tokens": target_tokens}
        return package(solutions, state.num_tokens, lm.spec.fingerprint, self.name, params, info,
                       paged_width=self.paged_width(budgets, state.num_tokens))

    def compressor(self, ratio: float) -> Callable[[LoadedModel, Any], CompactCache]:
        """A `(lm, context_ids) -> CompactCache` function at a fixed ratio, for the evaluation harness."""
        def compress(lm: LoadedModel, context_ids) -> CompactCache:
            return self.compact(lm, context_ids, ratio=ratio)

        compress.__name__ = f"{self.name}@{ratio:g}x"
        return compress


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, (list, tuple)) and all(_jsonable(x) for x in v))
