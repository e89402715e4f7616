"""Training sequences: TRAIN-split documents, tokenized and packed into fixed-length blocks.

`train_documents` is the single place that reads corpora (through `kvcat.data`, which splits documents by a
stable hash of their id: the held-out split is never read here). `PackedSequences` turns the documents into
blocks of `seq_len` tokens (documents joined by EOS, cut into consecutive blocks) and serves them in a
seeded order that is a pure function of (seed, epoch): the data position of a run is just the number of
sequences consumed, which makes resume exact and lets several processes share one global order.
"""

from __future__ import annotations

import hashlib

import torch


class DataTooSmallError(ValueError):
    """The training corpora do not hold enough tokens for the requested run."""


def train_documents(corpora: tuple[str, ...] | list[str], max_docs: int | None = None,
                    seed: int = 0) -> list[tuple[str, str]]:
    """(document id, text) of the TRAIN split of `corpora`; with max_docs, a seeded sample of that many."""
    docs = _load_train(corpora)
    if max_docs is not None and max_docs < len(docs):
        order = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}:{d[0]}".encode()).hexdigest())
        docs = sorted(order[:max_docs])
    return docs


def _load_train(corpora) -> list[tuple[str, str]]:
    from kvcat.data import load_documents

    out = []
    for name in corpora:
        for doc in load_documents(name, split="train"):
            if doc.split != "train":  # the loader's own guarantee, checked once more: never held-out text
                raise RuntimeError(f"{doc.id} is not a training document")
            out.append((doc.id, doc.text))
    return sorted(out)


class PackedSequences:
    """Fixed-length token blocks from documents, in a seeded per-epoch order."""

    def __init__(self, token_docs: list[list[int]], seq_len: int, eos_id: int | None, seed: int):
        stream: list[int] = []
        for ids in token_docs:
            stream.extend(ids)
            if eos_id is not None:
                stream.append(eos_id)
        n = len(stream) // seq_len
        self.blocks = torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)
        self.seq_len, self.seed = seq_len, seed
        self.num_tokens = len(stream)
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self), generator=gen)}
        return self._orders[epoch]

    def get(self, index: int) -> torch.Tensor:
        """The sequence at global position `index` of the endless shuffled stream: [seq_len]."""
        epoch, pos = divmod(index, len(self))
        return self.blocks[self._order(epoch)[pos]]

    def batch(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self.get(i) for i in indices])


def build_sequences(tokenizer, corpora, seq_len: int, seed: int, max_docs: int | None = None,
                    log=print) -> tuple[PackedSequences, dict]:
    """Tokenize the training documents and pack them; returns the sequences and a description for metadata."""
    docs = train_documents(corpora, max_docs, seed)
    if not docs:
        raise DataTooSmallError(f"the corpora {', '.join(corpora)} hold no training documents")
    token_docs = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in docs]
    seqs = PackedSequences(token_docs, seq_len, tokenizer.eos_token_id, seed)
    digest = hashlib.sha256("\n".join(doc_id for doc_id, _ in docs).encode()).hexdigest()[:16]
    info = {"corpora": list(corpora), "split": "train", "documents": len(docs), "tokens": seqs.num_tokens,
            "sequences": len(seqs), "seq_len": seq_len, "document_ids_sha256": digest}
    return seqs, info
