"""Gradient-based compaction (Cartridges-style): start from any method's cache, then Adam on C_k, beta, C_v.

Objectives:
- "attention" (per layer, cheap): for every layer and KV head, the mean squared error between the attention
  outputs of the compacted and the full cache on the reference queries, relative to the mean squared norm
  of the full output, plus the squared log attention-mass error (mass matching keeps the block composable).
- "logits" (end to end): KL(full || compacted) of the next-token distributions of the reference text
  ("repeat" prompt + context) run over the trainable cache; one model forward and backward per step.
The loss curve and the number of steps to reach `target_loss` (None if never) go into `info`; the KV-CAT
paper compares models by exactly this number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from kvcat.cache import CompactCache
from kvcat.models import LoadedModel

from .base import CompactionError, Method, Progress, attention_scale, group_queries
from .document import DocumentState
from .fit import Solution
from .queries import QueryMode, get_queries, repeat_input
from .registry import get_method, register


@register
@dataclass
class Optimized(Method):
    """Adam on (C_k, beta, C_v), initialised from method `init`, against the full cache."""

    name: ClassVar[str] = "optimize"

    init: str = "am-hak"
    """The registered method whose cache the optimization starts from."""
    objective: Literal["attention", "logits"] = "attention"
    """Per-head attention outputs and mass, or end-to-end next-token distributions."""
    steps: int = 100
    """Adam steps."""
    lr: float = 1e-2
    """Adam's learning rate."""
    target_loss: float | None = None
    """The loss whose first step is reported (`steps_to_target` in the cache's info)."""
    queries: QueryMode = "repeat"
    """Reference queries of the attention objective."""
    max_queries: int = 1024
    """Reference queries per KV head in the attention objective (a seeded sample)."""
    logit_tokens: int = 256
    """Tokens of the repeat prompt + context whose next-token distributions the logits objective matches."""

    init_method: Method = field(init=False, repr=False, compare=False)
    report: dict = field(init=False, repr=False, compare=False)  # loss curve, steps to target_loss

    at_least_one: ClassVar[tuple[str, ...]] = ("max_queries", "logit_tokens")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init in ("optimize", "cartridges"):
            raise CompactionError("optimize starts from another method's result: give init=am-hak (or another)")
        self.init_method = get_method(self.init)
        self.report = {}

    @property
    def needs_context_sample(self) -> bool:
        return "context" in self.queries or self.init_method.needs_context_sample

    def head_budgets(self, lm, state, t):
        return self.init_method.head_budgets(lm, state, t)

    def solve_layers(self, lm: LoadedModel, state: DocumentState, budgets: torch.Tensor,
                     progress: Progress | None) -> list[list[Solution]]:
        if self.init_method.query_mode:
            get_queries(lm, state, self.init_method.query_mode)
        init = self.init_method.solve_layers(lm, state, budgets, None)
        if self.objective == "attention":
            out, curve = self._attention_objective(lm, state, init, progress)
        else:
            out, curve = self._logit_objective(lm, state, init, progress)
        target = self.target_loss
        hit = next((i for i, v in enumerate(curve) if target is not None and v <= target), None)
        self.report = {"loss_curve": [round(v, 6) for v in curve], "steps_to_target": hit,
                       "initial_loss": curve[0] if curve else None, "final_loss": curve[-1] if curve else None}
        return out

    def compact_state(self, lm, state, t, ratio=None, target_tokens=None, progress=None) -> CompactCache:
        cache = super().compact_state(lm, state, t, ratio=ratio, target_tokens=target_tokens, progress=progress)
        cache.info.update({k: v for k, v in self.report.items() if k != "loss_curve"})
        cache.info["loss_curve"] = self.report.get("loss_curve", [])[:: max(1, len(self.report.get(
            "loss_curve", [])) // 50)]
        return cache

    # ---- per-layer attention matching by gradient ---------------------------------------------------
    def _attention_objective(self, lm, state, init, progress):
        scale = attention_scale(lm)
        queries = get_queries(lm, state, self.queries)
        steps, lr = self.steps, float(self.lr)
        curve = torch.zeros(steps + 1, dtype=torch.float64)
        out = []
        count = 0
        for layer, heads in enumerate(init):
            K, V = state.prefill.keys[layer].float(), state.prefill.values[layer].float()
            qs = group_queries(queries[layer], lm.spec.num_kv_heads, self.max_queries, seed=1)
            new = []
            for h, sol in enumerate(heads):
                q = qs[h].float()
                logits = (q @ K[h].T) * scale
                target_out = torch.softmax(logits, -1) @ V[h]
                target_lz = torch.logsumexp(logits, -1)
                norm = target_out.square().sum(-1).mean().clamp_min(1e-12)
                ck = sol.keys.float().clone().requires_grad_(True)
                b = sol.beta.float().clone().requires_grad_(True)
                cv = sol.values.float().clone().requires_grad_(True)
                opt = torch.optim.Adam([ck, b, cv], lr=lr)
                with torch.enable_grad():
                    for step in range(steps + 1):
                        lg = (q @ ck.T) * scale + b
                        o = torch.softmax(lg, -1) @ cv
                        loss = (o - target_out).square().sum(-1).mean() / norm + \
                            (torch.logsumexp(lg, -1) - target_lz).square().mean()
                        curve[step] += loss.item()
                        if step == steps:
                            break
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                count += 1
                new.append(Solution(ck.detach(), b.detach(), cv.detach(), sol.indices, values_refit=True))
            out.append(new)
            if progress:
                progress(layer + 1, len(init))
        return out, (curve / max(count, 1)).tolist()

    # ---- end-to-end next-token distributions ----------------------------------------------------------
    def _logit_objective(self, lm, state, init, progress):
        from transformers import DynamicCache

        from kvcat.attention import use_kvcat_attention

        use_kvcat_attention(lm.model)
        n0 = state.num_tokens
        text = repeat_input(lm, state.ids.tolist(), min(self.logit_tokens, max(lm.spec.max_positions - n0, 2)))
        ids = torch.tensor([text], device=lm.device)
        pos = torch.arange(n0, n0 + len(text), device=lm.device)[None]

        def build(tensors):
            cache = DynamicCache(config=lm.model.config)
            for i, (k, v) in enumerate(tensors):
                cache.update(k[None], v[None], i)
            return cache

        with torch.no_grad():
            full = build(zip(state.prefill.keys, state.prefill.values))
            ref = torch.log_softmax(lm.model(input_ids=ids, past_key_values=full, position_ids=pos)
                                    .logits[0].float(), -1)
        width = max(len(s.indices) for layer in init for s in layer)
        params = []
        for layer in init:
            k = torch.zeros(len(layer), width, lm.spec.head_dim, device=lm.device)
            v, b = torch.zeros_like(k), torch.full((len(layer), width), -math.inf, device=lm.device)
            for h, s in enumerate(layer):
                m = len(s.indices)
                k[h, :m], v[h, :m], b[h, :m] = s.keys.float(), s.values.float(), s.beta.float()
            params.append([t.requires_grad_(True) for t in (k, v, b)])
        live = [torch.isfinite(p[2].detach()) for p in params]
        flat = [t for p in params for t in p]
        opt = torch.optim.Adam(flat, lr=float(self.lr))
        flags = [prm.requires_grad for prm in lm.model.parameters()]
        for prm in lm.model.parameters():
            prm.requires_grad_(False)
        curve = []
        steps = self.steps
        try:
            with torch.enable_grad():
                for step in range(steps + 1):
                    cache = build((k, v) for k, v, _ in params)
                    bias = [torch.where(m, b, torch.full_like(b, -math.inf)) for (_, _, b), m in zip(params, live)]
                    logp = torch.log_softmax(lm.model(input_ids=ids, past_key_values=cache, position_ids=pos,
                                                      kvcat_bias=bias).logits[0].float(), -1)
                    loss = torch.nn.functional.kl_div(logp, ref, log_target=True, reduction="batchmean")
                    curve.append(loss.item())
                    if progress:
                        progress(min(step + 1, steps), steps)
                    if step == steps:
                        break
                    opt.zero_grad()
                    loss.backward()
                    for _, _, b in params:
                        if b.grad is not None:
                            b.grad.nan_to_num_(0.0, 0.0, 0.0)
                    opt.step()
        finally:
            for prm, flag in zip(lm.model.parameters(), flags):
                prm.requires_grad_(flag)
        out = []
        for (k, v, b), m in zip(params, live):
            heads = []
            for h in range(k.shape[0]):
                sel = m[h]
                heads.append(Solution(k[h, sel].detach(), b[h, sel].detach(), v[h, sel].detach(),
                                      torch.nonzero(sel).flatten(), values_refit=True))
            out.append(heads)
        return out, curve


def steps_to_target(lm: LoadedModel, context_ids, ratio: float, target_loss: float, init: str = "am-hak",
                    objective: str = "attention", max_steps: int = 200, lr: float = 1e-2) -> dict:
    """Optimize from `init` and report how many Adam steps reach `target_loss` (None if not within max)."""
    method = get_method("optimize", init=init, objective=objective, steps=max_steps, lr=lr,
                        target_loss=target_loss)
    method.compact(lm, context_ids, ratio=ratio)
    return dict(method.report)
