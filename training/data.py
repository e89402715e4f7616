"""Training sequences: TRAIN-split documents cut into fixed-length blocks, plus generated planted-fact sequences.

`train_documents` is the single place that reads corpora (through `kvcat.data`, which splits documents by a
stable hash of their id: the held-out split is never read here). Every sequence comes from ONE document, so a
sequence's prefix (what the policy compresses) and continuation (what the loss scores) belong together:
documents are cut into consecutive `seq_len` blocks (a tail shorter than a block is dropped), never joined.

`planted_sequences` teaches facts that must survive compression: a TRAIN-split haystack (or a key-value list)
with a planted fact in the prefix, then the question and its answer at the start of the continuation, then
(text kinds) the same document going on. The facts come from `kvcat.data.synthetic`'s generators with
split="train": their own haystacks and their own random streams, disjoint from the tune and held-out cases.

`SequenceSet` serves all of them in a seeded order that is a pure function of (seed, epoch): the data position
of a run is just the number of sequences consumed, which makes resume exact and lets several processes share
one global order.
"""

from __future__ import annotations

import hashlib
import json

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


PLANTED_KINDS = ("needle", "multikey", "passage", "kv")


class SequenceSet:
    """Fixed-length token sequences, in a seeded per-epoch order."""

    def __init__(self, sequences: list[list[int]], seq_len: int, seed: int):
        self.blocks = torch.tensor(sequences, dtype=torch.long).view(len(sequences), seq_len)
        self.seq_len, self.seed = seq_len, seed
        self.num_tokens = len(sequences) * seq_len
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


def document_blocks(token_docs: list[list[int]], seq_len: int) -> list[list[int]]:
    """Consecutive `seq_len` blocks of each document (never across documents; short tails dropped)."""
    return [ids[i:i + seq_len] for ids in token_docs for i in range(0, len(ids) - seq_len + 1, seq_len)]


def planted_sequence(tokenizer, kind: str, seq_len: int, prefix_len: int, seed: int, index: int) -> list[int]:
    """One training sequence: a fact planted in the prefix, "Question: ... Answer: ..." opening the continuation,
    then the document going on (key-value lists: questions about other keys of the prefix)."""
    import random

    from kvcat.data import RETRIEVAL_KINDS
    from kvcat.data.synthetic import kv_example

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def qa(question: str, answer: str) -> list[int]:
        return ids(f"\n\nQuestion: {question}\nAnswer: {answer}\n\n")

    rng = random.Random(f"kvcat-train-planted:{seed}:{index}")
    for attempt in range(8):  # a fact cut off by the prefix boundary is drawn again
        sub = index * 8 + attempt
        if kind == "kv":
            ex = kv_example(num_pairs=max(2, prefix_len // 8), depth=rng.uniform(0.0, 0.6), split="train",
                            seed=seed, index=sub, short=True)
        else:
            depth = rng.uniform(0.05, 0.9) * prefix_len / seq_len  # the fact lies inside the prefix
            ex = RETRIEVAL_KINDS[kind](tokenizer, seq_len + 16, depth, split="train", seed=seed, index=sub)
        doc = ids(ex.document)
        prefix = doc[:prefix_len]
        prefix_text = tokenizer.decode(prefix)
        if len(prefix) < prefix_len or ex.answers[0] not in prefix_text:
            continue
        out = prefix + qa(ex.question, ex.answers[0])
        if kind == "kv":  # more questions about keys the prefix holds
            pairs = [(k, v) for k, v in json.loads(ex.document.split("\n", 1)[1]).items()
                     if f'"{k}": "{v}"' in prefix_text]
            while len(out) < seq_len and pairs:
                k, v = pairs.pop(rng.randrange(len(pairs)))
                out += qa(f'What is the value associated with the key "{k}" in the JSON data?', v)
        else:
            out += doc[prefix_len:]
        if len(out) >= seq_len:
            return out[:seq_len]
    raise DataTooSmallError(f"could not plant a {kind} fact inside a {prefix_len}-token prefix of {seq_len} tokens")


def planted_sequences(tokenizer, n: int, seq_len: int, prefix_len: int, seed: int,
                      kinds: tuple[str, ...] = PLANTED_KINDS) -> list[list[int]]:
    """n planted-fact sequences cycling through `kinds`."""
    return [planted_sequence(tokenizer, kinds[i % len(kinds)], seq_len, prefix_len, seed, i) for i in range(n)]


def build_sequences(tokenizer, corpora, seq_len: int, seed: int, max_docs: int | None = None,
                    planted_frac: float = 0.0, prefix_len: int | None = None, log=print) -> tuple[SequenceSet, dict]:
    """Tokenize the training documents, cut them into blocks and mix in planted-fact sequences (`planted_frac` of
    all sequences); returns the sequences and a description for metadata."""
    docs = train_documents(corpora, max_docs, seed)
    if not docs:
        raise DataTooSmallError(f"the corpora {', '.join(corpora)} hold no training documents")
    token_docs = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in docs]
    blocks = document_blocks(token_docs, seq_len)
    if not blocks:
        raise DataTooSmallError(f"no training document of {', '.join(corpora)} is {seq_len} tokens long")
    n_planted = round(planted_frac * len(blocks) / (1 - planted_frac)) if planted_frac else 0
    if n_planted:
        log(f"generating {n_planted} planted-fact sequences ({', '.join(PLANTED_KINDS)})")
        blocks += planted_sequences(tokenizer, n_planted, seq_len, prefix_len or seq_len * 3 // 4, seed)
    seqs = SequenceSet(blocks, seq_len, seed)
    digest = hashlib.sha256("\n".join(doc_id for doc_id, _ in docs).encode()).hexdigest()[:16]
    info = {"corpora": list(corpora), "split": "train", "documents": len(docs), "tokens": seqs.num_tokens,
            "sequences": len(seqs), "document_sequences": len(blocks) - n_planted, "planted_sequences": n_planted,
            "planted_kinds": list(PLANTED_KINDS) if n_planted else [], "seq_len": seq_len,
            "packing": "within documents", "document_ids_sha256": digest}
    return seqs, info
