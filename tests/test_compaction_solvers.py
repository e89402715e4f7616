"""Per-head Attention Matching solvers on plain tensors, and budget allocation."""

import math

import pytest
import torch

from kvcat.compaction import budgets, fit, solvers

SOLVERS = {"hak": solvers.hak, "omp": solvers.omp}


def _head(n=120, d=16, q=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(n, d, generator=g) * 1.5
    V = torch.randn(n, d, generator=g)
    Q = torch.randn(q, d, generator=g) * 1.5
    return K, V, Q


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_keeping_everything_is_exact(name):
    K, V, Q = _head()
    s = SOLVERS[name](K, V, Q, K.shape[0])
    assert torch.equal(s.keys, K) and torch.equal(s.values, V) and torch.all(s.beta == 0)
    assert torch.equal(s.indices, torch.arange(K.shape[0]))
    err = fit.matching_errors(K, V, Q, s)
    assert err["output_rel_err"] < 1e-6 and err["log_mass_err"] < 1e-5


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solution_shapes_and_fit_beats_plain_eviction(name):
    K, V, Q = _head()
    t = 30
    s = SOLVERS[name](K, V, Q, t)
    assert s.keys.shape == (t, K.shape[1]) and s.values.shape == (t, K.shape[1]) and s.beta.shape == (t,)
    assert torch.equal(s.keys, K[s.indices])  # keys are a subset of the original keys
    assert torch.all(s.indices[1:] > s.indices[:-1])  # sorted, distinct
    assert torch.isfinite(s.beta).all() and torch.isfinite(s.values).all()
    plain = fit.Solution(K[s.indices], torch.zeros(t), V[s.indices], s.indices)
    fitted, evicted = fit.matching_errors(K, V, Q, s), fit.matching_errors(K, V, Q, plain)
    assert fitted["output_rel_err"] < evicted["output_rel_err"]
    assert fitted["log_mass_err"] < evicted["log_mass_err"]


def test_sink_and_recent_tokens_are_kept():
    K, V, Q = _head()
    s = solvers.hak(K, V, Q, 40, sink=4, recent=8)
    kept = set(s.indices.tolist())
    assert {0, 1, 2, 3} <= kept and set(range(112, 120)) <= kept


def test_hak_beta_respects_its_clamp():
    K, V, Q = _head(seed=3)
    s = solvers.hak(K, V, Q, 10, beta_bounds=(-3.0, 3.0))
    assert s.beta.min() >= -3.0 - 1e-5 and s.beta.max() <= 3.0 + 1e-5


def test_mass_weights_recover_a_known_mixture():
    g = torch.Generator().manual_seed(0)
    M = torch.rand(300, 5, generator=g)
    w_true = torch.tensor([0.5, 1.0, 2.0, 4.0, 0.1])
    w = fit.fit_mass_weights(M, M @ w_true, 1e-6, None, iters=0, ridge=0.0)
    assert torch.allclose(w, w_true, atol=1e-3)


def test_bad_solver_input():
    K, V, Q = _head()
    with pytest.raises(ValueError, match="budget"):
        solvers.hak(K, V, Q, 0)
    with pytest.raises(ValueError, match="budget"):
        solvers.omp(K, V, Q, K.shape[0] + 1)
    with pytest.raises(ValueError, match="solver wants"):
        solvers.hak(K, V[:, :3], Q, 5)


def test_allocation_hits_the_total_and_favours_sensitive_heads():
    fr = budgets.FRACTIONS
    cost = torch.zeros(2, 2, len(fr))
    for i, f in enumerate(fr):
        cost[0, 0, i] = 10 * (1 - f)  # a sensitive head
        cost[0, 1, i] = 0.1 * (1 - f)
        cost[1, 0, i] = 1 * (1 - f)
        cost[1, 1, i] = 1 * (1 - f)
    counts = budgets.allocate(cost, fr, n=1000, t=100)
    assert int(counts.sum()) == 400 and counts.min() >= 1 and counts.max() <= 1000
    # the sensitive head gets the most, the insensitive one no more than the middling ones
    assert counts[0, 0] == counts.max() and counts[0, 0] > 4 * counts[1, 0]
    assert counts[1, 0] >= counts[0, 1] and counts[1, 1] >= counts[0, 1]
    assert math.isclose(counts.float().mean().item(), 100)


@pytest.mark.parametrize("seed", range(3))
def test_holdout_keeps_the_fit_only_where_it_generalizes(seed, monkeypatch):
    """t close to the number of reference queries: the least-squares fit overfits them. With holdout_every the
    head falls back to a plainer variant, and does better on fresh queries than the unchecked fit."""
    monkeypatch.setattr(solvers, "FIT_MIN_QUERIES_PER_SLOT", 0)  # fit even where it is underdetermined
    K, V, Q = _head(n=120, q=40, seed=seed)
    fresh = torch.randn(400, K.shape[1], generator=torch.Generator().manual_seed(100 + seed)) * 1.5
    t = 36
    unchecked = solvers.hak(K, V, Q, t)
    checked = solvers.hak(K, V, Q, t, holdout_every=5)
    assert torch.equal(checked.indices, unchecked.indices)
    err = lambda s: fit.matching_errors(K, V, fresh, s)["output_rel_err"]  # noqa: E731
    assert err(checked) < err(unchecked)
    # with plenty of queries the choice costs (almost) nothing against the unchecked fit
    K, V, Q = _head(seed=seed)  # err() reads the new K, V
    assert err(solvers.hak(K, V, Q, 30, holdout_every=5)) < 1.05 * err(solvers.hak(K, V, Q, 30))


def test_too_few_queries_per_slot_skip_the_fits():
    K, V, Q = _head(n=120, q=40)
    s = solvers.hak(K, V, Q, 36)  # 40 queries < 4 x 36 slots
    assert torch.all(s.beta == 0) and torch.equal(s.values, V[s.indices])


@pytest.mark.parametrize("name", ["hak", "omp"])
def test_validation_queries_choose_the_variant_per_head(name):
    """With validation queries (another kind than the reference queries), each head keeps the variant --
    fitted, beta = 0 and/or C_v = V -- with the smallest output error on them."""
    K, V, Q = _head(seed=1)
    g = torch.Generator().manual_seed(7)
    shift = torch.randn(K.shape[1], generator=g) * 2.0
    val = torch.randn(64, K.shape[1], generator=g) * 0.5 + shift  # concentrated elsewhere than Q
    s = SOLVERS[name](K, V, Q, 30, validation=val)
    fitted = SOLVERS[name](K, V, Q, 30)
    assert torch.equal(s.indices, fitted.indices)
    zeros = torch.zeros(30)
    plain = fit.Solution(K[s.indices], zeros, V[s.indices], s.indices)
    no_beta = fit.Solution(K[s.indices], zeros, fit.fit_values(
        torch.softmax((Q @ K[s.indices].T) * K.shape[1] ** -0.5, 1), fit.attention_output(K, V, Q),
        V[s.indices]), s.indices)
    err = lambda x: fit.matching_errors(K, V, val, x)["output_rel_err"]  # noqa: E731
    assert err(s) <= min(err(fitted), err(plain), err(no_beta)) + 1e-6


@pytest.mark.parametrize("name", ["hak", "omp"])
def test_empty_validation_falls_back_to_the_held_out_rule(name):
    """No validation queries (a context shorter than the observation window could give none): the solver
    judges on held-out reference queries, as without validation."""
    K, V, Q = _head(seed=2)
    d = K.shape[1]
    empty = SOLVERS[name](K, V, Q, 30, validation=torch.empty(0, d), holdout_every=5)
    held = SOLVERS[name](K, V, Q, 30, holdout_every=5)
    assert torch.equal(empty.indices, held.indices) and torch.allclose(empty.values, held.values)
    assert torch.allclose(empty.beta, held.beta)


@pytest.mark.parametrize("score", ["rms", "mean", "max"])
def test_blocked_attention_stats_equal_the_whole_matrix(score):
    """attention_stats over query blocks gives what the whole [n, N] attention matrix gives."""
    K, V, Q = _head(q=50)
    s = K.shape[1] ** -0.5
    row_max, mass, scores, Y = solvers.attention_stats(K, Q, s, V, score, block=7)
    logits = (Q @ K.T) * s
    A = torch.softmax(logits, 1)
    want = {"rms": A.square().mean(0), "mean": A.mean(0), "max": A.amax(0)}[score]
    assert torch.allclose(scores, want, rtol=1e-5, atol=1e-8)
    assert torch.allclose(Y, A @ V, atol=1e-5)
    assert torch.allclose(row_max[:, 0], logits.amax(1)) and torch.allclose(mass.log() + row_max[:, 0],
                                                                           torch.logsumexp(logits, 1), atol=1e-5)


def test_hak_ranks_by_the_score_queries_alone_at_weight_one():
    K, V, Q = _head(seed=4)
    S = torch.randn(16, K.shape[1], generator=torch.Generator().manual_seed(9)) * 1.5
    sol = solvers.hak(K, V, Q, 30, sink=0, recent=0, score_queries=S, score_weight=1.0)
    top = solvers.attention_stats(K, S, K.shape[1] ** -0.5, score="rms")[2].topk(30).indices
    assert set(sol.indices.tolist()) == set(top.tolist())


def test_omp_weighs_the_score_queries_mass():
    """OMP with score queries at weight a matches their attention mass better than without them."""
    K, V, Q = _head(seed=5)
    S = torch.randn(16, K.shape[1], generator=torch.Generator().manual_seed(11)) * 1.5 + 1.0
    err = lambda s: fit.matching_errors(K, V, S, s)["log_mass_err"]  # noqa: E731
    plain = solvers.omp(K, V, Q, 20, refit_values=False)
    weighted = solvers.omp(K, V, Q, 20, refit_values=False, score_queries=S, score_weight=0.5)
    assert err(weighted) < err(plain)
