"""Training conversations: a TRAIN-split document holding a few facts, then the facts asked one by one in chat.

Why a training set of its own: facts planted with the evaluation's generators teach their sentence forms, and a
form the model has learnt is no longer surprising, so the served compaction's salient spans stop keeping it
(issue 40). Every form here (sentence, question), every key (people, places) and every value format (clock
times, dates, decimals, spices, instruments, fabrics, stones, labels) is used by no evaluation generator
(`kvcat.data.synthetic`, `kvcat.data.facts`, the QA sets); `tests/test_training_facts.py` checks it.

A sequence is the served chat as the evaluation asks it (`kvcat.prompts`): the context (template head, then the
document) is exactly the trainer's prefix, so the policy hides part of it; the continuation is the first
question, the assistant's answer, then the other facts asked and answered turn by turn, then padding that no
loss reads. `TrainingSequence.answer` marks the answer tokens: the trainer supervises them through the masked
pass (the answer has to come from what the policy kept).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable

from kvcat.data.facts import Draw
from kvcat.data.synthetic import plant

# Keys and values: pools of their own (the test checks they meet no evaluation pool); drawn by the evaluation's
# `Draw` (a key never twice in one document).
GIVEN = ("Anselm", "Brigid", "Cosmo", "Delphine", "Evander", "Fenna", "Gideon", "Hesper", "Isolde", "Jasper",
         "Kerensa", "Leopold", "Mireille", "Nestor", "Oriel", "Perpetua", "Rosalind", "Tamsin", "Ulric", "Wilhelmina")
SURNAMES = ("Brackenridge", "Cuthbertson", "Dunmore", "Featherstone", "Gallimore", "Hartigan", "Inglethorpe",
            "Jessop", "Kettering", "Lockwood", "Merriweather", "Northcote", "Oldcastle", "Pennington", "Quayle",
            "Redfern")
VILLAGES = ("Ashcombe", "Bramblewick", "Cinderford", "Dunhollow", "Elmstead", "Foxley", "Glenmarrow", "Hollowmere",
            "Ivybridge", "Juniper Hill", "Kestrel Point", "Lowmoor", "Millbrook", "Nettlebed", "Oxbow End", "Pinegate")
SPICES = ("cumin", "nutmeg", "cardamom", "cinnamon", "clove", "fennel", "turmeric", "paprika", "aniseed", "ginger")
INSTRUMENTS = ("oboe", "tuba", "cello", "banjo", "flute", "harp", "bassoon", "trombone", "mandolin", "clarinet")
FABRICS = ("tweed", "corduroy", "linen", "denim", "flannel", "gingham", "muslin", "calico", "chiffon", "seersucker")
STONES = ("opal", "garnet", "topaz", "jade", "onyx", "ruby", "emerald", "sapphire", "agate", "beryl")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
GREEK = ("Alpha", "Gamma", "Delta", "Epsilon", "Kappa", "Lambda", "Sigma", "Omega", "Theta", "Zeta")


def _tram(d: Draw):
    v, h, m = d.place(), d.rng.randrange(5, 12), d.rng.choice(("05", "15", "20", "35", "40", "50"))
    return (f"On Sundays the tram to {v} sets off at {h}:{m} sharp.", f"When does the Sunday tram to {v} set off?",
            f"{h}:{m}")


def _vineyard(d: Draw):
    who, day, month = d.person(), d.rng.randrange(2, 29), d.pick(MONTHS)
    return (f"The vineyard of {who} was planted on {day} {month}, after a week of rain.",
            f"On which date was the vineyard of {who} planted?", f"{day} {month}")


def _well(d: Draw):
    v, depth = d.place(), f"{d.rng.randrange(4, 40)}.{d.rng.randrange(1, 10)}"
    return (f"The old well behind the chapel in {v} measures {depth} metres to the water.",
            f"How many metres does the old well in {v} measure to the water?", depth)


def _soup(d: Draw):
    who, spice = d.person(), d.pick(SPICES)
    return (f"Every winter {who} seasoned the barley soup with {spice}.",
            f"Which spice did {who} use to season the barley soup?", spice)


def _band(d: Draw):
    who, instrument = d.person(), d.pick(INSTRUMENTS)
    return (f"In the brass and folk band of the parish, {who} played the {instrument}.",
            f"Which instrument did {who} play in the parish band?", instrument)


def _coat(d: Draw):
    who, fabric = d.person(), d.pick(FABRICS)
    return (f"{who} stitched a travelling cloak out of {fabric}.", f"What fabric was the travelling cloak of {who} "
            "stitched from?", fabric)


def _ring(d: Draw):
    v, stone = d.place(), d.pick(STONES)
    return (f"The mayor's ring kept in the {v} town hall is set with a single {stone}.",
            f"What stone is set in the mayor's ring at the {v} town hall?", stone)


def _sample(d: Draw):
    who, label = d.person(), f"{d.pick(GREEK)} {d.rng.randrange(10, 99)}"
    return (f"The soil sample that {who} collected was filed under the label {label}.",
            f"Under which label was the soil sample of {who} filed?", label)


def _mentor(d: Draw):
    who, mentor = d.person(), d.person()
    return (f"As an apprentice glazier, {who} learnt the craft from {mentor}.",
            f"From whom did {who} learn the glazier's craft?", mentor)


def _moved(d: Draw):
    who, village = d.person(), d.place()
    return (f"When the mill closed, {who} moved the whole family to {village}.",
            f"Where did {who} move the family when the mill closed?", village)


TRAINING_FORMS: tuple[Callable[[Draw], tuple[str, str, str]], ...] = (
    _tram, _vineyard, _well, _soup, _band, _coat, _ring, _sample, _mentor, _moved)


def draw_training_facts(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    """`count` (statement, question, answer) of distinct forms, keys never repeated in one document."""
    forms = rng.sample(TRAINING_FORMS, count)
    draw = Draw(rng, set(), GIVEN, SURNAMES, VILLAGES)
    return [form(draw) for form in forms]


@dataclass
class TrainingSequence:
    """Token ids of one sequence, which next-token targets a loss reads, and which are planted answers."""

    ids: list[int]
    scored: list[bool]
    answer: list[bool]


def document_sequence(ids: list[int]) -> TrainingSequence:
    return TrainingSequence(list(ids), [True] * len(ids), [False] * len(ids))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _context_of_length(tokenizer, document: str, question: str, prefix_len: int) -> tuple[str, list[int]] | None:
    """The longest start of `document` whose chat context (`kvcat.prompts`) is exactly `prefix_len` tokens."""
    from kvcat.prompts import context_and_question

    enc = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    overhead = len(context_and_question(tokenizer, "x", question).context_ids) - len(_encode(tokenizer, "x"))
    cut = min(len(offsets), prefix_len - overhead)
    for n in range(cut, max(0, cut - 8), -1):
        text = document[:offsets[n - 1][1]].rstrip()
        ctx = context_and_question(tokenizer, text, question).context_ids
        if len(ctx) == prefix_len:
            return text, ctx
    return None


@functools.cache
def _turn_texts(tokenizer) -> tuple[str, str]:
    """(a later user turn with "{question}" in it, up to the assistant's answer; what closes an answer), as the
    tokenizer's chat template renders them (plain text for a model without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n{question}\nAnswer: ", "\n"
    render = tokenizer.apply_chat_template
    one = [{"role": "user", "content": "A"}]
    asked = render(one, tokenize=False, add_generation_prompt=True)
    answered = render(one + [{"role": "assistant", "content": "B"}], tokenize=False)
    again = render(one + [{"role": "assistant", "content": "B"}, {"role": "user", "content": "\x00Q\x00"}],
                   tokenize=False, add_generation_prompt=True)
    if not (answered.startswith(asked + "B") and again.startswith(answered)):
        raise ValueError("the chat template does not render turns by appending them; cannot build conversations")
    later = again[len(answered):].replace("{", "{{").replace("}", "}}").replace("\x00Q\x00", "{question}")
    return later, answered[len(asked) + 1:]


def chat_fact_sequence(tokenizer, seq_len: int, prefix_len: int, seed: int, index: int,
                       corpora: tuple[str, ...], pad_id: int) -> TrainingSequence:
    """One training conversation (module docstring): 2-5 facts planted in a TRAIN-split document of one of
    `corpora`, the context exactly `prefix_len` tokens, the questions in the continuation."""
    from kvcat.prompts import context_and_question

    from kvcat.training.data import DataTooSmallError

    for attempt in range(8):  # a draw whose context cannot be cut to the prefix exactly is drawn again
        rng = random.Random(f"kvcat-train-chat:{seed}:{index}:{attempt}")
        facts = draw_training_facts(rng, rng.randint(2, 5))
        depths = sorted(rng.uniform(0.03, 0.85) for _ in facts)
        corpus = corpora[index % len(corpora)]
        document, _, _ = plant(tokenizer, prefix_len + 32, [(s, d) for (s, _, _), d in zip(facts, depths)], "train",
                               rng, corpus=corpus)
        order = list(range(len(facts)))
        rng.shuffle(order)
        found = _context_of_length(tokenizer, document, facts[order[0]][1], prefix_len)
        if found is None:
            continue
        text, ctx = found
        asked = [facts[i] for i in order if facts[i][0] in text]  # a fact cut off with the tail is not asked
        if not asked or asked[0] is not facts[order[0]]:
            continue
        ids, answer = list(ctx), [False] * len(ctx)
        first = context_and_question(tokenizer, text, asked[0][1]).question_ids
        later, end = _turn_texts(tokenizer)
        turns = [first] + [_encode(tokenizer, later.format(question=q)) for _, q, _ in asked[1:]]
        end = _encode(tokenizer, end)
        for turn, (_, _, value) in zip(turns, asked):
            value_ids = _encode(tokenizer, value)
            if len(ids) + len(turn) + len(value_ids) > seq_len:
                break
            ids += turn
            answer += [False] * len(turn)
            ids += value_ids
            answer += [True] * len(value_ids)
            ids += end
            answer += [False] * len(end)
        ids, answer = ids[:seq_len], answer[:seq_len]
        if not any(answer):
            continue
        scored = [True] * len(ids) + [False] * (seq_len - len(ids))
        pad = seq_len - len(ids)
        return TrainingSequence(ids + [pad_id] * pad, scored, answer + [False] * pad)
    raise DataTooSmallError(f"could not build a training conversation with a context of exactly {prefix_len} "
                            f"tokens in {seq_len}")
