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


def _haystack_text(split: str, rng: random.Random, min_chars: int, corpus: str = "paul_graham") -> str:
    essays = load_corpus(corpus, split)
    if not essays:
        raise DataError(f"no {corpus} documents in split {split!r}")
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


def plant(tokenizer, length: int, facts: list[tuple[str, float]], split: str, rng: random.Random,
          corpus: str = "paul_graham") -> tuple[str, list[int], int]:
    """A document of about `length` tokens: `corpus` text of `split` with each (sentence, depth) planted at the
    first word boundary at or after depth x the haystack's length. Returns (document, the token index where
    each sentence starts, the document's token count)."""
    lens = [len(tokenizer(" " + f, add_special_tokens=False)["input_ids"]) for f, _ in facts]
    if length < sum(lens) + 16:
        raise ValueError(f"length {length} is too short for {len(facts)} planted sentence(s) of {sum(lens)} tokens")
    budget = length - sum(lens)  # haystack tokens around the sentences
    hay = _haystack_text(split, rng, min_chars=8 * length + 1000, corpus=corpus)
    ids, offsets = _ids_offsets(tokenizer, hay)
    if len(ids) < budget + 1:
        raise DataError(f"split {split!r} of {corpus} has too little text for a {length}-token haystack")
    cuts = []
    for _, depth in facts:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be within [0, 1], got {depth}")
        pos = min(round(depth * budget), budget)
        while pos < budget and not hay[offsets[pos][0]].isspace():
            pos += 1
        cuts.append(offsets[pos][0] if pos < len(offsets) else len(hay))
    end = offsets[budget][0] if budget < len(offsets) else len(hay)
    order = sorted(range(len(facts)), key=lambda i: cuts[i])
    parts, starts, last = [], {}, 0
    for i in order:
        before = hay[last:cuts[i]]
        text = "".join(parts) + before
        sep = "" if text.endswith((" ", "\n")) or not text else " "
        starts[i] = len(text) + len(sep)
        parts += [before, sep, facts[i][0]]
        last = cuts[i]
    document = ("".join(parts) + hay[last:end]).rstrip()
    doc_ids, doc_offsets = _ids_offsets(tokenizer, document)
    if len(doc_ids) > length:  # merges at the seams can add a token or two: trim the tail
        document = document[:doc_offsets[length][0]].rstrip()
        doc_ids, doc_offsets = _ids_offsets(tokenizer, document)
    tokens = [next(j for j, (a, b) in enumerate(doc_offsets) if b > starts[i]) for i in range(len(facts))]
    return document, tokens, len(doc_ids)


def needle_example(tokenizer, length: int, depth: float, split: str = "heldout", seed: int = 0,
                   index: int = 0, digits: int = 7) -> Example:
    """One needle-in-a-haystack example whose document is `length` tokens (minus at most a few) with the
    needle starting about `depth * length` tokens in."""
    check_split(split)
    rng = _rng("needle", split, seed, index)
    city = rng.choice(CITIES)
    number = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    needle = f"The special magic number for {city} is {number}."
    document, (needle_token,), n = plant(tokenizer, length, [(needle, depth)], split, rng)
    # Short on purpose: small models echo the question before answering, and a long one eats the answer budget.
    question = f"What is the special magic number for {city}?"
    return Example(id=f"needle/{split}-{seed}-{index}-{length}-{depth:g}", task="needle", document=document,
                   question=question, answers=(number,), split=split,
                   metadata={"length": length, "num_tokens": n, "depth": depth, "needle_token": needle_token,
                             "actual_depth": needle_token / max(n, 1), "needle": needle, "city": city})


def multikey_example(tokenizer, length: int, depth: float, keys: int = 4, split: str = "heldout", seed: int = 0,
                     index: int = 0, digits: int = 7) -> Example:
    """Several magic numbers for different cities spread over the document; the question asks for the one
    planted at `depth` (the others are distractors of the same form)."""
    check_split(split)
    rng = _rng("multikey", split, seed, index)
    cities = rng.sample(CITIES, keys)
    numbers = [str(rng.randrange(10 ** (digits - 1), 10 ** digits)) for _ in cities]
    others = [(i + 0.5) / keys for i in range(keys)]
    others = sorted(others, key=lambda d: abs(d - depth))[1:]  # the asked one sits at `depth`
    depths = [depth] + others
    facts = [(f"The special magic number for {c} is {x}.", d) for c, x, d in zip(cities, numbers, depths)]
    document, tokens, n = plant(tokenizer, length, facts, split, rng)
    return Example(id=f"multikey/{split}-{seed}-{index}-{length}-{depth:g}", task="multikey", document=document,
                   question=f"What is the special magic number for {cities[0]}?", answers=(numbers[0],),
                   split=split, metadata={"length": length, "num_tokens": n, "depth": depth, "keys": keys,
                                          "needle_token": tokens[0], "actual_depth": tokens[0] / max(n, 1),
                                          "city": cities[0]})


FIRST_NAMES = ("Anna", "Tomas", "Leila", "Marek", "Sofia", "Kwame", "Ines", "Yuki", "Pavel", "Amara", "Oskar", "Nadia")
FAMILY_NAMES = ("Berg", "Okafor", "Varga", "Lindqvist", "Moreau", "Tanaka", "Novak", "Haddad", "Castillo", "Brandt")
SHOP_KINDS = ("bakery", "bookshop", "bicycle workshop", "tea house", "flower shop", "pottery studio")
SHOP_NAMES = ("Golden Loaf", "Silver Fern", "Blue Heron", "Copper Kettle", "Quiet Harbour", "Red Lantern",
              "Amber Mill", "Northern Star", "Green Gate", "Paper Moon")


def passage_example(tokenizer, length: int, depth: float, split: str = "heldout", seed: int = 0,
                    index: int = 0) -> Example:
    """A short planted passage (a person who opened a shop in a city) and a question about it whose answer
    is a name, not a number: retrieval of a fact stated in words."""
    check_split(split)
    rng = _rng("passage", split, seed, index)
    person = f"{rng.choice(FIRST_NAMES)} {rng.choice(FAMILY_NAMES)}"
    city, kind, shop = rng.choice(CITIES), rng.choice(SHOP_KINDS), rng.choice(SHOP_NAMES)
    passage = (f"In the spring of that year, {person} moved to {city} and opened a small {kind} called "
               f"the {shop}.")
    document, (token,), n = plant(tokenizer, length, [(passage, depth)], split, rng)
    return Example(id=f"passage/{split}-{seed}-{index}-{length}-{depth:g}", task="passage", document=document,
                   question=f"What was the name of the {kind} that {person} opened in {city}?", answers=(shop,),
                   split=split, metadata={"length": length, "num_tokens": n, "depth": depth, "needle_token": token,
                                          "actual_depth": token / max(n, 1), "passage": passage})


RETRIEVAL_KINDS = {"needle": needle_example, "multikey": multikey_example, "passage": passage_example}


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
