"""Reference queries: the post-RoPE queries a compacted cache is fitted against.

Modes (each gives, per layer, queries [num_heads, n, head_dim]):
- "context": the context's own queries from its prefill (free: captured during the prefill; a sample).
- "last": the context's own queries of its last LAST_QUERIES tokens (they look like the text that follows).
- "repeat": context reconstruction over the whole document: "Repeat the previous context verbatim." as the
  next chat question, then one chunk of the document, for every chunk, each run *after* the cached context
  (continuing from its K/V); the queries of the instruction and the copy look back at every token, like
  later questions do. `reconstruction.Reconstruction` runs it one decoder layer at a time (one layer's
  queries in memory, key scores recorded inside its attention, on-policy for free); `LayerQueries` serves
  any mode that way.
- "self-study": the model writes a few short texts about the context (summary, questions, key facts) over
  its K/V; the queries of those generated tokens.
- "repeat+self-study", "repeat+context", "repeat+last": both, concatenated.

The document's prefill and its queries are the expensive part of compaction; `document_state` memoizes
them (small LRU keyed by model fingerprint and token-ids hash) so several methods and ratios on one
document share them.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import torch

from kvcat import prompts
from kvcat.attention import KeyScores
from kvcat.inference import as_ids, prefill
from kvcat.models import LoadedModel

from .document import DocumentState
from .reconstruction import REPEAT_INSTRUCTION, Reconstruction, repeat_queries

# The modes a method's `queries` parameter takes (QUERY_MODES below computes each)
QueryMode = Literal["context", "repeat", "self-study", "repeat+self-study", "repeat+context", "last", "repeat+last"]

SELF_STUDY_PROMPTS = (
    "\n\nSummarize the text above in a few sentences.\n",
    "\n\nWrite three questions about the text above, with their answers.\n",
    "\n\nList the key facts, names and numbers in the text above.\n",
)


def _tokens(lm: LoadedModel, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


# Incremental compaction and the logit objective of `optimize` copy a bounded sample of the context: evenly
# spaced segments totalling REPEAT_MAX_TOKENS (their passes run over a whole conversation at once).
REPEAT_MAX_TOKENS = 768
REPEAT_SEGMENT = 192


def repeat_segments(ids: list[int], max_tokens: int = REPEAT_MAX_TOKENS, segment: int = REPEAT_SEGMENT) -> list[int]:
    """The context to copy: all of it, or evenly spaced contiguous segments totalling max_tokens."""
    n = len(ids)
    if n <= max_tokens:
        return list(ids)
    count = max(1, max_tokens // segment)
    starts = [round(i * (n - segment) / max(count - 1, 1)) for i in range(count)]
    return [tok for s in starts for tok in ids[s:s + segment]]


def repeat_input(lm: LoadedModel, ids: list[int], room: int | None = None) -> list[int]:
    """The repeat instruction in the question slot of the chat (user turn end, assistant header included),
    then a copy of the context (all of it, or segments of REPEAT_MAX_TOKENS). Cut to `room` tokens."""
    out = prompts.question_ids(lm.tokenizer, REPEAT_INSTRUCTION) + repeat_segments(list(ids))
    return out[: max(room, 0)] if room is not None else out


@torch.no_grad()
def self_study_queries(lm: LoadedModel, state: DocumentState, max_new_tokens: int = 48,
                       prompts: tuple[str, ...] = SELF_STUDY_PROMPTS, seed: int = 0) -> list[torch.Tensor]:
    """Queries of the prompts plus short model-written continuations over the document's K/V."""
    from transformers import DynamicCache

    from kvcat.attention import use_kvcat_attention

    use_kvcat_attention(lm.model)
    gen = torch.Generator(device=lm.device).manual_seed(seed)
    collected: list[list[torch.Tensor]] = [[] for _ in state.prefill.keys]
    n0 = state.num_tokens
    for prompt in prompts:
        room = lm.spec.max_positions - n0
        if room < 8:
            break
        cache = DynamicCache(config=lm.model.config)
        for i, (k, v) in enumerate(zip(state.prefill.keys, state.prefill.values)):
            cache.update(k[None], v[None], i)
        tokens = _tokens(lm, prompt)[: room // 2]
        pos = n0
        queries: dict[int, list[torch.Tensor]] = {}
        for _ in range(max_new_tokens + 1):
            if pos + len(tokens) > lm.spec.max_positions:
                break
            ids = as_ids(tokens, lm.device)
            out = lm.model(input_ids=ids, past_key_values=cache, use_cache=True, kvcat_queries=queries,
                           position_ids=torch.arange(pos, pos + ids.shape[1], device=lm.device)[None],
                           logits_to_keep=1)
            pos += ids.shape[1]
            probs = torch.softmax(out.logits[0, -1].float() / 0.7, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            if nxt == lm.tokenizer.eos_token_id:
                break
            tokens = [nxt]
        for i in range(len(collected)):
            collected[i].append(torch.cat(queries[i], dim=1))
    if not collected[0]:
        return list(state.prefill.queries)
    return [torch.cat(qs, dim=1) for qs in collected]


QUERY_MODES: dict[str, Callable[[LoadedModel, DocumentState], list[torch.Tensor]]] = {
    "context": lambda lm, st: list(st.prefill.queries),
    "repeat": repeat_queries,
    "self-study": self_study_queries,
    "repeat+self-study": lambda lm, st: _joined(lm, st, "repeat", "self-study"),
    "repeat+context": lambda lm, st: _joined(lm, st, "repeat", "context"),
    "last": lambda lm, st: _last_context_queries(st),
    "repeat+last": lambda lm, st: _joined(lm, st, "repeat", "last"),
}


def _last_context_queries(state: DocumentState) -> list[torch.Tensor]:
    """The context's own queries of its last LAST_QUERIES positions (they see almost all of it)."""
    sel = state.query_pos >= state.num_tokens - LAST_QUERIES
    return [q[:, sel.to(q.device)] for q in state.prefill.queries]


def _joined(lm: LoadedModel, state: DocumentState, *modes: str) -> list[torch.Tensor]:
    return [torch.cat(qs, dim=1) for qs in zip(*(get_queries(lm, state, m) for m in modes))]


def get_queries(lm: LoadedModel, state: DocumentState, mode: str) -> list[torch.Tensor]:
    """Per-layer reference queries of `mode`, computed once per document state."""
    if mode not in QUERY_MODES:
        raise ValueError(f"unknown query mode {mode!r}; choose one of {', '.join(QUERY_MODES)}")
    if mode not in state.queries:
        start = time.perf_counter()
        state.queries[mode] = QUERY_MODES[mode](lm, state)
        state.query_s[mode] = 0.0 if mode == "context" else time.perf_counter() - start
    return state.queries[mode]


class LayerQueries:
    """A mode's reference queries one layer at a time, for methods that solve layer by layer: the "repeat"
    part streams from a `Reconstruction` (one layer's queries in memory; on-policy when `advance` is given
    the compacted layer), other parts come from `get_queries`. A state that already holds the mode's
    queries (incremental blocks, or `keep_queries`) serves them as they are."""

    def __init__(self, lm: LoadedModel, state: DocumentState, mode: str):
        if mode not in QUERY_MODES:
            raise ValueError(f"unknown query mode {mode!r}; choose one of {', '.join(QUERY_MODES)}")
        self.state, self.mode = state, mode
        parts = mode.split("+")
        stream = "repeat" in parts and mode not in state.queries and "repeat" not in state.queries
        self.stream = Reconstruction(lm, state) if stream else None
        if self.stream is not None and self.stream.empty:  # no room after the context for a copy prompt
            self.stream = None
            state.queries.setdefault("repeat", list(state.prefill.queries))
        self.fixed_modes = [mode] if mode in state.queries else [m for m in parts
                                                                  if self.stream is None or m != "repeat"]
        self.fixed = [get_queries(lm, state, m) for m in self.fixed_modes]
        self.kept: list[torch.Tensor] = []

    def __call__(self, layer: int) -> torch.Tensor:
        parts = [f[layer] for f in self.fixed]
        if self.stream is not None:
            q = self.stream.queries(layer)
            if self.state.keep_queries:
                self.kept.append(q)
                self.state.scores[("reconstruction", layer)] = self.stream.key_scores
            parts.insert(0, q)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def key_scores(self, layer: int) -> KeyScores | None:
        """The attention the reconstruction's copy queries paid each document key at `layer` (the current
        layer while streaming, or memoized); None for modes without a reconstruction."""
        if self.stream is not None:
            return self.stream.key_scores
        return self.state.scores.get(("reconstruction", layer)) if "repeat" in self.mode.split("+") else None

    def advance(self, compacted: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Done with the current layer (see `Reconstruction.advance`)."""
        if self.stream is None:
            return
        self.stream.advance(compacted)
        if compacted is not None:
            self.kept = []  # on-policy queries depend on the method: never memoized
            self.state.keep_queries = False
        if self.stream.layer == len(self.state.prefill.keys):
            self.state.query_s["repeat"] = self.stream.seconds
            if self.kept:
                self.state.queries["repeat"] = self.kept

    @property
    def seconds(self) -> float:
        """Seconds spent on reference queries (the stream's, and any computed for the fixed parts)."""
        fixed = sum(self.state.query_s.get(m, 0.0) for m in self.fixed_modes)
        return fixed + (self.stream.seconds if self.stream is not None else 0.0)


# --------------------------------------------------------------------------------------------------
# Memoized per-document state

_STATES: OrderedDict[tuple, DocumentState] = OrderedDict()
MAX_STATES = 4


def _key(lm: LoadedModel, ids: torch.Tensor) -> tuple:
    digest = hashlib.sha256(ids.cpu().numpy().astype("int64").tobytes()).hexdigest()[:24]
    return (lm.spec.fingerprint, str(lm.device), str(lm.model.dtype), digest)


CONTEXT_QUERIES = 2048  # context queries kept per document: all of a short one, else a sample
LAST_QUERIES = 64  # ... always including the last ones (SnapKV's observation window)


def context_query_positions(n: int, keep: int = CONTEXT_QUERIES, last: int = LAST_QUERIES) -> torch.Tensor:
    """Sorted positions of the context queries to keep: all, or the last `last` plus a seeded uniform sample."""
    if n <= keep:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(n)
    sample = torch.randperm(n - last, generator=gen)[: keep - last]
    return torch.cat([sample.sort().values, torch.arange(n - last, n)])


def document_state(lm: LoadedModel, ids: torch.Tensor, context_sample: bool = False,
                   token_nll: bool = False) -> DocumentState:
    """The document's prefill (K/V + its own last queries), memoized; reference queries are added per mode
    on demand through `get_queries` and live in the same memo entry.

    Only methods that read the context's own queries across the whole document (H2O, the "context" query
    modes) ask for `context_sample` (CONTEXT_QUERIES of them: 0.75x the K/V of a 4k-token SmolLM2 context); the
    others keep the last LAST_QUERIES only. Methods that weigh tokens by their surprisal ask for `token_nll`.
    A memoized state without what is asked for is prefilled again with both, keeping the reference queries
    and scores it already has (and the memoized keep_queries choice)."""
    key = _key(lm, ids)
    old = _STATES.get(key)
    if old is not None and (old.context_sample or not context_sample) and (
            old.prefill.token_nll is not None or not token_nll):
        _STATES.move_to_end(key)
        return old
    if old is not None:
        context_sample = context_sample or old.context_sample
        token_nll = token_nll or old.prefill.token_nll is not None
    n = ids.numel()
    pos = context_query_positions(n) if context_sample else torch.arange(max(n - LAST_QUERIES, 0), n)
    start = time.perf_counter()
    pre = prefill(lm, ids.to(lm.device), capture_queries=True, query_positions=pos, token_nll=token_nll)
    state = DocumentState(ids=ids.cpu(), prefill=pre, prefill_s=time.perf_counter() - start, query_pos=pos,
                          context_sample=context_sample)
    if old is not None:  # what does not depend on the context queries carries over
        keep = [m for m in old.queries if "context" not in m]
        state.queries.update({m: old.queries[m] for m in keep})
        state.query_s.update({m: old.query_s[m] for m in keep if m in old.query_s})
        state.scores.update(old.scores)
        state.surprisal.update(old.surprisal)
        state.surprisal_s.update(old.surprisal_s)
        state.keep_queries = old.keep_queries
    _STATES[key] = state
    _STATES.move_to_end(key)
    while len(_STATES) > MAX_STATES:
        _STATES.popitem(last=False)
    return state


def clear_memo() -> None:
    _STATES.clear()
