"""Head roles: which KV heads read facts out of a document (retrieval heads), measured once per model on tune
cases and cached under $KVCAT_HOME/heads/<fingerprint>.json (beside the budgets profile).

A head's retrieval score is the attention mass that the tokens of a correct answer, teacher-forced after the
question over the whole document, put on the place in the document where that answer is written (the copy
source): the query before each answer token, averaged over the head's query group, the answer's tokens and the
cases. The heads that copy a fact out of a document are few and the same across documents (the retrieval
heads of Wu et al., 2024, and DuoAttention's); a compacted head spends its slots where its role says: a
retrieval head on the document's fact spans (`spans`), the other heads on the keys attention ranks. Every
head keeps the same number of slots, so a paged engine still saves exactly N/t.

Only tune-split cases are read: the held-out suite never shapes the profile.
"""

from __future__ import annotations

import logging

import torch

from kvcat.models import LoadedModel

from .base import attention_scale
from .profiles import ProfileStore

PROFILE_VERSION = 1
# Answers copied from the document, in several forms, from data the demo's set-up installs (the several-facts
# kind reads npm corpora too; with it, SmolLM2-135M's top 10% of heads were the same 9: benchmarks/NOTES.md).
PROFILE_KINDS = ("needle", "multikey", "passage", "squad")
PROFILE_LENGTH = 1024  # tokens: short enough that SmolLM2-135M answers these kinds over the full document
STORE = ProfileStore("heads", PROFILE_VERSION)
log = logging.getLogger(__name__)


def _find(ids: list[int], part: list[int]) -> int:
    """Start of the last occurrence of `part` in `ids` (-1: none)."""
    n = len(part)
    for i in range(len(ids) - n, -1, -1):
        if ids[i:i + n] == part:
            return i
    return -1


def retrieval_scores(lm: LoadedModel, cases) -> tuple[torch.Tensor, int]:
    """[num_layers, num_kv_heads] mean attention mass of teacher-forced answer tokens on their source in the
    document, and the number of cases it averages (those whose answer is found as tokens in the document)."""
    from kvcat.inference import prefill
    from kvcat.prompts import context_and_question

    tok, spec = lm.tokenizer, lm.spec
    g, scale = spec.num_heads // spec.num_kv_heads, attention_scale(lm)
    total, used = torch.zeros(spec.num_layers, spec.num_kv_heads), 0
    for ex in cases:
        prompt = context_and_question(tok, ex.document, ex.question)
        ctx = prompt.context_ids
        for form in (" " + ex.answers[0], ex.answers[0]):
            answer = tok(form, add_special_tokens=False)["input_ids"]
            src = _find(ctx, answer)
            if src >= 0:
                break
        if src < 0:
            continue
        ids = ctx + prompt.question_ids + answer
        first = len(ids) - len(answer)
        pos = torch.arange(first - 1, len(ids) - 1)  # the query before each answer token
        pre = prefill(lm, ids, capture_queries=True, query_positions=pos)
        key_pos = torch.arange(len(ids))
        causal = key_pos[None, :] <= pos[:, None]  # [n, N]
        for layer in range(spec.num_layers):
            q = pre.queries[layer].float()  # [num_heads, n, d]
            k = pre.keys[layer].float().repeat_interleave(g, dim=0)  # [num_heads, N, d]
            att = torch.softmax(((q @ k.transpose(1, 2)) * scale).masked_fill(~causal, float("-inf")), dim=-1)
            mass = att[:, :, src:src + len(answer)].sum(-1).mean(-1)  # [num_heads]
            total[layer] += mass.view(spec.num_kv_heads, g).mean(-1)
        used += 1
    if used == 0:
        raise ValueError("no case's answer was found as tokens in its document: cannot score retrieval heads")
    return total / used, used


def compute_profile(lm: LoadedModel, cases_per_kind: int = 4) -> dict:
    from kvcat.data.suite import SuiteSpec, retrieval_cases

    spec = SuiteSpec(split="tune", kinds=PROFILE_KINDS, cases_per_kind=cases_per_kind, lengths=(PROFILE_LENGTH,))
    cases = retrieval_cases(lm.tokenizer, spec)
    log.warning("measuring the retrieval heads of %s on %d tune cases (once per model)", lm.spec.name, len(cases))
    scores, used = retrieval_scores(lm, cases)
    return {"version": PROFILE_VERSION, "fingerprint": lm.spec.fingerprint, "split": "tune", "kinds": PROFILE_KINDS,
            "length": PROFILE_LENGTH, "cases": used, "scores": scores.tolist()}


def load_profile(lm: LoadedModel, refresh: bool = False) -> dict:
    """The model's head profile: memory, then $KVCAT_HOME/heads/<fingerprint>.json, else measured (and stored)."""
    return STORE.load(lm, lambda: compute_profile(lm), refresh)


def retrieval_heads(lm: LoadedModel, share: float) -> torch.Tensor:
    """[num_layers, num_kv_heads] bool: the `share` of KV heads with the highest retrieval scores (at least one
    where share > 0)."""
    n = lm.spec.num_layers * lm.spec.num_kv_heads
    return top_heads(lm, min(n, max(1, round(share * n))) if share > 0 else 0)


def top_heads(lm: LoadedModel, count: int) -> torch.Tensor:
    """[num_layers, num_kv_heads] bool: the `count` KV heads with the highest retrieval scores."""
    scores = torch.tensor(load_profile(lm)["scores"])
    if scores.shape != (lm.spec.num_layers, lm.spec.num_kv_heads):
        raise ValueError(f"the head profile of {lm.spec.name} scores {tuple(scores.shape)} heads, the model has "
                         f"{(lm.spec.num_layers, lm.spec.num_kv_heads)}: measure it again (kvcat models heads "
                         f"{lm.spec.name} --refresh)")
    if not 0 <= count <= scores.numel():
        raise ValueError(f"{count} retrieval heads asked of a model with {scores.numel()} KV heads")
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.topk(scores.flatten(), count).indices] = True
    return mask.view_as(scores)
