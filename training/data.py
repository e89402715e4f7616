"""Training sequences: TRAIN-split documents cut into fixed-length blocks, plus training conversations.

`train_documents` is the single place that reads corpora (through `kvcat.data`, which splits documents by a
stable hash of their id: the held-out split is never read here). Every sequence comes from ONE document, so a
sequence's prefix (what the policy compresses) and continuation (what the loss scores) belong together:
documents are cut into consecutive `seq_len` blocks (a tail shorter than a block is dropped), never joined.

Training conversations (`kvcat.training.facts`) teach facts that must survive compression: a TRAIN-split
document holding a few facts of training-only forms, asked one by one in the chat format the evaluation uses.

`SequenceSet` serves all of them in a seeded order that is a pure function of (seed, epoch): the data position
of a run is just the number of sequences consumed, which makes resume exact and lets several processes share
one global order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from kvcat.training.facts import TrainingSequence


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


class SequenceSet:
    """Fixed-length token sequences with their loss masks, in a seeded per-epoch order."""

    def __init__(self, sequences: list[TrainingSequence], seq_len: int, seed: int):
        n = len(sequences)
        self.blocks = torch.tensor([s.ids for s in sequences], dtype=torch.long).view(n, seq_len)
        self.scored = torch.tensor([s.scored for s in sequences], dtype=torch.bool).view(n, seq_len)
        self.answer = torch.tensor([s.answer for s in sequences], dtype=torch.bool).view(n, seq_len)
        self.seq_len, self.seed = seq_len, seed
        self.num_tokens = n * seq_len
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self), generator=gen)}
        return self._orders[epoch]

    def row(self, index: int) -> int:
        """The sequence at global position `index` of the endless shuffled stream."""
        epoch, pos = divmod(index, len(self))
        return int(self._order(epoch)[pos])

    def get(self, index: int) -> torch.Tensor:
        return self.blocks[self.row(index)]

    def batch(self, indices: list[int]) -> Batch:
        rows = torch.tensor([self.row(i) for i in indices])
        return Batch(self.blocks[rows], self.scored[rows], self.answer[rows])


@dataclass
class Batch:
    """ids [B, L]; scored [B, L]: the next-token targets a loss reads (padding is not); answer [B, L]: planted
    answers, supervised through the masked pass."""

    ids: torch.Tensor
    scored: torch.Tensor
    answer: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.ids.to(device), self.scored.to(device), self.answer.to(device))


def document_blocks(token_docs: list[list[int]], seq_len: int) -> list[list[int]]:
    """Consecutive `seq_len` blocks of each document (never across documents; short tails dropped)."""
    return [ids[i:i + seq_len] for ids in token_docs for i in range(0, len(ids) - seq_len + 1, seq_len)]


def build_sequences(tokenizer, corpora, seq_len: int, seed: int, max_docs: int | None = None,
                    planted_frac: float = 0.0, prefix_len: int | None = None, log=print) -> tuple[SequenceSet, dict]:
    """Tokenize the training documents, cut them into blocks and mix in training conversations (`planted_frac`
    of all sequences); returns the sequences and a description for metadata."""
    from kvcat.training.facts import chat_fact_sequence, document_sequence

    docs = train_documents(corpora, max_docs, seed)
    if not docs:
        raise DataTooSmallError(f"the corpora {', '.join(corpora)} hold no training documents")
    token_docs = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in docs]
    blocks = [document_sequence(b) for b in document_blocks(token_docs, seq_len)]
    if not blocks:
        raise DataTooSmallError(f"no training document of {', '.join(corpora)} is {seq_len} tokens long")
    n_planted = round(planted_frac * len(blocks) / (1 - planted_frac)) if planted_frac else 0
    if n_planted:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        prefix_len = prefix_len or seq_len * 3 // 4
        from tqdm import tqdm

        blocks += [chat_fact_sequence(tokenizer, seq_len, prefix_len, seed, i, tuple(corpora), pad)
                   for i in tqdm(range(n_planted), desc="training conversations", unit="seq", leave=False,
                                 disable=n_planted < 50)]
    seqs = SequenceSet(blocks, seq_len, seed)
    digest = hashlib.sha256("\n".join(doc_id for doc_id, _ in docs).encode()).hexdigest()[:16]
    info = {"corpora": list(corpora), "split": "train", "documents": len(docs), "tokens": seqs.num_tokens,
            "sequences": len(seqs), "document_sequences": len(blocks) - n_planted, "planted_sequences": n_planted,
            "planted": "chat conversations of training-only fact forms" if n_planted else None,
            "answer_tokens": int(seqs.answer.sum()), "seq_len": seq_len, "packing": "within documents",
            "document_ids_sha256": digest}
    return seqs, info
