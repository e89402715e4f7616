"""Deterministic train / tune / held-out splits from a stable hash of the document id.

The split of a document depends only on its id (sha256, not Python's salted `hash`), so it is the same on
every machine and run, and a document never moves between splits when corpora grow. Examples built from a
document (QA questions, needles planted in its essays) inherit its split, so training never sees held-out
documents.
"""

from __future__ import annotations

import hashlib

from kvcat.data.records import SPLITS

# Fractions of documents in each split (train, tune, heldout). "tune" is where defaults and hyperparameters
# are chosen; "heldout" is only for reported figures.
FRACTIONS = (0.8, 0.1, 0.1)
_SALT = "kvcat-split-v1:"


def _unit(doc_id: str) -> float:
    digest = hashlib.sha256((_SALT + doc_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(doc_id: str) -> str:
    """'train', 'tune' or 'heldout' for a document id."""
    u = _unit(doc_id)
    if u < FRACTIONS[0]:
        return "train"
    if u < FRACTIONS[0] + FRACTIONS[1]:
        return "tune"
    return "heldout"


def check_split(split: str | None) -> str | None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} (or None for all)")
    return split


def in_split(doc_id: str, split: str | None) -> bool:
    return split is None or split_of(doc_id) == split
