"""Paired statistics for comparing two systems on the same cases and windows."""

from __future__ import annotations

import math


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value for `wins` against `losses` (ties left out): on paired right/wrong
    outcomes, the exact McNemar test."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def mcnemar(a: list, b: list) -> dict:
    """Cases only `a` gets right, only `b` gets right, and the exact McNemar p-value."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes must be the same cases: {len(a)} against {len(b)}")
    only_a = sum(bool(x) and not bool(y) for x, y in zip(a, b))
    only_b = sum(bool(y) and not bool(x) for x, y in zip(a, b))
    return {"only_a": only_a, "only_b": only_b, "p": round(sign_test(only_a, only_b), 4)}


def paired_mean_ci(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """Mean of a - b over paired samples with its Student-t confidence interval."""
    from scipy import stats

    if len(a) != len(b) or len(a) < 2:
        raise ValueError("a paired interval needs the same two or more samples on both sides")
    d = [x - y for x, y in zip(a, b)]
    n, mean = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": round(mean, 4), "low": round(mean - half, 4), "high": round(mean + half, 4), "n": n,
            "level": level}
