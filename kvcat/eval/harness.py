"""The evaluation harness: method-independent metrics over any `(lm, context_ids) -> CompactCache` function.

(a) `ppl_gap`: perplexity of a continuation given the full prefix (one uncached forward pass), the
    compressed prefix and no prefix; gap = compressed - full, averaged as every benchmark does
    (`metrics.ppl_gap`: the mean over windows of each window's gap).
(b) `retrieval`: needle / key-value accuracy, greedy generation over compressed context + question.
(c) `qa`: exact match, F1 and answer-contained over compressed contexts.
(d) `base_ppl`: uncompressed perplexity of held-out text (the model's base ability).

Everything runs through `kvcat.inference` (prefill, CacheSession, continuation_nll): no other inference path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from kvcat.cache import CompactCache
from kvcat.data.records import Example, TokenWindow
from kvcat.eval import metrics
from kvcat.eval.compressors import NamedCompressor
from kvcat.inference import CacheSession, ContextTooLongError, continuation_nll
from kvcat.models import LoadedModel
from kvcat.prompts import context_and_question

MAX_NEW_TOKENS = {"needle": 24, "kv": 48, "hotpotqa": 32, "squad": 32}


# ---- result types -----------------------------------------------------------------------------------


@dataclass
class PPLResult:
    """(a) Continuation perplexity with the full, the compressed and no prefix (each the mean over windows of
    the window's perplexity); gap = compressed - full (`metrics.ppl_gap`)."""

    method: str
    ratio: float | None
    n: int
    prefix_tokens: int
    continuation_tokens: int
    full_ppl: float
    compressed_ppl: float
    no_context_ppl: float
    gap: float
    achieved_ratio: float | None  # mean N / live slots of the method's caches
    compress_s: float  # mean seconds per compression
    examples: list[dict] = field(default_factory=list)
    task: str = "ppl"


@dataclass
class RetrievalResult:
    """(b) Needle or key-value retrieval accuracy (the answer string appears in the greedy generation)."""

    task: str
    method: str
    ratio: float | None
    n: int
    accuracy: float
    recall: float  # mean fraction of the answer reproduced contiguously (metrics.recalled)
    achieved_ratio: float | None
    compress_s: float
    examples: list[dict] = field(default_factory=list)


@dataclass
class QAResult:
    """(c) Question answering over a compressed context."""

    task: str
    method: str
    ratio: float | None
    n: int
    exact_match: float
    f1: float
    contains: float
    achieved_ratio: float | None
    compress_s: float
    examples: list[dict] = field(default_factory=list)


@dataclass
class BasePPLResult:
    """(d) Uncompressed perplexity over held-out windows: the model's base language-modelling ability."""

    n: int
    tokens: int
    ppl: float
    examples: list[dict] = field(default_factory=list)
    task: str = "base_ppl"
    method: str = "uncompressed"


Result = PPLResult | RetrievalResult | QAResult | BasePPLResult


def result_to_dict(result: Result) -> dict:
    return {"kind": type(result).__name__, **asdict(result)}


# ---- helpers ----------------------------------------------------------------------------------------


def _bar(items, desc: str, progress: bool):
    return tqdm(items, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


def _compress(lm: LoadedModel, comp: NamedCompressor, context_ids: list[int]) -> tuple[CompactCache | None, float]:
    start = time.perf_counter()
    cache = comp.fn(lm, list(context_ids))
    return cache, time.perf_counter() - start


def _ratio_of(caches_ratios: list[float]) -> float | None:
    return sum(caches_ratios) / len(caches_ratios) if caches_ratios else None


def check_fits(lm: LoadedModel, num_tokens: int, what: str) -> None:
    """Refuse inputs longer than the model's context, stating both lengths."""
    if num_tokens > lm.spec.max_positions:
        raise ContextTooLongError(num_tokens, lm.spec.max_positions, what)


# ---- (a) compressed-prefix continuation perplexity --------------------------------------------------


def full_prefix_nll(lm: LoadedModel, window: TokenWindow) -> torch.Tensor:
    """NLL of continuation[1:] given the whole prefix: one uncached forward pass over prefix + continuation
    (independent of any cache, so the identity compression's gap measures the cache path itself)."""
    ids = list(window.prefix_ids) + list(window.continuation_ids)
    check_fits(lm, len(ids), "prefix plus continuation")
    logits = CacheSession(lm, None).forward(ids)
    p = len(window.prefix_ids)
    target = torch.as_tensor(ids[p + 1:], device=logits.device)
    return torch.nn.functional.cross_entropy(logits[p:-1], target, reduction="none")


def ppl_gap(lm: LoadedModel, compressors: Sequence[NamedCompressor], windows: Sequence[TokenWindow],
            progress: bool = True) -> list[PPLResult]:
    """(a) for each compressor; the full- and no-prefix references are computed once per window."""
    if not windows:
        raise ValueError("no windows to evaluate")
    full_nll, none_nll = [], []
    for w in _bar(windows, "ppl: references", progress):
        full_nll.append(metrics.window_nll(full_prefix_nll(lm, w)))
        none_nll.append(metrics.window_nll(continuation_nll(lm, None, list(w.continuation_ids))))
    full_ppl, none_ppl = metrics.mean_ppl(full_nll), metrics.mean_ppl(none_nll)
    out = []
    for comp in compressors:
        nlls, ratios, secs, rows = [], [], [], []
        for w, f, z in zip(_bar(windows, f"ppl: {comp.label}", progress), full_nll, none_nll):
            cache, sec = _compress(lm, comp, list(w.prefix_ids))
            nlls.append(metrics.window_nll(continuation_nll(lm, cache, list(w.continuation_ids))))
            secs.append(sec)
            if cache is not None:
                ratios.append(cache.ratio)
            rows.append({"document_id": w.document_id, "start": w.start, "full_ppl": metrics.ppl(*f),
                         "compressed_ppl": metrics.ppl(*nlls[-1]), "no_context_ppl": metrics.ppl(*z),
                         "ratio": cache.ratio if cache is not None else None, "compress_s": sec})
        out.append(PPLResult(method=comp.label, ratio=comp.ratio, n=len(windows),
                             prefix_tokens=len(windows[0].prefix_ids),
                             continuation_tokens=len(windows[0].continuation_ids), full_ppl=full_ppl,
                             compressed_ppl=metrics.mean_ppl(nlls), no_context_ppl=none_ppl,
                             gap=metrics.ppl_gap(nlls, full_nll), achieved_ratio=_ratio_of(ratios),
                             compress_s=sum(secs) / len(secs), examples=rows))
    return out


# ---- (b, c) generation over a compressed context ------------------------------------------------------


def answer(lm: LoadedModel, comp: NamedCompressor, example: Example, max_new_tokens: int,
           cache: CompactCache | None = None) -> tuple[str, CompactCache | None, float]:
    """Greedy answer to `example.question` over the compressed `example.document` (or no document when the
    compressor returns None). Returns (text, cache, compression seconds)."""
    tok = lm.tokenizer
    prompt = context_and_question(tok, example.document, example.question)
    check_fits(lm, len(prompt.ids) + max_new_tokens, "document plus question and answer")
    sec = 0.0
    if cache is None:
        cache, sec = _compress(lm, comp, prompt.context_ids)
    if cache is None:  # no context: the same question with an empty document
        ids = context_and_question(tok, "", example.question).ids
        out = CacheSession(lm, None).generate(ids, max_new_tokens=max_new_tokens)
    else:
        out = CacheSession(lm, cache).generate(prompt.question_ids, max_new_tokens=max_new_tokens)
    return tok.decode(out, skip_special_tokens=True).strip(), cache, sec


def _generate_all(lm, compressors, examples, task, max_new_tokens, progress):
    if not examples:
        raise ValueError(f"no {task} examples to evaluate")
    max_new = max_new_tokens or MAX_NEW_TOKENS.get(task, 32)
    for comp in compressors:
        rows, ratios, secs = [], [], []
        for ex in _bar(examples, f"{task}: {comp.label}", progress):
            text, cache, sec = answer(lm, comp, ex, max_new)
            secs.append(sec)
            if cache is not None:
                ratios.append(cache.ratio)
            rows.append({"id": ex.id, "prediction": text, "answers": list(ex.answers),
                         "ratio": cache.ratio if cache is not None else None, "compress_s": sec,
                         **{k: ex.metadata[k] for k in ("depth", "length", "num_pairs") if k in ex.metadata}})
        yield comp, rows, _ratio_of(ratios), sum(secs) / len(secs)


def _score(rows: list[dict], scorers: dict) -> dict[str, float]:
    """Each row's score under every metric (stored in the row), and each metric's mean over the rows."""
    for r in rows:
        for name, metric in scorers.items():
            r[name] = metric(r["prediction"], r["answers"])
    return {name: sum(r[name] for r in rows) / len(rows) for name in scorers}


def retrieval(lm: LoadedModel, compressors: Sequence[NamedCompressor], examples: Sequence[Example],
              progress: bool = True, max_new_tokens: int | None = None) -> list[RetrievalResult]:
    """(b) accuracy on needle or key-value examples (all of one task)."""
    task = examples[0].task if examples else "retrieval"
    out = []
    for comp, rows, ratio, sec in _generate_all(lm, compressors, examples, task, max_new_tokens, progress):
        means = _score(rows, {"correct": metrics.retrieved, "recall": metrics.recalled})
        out.append(RetrievalResult(task=task, method=comp.label, ratio=comp.ratio, n=len(rows),
                                   accuracy=means["correct"], recall=means["recall"], achieved_ratio=ratio,
                                   compress_s=sec, examples=rows))
    return out


def qa(lm: LoadedModel, compressors: Sequence[NamedCompressor], examples: Sequence[Example],
       progress: bool = True, max_new_tokens: int | None = None) -> list[QAResult]:
    """(c) exact match, F1 and answer-contained on QA examples (all of one task)."""
    task = examples[0].task if examples else "qa"
    out = []
    for comp, rows, ratio, sec in _generate_all(lm, compressors, examples, task, max_new_tokens, progress):
        means = _score(rows, {"exact_match": metrics.exact_match, "f1": metrics.f1, "contains": metrics.contains})
        out.append(QAResult(task=task, method=comp.label, ratio=comp.ratio, n=len(rows), **means,
                            achieved_ratio=ratio, compress_s=sec, examples=rows))
    return out


# ---- (d) uncompressed perplexity ---------------------------------------------------------------------


def base_ppl(lm: LoadedModel, windows: Sequence[TokenWindow], progress: bool = True) -> BasePPLResult:
    """(d) plain perplexity of each window (prefix + continuation) with no compression anywhere."""
    total, tokens, rows = 0.0, 0, []
    for w in _bar(windows, "base ppl", progress):
        ids = list(w.prefix_ids) + list(w.continuation_ids)
        check_fits(lm, len(ids), "text window")
        nll = continuation_nll(lm, None, ids)
        total += float(nll.sum())
        tokens += len(nll)
        rows.append({"document_id": w.document_id, "start": w.start, "ppl": math.exp(float(nll.mean()))})
    return BasePPLResult(n=len(windows), tokens=tokens, ppl=metrics.ppl(total, tokens), examples=rows)
