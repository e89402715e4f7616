"""Fact spans (`kvcat.compaction.spans`): sentences as units, ranked by peak surprisal with suppression, the
chat template kept and never scored; and the AM methods keeping them in every head."""

from __future__ import annotations

import pytest
import torch

from kvcat import prompts
from kvcat.compaction import get_method, spans
from kvcat.compaction.queries import clear_memo, document_state

DOC = ("The harbour was quiet that year. The price of the ticket is 2.5 crowns at 10:30 daily!\n"
       "Maren's locker code is 4417. Nobody asked why; the keeper knew: it was his.")


def _units(tokenizer, max_unit=64):
    ids = prompts.context_ids(tokenizer, DOC)
    template = spans.template_positions(ids, tokenizer, prompts.context_ids(tokenizer, ""))
    return ids, template, spans.units(ids, tokenizer, max_unit, template)


def test_units_are_sentences_and_the_template_is_none_of_them(tiny):
    tok = tiny.tokenizer
    ids, template, units = _units(tok)
    head = prompts.context_ids(tok, "")
    assert template.tolist() == list(range(len(head)))  # the system prompt and the first user marker
    texts = [tok.decode(ids[s:e]).strip() for s, e in units]
    assert texts == ["The harbour was quiet that year.", "The price of the ticket is 2.5 crowns at 10:30 daily!",
                     "Maren's locker code is 4417.", "Nobody asked why;", "the keeper knew:", "it was his."]
    assert units[0][0] == len(head) and all(a[1] == b[0] for a, b in zip(units, units[1:]))
    chunked = spans.units(ids, tok, 4, template)
    assert max(e - s for s, e in chunked) == 4 and chunked[0][0] == len(head) and chunked[-1][1] == len(ids)


def test_turn_markers_inside_a_conversation_are_template(tiny):
    tok = tiny.tokenizer
    convo = tok.apply_chat_template([{"role": "user", "content": "Hello there."},
                                     {"role": "assistant", "content": "Hi."}], tokenize=False)
    ids = tok(convo, add_special_tokens=False)["input_ids"]
    template = set(spans.template_positions(ids, tok, prompts.context_ids(tok, "")).tolist())
    marker = [i for i, t in enumerate(ids) if t in tok.all_special_ids]
    assert all({i, i + 1} <= template for i in marker[:-1])  # each marker and its role name
    assert not any(tok.decode([ids[i]]).strip() == "there" for i in template)


def test_fact_spans_take_whole_units_by_peak_with_suppression():
    units = [(0, 10), (10, 20), (20, 30), (30, 40)]
    nll = torch.full((40,), 0.5)
    nll[3] = 9.0  # unit 0: one rare word
    nll[14:18] = 6.0  # unit 1: a four-digit number, the best mean over 8 tokens in a row
    nll[20:30] = 2.5  # unit 2: the most surprising on average, second by peak
    nll[33:35] = 6.0  # unit 3: a two-token name, third
    assert spans.fact_spans(nll, units, 20, window=8).tolist() == list(range(10, 30))
    part = spans.fact_spans(nll, units, 24, window=8).tolist()  # the third does not fit: 4 tokens around its peak
    assert part[20:] == [32, 33, 34, 35] and len(set(part)) == 24
    assert spans.fact_spans(nll, units, 40, window=8).tolist()[30:] == list(range(10))  # the rare word comes last
    assert spans.fact_spans(nll, units, 0, window=8).numel() == 0 and spans.fact_spans(nll, [], 5).numel() == 0


def test_unit_order_by_peak_by_mean_and_in_turn():
    units = [(0, 10), (10, 20), (20, 30), (30, 40)]
    nll = torch.full((40,), 0.5)
    nll[14:18] = 6.0  # unit 1: a number, the highest peak (mean 2.7)
    nll[20:30] = 2.8  # unit 2: out of place throughout, the highest mean
    nll[33:36] = 5.0  # unit 3: a name, second by peak (mean 1.85)
    nll[0:10] = 1.0  # unit 0: last either way
    assert spans.unit_order(nll, units, 4, "peak")[0] == [1, 3, 2, 0]
    assert spans.unit_order(nll, units, 4, "mean")[0] == [2, 1, 3, 0]
    assert spans.unit_order(nll, units, 4, "peak+mean")[0] == [1, 2, 3, 0]  # each order in turn, each unit once
    assert spans.fact_spans(nll, units, 20, window=4, rank="peak+mean").tolist() == list(range(10, 30))
    with pytest.raises(ValueError, match="unit rank"):
        spans.unit_order(nll, units, 4, "max")


def test_sentence_salience_keeps_the_template_and_a_fact_in_every_head(small):
    ids = prompts.context_ids(small.tokenizer, DOC * 6)
    clear_memo()
    state = document_state(small, torch.tensor(ids), token_nll=True)
    method = get_method("am-hak-fast", salient_unit="sentence", keep_template=True)
    method.prepare(small, state)
    t = len(ids) // 3
    budgets = method.head_budgets(small, state, t)
    template, units = state.fact_units(small, method.max_unit)
    kept = method.salient(state, t, {})
    assert kept[:len(template)].tolist() == template.tolist()  # first: kept whatever the budget
    assert len(kept) == len(template) + round(method.salient_frac * t)
    for layer in method.solve_layers(small, state, budgets, None):
        for head in layer:
            assert set(template.tolist()) <= set(head.indices.tolist()) and len(head.indices) == t
    cache = method.compact(small, ids, ratio=3)
    fit = cache.info["fit"]
    assert fit["heads"] == small.spec.num_layers * small.spec.num_kv_heads
    assert len(fit["per_layer"]["beta_fitted"]) == small.spec.num_layers


def test_head_profile_scores_copying_heads_once_per_model(small, tmp_path, monkeypatch):
    """Retrieval scores: the attention mass of teacher-forced answers on their source in the document, from
    tune cases only; the profile is cached per model and read back; the share picks the top heads."""
    from kvcat.compaction import heads
    from kvcat.data.suite import SuiteSpec, retrieval_cases

    cases = retrieval_cases(small.tokenizer, SuiteSpec(split="tune", kinds=("needle",), cases_per_kind=3,
                                                       lengths=(512,)))
    scores, used = heads.retrieval_scores(small, cases)
    assert used == 3 and scores.shape == (small.spec.num_layers, small.spec.num_kv_heads)
    assert ((scores >= 0) & (scores <= 1)).all() and scores.max() > 5 * scores.median()  # a few heads copy

    monkeypatch.setenv("KVCAT_HOME", str(tmp_path))
    monkeypatch.setattr(heads, "compute_profile", lambda lm: {
        "version": heads.PROFILE_VERSION, "fingerprint": lm.spec.fingerprint, "scores": scores.tolist()})
    heads.STORE.memo.clear()
    mask = heads.retrieval_heads(small, 0.2)
    assert heads.STORE.path(small).is_file() and int(mask.sum()) == round(0.2 * scores.numel())
    assert scores[mask].min() >= scores[~mask].max()
    heads.STORE.memo.clear()
    assert heads.load_profile(small)["scores"] == scores.tolist()  # read back from disk
    assert int(heads.retrieval_heads(small, 0).sum()) == 0
    assert int(heads.retrieval_heads(small, 5.0).sum()) == scores.numel()


def test_retrieval_heads_spend_their_slots_on_fact_spans(small, monkeypatch):
    """With head roles, the heads the profile names keep fact spans with their whole budget (after the sinks and
    recent tokens), the others none; every head keeps the same number of slots."""
    from kvcat.compaction import heads

    L, H = small.spec.num_layers, small.spec.num_kv_heads
    scores = torch.zeros(L, H)
    scores[1, 0], scores[4, 2] = 0.3, 0.2
    monkeypatch.setitem(heads.STORE.memo, small.spec.fingerprint, {
        "version": heads.PROFILE_VERSION, "fingerprint": small.spec.fingerprint, "scores": scores.tolist()})
    ids = prompts.context_ids(small.tokenizer, DOC * 6)
    clear_memo()
    state = document_state(small, torch.tensor(ids), token_nll=True)
    method = get_method("am-hak-fast", salient_unit="sentence", salient_frac=0.0, retrieval_share=2 / (L * H))
    method.prepare(small, state)
    t = len(ids) // 4
    facts = method.salient(state, t, {}, 1.0)[:t - method.sink - method.recent]
    assert method.salient(state, t, {}) is None
    solved = method.solve_layers(small, state, method.head_budgets(small, state, t), None)
    holds = [[set(facts.tolist()) <= set(head.indices.tolist()) for head in row] for row in solved]
    assert all(len(head.indices) == t for row in solved for head in row)
    assert holds[1][0] and holds[4][2] and sum(map(sum, holds)) < L * H  # the others rank keys by attention
