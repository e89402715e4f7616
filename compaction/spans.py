"""Where a document's facts are, as whole units: the tokens a compacted head keeps whatever attention says.

A question about a document asks for a fact (a name, a number, a code, a phrase) and names what it belongs
to. Both sit in one sentence, so the unit kept is the sentence (long ones cut into chunks of `max_unit`
tokens), not a window around one token. Units are ranked by their peak surprisal under the model's prefill
(the highest mean over a few tokens in a row): a fact is news to the model even where the sentence around it
repeats the form of an earlier one, so only its value is surprising and a mean over the sentence would hide
it.
Each unit taken removes itself from the ranking (suppression), so a budget holds many facts, one sentence
each, rather than the whole neighbourhood of the single most surprising one.

The chat template's tokens (the system prompt and the turn markers) are not document: they are never scored
and are kept by every head, since every later turn reads them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch

# A unit ends after a token whose text ends a sentence or a line.
_ENDS = (".", "!", "?", "\n", ";", ":")


def _ends_unit(tokenizer, token_id: int) -> bool:
    text = _decoder(tokenizer)(token_id)
    return "\n" in text or text.rstrip(" \"')]").endswith(_ENDS)


@lru_cache(maxsize=8)
def _decoder(tokenizer):
    @lru_cache(maxsize=None)
    def text(token_id: int) -> str:
        return tokenizer.decode([token_id])
    return text


def template_positions(ids: list[int], tokenizer, head_ids: list[int]) -> torch.Tensor:
    """Positions of the chat template's tokens in a context: the template head (`head_ids`, the system prompt
    and the first user marker) where the context starts with it, and every special token (a turn marker)
    with the role name and line break after it."""
    keep = set(range(len(head_ids))) if ids[:len(head_ids)] == list(head_ids) else set()
    special = set(tokenizer.all_special_ids)
    for i, tid in enumerate(ids):
        if tid in special:
            keep.update(range(i, min(i + 3, len(ids))))
    return torch.tensor(sorted(keep), dtype=torch.long)


def units(ids: list[int], tokenizer, max_unit: int, skip: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """[start, end) of each sentence or line of the document (ended by a full stop, question or exclamation
    mark, colon or semicolon before white space, or by a line break), cut into chunks of at most `max_unit`
    tokens; positions in `skip` (the template) belong to no unit."""
    skipped = set(skip.tolist()) if skip is not None else set()
    text = _decoder(tokenizer)
    out: list[tuple[int, int]] = []

    def close(start: int, end: int) -> None:
        blank = all(not text(t).strip() for t in ids[start:end])
        if blank and out and out[-1][1] == start and end - out[-1][0] <= max_unit:
            out[-1] = (out[-1][0], end)  # line breaks after a sentence belong to it
        else:
            out.append((start, end))

    start = None
    for i, tid in enumerate(ids):
        if i in skipped:
            if start is not None:
                close(start, i)
                start = None
            continue
        if start is None:
            start = i
        after = text(ids[i + 1]) if i + 1 < len(ids) else " "
        if (_ends_unit(tokenizer, tid) and after[:1].isspace()) or i + 1 - start >= max_unit:
            close(start, i + 1)
            start = None
    if start is not None:
        close(start, len(ids))
    return out


def _runs(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean surprisal of every run of `window` tokens in a row (a unit shorter than that: one run, its sum over
    `window`, so that a short unit is not favoured for its few tokens)."""
    if x.numel() <= window:
        return x.sum().view(1) / window
    return x.unfold(0, window, 1).mean(1)


UnitRank = Literal["peak", "mean", "peak+mean"]


def unit_order(nll: torch.Tensor, spans: list[tuple[int, int]], window: int = 4,
               rank: UnitRank = "peak") -> tuple[list[int], list[torch.Tensor]]:
    """The units, most surprising first, and each unit's run means (`_runs`). "peak": by the highest mean over
    `window` tokens in a row (a value is several surprising tokens, a number's digits or a name's pieces, where
    one rare word is one); "mean": by the unit's mean surprisal (a sentence out of place in its text is
    surprising throughout, where a value of a form seen before is surprising in one token); "peak+mean": the
    two orders taken in turn, each unit once."""
    x = nll.float().cpu()
    runs = [_runs(x[s:e], window) for s, e in spans]  # within each unit: no peak borrowed from a neighbour
    by_peak = torch.argsort(torch.stack([r.max() for r in runs]), descending=True, stable=True).tolist()
    if rank == "peak":
        return by_peak, runs
    by_mean = torch.argsort(torch.stack([x[s:e].mean() for s, e in spans]), descending=True, stable=True).tolist()
    if rank == "mean":
        return by_mean, runs
    if rank != "peak+mean":
        raise ValueError(f"unknown unit rank {rank!r}; choose one of peak, mean, peak+mean")
    return list(dict.fromkeys(u for pair in zip(by_peak, by_mean) for u in pair)), runs


def fact_spans(nll: torch.Tensor, spans: list[tuple[int, int]], count: int, window: int = 4,
               lead: float = 0.75, rank: UnitRank = "peak") -> torch.Tensor:
    """Up to `count` positions, most important first: the units in `unit_order`, each whole, with suppression
    (a unit is taken once). The last unit that does not fit whole keeps the tokens around its peak, `lead` of
    them before it (what a value belongs to is said before the value)."""
    count = max(0, count)
    if count == 0 or not spans:
        return torch.empty(0, dtype=torch.long)
    order, runs = unit_order(nll, spans, window, rank)
    out: list[torch.Tensor] = []
    left = count
    for u in order:
        s, e = spans[u]
        if e - s <= left:
            out.append(torch.arange(s, e))
            left -= e - s
        else:
            p = s + int(torch.argmax(runs[u])) + min(window, e - s) // 2  # the middle of the best run
            a = max(s, min(p - round(lead * (left - 1)), e - left))
            out.append(torch.arange(a, a + left))
            left = 0
        if left == 0:
            break
    return torch.cat(out)
