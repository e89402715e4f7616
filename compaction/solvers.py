"""Attention Matching per-head solvers on plain tensors: `(K, V, Q, t) -> Solution(C_k, beta, C_v, indices)`.

For one KV head with N cached keys K [N, d] and values V [N, d], and reference queries Q [n, d] (for GQA, the
queries of every query head of the group stacked), find t slots such that for the reference queries
  1. the attention mass  sum_i exp(q.k_i s)  is matched by  sum_j exp(q.C_k[j] s + beta[j]),
  2. the attention output  softmax(q K^T s) V  is matched by  softmax(q C_k^T s + beta) C_v,
with s = 1/sqrt(d) (or the model's scaling). Keys are a subset of the original keys:
  - HAK ("highest attention keys"): rank keys by the RMS over queries of their attention weight; keep the top t.
  - OMP: greedily add the key that most reduces the mass residual, refitting the weights after each step.
beta = log w with w >= 0 the (box-constrained) non-negative least-squares mass weights; C_v is a float32
least-squares fit, regularized towards the original values of the kept keys (ridge) so that ill-conditioned
heads fall back to plain eviction values instead of blowing up. Each head keeps the fit only where it beats
the plain variants on validation queries or held-out reference queries (the fits: `fit.py`).
Reference: Zweiger et al., "Fast KV Compaction via Attention Matching", arXiv 2602.16284.
"""

from __future__ import annotations

import math

import torch

from .fit import FIT_MIN_QUERIES_PER_SLOT, Solution, finish, fit_mass_weights, fit_plan, shifted_exp, spd_solve


def forced_indices(n: int, t: int, sink: int, recent: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The first `sink` and the last `recent` positions, capped so they never fill more than half of t,
    and the positions in `keep` (salient tokens, at most t in all)."""
    sink = min(sink, t // 2, n)
    recent = min(recent, max(t // 2 - sink, 0), n - sink)
    idx = torch.tensor(sorted(set(range(sink)) | set(range(n - recent, n))), dtype=torch.long)
    if keep is not None and keep.numel():
        idx = torch.cat([idx, keep.cpu().long()[~torch.isin(keep.cpu().long(), idx)]])[:t].sort().values
    return idx


def salient_tokens(token_nll: torch.Tensor, count: int, window: int = 32) -> torch.Tensor:
    """The `count` positions whose surrounding span (+-window/2 tokens) is least predictable to the model:
    mean surprisal over the span, highest first. Facts planted in text, names and numbers sit in such
    spans; a question about the document most often asks for them, and the model cannot rebuild them
    from the rest of the text once they are evicted."""
    n = token_nll.numel()
    count = max(0, min(count, n))
    if count == 0:
        return torch.empty(0, dtype=torch.long)
    x = token_nll.float().cpu()[None, None]
    span = torch.nn.functional.avg_pool1d(x, 2 * (window // 2) + 1, stride=1, padding=window // 2,
                                          count_include_pad=False)[0, 0, :n]
    return torch.topk(span, count).indices


def identity(K: torch.Tensor, V: torch.Tensor) -> Solution:
    return Solution(K, torch.zeros(K.shape[0], device=K.device), V, torch.arange(K.shape[0], device=K.device))


def _check(K, V, Q, t):
    if K.dim() != 2 or V.shape != K.shape or Q.dim() != 2 or Q.shape[1] != K.shape[1]:
        raise ValueError(f"solver wants K [N, d], V [N, d], Q [n, d]; got {tuple(K.shape)}, "
                         f"{tuple(V.shape)}, {tuple(Q.shape)}")
    if not 1 <= t <= K.shape[0]:
        raise ValueError(f"budget t={t} must be in [1, N={K.shape[0]}]")
    if Q.shape[0] == 0:
        raise ValueError("no reference queries")


# --------------------------------------------------------------------------------------------------
# Solvers


def hak(K: torch.Tensor, V: torch.Tensor, Q: torch.Tensor, t: int, *, scale: float | None = None,
        score: str = "rms", sink: int = 4, recent: int = 16, fit_beta: bool = True,
        beta_bounds: tuple[float, float] = (-3.0, 3.0), nnls_iters: int = 2, refit_values: bool = True,
        ridge: float = 1e-6, holdout_every: int = 0, validation: torch.Tensor | None = None,
        score_queries: torch.Tensor | None = None, score_weight: float = 0.0,
        key_scores: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> Solution:
    """Highest-attention keys (RMS / mean / max over queries), NNLS beta clamped to e^bounds, C_v refit.
    `key_scores` [N], when given, rank the keys instead of Q's attention (scores recorded over many more
    queries than the fits can take, e.g. every copy query of a reconstruction); Q is then only fitted on.
    `keep`: positions kept whatever their scores (salient tokens; with the sinks and recent ones, <= t).
    With `score_queries` [m, d] and `score_weight` = a, the key scores mix the reference queries' (1 - a)
    and those queries' (a): each set counts as a whole, however many queries it has."""
    _check(K, V, Q, t)
    N = K.shape[0]
    if t == N:
        return identity(K, V)
    scale = scale if scale is not None else K.shape[1] ** -0.5
    if score not in ("rms", "mean", "max"):
        raise ValueError(f"unknown score {score!r}: rms, mean or max")
    if key_scores is not None and key_scores.shape != (N,):
        raise ValueError(f"key_scores must have one score per key ({N}), got {tuple(key_scores.shape)}")
    enough = Q.shape[0] >= FIT_MIN_QUERIES_PER_SLOT * t
    fits = fit_beta and enough
    refit, _, held = fit_plan(Q.shape[0], t, refit_values, fits, holdout_every, validation)
    mix = _mixes_score_queries(score_queries, score_weight)
    ref_scores = (not mix or score_weight < 1) and key_scores is None
    # the full cache's outputs Y on Q only where finish reads them; nothing at all on Q where no one does
    row_max = mass = s = Y = None
    if ref_scores or fits or refit or held:
        row_max, mass, s, Y = attention_stats(K, Q, scale, V if refit or held else None,
                                              score if ref_scores else None)
    if key_scores is not None:
        s = key_scores.float().clone()
    if mix:
        s_last = attention_stats(K, score_queries, scale, score=score)[2]
        s = s_last if s is None else (1 - score_weight) * s + score_weight * s_last
    s[forced_indices(N, t, sink, recent, keep).to(K.device)] = float("inf")
    idx = torch.topk(s, t).indices
    w = None
    if fits:  # the kept columns of exp(Q K^T s - row max), recomputed from Q and C_k
        M = (Q.float() @ K[idx].float().T).mul_(scale).sub_(row_max).exp_()
        w = fit_mass_weights(M, mass, math.exp(beta_bounds[0]), math.exp(beta_bounds[1]), nnls_iters)
    sol = finish(K, V, Q, Y, idx, w, scale, refit_values, ridge, holdout_every, validation)
    sol.underdetermined = (fit_beta or refit_values) and not enough
    return sol


def _mixes_score_queries(score_queries: torch.Tensor | None, score_weight: float) -> bool:
    """Whether a solver's key choice takes the score queries into account (hak and omp mix them alike)."""
    return score_queries is not None and score_queries.shape[0] > 0 and score_weight > 0


# Queries per block of attention_stats: the [n, N] attention matrix is the solvers' largest buffer (32 MB
# for 2,048 queries over 4,096 keys); blocks of 512 rows keep it at 8 MB and run faster (one thread: 79 ms
# instead of 141 ms for the whole matrix; fewer page faults).
QUERY_BLOCK = 512


def attention_stats(K: torch.Tensor, Q: torch.Tensor, scale: float, V: torch.Tensor | None = None,
                    score: str | None = None, block: int = QUERY_BLOCK
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per query its row max [n, 1] of Q K^T s and mass [n] = sum_i exp(q.k_i s - row max); with `score`,
    per key the mean squared ("rms"), mean or max attention weight over the queries [N]; with V, the
    attention outputs [n, d]. Computed over blocks of queries: the whole [n, N] matrix is never held."""
    n, N = Q.shape[0], K.shape[0]
    row_max = torch.empty(n, 1, device=K.device)
    mass = torch.empty(n, device=K.device)
    s = torch.zeros(N, device=K.device) if score is not None else None
    Y = torch.empty(n, V.shape[1], device=K.device) if V is not None else None
    Vf = V.float() if V is not None else None
    for a in range(0, n, block):
        b = min(a + block, n)
        E, row_max[a:b] = shifted_exp(K, Q[a:b], scale)
        mass[a:b] = E.sum(1)
        A = E.div_(mass[a:b, None])  # attention weights, in place
        if Y is not None:
            Y[a:b] = A @ Vf
        if score == "rms":
            s += A.square_().sum(0)
        elif score == "mean":
            s += A.sum(0)
        elif score == "max":
            s = torch.maximum(s, A.amax(0))
    if score in ("rms", "mean"):
        s /= n
    return row_max, mass, s, Y


def omp(K: torch.Tensor, V: torch.Tensor, Q: torch.Tensor, t: int, *, scale: float | None = None,
        sink: int = 4, recent: int = 16, k_choice: int = 1, refit_every: int = 1, upper: float = 3.0,
        drop_below: float | None = -7.0, refit_values: bool = True, ridge: float = 1e-6,
        holdout_every: int = 0, validation: torch.Tensor | None = None,
        score_queries: torch.Tensor | None = None, score_weight: float = 0.0,
        keep: torch.Tensor | None = None) -> Solution:
    """Orthogonal matching pursuit on the attention mass: greedily add the k_choice keys most correlated with
    the residual, refit the non-negative weights (incremental normal equations), optionally drop keys whose
    log-weight falls below `drop_below` and pick replacements.
    With `score_queries` [m, d] and `score_weight` = a, their mass residuals join the reference queries'
    in the selection and the weights, the two sets weighted (1 - a) and a as wholes (HAK's scores mix them
    the same way); the C_v fit uses the reference queries. `keep`: positions chosen before the pursuit."""
    _check(K, V, Q, t)
    N = K.shape[0]
    if t == N:
        return identity(K, V)
    scale = scale if scale is not None else K.shape[1] ** -0.5
    E, _ = shifted_exp(K, Q, scale)
    y = E.sum(1)
    refit, _, held = fit_plan(Q.shape[0], t, refit_values, True, holdout_every, validation)
    Y = (E @ V.float()).div_(y[:, None]) if refit or held else None  # the full cache's outputs, where read
    if _mixes_score_queries(score_queries, score_weight):
        Es, _ = shifted_exp(K, score_queries, scale)  # rows scaled so that each set's squared residual counts
        E = torch.cat([E.mul_(((1 - score_weight) / E.shape[0]) ** 0.5),
                       Es.mul_((score_weight / Es.shape[0]) ** 0.5)])
        del Es
        y = E.sum(1)
    ET = E.T.contiguous()  # a chosen key's column of E is a contiguous row of E^T
    del E
    y64 = y.double()
    hi = math.exp(upper)
    lo = 1e-12
    chosen = forced_indices(N, t, sink, recent, keep).to(K.device).tolist()
    banned = torch.zeros(N, dtype=torch.bool, device=K.device)
    gram = _Gram(ET, y64, t)
    gram.add(chosen)

    def fit_weights() -> torch.Tensor:
        G = gram.G
        lam = 1e-8 * G.diagonal().mean().clamp_min(1e-30)
        return spd_solve(G, gram.My, lam).clamp(lo, hi).float()

    w = fit_weights() if chosen else None
    step = 0
    rounds = 0
    while True:
        while len(chosen) < t:
            resid = (y64 - gram.fitted(w) if chosen else y64).float()
            corr = ET @ resid
            mask = banned.clone()
            if chosen:
                mask[torch.tensor(chosen, device=K.device)] = True
            corr[mask] = -float("inf")
            k = min(k_choice, t - len(chosen), int((~mask).sum()))
            if k <= 0:
                break
            new = torch.topk(corr, k).indices.tolist()
            chosen.extend(new)
            gram.add(new)
            step += 1
            if step % refit_every == 0 or len(chosen) >= t:
                w = fit_weights()
            else:  # keep old weights, give the new keys weight 1
                w = torch.cat([w, torch.ones(k, device=K.device, dtype=w.dtype)])
        w = fit_weights()
        rounds += 1
        if drop_below is None or rounds > 3:
            break
        low = torch.log(w) < drop_below
        if not low.any() or int((~banned).sum()) - len(chosen) < int(low.sum()):
            break
        drop = [c for c, bad in zip(chosen, low.tolist()) if bad]
        banned[torch.tensor(drop, device=K.device)] = True
        chosen = [c for c, bad in zip(chosen, low.tolist()) if not bad]
        gram = _Gram(ET, y64, t)
        gram.add(chosen)
        w = fit_weights()
    idx = torch.tensor(chosen, device=K.device, dtype=torch.long)
    del ET
    sol = finish(K, V, Q, Y, idx, w, scale, refit_values, ridge, holdout_every, validation)
    sol.underdetermined = refit_values and Q.shape[0] < FIT_MIN_QUERIES_PER_SLOT * t
    return sol


class _Gram:
    """The normal equations M^T M and M^T y of the chosen columns M of E (at most `capacity`), grown a few
    columns at a time: each step costs O(n * k * new) instead of recomputing O(n * k^2). Works on E^T, so
    that a chosen column is a contiguous row; float64 (E^T itself stays float32: only chosen rows are
    converted)."""

    def __init__(self, ET: torch.Tensor, y: torch.Tensor, capacity: int):
        self.ET, self.y, self.k = ET, y, 0
        self._Mt = y.new_empty(capacity, ET.shape[1])
        self._G = y.new_empty(capacity, capacity)
        self._My = y.new_empty(capacity)

    @property
    def G(self) -> torch.Tensor:
        return self._G[:self.k, :self.k]

    @property
    def My(self) -> torch.Tensor:
        return self._My[:self.k]

    def fitted(self, w: torch.Tensor) -> torch.Tensor:
        """M w: the mass the chosen keys give each query under weights w."""
        return self._Mt[:self.k].T @ w.to(self._Mt.dtype)

    def add(self, cols: list[int]) -> None:
        k, m = self.k, len(cols)
        if m == 0:
            return
        rows = self.ET[cols].to(self.y.dtype)
        cross = rows @ self._Mt[:k].T  # [m, k]: 2.5x faster than its transpose's product on the CPU
        self._G[k:k + m, :k], self._G[:k, k:k + m] = cross, cross.T
        self._G[k:k + m, k:k + m] = rows @ rows.T
        self._My[k:k + m] = rows @ self.y
        self._Mt[k:k + m] = rows
        self.k += m
