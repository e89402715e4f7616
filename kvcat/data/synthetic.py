"""Synthetic retrieval: a needle in a haystack of Paul Graham essays, and key-value lookup.

Needle: a sentence with a random fact ("The special magic number for Lisbon is 4829113.") planted in a
haystack of essays at a chosen depth (0 = start, 1 = end) of a document of a chosen token length; the
question asks for the fact. Lengths and positions are in tokens of the given tokenizer, placed at a word
boundary (within a few tokens of the request); the actual position is recorded in the example's metadata.

Key-value: a JSON object of random UUID keys and values; the question asks for the value of one key.

Random facts are seeded by (split, seed, index), and haystacks only use essays of the requested split, so a
training run never sees a held-out needle or haystack.
"""

from __future__ import annotations

import json
import random
import uuid

from kvcat.data.corpora import load_corpus
from kvcat.data.records import DataError, Example
from kvcat.data.splits import check_split

CITIES = ("Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Dublin", "Quito", "Accra", "Tbilisi", "Perth",
          "Bergen", "Cusco", "Riga", "Sapporo", "Valencia", "Tunis", "Montreal", "Kyoto", "Porto", "Zagreb",
          "Havana", "Seville", "Tallinn", "Krakow", "Bogota", "Cairo", "Manila", "Helsinki", "Dakar", "Geneva")
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _rng(kind: str, split: str, seed: int, index: int) -> random.Random:
    return random.Random(f"kvcat-{kind}:{split}:{seed}:{index}")


def _ids_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _haystack_text(split: str, rng: random.Random, min_chars: int) -> str:
    essays = load_corpus("paul_graham", split)
    if not essays:
        raise DataError(f"no Paul Graham essays in split {split!r}")
    start = rng.randrange(len(essays))
    parts, total, i = [], 0, 0
    while total < min_chars:
        text = essays[(start + i) % len(essays)].text
        parts.append(text)
        total += len(text) + 2
        i += 1
        if i > 10 * len(essays):  # the split's essays are shorter than requested, even repeated
            break
    return "\n\n".join(parts)


def needle_example(tokenizer, length: int, depth: float, split: str = "heldout", seed: int = 0,
                   index: int = 0, digits: int = 7) -> Example:
    """One needle-in-a-haystack example whose document is `length` tokens (minus at most a few) with the
    needle starting about `depth * length` tokens in."""
    check_split(split)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    rng = _rng("needle", split, seed, index)
    city = rng.choice(CITIES)
    number = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    needle = f"The special magic number for {city} is {number}."
    needle_len = len(tokenizer(" " + needle, add_special_tokens=False)["input_ids"])
    if length < needle_len + 16:
        raise ValueError(f"length {length} is too short for a needle of {needle_len} tokens")
    budget = length - needle_len  # haystack tokens around the needle
    hay = _haystack_text(split, rng, min_chars=8 * length + 1000)
    ids, offsets = _ids_offsets(tokenizer, hay)
    if len(ids) < budget + 1:
        raise DataError(f"split {split!r} has too little essay text for a {length}-token haystack")
    # Insert at the first word boundary (a token that starts with a space or newline) at or after the target.
    target = min(round(depth * budget), budget)
    pos = target
    while pos < budget and not hay[offsets[pos][0]].isspace():
        pos += 1
    cut = offsets[pos][0] if pos < len(offsets) else len(hay)
    end = offsets[budget][0] if budget < len(offsets) else len(hay)
    before, after = hay[:cut], hay[cut:end]
    sep = "" if before.endswith((" ", "\n")) or not before else " "
    document = f"{before}{sep}{needle}{after}".rstrip()
    needle_char = len(before) + len(sep)
    doc_ids, doc_offsets = _ids_offsets(tokenizer, document)
    if len(doc_ids) > length:  # merges at the seams can add a token or two: trim the tail
        document = document[:doc_offsets[length][0]].rstrip()
        doc_ids, doc_offsets = _ids_offsets(tokenizer, document)
    needle_token = next(i for i, (a, b) in enumerate(doc_offsets) if b > needle_char)
    # Short on purpose: small models echo the question before answering, and a long one eats the answer budget.
    question = f"What is the special magic number for {city}?"
    return Example(id=f"needle/{split}-{seed}-{index}-{length}-{depth:g}", task="needle", document=document,
                   question=question, answers=(number,), split=split,
                   metadata={"length": length, "num_tokens": len(doc_ids), "depth": depth,
                             "needle_token": needle_token, "actual_depth": needle_token / max(len(doc_ids), 1),
                             "needle": needle, "city": city})


def needle(tokenizer, n: int = 5, length: int = 1024, depths: tuple[float, ...] = DEFAULT_DEPTHS,
           split: str = "heldout", seed: int = 0, digits: int = 7) -> list[Example]:
    """n needle examples of `length` tokens, cycling through `depths`."""
    return [needle_example(tokenizer, length, depths[i % len(depths)], split, seed, i, digits) for i in range(n)]


def needle_grid(tokenizer, lengths: tuple[int, ...], depths: tuple[float, ...] = DEFAULT_DEPTHS,
                per_cell: int = 1, split: str = "heldout", seed: int = 0) -> list[Example]:
    """Every (length, depth) combination, `per_cell` examples each."""
    return [needle_example(tokenizer, length, depth, split, seed, i)
            for length in lengths for depth in depths for i in range(per_cell)]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def kv_example(num_pairs: int = 16, depth: float | None = None, split: str = "heldout", seed: int = 0,
               index: int = 0, short: bool = False) -> Example:
    """A JSON object of `num_pairs` random UUID keys -> UUID values; the question asks for one key's value,
    at `depth` (fraction of the pairs; random when None). `short=True` uses 8-hex-digit keys and values."""
    check_split(split)
    if num_pairs < 1:
        raise ValueError("num_pairs must be positive")
    rng = _rng("kv", split, seed, index)
    make = (lambda: f"{rng.getrandbits(32):08x}") if short else (lambda: _uuid(rng))
    pairs = {}
    while len(pairs) < num_pairs:
        pairs[make()] = make()
    keys = list(pairs)
    pick = rng.randrange(num_pairs) if depth is None else min(int(depth * num_pairs), num_pairs - 1)
    key = keys[pick]
    document = "JSON data:\n" + json.dumps(pairs, indent=0)
    question = (f'What is the value associated with the key "{key}" in the JSON data? '
                "Answer with the value only.")
    return Example(id=f"kv/{split}-{seed}-{index}-{num_pairs}", task="kv", document=document, question=question,
                   answers=(pairs[key],), split=split,
                   metadata={"num_pairs": num_pairs, "key": key, "key_index": pick, "depth": pick / num_pairs})


def kv_retrieval(n: int = 5, num_pairs: int = 16, split: str = "heldout", seed: int = 0,
                 short: bool = False) -> list[Example]:
    """n key-value retrieval examples with the asked key at evenly spread depths."""
    return [kv_example(num_pairs, (i + 0.5) / n, split, seed, i, short) for i in range(n)]
