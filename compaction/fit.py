"""Least-squares fits shared by the Attention Matching solvers, on plain tensors: the mass weights (beta = log w),
the compacted values C_v, and the per-head choice between the fitted head and its plain variants (`finish`).

Everything is float32 (float64 for the small normal-equation solves) and device-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Solution:
    keys: torch.Tensor  # [t, d] compacted keys C_k (a subset of K)
    beta: torch.Tensor  # [t] additive logit bias per slot
    values: torch.Tensor  # [t, d] compacted values C_v
    indices: torch.Tensor  # [t] long: which original keys were kept (sorted)
    # the fits were skipped: fewer than FIT_MIN_QUERIES_PER_SLOT reference queries per slot (the head keeps
    # beta = 0 and C_v = V: eviction values); reported in the cache's info and logged by the method
    underdetermined: bool = False
    values_refit: bool = False  # C_v is a least-squares fit (else the kept keys' own values)


def shifted_exp(K: torch.Tensor, Q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(Q K^T s - rowmax) [n, N] in float32 and the row maxima [n, 1]."""
    E = (Q.float() @ K.float().T).mul_(scale)  # in place: these [n, N] matrices are the solvers' main cost
    m = E.amax(dim=1, keepdim=True)
    return E.sub_(m).exp_(), m


def _plus_diagonal(A: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """A + lam I, as a new tensor (adding to the diagonal: no identity matrix is built)."""
    out = A.clone()
    out.diagonal().add_(lam)
    return out


def spd_solve(A: torch.Tensor, B: torch.Tensor, ridge: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Solve (A + ridge I) X = B for symmetric positive (semi)definite A, in float64, with escalating extra
    ridge on failure."""
    A64, B64 = A.double(), B.double()
    A64 = (A64 + A64.T).mul_(0.5)
    A64.diagonal().add_(ridge)
    scale = A64.diagonal().abs().mean().clamp_min(1e-30)
    for extra in (0.0, 1e-10, 1e-8, 1e-6, 1e-4):
        L, info = torch.linalg.cholesky_ex(_plus_diagonal(A64, extra * scale) if extra else A64)
        if int(info) == 0:
            X = torch.cholesky_solve(B64 if B64.dim() == 2 else B64[:, None], L)
            X = X if B64.dim() == 2 else X[:, 0]
            if torch.isfinite(X).all():
                return X.to(B.dtype)
    return torch.linalg.lstsq(A64.cpu(), B64.cpu()).solution.to(B.device, B.dtype)


def fit_mass_weights(M: torch.Tensor, y: torch.Tensor, lower: float, upper: float | None,
                     iters: int = 2, ridge: float = 1e-6) -> torch.Tensor:
    """Box-constrained NNLS  min ||M w - y||  s.t. lower <= w <= upper.

    Least squares (ridge towards w = 1, i.e. beta = 0) clamped to the box, then `iters` projected-gradient
    steps with step 1/||M||^2."""
    t = M.shape[1]
    G = M.T @ M
    lam = ridge * G.diagonal().mean().clamp_min(1e-30)
    w = spd_solve(G, M.T @ y + lam, lam)
    hi = upper if upper is not None else float("inf")
    w = w.clamp(lower, hi)
    if iters > 0:
        u = torch.ones(t, device=M.device, dtype=G.dtype) / t ** 0.5  # power iteration: ||M||^2 = ||G||
        for _ in range(8):
            u = G @ u
            u = u / u.norm().clamp_min(1e-30)
        step = 1.0 / (u @ G @ u).clamp_min(1e-12)
        My = M.T @ y
        for _ in range(iters):
            w = (w - step * (G @ w - My)).clamp(lower, hi)
    return w


def fit_values(X: torch.Tensor, Y: torch.Tensor, prior: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """C_v = argmin ||X C - Y||^2 + lam ||C - prior||^2 (float32 result); lam relative to the mean of diag X^T X."""
    G = X.T @ X
    lam = ridge * G.diagonal().mean().clamp_min(1e-30)
    return spd_solve(G, X.T @ Y + lam * prior, lam).float()


def _fit_or_prior(X: torch.Tensor, Y: torch.Tensor, prior: torch.Tensor, refit: bool, ridge: float) -> torch.Tensor:
    if not refit:
        return prior
    C_v = fit_values(X, Y, prior, ridge)
    return C_v if torch.isfinite(C_v).all() else prior


# Below this many reference queries per kept slot the least-squares fits (beta, C_v; t unknowns per output
# column) are barely determined by the queries: they are skipped, the head keeps beta = 0 and C_v = V, and
# its Solution says so (`underdetermined`). Measured: benchmarks/NOTES.md.
FIT_MIN_QUERIES_PER_SLOT = 4


def fit_plan(n: int, t: int, refit_values: bool, beta_fitted: bool, holdout_every: int,
             validation: torch.Tensor | None) -> tuple[bool, bool, bool]:
    """How `finish` treats a head with n reference queries and t slots: (refit C_v, judge the variants on
    the validation queries, judge them on held-out reference queries). The solvers ask it too, to compute
    the full cache's outputs only where one of these reads them."""
    refit = refit_values and n >= FIT_MIN_QUERIES_PER_SLOT * t
    variants = beta_fitted or refit  # else the plain head is the only candidate
    use_val = variants and validation is not None and validation.shape[0] > 0
    use_held = variants and not use_val and holdout_every > 0 and n >= 2 * holdout_every
    return refit, use_val, use_held


def finish(K: torch.Tensor, V: torch.Tensor, Q: torch.Tensor, Y: torch.Tensor | None, idx: torch.Tensor,
           w: torch.Tensor | None, scale: float, refit_values: bool, ridge: float,
           holdout_every: int = 0, validation: torch.Tensor | None = None) -> Solution:
    """Given chosen indices (and mass weights w, or None for beta = 0) and the full cache's attention outputs
    Y [n, d] for the reference queries (may be None where `fit_plan` says neither a C_v fit nor the held-out
    rule reads them): sort, fit C_v, package.

    The fitted head (beta, refit C_v) competes with its simpler variants (beta = 0, and/or C_v = the kept
    values); the variant with the smallest attention-output error on other queries wins, per head:
    - `validation` queries [m, d] (a different kind of query than Q: the AM methods pass the context's own
      last queries, which look like the text that follows it): every variant is fitted on all of Q;
    - else, with `holdout_every` = k > 0, every k-th reference query is held out, and the winner is refit
      on all queries.
    Fits tuned to one kind of query can do worse than plain eviction on another (the repeat queries vs the
    continuation of the text, on SmolLM2-135M); this keeps a fit only where it carries over."""
    order = torch.argsort(idx)
    idx = idx[order]
    w = w[order] if w is not None else None
    zeros = torch.zeros(len(idx), device=K.device)
    fitted_beta = torch.log(w).float() if w is not None else zeros
    C_k = K[idx]
    prior = V[idx].float()
    refit_values, use_val, use_held = fit_plan(Q.shape[0], len(idx), refit_values, w is not None, holdout_every,
                                               validation)
    betas = (fitted_beta, zeros) if w is not None else (zeros,)
    refits = tuple(dict.fromkeys((refit_values, False)))  # the fitted head first
    if not (use_val or use_held or refit_values):
        return Solution(C_k.to(K.dtype), fitted_beta, prior.to(V.dtype), idx)
    logits = (Q.float() @ C_k.float().T) * scale if refit_values or use_held else None
    if not (use_val or use_held):
        C_v = _fit_or_prior(torch.softmax(logits + fitted_beta, dim=1), Y, prior, refit_values, ridge)
        return Solution(C_k.to(K.dtype), fitted_beta, C_v.to(V.dtype), idx, values_refit=C_v is not prior)
    if use_val:  # fit on every reference query, judge on the validation queries
        fit = slice(None)
        logits_v, Y_v = (validation.float() @ C_k.float().T) * scale, attention_output(K, V, validation, scale=scale)
    else:  # fit on the kept reference queries, judge on the held-out ones
        held = torch.arange(Q.shape[0], device=K.device) % holdout_every == 0
        fit, logits_v, Y_v = ~held, logits[held], Y[held]
    best = None
    need_X = any(refits) or use_held
    for b in betas:
        Xb = torch.softmax(logits + b, dim=1) if need_X else None
        for r in refits:
            C_v = _fit_or_prior(Xb[fit], Y[fit], prior, r, ridge) if r else prior
            err = float((torch.softmax(logits_v + b, dim=1) @ C_v - Y_v).square().sum())
            if best is None or err < best[0]:
                best = (err, b, r, Xb, C_v)
    _, beta, refit, X, C_v = best
    if use_held:  # the winner, refit on all reference queries
        C_v = _fit_or_prior(X, Y, prior, refit, ridge)
    return Solution(C_k.to(K.dtype), beta, C_v.to(V.dtype), idx, values_refit=C_v is not prior)


# --------------------------------------------------------------------------------------------------
# Diagnostics


def attention_output(K, V, Q, beta=None, scale=None) -> torch.Tensor:
    scale = scale if scale is not None else K.shape[1] ** -0.5
    logits = (Q.float() @ K.float().T) * scale
    if beta is not None:
        logits = logits + beta.float()
    return torch.softmax(logits, dim=1) @ V.float()


def matching_errors(K, V, Q, sol: Solution, scale=None) -> dict[str, float]:
    """Relative output error and mean |log mass ratio| of a solution on queries Q."""
    scale = scale if scale is not None else K.shape[1] ** -0.5
    full = attention_output(K, V, Q, scale=scale)
    comp = attention_output(sol.keys, sol.values, Q, sol.beta, scale)
    lz_full = torch.logsumexp((Q.float() @ K.float().T) * scale, 1)
    lz_comp = torch.logsumexp((Q.float() @ sol.keys.float().T) * scale + sol.beta.float(), 1)
    return {"output_rel_err": float((comp - full).norm() / full.norm().clamp_min(1e-12)),
            "log_mass_err": float((lz_comp - lz_full).abs().mean())}
