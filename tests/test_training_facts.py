"""Training conversations share nothing with the evaluation (issue 40): no sentence form, key, value or value
format of any evaluation generator appears in the facts training plants, and a conversation is the served chat
(its context exactly the trainer's prefix, answers marked, padding unscored)."""

from __future__ import annotations

import random
import re

import pytest

from kvcat.data import facts as eval_facts
from kvcat.data import synthetic
from kvcat.training import facts as train_facts

CORPORA = ("paul_graham", "sotu", "moby_dick", "kjv")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from kvcat.models import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2-135m")[1])


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def _training_strings(n: int = 400) -> list[str]:
    out = []
    for i in range(n):
        rng = random.Random(f"test:{i}")
        for statement, question, answer in train_facts.draw_training_facts(rng, rng.randint(2, 5)):
            out += [statement, question, answer]
    return out


def _evaluation_strings(tok) -> list[str]:
    """Statements, questions and answers of every evaluation generator, both splits."""
    out = []
    for split in ("tune", "heldout"):
        for i in range(40):
            for form, statement, question, answer in eval_facts.draw_facts(random.Random(f"e:{split}:{i}"), split, 7):
                out += [statement, question, answer]
        for kind, make in synthetic.RETRIEVAL_KINDS.items():
            ex = make(tok, 600, 0.5, split=split, seed=0, index=0)
            planted = ex.metadata.get("needle") or ex.metadata.get("passage") or ""
            out += [planted, ex.question, *ex.answers]
    return out


def test_no_evaluation_template_key_or_value_appears_in_training_facts(tok):
    training = _training_strings()
    evaluation = _evaluation_strings(tok)
    train_grams = set().union(*map(_grams, training))
    shared = train_grams & set().union(*map(_grams, evaluation))
    assert not shared, sorted(shared)[:10]
    joined = " " + " ".join(" ".join(_words(s)) for s in training) + " "
    pools = (synthetic.CITIES, synthetic.FIRST_NAMES, synthetic.FAMILY_NAMES, synthetic.SHOP_NAMES,
             synthetic.SHOP_KINDS, eval_facts.FIRST, eval_facts.FAMILY, eval_facts.PLACES, eval_facts.COLOURS,
             eval_facts.WORDS, eval_facts.ANIMALS, eval_facts.TRADES, eval_facts.SHIPS)
    for pool in pools:
        for item in pool:
            assert f" {' '.join(_words(item))} " not in joined, item
    eval_formats = (r"\d{7}", r"\d{4}", r"\d{2,3}", r"[A-Z]{2}-\d{3}", r"\d{1,2}[A-F]", r"[0-9a-f]{8}")
    answers = training[2::3]
    for answer in answers:
        assert not any(re.fullmatch(f, answer) for f in eval_formats), answer
    assert {a for a in answers} & {e for e in evaluation} == set()


def test_training_data_hold_no_evaluation_fact(tok):
    """The built training set (conversations included) holds none of the evaluation's planted sentences."""
    from kvcat.training.data import build_sequences

    seqs, info = build_sequences(tok, CORPORA, 512, 0, max_docs=12, planted_frac=0.5, prefix_len=384,
                                 log=lambda m: None)
    text = tok.decode(seqs.blocks[info["document_sequences"]:].flatten().tolist())
    for phrase in ("special magic number", "closest friend", "bicycle lock", "value associated with the key",
                   "front door of the cottage", "opened a small"):
        assert phrase not in text


def test_a_conversation_is_the_served_chat_with_its_context_exactly_the_prefix(tok):
    from kvcat.prompts import context_and_question

    for i in range(6):
        seq = train_facts.chat_fact_sequence(tok, 512, 384, seed=0, index=i, corpora=CORPORA, pad_id=0)
        assert len(seq.ids) == len(seq.scored) == len(seq.answer) == 512
        text = tok.decode(seq.ids[:384])
        assert text.startswith(tok.decode(context_and_question(tok, "", "q").context_ids))
        answers = []  # each marked run decodes to an answer stated in the context
        run: list[int] = []
        for tid, is_answer in zip(seq.ids + [0], seq.answer + [False]):
            if is_answer:
                run.append(tid)
            elif run:
                answers.append(tok.decode(run).strip())
                run = []
        assert answers and all(a in text for a in answers), answers
        first_answer = seq.answer.index(True)
        assert first_answer > 384
        body = tok.decode(seq.ids[384:first_answer])
        assert "?" in body and body.rstrip().endswith("assistant")
        n = sum(seq.scored)
        assert all(seq.scored[:n]) and not any(seq.scored[n:]) and not any(seq.answer[n:])
