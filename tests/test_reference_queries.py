"""Reference queries: the reconstruction covers every token, its layer-by-layer stream equals a whole-model
pass, on-policy queries over an identity compaction equal off-policy ones, and skipped fits are reported."""

import logging

import pytest
import torch

from kvcat.compaction import get_method, queries, reconstruction, solvers
from kvcat.inference import prefill

TEXT = ("Harbour log. The red ship Aurora docked at pier nine; its captain, Ines Varga, paid in copper. "
        "The blue ship Meridian left for Oslo with timber and wool on the fourth night. ") * 12


def _state(lm, n):
    ids = torch.tensor(lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:n])
    queries.clear_memo()
    return queries.document_state(lm, ids, token_nll=True)  # what the AM methods ask for: the same memo entry


def test_reconstruction_copies_every_token_in_chunks(tiny):
    ids = list(range(100, 1100))
    head = reconstruction.reconstruction_inputs(tiny, [1, 2], room=10_000)[0][:-2]
    prompts = reconstruction.reconstruction_inputs(tiny, ids, room=10_000, chunk=300)
    assert [len(p) - len(head) for p in prompts] == [300, 300, 300, 100]
    assert all(p[:len(head)] == head for p in prompts)
    assert sum((p[len(head):] for p in prompts), []) == ids
    # little room after the context: smaller chunks, still every token; no room at all: none
    small = reconstruction.reconstruction_inputs(tiny, ids, room=len(head) + 50)
    assert sum((p[len(head):] for p in small), []) == ids and max(map(len, small)) == len(head) + 50
    assert reconstruction.reconstruction_inputs(tiny, ids, room=len(head) + 1) == []


def test_layer_stream_equals_a_whole_model_pass(small):
    """The reconstruction run one decoder layer at a time gives the queries a normal forward pass of the
    same prompt over the document's K/V records."""
    state = _state(small, 200)
    rec = reconstruction.Reconstruction(small, state, chunk=64)
    prompts = reconstruction.reconstruction_inputs(small, state.ids.tolist(), small.spec.max_positions - 200, chunk=64)
    whole = [prefill(small, p, capture_queries=True, past=state.prefill, keep_new_kv=False).queries for p in prompts]
    for layer in range(small.spec.num_layers):
        got = rec.queries(layer)
        want = torch.cat([w[layer] for w in whole], dim=1)
        assert got.shape == want.shape == (small.spec.num_heads, sum(map(len, prompts)), small.spec.head_dim)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        rec.advance()


def test_on_policy_over_an_identity_compaction_is_off_policy(small):
    """advance() over the layer's own full K/V with beta = 0 changes nothing; over a real compaction the
    next layer's queries move."""
    state = _state(small, 160)
    off, on, moved = (reconstruction.Reconstruction(small, state) for _ in range(3))
    for layer in range(3):
        q_off, q_on, q_moved = off.queries(layer), on.queries(layer), moved.queries(layer)
        torch.testing.assert_close(q_on, q_off, rtol=1e-4, atol=1e-4)
        if layer == 2:
            assert (q_moved - q_off).abs().max() > 1e-3
        K, V = state.prefill.keys[layer], state.prefill.values[layer]
        off.advance()
        on.advance((K, V, torch.zeros(K.shape[:2])))
        moved.advance((K[:, ::4], V[:, ::4], torch.zeros(K[:, ::4].shape[:2])))


def test_am_on_policy_runs_and_differs(small):
    state = _state(small, 160)
    off = get_method("am-hak").compact(small, state.ids, ratio=4)
    on = get_method("am-hak", on_policy=True).compact(small, state.ids, ratio=4)
    assert torch.equal(off.keys[0], on.keys[0])  # layer 0 sees the same queries either way
    assert not all(torch.equal(a, b) for a, b in zip(off.beta, on.beta))
    assert on.info["queries_s"] > 0


def test_hak_ranks_keys_by_the_given_scores_and_fits_on_q():
    """Key scores recorded over many queries pick the keys; the few queries given are only fitted on."""
    gen = torch.Generator().manual_seed(0)
    K, V, Q = torch.randn(256, 16, generator=gen), torch.randn(256, 16, generator=gen), torch.randn(200, 16)
    scores = torch.rand(256, generator=gen)
    scores[77] = 10.0  # a key only some unseen query looked at
    s = solvers.hak(K, V, Q, 40, key_scores=scores, sink=0, recent=0)
    assert s.indices.tolist() == torch.topk(scores, 40).indices.sort().values.tolist()
    assert not s.underdetermined and not torch.all(s.beta == 0)
    with pytest.raises(ValueError, match="one score per key"):
        solvers.hak(K, V, Q, 40, key_scores=scores[:10])


def test_key_scores_record_the_attention_they_compute():
    """KeyScores.attend gives SDPA's output and records, per key of the context, the max and the RMS of
    the softmax weights over every query of each GQA group."""
    from kvcat.attention import KeyScores, _causal

    gen = torch.Generator().manual_seed(1)
    n, q_len, H, Hkv, d = 50, 12, 6, 2, 8
    q = torch.randn(1, H, q_len, d, generator=gen)
    k, v = torch.randn(1, Hkv, n + q_len, d, generator=gen), torch.randn(1, Hkv, n + q_len, d, generator=gen)
    ks = KeyScores(H, n)
    mask = _causal(q_len, n + q_len, q)
    out = ks.attend(q, k, v, d ** -0.5, mask)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, want)
    w = torch.softmax(q[0] @ k[0].repeat_interleave(3, 0).transpose(1, 2) * d ** -0.5 + mask, -1)[:, :, :n]
    torch.testing.assert_close(ks.per_kv_head(Hkv, "max"), w.view(Hkv, 3 * q_len, n).amax(1))
    torch.testing.assert_close(ks.per_kv_head(Hkv, "rms"), w.view(Hkv, 3 * q_len, n).square().mean(1).sqrt())


def test_underdetermined_fits_are_reported_and_logged(small, caplog):
    """Too few reference queries per slot: the heads keep eviction values, and the cache and log say so; a
    small max_queries is raised to what the fit needs where the document has that many queries."""
    state = _state(small, 200)
    with caplog.at_level(logging.WARNING, logger="kvcat.compaction.am"):
        cache = get_method("am-hak", queries="last").compact(small, state.ids, ratio=2)  # 3 x 64 < 4 x 100
    fit, heads = cache.info["fit"], small.spec.num_layers * small.spec.num_kv_heads
    assert fit["underdetermined"] == fit["heads"] == heads and fit["beta_fitted"] == fit["values_refit"] == 0
    assert fit["per_layer"]["underdetermined"] == [small.spec.num_kv_heads] * small.spec.num_layers
    assert "kept eviction values" in caplog.text
    raised = get_method("am-hak", max_queries=64).compact(small, state.ids, ratio=2)  # 3 x 200 copies >= 4 x 100
    assert raised.info["fit"]["underdetermined"] == 0 and raised.info["fit"]["beta_fitted"] > 0


@pytest.mark.parametrize("mode", ["repeat", "repeat+self-study"])
def test_streamed_and_stored_queries_give_the_same_cache(small, mode):
    """keep_queries memoizes the streamed queries; a second compaction from them gives the same cache."""
    state = _state(small, 160)
    state.keep_queries = True
    a = get_method("am-hak", queries=mode).compact(small, state.ids, ratio=4)
    assert "repeat" in state.queries
    b = get_method("am-hak", queries=mode).compact(small, state.ids, ratio=4)
    for x, y in zip(a.keys + a.beta, b.keys + b.beta):
        torch.testing.assert_close(x, y)


def test_token_nll_is_the_models_surprisal(small):
    """Prefill's per-token surprisal, chunk seams included, equals a plain forward pass's cross-entropy."""
    ids = torch.tensor(small.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:150])
    got = prefill(small, ids, chunk_size=64, token_nll=True).token_nll
    with torch.no_grad():
        logits = small.model(ids[None]).logits[0]
    want = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")
    assert got[0] == 0 and got.shape == (150,)
    torch.testing.assert_close(got[1:], want, rtol=1e-4, atol=1e-4)
    seam = prefill(small, ids, chunk_size=149, token_nll=True)  # a last chunk of one token
    torch.testing.assert_close(seam.token_nll, got, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seam.last_logits, logits[-1], rtol=1e-4, atol=1e-4)


def test_salient_tokens_find_the_unpredictable_span():
    nll = torch.full((400,), 2.0)
    nll[200:212] = 9.0  # a planted fact the text does not predict
    nll[50] = 12.0  # one surprising word alone weighs less than a surprising span
    got = solvers.salient_tokens(nll, 12, window=16)
    assert set(got.tolist()) <= set(range(192, 220)) and len(got) == 12
    assert solvers.salient_tokens(nll, 0).numel() == 0 and solvers.salient_tokens(nll, 10_000).numel() == 400
    kept = solvers.forced_indices(400, 40, sink=4, recent=16, keep=got)
    assert {0, 1, 2, 3, 399} <= set(kept.tolist()) and set(got.tolist()) <= set(kept.tolist())
    assert len(solvers.forced_indices(400, 10, sink=4, recent=16, keep=got)) == 10  # never more than t


def test_am_keeps_salient_tokens_in_every_head(small):
    state = _state(small, 200)
    cache = get_method("am-hak", salient_frac=0.5).compact(small, state.ids, ratio=8)
    nll = queries.document_state(small, state.ids, token_nll=True).prefill.token_nll
    salient = set(solvers.salient_tokens(nll, round(0.5 * 25)).tolist())
    for layer, K in enumerate(queries.document_state(small, state.ids).prefill.keys):
        for h in range(K.shape[0]):
            kept = {i for i in range(200) if (cache.keys[layer][h] == K[h, i]).all(-1).any()}
            assert salient <= kept


def test_local_surprisal_sees_only_the_last_tokens(small):
    """Within the first window it is the prefill's surprisal; later, each token is scored given only the
    window before it (a text repeated 12 times is surprising again once its first copy is out of sight)."""
    from kvcat.inference import local_surprisal

    state = _state(small, 300)
    whole = state.prefill.token_nll
    local = local_surprisal(small, state.ids, context=32, window=128)
    torch.testing.assert_close(local[:128], whole[:128], atol=2e-3, rtol=1e-3)
    for i in (130, 200, 299):  # scored in the window that starts at the last multiple of 96 with >= 32 before i
        start = max(s for s in range(0, 300, 96) if i - s >= 32)
        seg = state.ids[start:i + 1]
        with torch.no_grad():
            logits = small.model(input_ids=seg[None].to(small.device)).logits[0, -2].float()
        assert float(local[i]) == pytest.approx(float(torch.log_softmax(logits, -1)[seg[-1]].neg()), abs=2e-3)
    assert float(local[200:].mean()) > float(whole[200:].mean())  # the repeats are no longer predicted
    with pytest.raises(ValueError, match="context < window"):
        local_surprisal(small, state.ids, context=64, window=64)
    # an AM method with salient_context reads it, memoized in the state with its seconds
    cache = get_method("am-hak-fast", salient_context=32).compact(small, state.ids, ratio=8)
    st = queries.document_state(small, state.ids)
    assert 32 in st.surprisal and st.surprisal_s[32] > 0
    assert cache.info["queries_s"] == pytest.approx(st.surprisal_s[32], abs=1e-3)  # info is rounded


def test_global_budgets_spread_the_total_over_heads_by_reconstruction_scores(small):
    state = _state(small, 200)
    cache = get_method("am-hak", budgets="global").compact(small, state.ids, ratio=8)
    counts = cache.head_counts()
    L, H = small.spec.num_layers, small.spec.num_kv_heads
    assert int(counts.sum()) == 25 * L * H and counts.min() >= 1 and counts.max() > counts.min()
