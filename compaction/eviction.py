"""Eviction baselines under the same interface: keep a subset of the original (key, value) pairs, beta = 0.

Each method scores every key of every KV head (higher = keep) and keeps the top t per head, or, for
global methods (KVzip-style), the top L*H*t over all heads and layers (at least one per head); heads with
fewer slots are padded with beta = -inf by `base.package`, and a global method's heads that keep more than t
keep the rest as side slots (a hybrid cache: its bytes are then what a server holds, not t per head padded to
the widest head).

- recent (truncation): the t most recent tokens.
- streaming-llm: the first `sink` tokens (attention sinks) + the most recent ones (Xiao et al. 2023).
- random: t uniformly random tokens per head (seeded).
- snapkv: attention of the last `window` context queries, averaged over them and the GQA group, pooled
  (kernel `kernel`); the window itself is always kept (Li et al. 2024).
- h2o: accumulated (causal) attention over all context queries ("heavy hitters") + a recent window of half
  the budget (Zhang et al. 2023).
- kvzip: max attention from "repeat" queries (context reconstruction), global eviction across heads and
  layers (Kim et al. 2025).
- key-norm: the keys with the smallest L2 norm (Devoto et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from kvcat.models import LoadedModel

from . import heads
from .base import Method, Progress, attention_scale, group_queries
from .document import DocumentState
from .fit import Solution
from .hybrid import WholeHeads
from .queries import get_queries
from .registry import register


@dataclass
class Eviction(WholeHeads, Method):
    """Score-based eviction; subclasses implement `scores` ([H, N], higher = keep). With `whole_share` the best
    retrieval heads keep every token beside the others' top t' (streaming-llm then is DuoAttention's kind of
    cache: whole retrieval heads, sinks and recent tokens elsewhere)."""

    global_budget: ClassVar[bool] = False  # one top-k over every head and layer (else top t per head)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_whole_share(spreads_budgets=self.global_budget)

    def prepare_model(self, lm: LoadedModel) -> None:
        if self.whole_share:
            heads.load_profile(lm)

    def head_budgets(self, lm: LoadedModel, state: DocumentState, t: int) -> torch.Tensor:
        whole = self.whole_budgets(lm, state.num_tokens, t)
        return whole if whole is not None else super().head_budgets(lm, state, t)

    def scores(self, lm: LoadedModel, state: DocumentState, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def adjust(self, scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
        """Budget-dependent changes to a layer's (memoized) scores [H, N]; none by default."""
        return scores

    def solve_layers(self, lm: LoadedModel, state: DocumentState, budgets: torch.Tensor,
                     progress: Progress | None) -> list[list[Solution]]:
        L, H, n = lm.spec.num_layers, lm.spec.num_kv_heads, state.num_tokens
        all_scores = []
        key = (self.name, tuple(sorted(self.params.items())))
        for layer in range(L):
            if (*key, layer) not in state.scores:  # scores do not depend on the budget: once per document
                state.scores[(*key, layer)] = self.scores(lm, state, layer).float().to(lm.device)
            all_scores.append(self.adjust(state.scores[(*key, layer)], budgets[layer]))
            if progress:
                progress(layer + 1, L)
        if self.global_budget:
            budgets = global_counts(torch.stack(all_scores), int(budgets.sum()))
        out = []
        for layer in range(L):
            K, V = state.prefill.keys[layer], state.prefill.values[layer]
            heads = []
            for h in range(H):
                t = int(budgets[layer, h])
                idx = torch.topk(all_scores[layer][h], min(t, n)).indices.sort().values
                heads.append(Solution(K[h, idx], torch.zeros(len(idx), device=K.device), V[h, idx], idx))
            out.append(heads)
        return out


def global_counts(scores: torch.Tensor, total: int) -> torch.Tensor:
    """Per-head counts [L, H] from one top-`total` over all scores [L, H, N], at least 1 per head."""
    L, H, n = scores.shape
    flat = scores.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, min(total, flat.numel())).indices] = True
    counts = keep.view(L, H, n).sum(-1).cpu()
    while (counts == 0).any():  # every head keeps at least one slot: take it from the largest head
        i = int(torch.argmin(counts.flatten()))
        j = int(torch.argmax(counts.flatten()))
        counts.view(-1)[i] += 1
        counts.view(-1)[j] -= 1
    return counts


def _positions(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.float32)


@register
@dataclass
class Recent(Eviction):
    """Truncation: keep the most recent t tokens."""

    name: ClassVar[str] = "recent"

    def scores(self, lm, state, layer):
        H, n = lm.spec.num_kv_heads, state.num_tokens
        return _positions(n, lm.device).expand(H, n)


@register
@dataclass
class StreamingLLM(Eviction):
    """Attention sinks (first `sink` tokens) plus the most recent tokens."""

    name: ClassVar[str] = "streaming-llm"

    sink: int = 4
    """First tokens kept whatever the budget."""

    def scores(self, lm, state, layer):
        H, n = lm.spec.num_kv_heads, state.num_tokens
        s = _positions(n, lm.device).clone()
        s[: self.sink] = float("inf")
        return s.expand(H, n)


@register
@dataclass
class Random(Eviction):
    """t uniformly random tokens per head."""

    name: ClassVar[str] = "random"

    seed: int = 0
    """Seed of the choice (with the layer index)."""

    def scores(self, lm, state, layer):
        gen = torch.Generator().manual_seed(self.seed * 100003 + layer)
        return torch.rand(lm.spec.num_kv_heads, state.num_tokens, generator=gen)


def _attention(q: torch.Tensor, k: torch.Tensor, scale: float, q_pos: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T s) [n_q, N]; with q_pos, causal: query at position p sees keys 0..p."""
    logits = (q.float() @ k.float().T) * scale
    if q_pos is not None:
        cols = torch.arange(k.shape[0], device=k.device)
        logits = logits.masked_fill(cols[None, :] > q_pos[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


@register
@dataclass
class SnapKV(Eviction):
    """Attention of the last `window` context queries (mean over them and the group), average-pooled;
    the window itself is always kept."""

    name: ClassVar[str] = "snapkv"

    window: int = 32
    """Last context queries whose attention scores the keys (all kept)."""
    kernel: int = 7
    """Width of the average pooling over the scores."""

    at_least_one: ClassVar[tuple[str, ...]] = ("window", "kernel")

    def scores(self, lm, state, layer):
        n, H = state.num_tokens, lm.spec.num_kv_heads
        w = min(self.window, n)
        sel = state.query_pos >= n - w  # the stored context queries always include the last ones
        q = state.prefill.queries[layer][:, sel.to(state.prefill.queries[layer].device)]  # [Hq, w', d]
        K = state.prefill.keys[layer]
        g = q.shape[0] // H
        pos = state.query_pos[sel].to(K.device)
        w = len(pos)
        out = []
        for h in range(H):
            a = _attention(q[h * g:(h + 1) * g].reshape(g * w, -1), K[h], attention_scale(lm), pos.repeat(g))
            s = a.mean(0)
            s = F.avg_pool1d(s[None, None], kernel_size=self.kernel, stride=1, padding=self.kernel // 2)[0, 0][:n]
            s[n - w:] = float("inf")
            out.append(s)
        return torch.stack(out)


@register
@dataclass
class H2O(Eviction):
    """Heavy hitters (causal accumulated attention of all context queries) + recent half of the budget."""

    name: ClassVar[str] = "h2o"

    recent_frac: float = 0.5
    """Share of the mean budget kept for the most recent tokens."""
    chunk: int = 512
    """Context queries per block of the accumulated attention."""

    at_least_one: ClassVar[tuple[str, ...]] = ("chunk",)

    @property
    def needs_context_sample(self) -> bool:
        return True

    def adjust(self, scores, budgets):
        recent = int(round(float(budgets.float().mean()) * float(self.recent_frac)))
        if recent <= 0:
            return scores
        out = scores.clone()
        out[:, scores.shape[1] - recent:] = float("inf")
        return out

    def scores(self, lm, state, layer):
        n, H = state.num_tokens, lm.spec.num_kv_heads
        q_all = state.prefill.queries[layer]  # all context queries, or a uniform sample (query_pos)
        K = state.prefill.keys[layer]
        g = q_all.shape[0] // H
        m = q_all.shape[1]
        out = []
        for h in range(H):
            acc = torch.zeros(n, device=K.device)
            for start in range(0, m, self.chunk):
                stop = min(start + self.chunk, m)
                pos = state.query_pos[start:stop].to(K.device).repeat(g)
                q = q_all[h * g:(h + 1) * g, start:stop].reshape(-1, q_all.shape[-1])
                acc += _attention(q, K[h], attention_scale(lm), pos).sum(0)
            out.append(acc)
        return torch.stack(out)


@register
@dataclass
class KVzip(Eviction):
    """Max attention from the context-reconstruction queries (every token of the document copied, see
    `reconstruction.Reconstruction`); global eviction across heads and layers."""

    name: ClassVar[str] = "kvzip"
    global_budget: ClassVar[bool] = True

    queries: Literal["repeat"] = "repeat"
    """The reconstruction's copy queries score the keys (the only mode)."""

    def scores(self, lm, state, layer):
        q = get_queries(lm, state, "repeat")[layer]  # also records the reconstruction's key scores
        recorded = state.scores.get(("reconstruction", layer))
        if recorded is not None:
            return recorded.per_kv_head(lm.spec.num_kv_heads, "max")
        K = state.prefill.keys[layer]  # no room for a copy after the document: its own last queries
        return torch.stack([_attention(qh, K[h], attention_scale(lm)).amax(0)
                            for h, qh in enumerate(group_queries(q, lm.spec.num_kv_heads))])


@register
@dataclass
class KeyNorm(Eviction):
    """Keep the keys with the smallest L2 norm."""

    name: ClassVar[str] = "key-norm"

    def scores(self, lm, state, layer):
        return -state.prefill.keys[layer].float().norm(dim=-1)
