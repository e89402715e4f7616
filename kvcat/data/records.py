"""The typed records every loader returns, and the one error they raise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Split = Literal["train", "tune", "heldout"]
SPLITS: tuple[str, ...] = ("train", "tune", "heldout")


class DataError(RuntimeError):
    """A corpus or package is missing or unreadable; the message names the fix."""


@dataclass(frozen=True)
class Document:
    """One long document of a corpus (an essay, a speech, a chapter, a book of the Bible, a novel)."""

    id: str  # "<corpus>/<stable name>", unique across corpora; the split is a hash of it
    corpus: str
    title: str
    text: str
    metadata: dict = field(default_factory=dict, compare=False)

    @property
    def split(self) -> str:
        from kvcat.data.splits import split_of

        return split_of(self.id)


@dataclass(frozen=True)
class Example:
    """A question about a document: QA, needle-in-a-haystack or key-value retrieval.

    `document` is the context that gets compressed; `question` is asked after it; any of `answers`
    counts as correct. `metadata` holds task facts (needle depth and token position, source ids, ...).
    """

    id: str
    task: str  # "hotpotqa", "squad", "needle", "kv"
    document: str
    question: str
    answers: tuple[str, ...]
    split: str
    metadata: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class TokenWindow:
    """A prefix (to be compressed) and the continuation that follows it in a document, as token ids."""

    document_id: str
    start: int  # token offset of the prefix inside the tokenized document
    prefix_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
