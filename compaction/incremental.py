"""Growing a compacted context: compact only the new tokens and join their block to the existing cache.

Attention over a concatenation of blocks is a mass-weighted mix of each block's attention output, so a
block that matches its own attention mass and output for the queries that will look at it can be joined
to other matched blocks without refitting them. For a conversation whose older part is already a
CompactCache (t slots standing for N tokens):

1. the new tokens run over that cache (beta honoured, positions N, N+1, ...): their post-RoPE K/V and
   (a sample of) their own queries are captured;
2. reference queries look back at the new block from after it (the method's query mode: "repeat" asks for
   a copy of the new tokens and copies them, continuing over the same cache; "context" uses the new tokens'
   own queries);
3. the method compacts the new block alone (mass and output matched for that block), and its slots are
   appended to the cache: keys at positions N.., one CompactCache of N + n tokens.
Nothing of the older block is recomputed or read from the original text.
"""

from __future__ import annotations

import time

import torch

from kvcat.cache import CompactCache
from kvcat.inference import CacheSession, ContextTooLongError, Prefill
from kvcat.models import LoadedModel

from .base import CompactionError, Method, Progress, slots_per_head
from .document import DocumentState
from .queries import context_query_positions, repeat_input

SUPPORTED_QUERIES = (None, "context", "repeat")


def segment_state(lm: LoadedModel, cache: CompactCache, ids: torch.Tensor, query_mode: str | None,
                  chunk_size: int = 1024) -> DocumentState:
    """The new tokens' DocumentState, computed over `cache` (their K/V, context queries, repeat queries)."""
    if query_mode not in SUPPORTED_QUERIES:
        raise CompactionError(f"incremental compaction supports the query modes context and repeat, not "
                              f"{query_mode!r}")
    n = ids.numel()
    session = CacheSession(lm, cache)
    t0 = session.past.layers[0].keys.shape[2]
    pos = context_query_positions(n)
    start = time.perf_counter()
    queries: list[list[torch.Tensor]] = [[] for _ in range(lm.spec.num_layers)]
    logits = None
    nll = torch.zeros(n, device=lm.device)  # the new tokens' surprisal (salient-token selection)
    dev_ids = ids.to(lm.device)
    for lo in range(0, n, chunk_size):
        got: dict[int, list[torch.Tensor]] = {}
        out = session.forward(ids[lo:lo + chunk_size], queries=got)
        end = min(lo + chunk_size + 1, n)
        nll[lo + 1:end] = torch.nn.functional.cross_entropy(out[:end - lo - 1], dev_ids[lo + 1:end], reduction="none")
        logits = out[-1]
        keep = (pos[(pos >= lo) & (pos < lo + chunk_size)] - lo).to(lm.device)
        for layer, qs in got.items():
            queries[layer].append(torch.cat(qs, dim=1)[:, keep])
    keys = [layer.keys[0, :, t0:t0 + n].clone() for layer in session.past.layers]
    values = [layer.values[0, :, t0:t0 + n].clone() for layer in session.past.layers]
    pre = Prefill(keys=keys, values=values, queries=[torch.cat(q, dim=1) for q in queries], last_logits=logits,
                  token_nll=nll)
    state = DocumentState(ids=ids.cpu(), prefill=pre, prefill_s=time.perf_counter() - start, query_pos=pos)
    if query_mode == "repeat":
        start = time.perf_counter()
        copy = repeat_input(lm, ids.tolist(), lm.spec.max_positions - session.position)
        if len(copy) >= 2:
            got = {}
            session.forward(copy, queries=got)
            state.queries["repeat"] = [torch.cat(got[i], dim=1) for i in range(len(keys))]
        else:  # no room left after the conversation: the new tokens' own queries
            state.queries["repeat"] = list(pre.queries)
        state.query_s["repeat"] = time.perf_counter() - start
    return state


def extend(lm: LoadedModel, cache: CompactCache, new_ids, method: Method, ratio: float | None = None,
           target_tokens: int | None = None, progress: Progress | None = None) -> CompactCache:
    """`cache` followed by the compacted block of `new_ids` (about n / ratio, or target_tokens, slots)."""
    cache.check_model(lm.spec.fingerprint)
    ids = torch.as_tensor(new_ids, dtype=torch.long).flatten().cpu()
    if ids.numel() < 2:
        raise CompactionError("fewer than two new tokens: nothing to compact")
    if cache.num_tokens + ids.numel() > lm.spec.max_positions:
        raise ContextTooLongError(cache.num_tokens + ids.numel(), lm.spec.max_positions, "conversation")
    t = slots_per_head(ids.numel(), ratio, target_tokens)
    state = segment_state(lm, cache, ids, method.query_mode)
    block = method.compact_state(lm, state, t, ratio=ratio, target_tokens=target_tokens, progress=progress)
    return cache.concat(block)
