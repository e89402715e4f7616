"""The retrieval suite: kinds a trick cannot pass, split cleanly, scored with folded text."""

from __future__ import annotations

from collections import Counter

import pytest

from kvcat.data.facts import FACT_FORMS, VALUE_KINDS, facts_examples
from kvcat.data.suite import KIND_LENGTHS, SUITE_KINDS, SuiteSpec, by_document, retrieval_cases, suite_kind
from kvcat.eval.metrics import answered, retrieved


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kvcat.models import model_path

    return AutoTokenizer.from_pretrained(model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def heldout(tokenizer):
    return retrieval_cases(tokenizer, SuiteSpec(split="heldout", cases_per_kind=8, lengths=(1024, 2048)))


def test_every_kind_has_its_cases_and_lengths(heldout, tokenizer):
    assert Counter(suite_kind(e) for e in heldout) == {k: 8 for k in SUITE_KINDS}
    for ex in heldout:
        n = len(tokenizer(ex.document, add_special_tokens=False)["input_ids"])
        assert 0.8 * ex.metadata["length"] <= n <= ex.metadata["length"], (ex.id, n)
        assert ex.split == "heldout" and ex.answers and ex.question.strip()
    assert retrieval_cases(tokenizer, SuiteSpec(split="heldout", cases_per_kind=8, lengths=(1024, 2048))) == heldout


def test_each_kind_has_its_own_lengths_unless_told(tokenizer):
    cases = retrieval_cases(tokenizer, SuiteSpec(split="tune", kinds=("multikey", "facts"), cases_per_kind=4))
    for kind in ("multikey", "facts"):
        assert {e.metadata["length"] for e in cases if suite_kind(e) == kind} == set(KIND_LENGTHS[kind])


def test_facts_documents_mix_forms_and_every_fact_is_in_its_document(tokenizer):
    cases = facts_examples(tokenizer, 2048, 4, split="heldout", seed=3, index=1, corpus="sotu")
    assert len(cases) == 4 and len({c.document for c in cases}) == 1
    assert len({c.metadata["value_kind"] for c in cases}) == 4  # four facts: a number, a code, a word, a name
    keys = [c.question for c in cases]
    assert len(set(keys)) == 4
    for c in cases:
        assert c.metadata["statement"] in c.document and c.answers[0] in c.metadata["statement"]
    assert "special magic number" not in cases[0].document


def test_tune_and_heldout_never_share_a_fact_form_or_a_document(tokenizer, heldout):
    tune = retrieval_cases(tokenizer, SuiteSpec(split="tune", cases_per_kind=6, lengths=(1024, 2048)))
    forms = {s: {e.metadata["form"] for e in cases if e.task == "facts"} for s, cases in
             (("tune", tune), ("heldout", heldout))}
    assert forms["tune"] and forms["heldout"] and not forms["tune"] & forms["heldout"]
    assert not {e.document for e in tune} & {e.document for e in heldout}
    for kind in VALUE_KINDS:  # each split has every kind of value
        assert {f.split for f in FACT_FORMS if f.kind == kind} == {"tune", "heldout"}


def test_natural_text_answers_come_from_the_data_not_from_planting(heldout):
    for ex in heldout:
        if suite_kind(ex) in ("squad", "hotpotqa"):
            assert any(a in ex.document for a in ex.answers), ex.id
            assert all(len(a.split()) <= 3 for a in ex.answers)
    squad = [e for e in heldout if suite_kind(e) == "squad"]
    groups = by_document(squad)
    assert len(groups) < len(squad)  # several questions share one compacted document
    assert len({e.metadata["title"] for e in squad}) > 1


@pytest.mark.parametrize("bad, words", [(dict(split="train"), "evaluation"), (dict(kinds=("needle", "trivia")),
                                                                                "unknown suite kind"),
                                        (dict(cases_per_kind=0), "positive"), (dict(lengths=(256,)), "512")])
def test_bad_suite_specs_are_refused(bad, words):
    with pytest.raises(ValueError, match=words):
        SuiteSpec(**bad)


def test_facts_refuse_the_training_split(tokenizer):
    with pytest.raises(ValueError, match="evaluation only"):
        facts_examples(tokenizer, 1024, 3, split="train")


@pytest.mark.parametrize("prediction, answers, hit", [
    ("It was the Northern\nStar.", ("Northern Star",), 1.0),
    ("The code is kt-482.", ("KT-482",), 1.0),
    ("Anna Berg's shop", ("Anna Berg",), 1.0),
    ("The number is 12345.", ("1234",), 0.0),
    ("She painted it OCHRE", ("ochre",), 1.0),
    ("I do not know.", ("ochre",), 0.0),
    ("", ("",), 0.0),
])
def test_answered_folds_case_space_and_punctuation_but_needs_whole_words(prediction, answers, hit):
    assert answered(prediction, answers) == hit


def test_retrieved_folds_white_space_and_case():
    assert retrieved("the Northern\n  star", ("Northern Star",)) == 1.0
    assert retrieved("4829", ("48291",)) == 0.0
