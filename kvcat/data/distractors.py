"""Natural-text questions in long documents: a SQuAD or HotpotQA paragraph among distractor paragraphs.

RULER's QA tasks in our own terms: the paragraphs that answer a question are placed at a seeded depth among
paragraphs of other articles (SQuAD) or other questions (HotpotQA) of the same split, up to `length` tokens.
The answer is a span of ordinary text, never a planted token, so keeping surprising tokens does not find it.

- SQuAD v2: one answering paragraph, several of its questions (one Example each, same document), answers of at
  most `MAX_ANSWER_WORDS` words (a small model's generation rarely reproduces a long span word for word).
- HotpotQA (bridge questions with answers of at most `MAX_ANSWER_WORDS` words only: comparison questions are
  yes/no or one of two names, guessable): the two supporting paragraphs and as many of the question's own eight
  distractors as fill half the length, spread over the document.
"""

from __future__ import annotations

import random

from kvcat.data.qa import hotpotqa_records, squad_articles
from kvcat.data.records import DataError, Example
from kvcat.data.splits import check_split, split_of

MAX_ANSWER_WORDS = 3


def _nth(items: list, index: int, key: str):
    """The index-th item of a seeded permutation: cases of one suite never share an answering paragraph until
    every one has been used."""
    order = list(range(len(items)))
    random.Random(key).shuffle(order)
    return items[order[index % len(items)]]


def _token_len(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fill(tokenizer, length: int, fixed: list[str], pool: list[str], depth: float, rng: random.Random
          ) -> tuple[str, int]:
    """`fixed` paragraphs (in order, the first at about `depth`) among paragraphs drawn from `pool` until the
    document reaches `length` tokens. Returns (document, token index where the first fixed paragraph starts)."""
    need = length - sum(_token_len(tokenizer, p) + 2 for p in fixed)
    if need < 0:
        raise ValueError(f"length {length} is shorter than the answering paragraphs")
    pool = list(pool)
    rng.shuffle(pool)
    fillers, used = [], 0
    for text in pool:
        n = _token_len(tokenizer, text) + 2
        if used + n > need:
            continue
        fillers.append(text)
        used += n
        if need - used < 24:
            break
    if need - used > max(64, length // 8):
        raise DataError(f"too few distractor paragraphs for a {length}-token document")
    at = round(depth * len(fillers))
    before, rest = fillers[:at], fillers[at:]
    step = max(1, len(rest) // max(1, len(fixed)))
    for i, text in enumerate(fixed[1:]):  # the other fixed paragraphs spread over the rest of the document
        rest.insert(min(len(rest), (i + 1) * step + i), text)
    start = _token_len(tokenizer, "\n\n".join(before) + "\n\n") if before else 0
    return "\n\n".join(before + [fixed[0]] + rest), start


def squad_haystack_examples(tokenizer, length: int, depth: float, split: str = "heldout", seed: int = 0,
                            index: int = 0, questions: int = 3) -> list[Example]:
    """A SQuAD paragraph at `depth` among paragraphs of other articles; up to `questions` of its questions."""
    check_split(split)
    rng = random.Random(f"kvcat-squad-haystack:{split}:{seed}:{index}")
    articles = [(t, ps) for t, ps in squad_articles() if split_of(f"squad/{t}") == split]
    candidates = []
    for title, paragraphs in articles:
        for p_index, para in enumerate(paragraphs):
            qas = [qa for qa in para["qas"] if not qa["is_impossible"]
                   and all(len(a["text"].split()) <= MAX_ANSWER_WORDS for a in qa["answers"])]
            if len(qas) >= 2:
                candidates.append((title, p_index, para, qas))
    if not candidates:
        raise DataError(f"no SQuAD paragraphs with short answers in split {split!r}")
    title, p_index, para, qas = _nth(candidates, index, f"squad:{split}:{seed}")
    pool = [p["context"] for t, ps in articles if t != title for p in ps]
    document, start = _fill(tokenizer, length, [para["context"]], pool, depth, rng)
    n = _token_len(tokenizer, document)
    doc_id = f"squad-haystack/{split}-{seed}-{index}-{length}"
    rng.shuffle(qas)
    return [Example(id=f"{doc_id}/{qa['id']}", task="squad-haystack", document=document, question=qa["question"],
                    answers=tuple(dict.fromkeys(a["text"] for a in qa["answers"])), split=split,
                    metadata={"length": length, "num_tokens": n, "depth": depth, "title": title,
                              "paragraph": p_index, "needle_token": start, "actual_depth": start / max(n, 1),
                              "document_id": doc_id})
            for qa in qas[:questions]]


def hotpotqa_haystack_example(tokenizer, length: int, depth: float, split: str = "heldout", seed: int = 0,
                              index: int = 0) -> Example:
    """A HotpotQA bridge question: its ten paragraphs (the first supporting one at `depth`) among other
    questions' paragraphs."""
    check_split(split)
    rng = random.Random(f"kvcat-hotpotqa-haystack:{split}:{seed}:{index}")
    pool_examples = [e for e in hotpotqa_records() if e.split == split and e.metadata["type"] == "bridge"]
    short = [e for e in pool_examples if all(len(a.split()) <= MAX_ANSWER_WORDS for a in e.answers)]
    if not short:
        raise DataError(f"no HotpotQA bridge questions with short answers in split {split!r}")
    ex = _nth(short, index, f"hotpotqa:{split}:{seed}")
    own = ex.document.split("\n\n")
    supporting = [p for p in own if p.split("\n", 1)[0] in ex.metadata["supporting_titles"]]
    others = [p for p in own if p not in supporting]
    rng.shuffle(others)
    fixed, room = list(supporting), length // 2 - sum(_token_len(tokenizer, p) + 2 for p in supporting)
    for text in others:  # its own distractors (same names and topics: the hard ones) as far as half the length
        room -= _token_len(tokenizer, text) + 2
        if room < 0:
            break
        fixed.append(text)
    titles = {p.split("\n", 1)[0] for p in own}
    pool = [p for e in rng.sample(pool_examples, min(len(pool_examples), 60)) if e.id != ex.id
            for p in e.document.split("\n\n") if p.split("\n", 1)[0] not in titles]
    document, start = _fill(tokenizer, length, fixed, pool, depth, rng)
    n = _token_len(tokenizer, document)
    return Example(id=f"hotpotqa-haystack/{split}-{seed}-{index}-{length}", task="hotpotqa-haystack",
                   document=document, question=ex.question, answers=ex.answers, split=split,
                   metadata={"length": length, "num_tokens": n, "depth": depth, "source": ex.id,
                             "needle_token": start, "actual_depth": start / max(n, 1)})
