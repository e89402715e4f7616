"""The retrieval suite compaction is judged on: planted facts, several facts of mixed forms, natural-text QA.

Kinds (each case is one question about one document; `Example.task` names the kind):

- needle: essays with one planted "special magic number"; the answer is its 7 digits.
- multikey: essays with four such numbers for four cities; the answer is one of them.
- passage: essays with a planted sentence about a shop; the answer is the shop's name.
- facts: essays, speeches, a novel or scripture holding 3-6 facts of mixed forms, asked one by one; the answer
  is a number, a code, a word or a name (`kvcat.data.facts`).
- squad: a SQuAD paragraph among other articles' paragraphs; the answer is a span of natural text.
- hotpotqa: a HotpotQA bridge question's paragraphs among other questions'; a span of natural text, two hops.

A method that keeps surprising tokens passes the first kind and fails the others; one fitted to a sentence
form of the tune split meets other forms on the held-out split (`kvcat.data.facts`). Cases of the kinds with
several questions per document share the document (`Example.metadata["document_id"]`): compaction is made
once per document (`by_document`) and asked each question.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from kvcat.data.distractors import hotpotqa_haystack_example, squad_haystack_examples
from kvcat.data.facts import facts_examples
from kvcat.data.records import Example
from kvcat.data.synthetic import DEFAULT_DEPTHS, RETRIEVAL_KINDS

SUITE_KINDS = ("needle", "multikey", "passage", "facts", "squad", "hotpotqa")
HAYSTACK_CORPORA = ("paul_graham", "sotu", "moby_dick", "kjv")  # the several-facts kind cycles through them


# Document lengths per kind, chosen on the tune split where the full document answers and no document does
# not (SmolLM2-135M, benchmarks/NOTES.md 2026-12-07): the planted kinds to 4k tokens and beyond, the several-facts
# and natural-text kinds only up to about 1k (from 2k on the full document answered 0 of 19 tune cases).
KIND_LENGTHS = {"needle": (2048, 4096), "multikey": (2048, 4096), "passage": (1024, 2048), "facts": (768, 1024),
                "squad": (768, 1024), "hotpotqa": (768, 1024)}


@dataclass(frozen=True)
class SuiteSpec:
    """Which cases: `cases_per_kind` of each kind, lengths and depths cycled so every kind meets each. Lengths:
    `lengths` for every kind, or None for each kind's own (KIND_LENGTHS)."""

    split: str = "heldout"
    kinds: tuple[str, ...] = SUITE_KINDS
    cases_per_kind: int = 24
    lengths: tuple[int, ...] | None = None
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    facts_per_document: tuple[int, ...] = (3, 4, 5, 6)
    questions_per_paragraph: int = 3
    seed: int = 0

    def __post_init__(self):
        unknown = set(self.kinds) - set(SUITE_KINDS)
        if unknown:
            raise ValueError(f"unknown suite kind(s) {sorted(unknown)}; choose from {', '.join(SUITE_KINDS)}")
        if self.split not in ("tune", "heldout"):
            raise ValueError(f"the suite is for evaluation: split 'tune' or 'heldout', not {self.split!r}")
        if self.cases_per_kind < 1 or self.lengths == () or not self.depths:
            raise ValueError("cases_per_kind must be positive and lengths and depths non-empty")
        if self.lengths and min(self.lengths) < 512:
            raise ValueError(f"lengths must be at least 512 tokens, got {min(self.lengths)}")

    def kind_lengths(self, kind: str) -> tuple[int, ...]:
        return self.lengths or KIND_LENGTHS[kind]


def _kind_cases(tokenizer, kind: str, spec: SuiteSpec) -> list[Example]:
    out: list[Example] = []
    lengths = spec.kind_lengths(kind)
    i = 0
    while len(out) < spec.cases_per_kind:
        length = lengths[i % len(lengths)]
        depth = spec.depths[(i // len(lengths)) % len(spec.depths)]
        if kind in RETRIEVAL_KINDS:
            out.append(RETRIEVAL_KINDS[kind](tokenizer, length, depth, split=spec.split, seed=spec.seed, index=i))
        elif kind == "facts":
            count = spec.facts_per_document[i % len(spec.facts_per_document)]
            corpus = HAYSTACK_CORPORA[i % len(HAYSTACK_CORPORA)]
            out += facts_examples(tokenizer, length, count, split=spec.split, seed=spec.seed, index=i, corpus=corpus)
        elif kind == "squad":
            out += squad_haystack_examples(tokenizer, length, depth, split=spec.split, seed=spec.seed, index=i,
                                           questions=spec.questions_per_paragraph)
        else:
            out.append(hotpotqa_haystack_example(tokenizer, length, depth, split=spec.split, seed=spec.seed,
                                                 index=i))
        i += 1
    return out[:spec.cases_per_kind]


def retrieval_cases(tokenizer, spec: SuiteSpec = SuiteSpec()) -> list[Example]:
    """`spec.cases_per_kind` cases of every kind of `spec.kinds`, in kind order (deterministic)."""
    return [ex for kind in spec.kinds for ex in _kind_cases(tokenizer, kind, spec)]


def suite_kind(example: Example) -> str:
    """The suite kind a case belongs to (tasks "squad-haystack" / "hotpotqa-haystack" are "squad" / "hotpotqa")."""
    return example.task.removesuffix("-haystack")


def by_document(examples: list[Example]) -> dict[str, list[Example]]:
    """Cases grouped by the document they ask about (in first-seen order): compact once, ask each."""
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex.metadata.get("document_id", ex.id)].append(ex)
    return dict(groups)
