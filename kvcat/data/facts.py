"""Documents that hold several facts of mixed forms, each asked on its own.

A case of the single-needle kind can be passed by keeping the most surprising tokens: a random seven-digit
number in an essay is exactly that. Real documents state many facts, most of them in ordinary words. Here a
document of `length` tokens of one corpus (essays, speeches, a novel, scripture) holds 3-6 facts, each in its
own sentence form and of its own kind of value:

- numbers and codes ("The combination of Ilse Marchetti's bicycle lock is 4175.", "... seat 14C"),
- common words ("Ilse Marchetti painted the door of her cottage ochre."),
- names of people and places ("The ferry company on Corvo Island is run by Dario Whitfield.").

Each fact becomes one `Example` (same document, its own question), so a compaction made once per document
is asked every fact in turn, and the other facts of the document are its distractors. The sentence forms of
the tune split and of the held-out split are different (`FACT_FORMS`): a default chosen on tune is judged on
forms it never saw. No form, key or value here is used by training (`kvcat.training.facts` has its own).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from kvcat.data.records import Example
from kvcat.data.splits import check_split
from kvcat.data.synthetic import plant

# Key pools: who or what a fact is about. Disjoint from the single-needle kinds' cities and names.
FIRST = ("Ilse", "Dario", "Maren", "Teodor", "Priya", "Joaquin", "Elif", "Bruno", "Saskia", "Emeka", "Linnea",
         "Rafael", "Ottilie", "Henrik", "Zainab", "Casimir", "Noor", "Viggo", "Ottavia", "Lorcan")
FAMILY = ("Marchetti", "Whitfield", "Ostrowski", "Achterberg", "Nakamura", "Delacroix", "Fairbairn", "Kowalczyk",
          "Salazar", "Lindgren", "Abernathy", "Petrescu", "Vasquez", "Holloway", "Rasmussen", "Okonkwo")
PLACES = ("Corvo Island", "Aldermere", "Pembrook", "Saltcombe", "Harrowgate", "Ravensholm", "Kilmory", "Eastwick",
          "Thornbury", "Wexmoor", "Larkspur Bay", "Fenwick", "Brindlecote", "Oakhurst", "Marlow Cross", "Selby Fen")
# Value pools for word answers: common enough to be ordinary text, too many to guess.
COLOURS = ("ochre", "turquoise", "maroon", "lavender", "crimson", "teal", "mustard", "olive", "coral", "indigo",
           "saffron", "cobalt", "amber", "plum", "scarlet", "beige")
WORDS = ("lantern", "meadow", "harbour", "thistle", "anchor", "compass", "orchard", "falcon", "granite", "willow",
         "saddle", "lighthouse", "marble", "pepper", "kettle", "ribbon", "cedar", "violin", "glacier", "tulip",
         "barrel", "chimney", "walnut", "feather", "pebble", "quarry", "timber", "blanket")
ANIMALS = ("tortoise", "ferret", "parrot", "hedgehog", "goat", "donkey", "iguana", "rabbit", "owl", "canary",
           "pony", "lizard", "goose", "alpaca")
TRADES = ("bakery", "bookbindery", "boatyard", "cheese shop", "clock repair shop", "print shop", "sawmill",
          "dairy", "ferry company", "tannery", "glassworks", "smithy")
SHIPS = ("Morning Lark", "Iron Duchess", "Silver Wren", "Patient Heron", "Scarlet Tide", "Northern Lamp",
         "Brave Sparrow", "Velvet Gale", "Quiet Thunder", "Copper Swan")
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"


@dataclass(frozen=True)
class Draw:
    """What one fact needs drawn: a fresh person or place as its key, and its value. The key pools are the
    evaluation's unless given (training draws from pools of its own: `kvcat.training.facts`)."""

    rng: random.Random
    used: set
    first: tuple[str, ...] = FIRST
    family: tuple[str, ...] = FAMILY
    places: tuple[str, ...] = PLACES

    def person(self) -> str:
        return self._fresh(lambda: f"{self.rng.choice(self.first)} {self.rng.choice(self.family)}")

    def place(self) -> str:
        return self._fresh(lambda: self.rng.choice(self.places))

    def _fresh(self, make: Callable[[], str]) -> str:
        for _ in range(1000):  # a key is never shared by two facts of one document (surnames may repeat)
            value = make()
            if value not in self.used and value.split()[0] not in {u.split()[0] for u in self.used}:
                self.used.add(value)
                return value
        raise RuntimeError("fact key pools exhausted")

    def digits(self, n: int) -> str:
        return str(self.rng.randrange(10 ** (n - 1), 10 ** n))

    def pick(self, pool: tuple[str, ...]) -> str:
        return self.rng.choice(pool)

    def code(self) -> str:
        return f"{self.rng.choice(LETTERS)}{self.rng.choice(LETTERS)}-{self.digits(3)}"


@dataclass(frozen=True)
class FactForm:
    """One way a document states a fact and a reader asks for it. `make` returns (statement, question, answer)."""

    name: str
    kind: str  # the value's form: "number", "code", "word" or "name"
    split: str  # "tune" or "heldout": the forms of the two splits never meet
    make: Callable[[Draw], tuple[str, str, str]]


def _lock(d: Draw):
    p, v = d.person(), d.digits(4)
    return (f"The combination of {p}'s bicycle lock is {v}.", f"What is the combination of {p}'s bicycle lock?", v)


def _paid(d: Draw):
    p, v = d.person(), d.digits(3)
    return (f"At the auction {p} paid {v} pounds for a painting of the harbour.",
            f"How many pounds did {p} pay for the painting of the harbour?", v)


def _pier(d: Draw):
    p, v = d.place(), d.digits(2)
    return (f"The morning ferry to {p} always leaves from pier {v}.",
            f"From which pier does the morning ferry to {p} leave?", v)


def _born(d: Draw):
    p, v = d.person(), str(d.rng.randrange(1901, 1990))
    return f"{p} was born in {v}, the year the old bridge was rebuilt.", f"In what year was {p} born?", v


def _storeroom(d: Draw):
    p, v = d.place(), d.code()
    return (f"The storeroom of the {p} library opens with the access code {v}.",
            f"What is the access code of the storeroom of the {p} library?", v)


def _seat(d: Draw):
    p, v = d.person(), f"{d.rng.randrange(2, 40)}{d.rng.choice('ABCDEF')}"
    return (f"On the night train {p} sat in seat {v}, next to a sleeping soldier.",
            f"In which seat did {p} sit on the night train?", v)


def _door(d: Draw):
    p, v = d.person(), d.pick(COLOURS)
    return (f"{p} painted the front door of the cottage {v}.",
            f"What colour did {p} paint the front door of the cottage?", v)


def _password(d: Draw):
    p, v = d.place(), d.pick(WORDS)
    return (f"To enter the archive at {p}, visitors had to say the word {v}.",
            f"What word did visitors have to say to enter the archive at {p}?", v)


def _pet(d: Draw):
    p, v = d.person(), d.pick(ANIMALS)
    return f"{p} kept a {v} in the garden shed for eleven years.", f"What animal did {p} keep in the garden shed?", v


def _ship(d: Draw):
    p, v = d.person(), d.pick(SHIPS)
    return (f"{p} crossed the ocean on a steamer called the {v}.",
            f"What was the name of the steamer on which {p} crossed the ocean?", v)


def _trade(d: Draw):
    place, trade, v = d.place(), d.pick(TRADES), d.person()
    return (f"The {trade} in {place} is run by {v}.", f"Who runs the {trade} in {place}?", v)


def _friend(d: Draw):
    p, v = d.person(), d.person()
    return (f"At school, {p}'s closest friend was {v}.", f"Who was {p}'s closest friend at school?", v)


def _winter(d: Draw):
    p, v = d.person(), d.place()
    return (f"{p} spent the long winter of that year in {v}.", f"Where did {p} spend the long winter?", v)


def _bridge(d: Draw):
    p, v = d.place(), d.person()
    return (f"The stone bridge at {p} was designed by the engineer {v}.",
            f"Which engineer designed the stone bridge at {p}?", v)


FACT_FORMS: tuple[FactForm, ...] = (
    FactForm("lock", "number", "tune", _lock), FactForm("paid", "number", "heldout", _paid),
    FactForm("pier", "number", "tune", _pier), FactForm("born", "number", "heldout", _born),
    FactForm("storeroom", "code", "tune", _storeroom), FactForm("seat", "code", "heldout", _seat),
    FactForm("door", "word", "tune", _door), FactForm("password", "word", "heldout", _password),
    FactForm("pet", "word", "tune", _pet), FactForm("ship", "word", "heldout", _ship),
    FactForm("trade", "name", "tune", _trade), FactForm("friend", "name", "heldout", _friend),
    FactForm("winter", "name", "tune", _winter), FactForm("bridge", "name", "heldout", _bridge),
)
VALUE_KINDS = ("number", "code", "word", "name")


def forms_for(split: str) -> tuple[FactForm, ...]:
    if split not in ("tune", "heldout"):
        raise ValueError(f"the several-facts kind is for evaluation only: split 'tune' or 'heldout', not {split!r}")
    return tuple(f for f in FACT_FORMS if f.split == split)


def draw_facts(rng: random.Random, split: str, count: int) -> list[tuple[FactForm, str, str, str]]:
    """`count` facts of distinct forms, covering as many value kinds as `count` allows (numbers, codes, words,
    names in turn), keys never repeated within the document."""
    forms = forms_for(split)
    if not 1 <= count <= len(forms):
        raise ValueError(f"a document holds 1 to {len(forms)} facts of distinct forms, not {count}")
    by_kind = {k: [f for f in forms if f.kind == k] for k in VALUE_KINDS}
    for pool in by_kind.values():
        rng.shuffle(pool)
    kinds = list(VALUE_KINDS)
    rng.shuffle(kinds)
    chosen: list[FactForm] = []
    while len(chosen) < count:
        for k in kinds:
            if by_kind[k] and len(chosen) < count:
                chosen.append(by_kind[k].pop())
    rng.shuffle(chosen)
    draw = Draw(rng, set())
    return [(form, *form.make(draw)) for form in chosen]


def facts_examples(tokenizer, length: int, count: int, split: str = "heldout", seed: int = 0, index: int = 0,
                   corpus: str = "paul_graham") -> list[Example]:
    """One document of about `length` tokens of `corpus` text holding `count` facts at evenly spread depths
    (jittered), and one Example per fact (same document, the question about that fact)."""
    check_split(split)
    rng = random.Random(f"kvcat-facts:{split}:{seed}:{index}:{corpus}")
    facts = draw_facts(rng, split, count)
    depths = [min(0.95, max(0.02, (i + 0.5) / count + rng.uniform(-0.3, 0.3) / count)) for i in range(count)]
    document, tokens, n = plant(tokenizer, length, [(s, d) for (_, s, _, _), d in zip(facts, depths)], split, rng,
                                corpus=corpus)
    doc_id = f"facts/{split}-{seed}-{index}-{length}-{corpus}"
    return [Example(id=f"{doc_id}/{i}", task="facts", document=document, question=question, answers=(answer,),
                    split=split, metadata={"length": length, "num_tokens": n, "corpus": corpus, "form": form.name,
                                           "value_kind": form.kind, "statement": statement, "facts": count,
                                           "needle_token": tokens[i], "actual_depth": tokens[i] / max(n, 1),
                                           "document_id": doc_id})
            for i, (form, statement, question, answer) in enumerate(facts)]
