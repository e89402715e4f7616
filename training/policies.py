"""Train-time KV sparsification policies: which prefix KV slots the continuation may attend to.

During the full (teacher) pass every layer's attention hands the policy its detached post-RoPE queries, keys
and values through `kvcat_observer` (`observe`). After that pass, `slot_bias()` returns one tensor per layer,
[batch, num_kv_heads, prefix_len], that the masked pass adds to the prefix columns of every continuation
query row: 0 for a kept slot, -inf for a dropped one (ROUTER: a differentiable log-gate). Retention r keeps
ceil(r * prefix_len) slots per layer and KV head (ROUTER: r in expectation, held there by the budget loss).

Randomness (RAND's picks, ROUTER's Gumbel noise) is a function of (seed, global sample index, layer), so a
sequence gets the same mask whichever process or micro-batch it lands in, and after a resume.

| policy | keeps the prefix slots ...                                                                     |
|--------|------------------------------------------------------------------------------------------------|
| ntp    | all: the control (trained with w_kl = 0, so no masked pass runs; same data, steps, optimizer)   |
| rand   | chosen uniformly at random                                                                      |
| attn   | with the highest mean attention from the last `observation_window` prefix queries (SnapKV-like) |
| am     | with the highest RMS attention from `am_queries` of the prefix's own queries, each scored       |
|        | against every prefix key: Attention Matching's HAK key selection from reference queries the     |
|        | served method could have (never the continuation's)                                             |
| served | what the served default (`am-hak-fast`) keeps: the sinks and recent tokens, the prefix's most       |
|        | surprising sentences under the model's own full pass (`compaction.spans`: salient_frac of the budget) |
|        | and, for the rest, the highest RMS attention from the prefix's last queries                       |
| router | a small learned per-layer, per-KV-head scorer on (key, value) says keep: Gumbel-sigmoid keep     |
|        | decisions with a straight-through gradient, target retention r                                  |

AM at serving time (`am-hak`) takes its reference queries from a second pass that re-reads the document, and
fits beta and C_v; a training step cannot afford that second pass, so `am` reads the first pass's prefix queries
without the causal mask (each sees the whole prefix, as a re-reading query does) and keeps the selected slots'
keys and values as they are (no beta / C_v in the masked pass).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

DROP_GATE = 1e-6  # ROUTER: a dropped slot's attention weight is scaled by this (log: about -13.8)


@dataclass
class SlotBatch:
    """What a policy knows about the micro-batch whose mask it is choosing."""

    prefix_len: int
    sample_ids: list[int]  # global sequence indices: seed the per-sequence randomness
    seed: int
    ids: torch.Tensor | None = None  # [B, L] the sequences' token ids (policies that read the text)


def per_sample_uniform(batch: SlotBatch, layer: int, shape: tuple[int, ...], salt: str,
                       device: torch.device) -> torch.Tensor:
    """Uniform(0, 1) noise [batch, *shape] that depends only on (seed, sample id, layer, salt)."""
    rows = []
    for sid in batch.sample_ids:
        key = hashlib.blake2b(f"{batch.seed}:{sid}:{layer}:{salt}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little") & ((1 << 63) - 1))
        rows.append(torch.rand(shape, generator=gen))
    return torch.stack(rows).to(device)


class Policy(nn.Module):
    """Base class: collects one slot bias per layer. Subclasses override `observe` (and `slot_bias`)."""

    name: ClassVar[str]

    def __init__(self, retention: float, num_layers: int, num_kv_heads: int, head_dim: int, config=None,
                 tokenizer=None):
        super().__init__()
        self.retention, self.num_layers = retention, num_layers
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.config, self.tokenizer = config, tokenizer
        self.batch: SlotBatch | None = None
        self._stats: dict[str, float] = {}

    def begin(self, batch: SlotBatch) -> None:
        """Start a new micro-batch (forget the previous one's observations)."""
        self.batch = batch

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Called by every layer's attention in the full pass: query [B, H, L, d], key/value [B, KVH, L, d]."""

    def see_logits(self, logits: torch.Tensor) -> None:
        """Called after the full pass with its logits [B, L, V] (detached): policies that read surprisal."""

    def slot_bias(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def aux_loss(self) -> torch.Tensor | None:
        """An extra loss term (ROUTER's budget loss); None for policies without parameters."""
        return None

    def stats(self) -> dict[str, float]:
        """Numbers for the progress bar and log of the last micro-batch (at least 'keep': kept fraction)."""
        return dict(self._stats)

    def num_keep(self, prefix_len: int) -> int:
        return min(prefix_len, max(1, math.ceil(self.retention * prefix_len)))


class TopKPolicy(Policy):
    """Keeps the ceil(r * P) highest-scoring prefix slots of each layer and KV head."""

    def begin(self, batch: SlotBatch) -> None:
        super().begin(batch)
        self.scores: list[torch.Tensor | None] = [None] * self.num_layers

    def observe(self, layer, query, key, value) -> None:
        self.scores[layer] = self.score(layer, query, key, value)

    def score(self, layer: int, query, key, value) -> torch.Tensor:
        """[B, KVH, P] higher = more worth keeping."""
        raise NotImplementedError

    def forced(self) -> torch.Tensor | None:
        """[B, P] bool: slots kept whatever their scores (within the budget), or None."""
        return None

    def slot_bias(self) -> list[torch.Tensor]:
        if any(s is None for s in self.scores):
            raise RuntimeError(f"policy {self.name!r} saw no full pass for some layer")
        out = []
        forced = self.forced()
        for scores in self.scores:
            k = self.num_keep(scores.shape[-1])
            if forced is not None:
                scores = scores.masked_fill(forced[:, None, :], float("inf"))
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)
            out.append(torch.zeros_like(scores, dtype=torch.float32).masked_fill(~keep, float("-inf")))
        self._stats = {"keep": sum(torch.isfinite(b).float().mean().item() for b in out) / len(out)}
        return out


def _prefix_attention(query: torch.Tensor, key: torch.Tensor, rows: slice | torch.Tensor, prefix_len: int,
                      causal: bool = True) -> torch.Tensor:
    """Full-pass attention probabilities of query rows `rows` over the prefix columns, grouped per KV head:
    [B, KVH, groups * len(rows), P] (float32; softmax over every causally visible key, or over every key)."""
    b, h, n, d = query.shape
    kvh = key.shape[1]
    q = query[:, :, rows].float()
    k = key.float().repeat_interleave(h // kvh, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    row_pos = torch.arange(n, device=q.device)[rows][:, None]
    col_pos = torch.arange(key.shape[2], device=q.device)[None, :]
    if causal:
        logits = logits.masked_fill(col_pos > row_pos, float("-inf"))
    probs = logits.softmax(-1)[..., :prefix_len]
    return probs.reshape(b, kvh, -1, prefix_len)


class RandPolicy(TopKPolicy):
    name = "rand"

    def score(self, layer, query, key, value):
        return per_sample_uniform(self.batch, layer, (key.shape[1], self.batch.prefix_len), "rand", key.device)


class AttnPolicy(TopKPolicy):
    name = "attn"

    def score(self, layer, query, key, value):
        p = self.batch.prefix_len
        window = min(getattr(self.config, "observation_window", 32), p)
        return _prefix_attention(query, key, slice(p - window, p), p).mean(dim=2)


class NtpPolicy(TopKPolicy):
    """The control: nothing is hidden (`TrainConfig` requires w_kl = 0, so the masked pass never runs)."""

    name = "ntp"

    def score(self, layer, query, key, value):
        return torch.zeros(key.shape[0], key.shape[1], self.batch.prefix_len, device=key.device)

    def num_keep(self, prefix_len: int) -> int:
        return prefix_len


class AMPolicy(TopKPolicy):
    name = "am"

    def score(self, layer, query, key, value):
        p = self.batch.prefix_len
        n = min(getattr(self.config, "am_queries", 64), p)
        rows = torch.linspace(0, p - 1, n, device=query.device).round().long()  # evenly spread, the last included
        return _prefix_attention(query, key[:, :, :p], rows, p, causal=False).square().mean(dim=2).sqrt()


class ServedPolicy(TopKPolicy):
    """The served default's choice (`am-hak-fast`, without its fit): every head keeps the first `SINK` and last
    `RECENT` prefix tokens and the prefix's most surprising sentences (`salient_frac` of its budget; surprisal
    under this model's own full pass, sentences and ranking from `compaction.spans`, as served), then the slots
    with the highest RMS attention from the prefix's last `LAST` queries. Training on this mask teaches the
    model to work with what serving will keep."""

    name = "served"
    SINK, RECENT, LAST = 4, 16, 64  # the served default's sink, recent and last-query counts
    salient_frac = 0.5
    max_unit, peak_run = 32, 4

    def begin(self, batch: SlotBatch) -> None:
        super().begin(batch)
        self._forced: torch.Tensor | None = None

    def see_logits(self, logits: torch.Tensor) -> None:
        from kvcat.compaction import spans
        from kvcat.prompts import context_ids

        if self.tokenizer is None or self.batch.ids is None:
            raise RuntimeError("the served policy reads the text: give it the tokenizer and the batch's ids")
        p, ids = self.batch.prefix_len, self.batch.ids
        t = self.num_keep(p)
        logp = torch.log_softmax(logits[:, :p - 1].detach().float(), dim=-1)
        nll = torch.zeros(ids.shape[0], p)
        nll[:, 1:] = -logp.gather(-1, ids[:, 1:p, None]).squeeze(-1).cpu()
        head = context_ids(self.tokenizer, "")
        forced = torch.zeros(ids.shape[0], p, dtype=torch.bool)
        for b in range(ids.shape[0]):
            row = ids[b, :p].tolist()
            template = spans.template_positions(row, self.tokenizer, head)
            units = spans.units(row, self.tokenizer, self.max_unit, template)
            keep = spans.fact_spans(nll[b], units, round(self.salient_frac * t), self.peak_run)
            forced[b, :self.SINK] = True
            forced[b, max(0, p - self.RECENT):] = True
            forced[b, keep] = True
        self._forced = forced.to(logits.device)

    def forced(self) -> torch.Tensor | None:
        if self._forced is None:
            raise RuntimeError("the served policy saw no full-pass logits (see_logits)")
        return self._forced

    def score(self, layer, query, key, value):
        p = self.batch.prefix_len
        rows = slice(max(0, p - self.LAST), p)
        return _prefix_attention(query, key, rows, p).square().mean(dim=2).sqrt()


class RouterPolicy(Policy):
    """Per layer and KV head, a 2-layer MLP scores each prefix slot from its RMS-normalised (key, value).

    Keep decision (training): keep = logit + Logistic noise > 0, i.e. a Bernoulli(sigmoid(logit)) sample
    (Gumbel-sigmoid). Forward: the hard decision, as an attention gate g in {1, DROP_GATE} (bias log g).
    Backward (straight-through): d bias / d g at the hard g, times d soft / d logit with
    soft = sigmoid((logit + noise) / tau): the first-order effect of opening or closing each slot's gate.
    Budget loss: mean over layers of (mean keep probability - r)^2. The router reads detached K/V: it learns
    which slots matter, while the model learns (through the KL) to do well with what the router keeps.
    """

    name = "router"

    def __init__(self, retention, num_layers, num_kv_heads, head_dim, config=None, tokenizer=None):
        super().__init__(retention, num_layers, num_kv_heads, head_dim, config, tokenizer)
        hidden = getattr(config, "router_hidden", 32)
        self.tau = getattr(config, "router_tau", 1.0)
        self.noise = getattr(config, "router_noise", True)
        gen = torch.Generator().manual_seed(getattr(config, "seed", 0))
        shape = (num_layers, num_kv_heads)
        self.w1 = nn.Parameter(torch.randn(*shape, 2 * head_dim, hidden, generator=gen) / math.sqrt(2 * head_dim))
        self.b1 = nn.Parameter(torch.zeros(*shape, hidden))
        self.w2 = nn.Parameter(torch.randn(*shape, hidden, generator=gen) * 0.01)
        prior = min(max(retention, 1e-4), 1 - 1e-4)
        self.b2 = nn.Parameter(torch.full(shape, math.log(prior / (1 - prior))))

    def begin(self, batch: SlotBatch) -> None:
        super().begin(batch)
        self.logits: list[torch.Tensor | None] = [None] * self.num_layers

    def observe(self, layer, query, key, value) -> None:
        p = self.batch.prefix_len
        x = torch.cat([key[:, :, :p], value[:, :, :p]], dim=-1).float()
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
        with torch.autocast(device_type=x.device.type, enabled=False):
            hidden = F.gelu(torch.einsum("bhpd,hdk->bhpk", x, self.w1[layer]) + self.b1[layer][:, None])
            self.logits[layer] = torch.einsum("bhpk,hk->bhp", hidden, self.w2[layer]) + self.b2[layer][:, None]

    def slot_bias(self) -> list[torch.Tensor]:
        if any(s is None for s in self.logits):
            raise RuntimeError("router saw no full pass for some layer")
        out, kept = [], 0.0
        for layer, logit in enumerate(self.logits):
            noisy = logit
            if self.training and self.noise:
                u = per_sample_uniform(self.batch, layer, tuple(logit.shape[1:]), "router", logit.device)
                u = u.clamp(1e-6, 1 - 1e-6)
                noisy = logit + torch.log(u) - torch.log1p(-u)
            if self.retention >= 1.0:
                keep = torch.ones_like(logit, dtype=torch.bool)
            else:
                keep = noisy > 0
            soft = torch.sigmoid(noisy / self.tau)
            gate = torch.where(keep, 1.0, DROP_GATE)
            out.append(torch.log(gate) + (soft - soft.detach()) / gate)
            kept += keep.float().mean().item()
        probs = [torch.sigmoid(logit).mean() for logit in self.logits]
        self._stats = {"keep": kept / len(self.logits), "keep_prob": float(sum(probs).item() / len(probs))}
        return out

    def aux_loss(self) -> torch.Tensor:
        if self.retention >= 1.0:
            return torch.zeros((), device=self.b2.device)
        return torch.stack([(torch.sigmoid(logit).mean() - self.retention) ** 2 for logit in self.logits]).mean()


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (NtpPolicy, RandPolicy, AttnPolicy, AMPolicy,
                                                                  ServedPolicy, RouterPolicy)}


def make_policy(name: str, retention: float, num_layers: int, num_kv_heads: int, head_dim: int,
                config=None, tokenizer=None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](retention, num_layers, num_kv_heads, head_dim, config, tokenizer)
