"""Streams of text and token windows for training (train split) and perplexity evaluation (held-out split)."""

from __future__ import annotations

import random
from collections.abc import Iterator

from kvcat.data.corpora import DEFAULT_CORPORA, documents
from kvcat.data.records import DataError, Document, TokenWindow
from kvcat.data.splits import check_split


def training_texts(corpora: tuple[str, ...] | None = None, seed: int = 0, epochs: int | None = 1,
                   split: str = "train") -> Iterator[str]:
    """Texts of TRAIN-split documents (by default of every required corpus) in a seeded order; `epochs=None`
    repeats forever, reshuffling each epoch. The held-out split is never read (unless asked for by name)."""
    check_split(split)
    docs = documents(split, corpora or DEFAULT_CORPORA)
    if not docs:
        raise DataError(f"no {split} documents in corpora {corpora or DEFAULT_CORPORA}")
    epoch = 0
    while epochs is None or epoch < epochs:
        order = list(docs)
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for doc in order:
            yield doc.text
        epoch += 1


def training_windows(tokenizer, seq_len: int, corpora: tuple[str, ...] | None = None, seed: int = 0,
                     epochs: int | None = 1, split: str = "train") -> Iterator[list[int]]:
    """Token blocks of exactly `seq_len` ids packed from `training_texts` (documents joined by EOS)."""
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    for text in training_texts(corpora, seed, epochs, split):
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]


def token_windows(tokenizer, prefix_tokens: int, continuation_tokens: int, n: int, split: str = "heldout",
                  corpora: tuple[str, ...] | None = None, seed: int = 0, per_document: int = 1) -> list[TokenWindow]:
    """n (prefix, continuation) windows from documents of `split` long enough to hold both, at a seeded offset
    inside each; at most `per_document` from one document (non-overlapping: seeded choices among its
    consecutive window-sized blocks), for a corpus with fewer documents than windows wanted. Deterministic for a
    tokenizer, split, sizes, seed and per_document."""
    check_split(split)
    need = prefix_tokens + continuation_tokens
    if prefix_tokens < 1 or continuation_tokens < 2:
        raise ValueError("need prefix_tokens >= 1 and continuation_tokens >= 2")
    docs: list[Document] = documents(split, corpora or DEFAULT_CORPORA, min_chars=need * 2)
    rng = random.Random(f"windows:{split}:{seed}:{prefix_tokens}:{continuation_tokens}")
    rng.shuffle(docs)
    out: list[TokenWindow] = []
    if per_document < 1:
        raise ValueError("per_document must be at least 1")
    for doc in docs:
        # Tokenize only as much text as the windows need (plus slack for the random offset).
        ids = tokenizer(doc.text[: need * 12 * per_document], add_special_tokens=False)["input_ids"]
        if len(ids) < need:
            continue
        if per_document == 1:
            starts = [rng.randrange(0, min(len(ids) - need, need) + 1)]
        else:
            blocks = len(ids) // need
            starts = [b * need for b in sorted(rng.sample(range(blocks), min(per_document, blocks)))]
        for start in starts[:n - len(out)]:
            out.append(TokenWindow(doc.id, start, tuple(ids[start:start + prefix_tokens]),
                                   tuple(ids[start + prefix_tokens:start + need])))
        if len(out) == n:
            break
    if len(out) < n:
        raise DataError(f"only {len(out)} documents of split {split!r} hold {need} tokens; ask for fewer "
                        "windows or shorter ones")
    return out
