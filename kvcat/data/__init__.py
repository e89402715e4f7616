"""Typed loaders for long documents, QA, needle-in-a-haystack and synthetic retrieval.

    from kvcat import data
    docs = data.load_documents("sotu", split="heldout")          # list[Document]
    qa = data.hotpotqa(split="heldout", n=20)                    # list[Example]
    needles = data.needle(tokenizer, n=5, length=2048)           # list[Example]
    for block in data.training_windows(tokenizer, 512): ...      # TRAIN-split token blocks

Splits (train / tune / heldout) are a stable hash of the document id (`split_of`); training code reads
only the train split.
"""

from kvcat.data.corpora import (CORPORA, DEFAULT_CORPORA, available_corpora, documents, iter_documents,
                                load_corpus)
from kvcat.data.qa import QA_TASKS, hotpotqa, squad
from kvcat.data.records import SPLITS, DataError, Document, Example, Split, TokenWindow
from kvcat.data.splits import split_of
from kvcat.data.stream import token_windows, training_texts, training_windows
from kvcat.data.synthetic import (RETRIEVAL_KINDS, kv_example, kv_retrieval, multikey_example, needle,
                                  needle_example, needle_grid, passage_example)

# Names other packages use: one corpus, or several (default: all required corpora).
load_documents = load_corpus
long_documents = documents

__all__ = [
    "CORPORA", "DEFAULT_CORPORA", "QA_TASKS", "RETRIEVAL_KINDS", "SPLITS", "DataError", "Document", "Example",
    "Split", "TokenWindow", "available_corpora", "documents", "hotpotqa", "iter_documents", "kv_example",
    "kv_retrieval", "load_corpus", "load_documents", "long_documents", "multikey_example", "needle",
    "needle_example", "needle_grid", "passage_example", "split_of", "squad", "token_windows",
    "training_texts", "training_windows",
]
