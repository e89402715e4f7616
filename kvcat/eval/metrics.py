"""Scoring: SQuAD-style exact match and token F1, answer containment, retrieval hits and recall, and the
continuation perplexity gap every evaluation and benchmark reports (`ppl_gap`)."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize(text: str, punctuation: str = "") -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD evaluation's normalization); with
    `punctuation=" "` a punctuation mark is a word break instead ("KT-482" is "kt 482")."""
    text = "".join(punctuation if ch in _PUNCT else ch for ch in text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_line(prediction: str) -> str:
    """The answer part of a generation: its first non-empty line."""
    for line in prediction.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(prediction: str, answers) -> float:
    pred = normalize(first_line(prediction))
    return float(any(pred == normalize(a) for a in answers))


def token_f1(pred: str, gold: str) -> float:
    """SQuAD's token F1 of two whole strings (normalized; 1 when both are empty)."""
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers) -> float:
    pred = first_line(prediction)
    return max((token_f1(pred, a) for a in answers), default=0.0)


def contains(prediction: str, answers, punctuation: str = "") -> float:
    """1 when a (normalized) gold answer appears as whole words in the (normalized) generation."""
    pred = f" {normalize(prediction, punctuation)} "
    return float(any(gold and f" {gold} " in pred for gold in (normalize(a, punctuation) for a in answers)))


def _fold(text: str) -> str:
    return " ".join(text.lower().split())


def retrieved(prediction: str, answers) -> float:
    """Retrieval hit: the answer string (a number, a UUID, a name) appears in the generation, case and runs of
    white space folded ("Northern\nStar" is "Northern Star")."""
    pred = _fold(prediction)
    return float(any(_fold(a) and _fold(a) in pred for a in answers))


def answered(prediction: str, answers) -> float:
    """The suite's score: a gold answer appears in the generation as whole words, case, white space, punctuation
    and articles folded; "1234" is not found in "12345", "Anna Berg" is found in "Anna Berg's shop"."""
    return contains(prediction, answers, punctuation=" ")


def recalled(prediction: str, answers) -> float:
    """Partial retrieval credit: the longest run of an answer's characters reproduced contiguously in the
    generation, as a fraction of the answer's length (1.0 for an exact hit; small models often get part of a
    long value right, which exact hits cannot tell from a guess)."""
    from difflib import SequenceMatcher

    pred = prediction.lower()
    best = 0.0
    for a in answers:
        a = a.lower()
        if a:
            m = SequenceMatcher(None, pred, a, autojunk=False).find_longest_match(0, len(pred), 0, len(a))
            best = max(best, m.size / len(a))
    return best


def ppl(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / tokens) if tokens else float("nan")


def window_nll(nll) -> tuple[float, int]:
    """(sum, token count) of one window's per-token NLL tensor: the pair `mean_ppl` and `ppl_gap` take (JSON
    keeps it as a two-item list, which they take too)."""
    return float(nll.sum()), int(nll.numel())


def mean_ppl(windows: Sequence[Sequence[float]]) -> float:
    """Mean over windows of each window's perplexity exp(sum NLL / tokens), from (sum NLL, tokens) pairs."""
    if not windows:
        raise ValueError("no windows")
    return sum(ppl(total, tokens) for total, tokens in windows) / len(windows)


def ppl_gap(compacted: Sequence[Sequence[float]], full: Sequence[Sequence[float]]) -> float:
    """The continuation perplexity gap: compacted-prefix minus full-prefix perplexity, the MEAN OVER WINDOWS OF
    EACH WINDOW'S GAP (`compacted[i]` and `full[i]`: (sum NLL, tokens) of window i's continuation).

    Per-window rather than pooled over all tokens: every window (document) weighs the same and the benchmarks'
    published gaps keep their meaning. Being linear, it equals mean_ppl(compacted) - mean_ppl(full), so the
    perplexities reported beside it add up."""
    if len(compacted) != len(full):
        raise ValueError(f"{len(compacted)} compacted windows against {len(full)} full ones: pair the same windows")
    return mean_ppl(compacted) - mean_ppl(full)
