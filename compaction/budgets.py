"""Non-uniform per-head budgets, computed once per model and cached under $KVCAT_HOME/budgets/.

Profile (per model): for every layer l and KV head h, a cost curve c[l, h, f] estimating how much the
continuation loss grows when that head alone keeps a fraction f of its keys (AM-HAK fit). It is measured on
a few calibration texts, each split into a prefix (compacted) and a continuation, with one forward and
backward pass per text and no per-head forward passes:
  - g = d NLL(continuation) / d (attention output of each query head), on the full cache;
  - delta_f = exact change of each head's attention output on the continuation (prefix + causal
    continuation part, mixed by attention mass) when its prefix block is replaced by the AM-HAK fit at f;
  - c[l, h, f] = sum over continuation tokens and the head's query group of |g . delta_f|  (first order).
Allocation (per document, cheap): start every head at the smallest fraction and greedily give slots to the
head whose cost drops the most per slot, until the mean budget is t; heads never exceed N.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kvcat.models import LoadedModel

from .base import attention_scale, group_queries, uniform_budgets
from .profiles import ProfileStore
from .solvers import hak

FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
PROFILE_VERSION = 1
STORE = ProfileStore("budgets", PROFILE_VERSION)


# --------------------------------------------------------------------------------------------------
# Calibration texts


def calibration_texts(lm: LoadedModel, count: int = 3, tokens: int = 768) -> list[list[int]]:
    """A few TRAIN-split texts as token ids (from kvcat.data when available; else a built-in fallback)."""
    out: list[list[int]] = []
    try:  # the data package's TRAIN-split documents (never the held-out evaluation split)
        from kvcat import data

        for text in data.training_texts(seed=0):
            if len(text) < tokens * 5:
                continue
            ids = lm.tokenizer(text[: tokens * 12], add_special_tokens=False)["input_ids"]
            if len(ids) >= tokens:
                out.append(ids[:tokens])
            if len(out) == count:
                break
    except Exception:  # data not installed: a small built-in text keeps the method usable
        out = []
    if not out:
        ids = lm.tokenizer(_FALLBACK, add_special_tokens=False)["input_ids"]
        while len(ids) < tokens:
            ids = ids + ids
        out = [ids[:tokens]]
    return out


_FALLBACK = (
    "The history of the lighthouse begins with the harbour itself. Fishermen who returned late in autumn "
    "lit fires on the rocks so that their families could find the channel, and in 1821 the town council "
    "paid a stonemason named Elias Brandt to build a tower of grey granite on the northern point. The tower "
    "was finished in the spring of 1823; it was thirty-one metres tall and burned whale oil in twelve lamps. "
    "Brandt's daughter Maren kept the light for forty years. She wrote every ship that passed into a "
    "leather logbook, with its name, its flag and the hour, and the logbooks survive in the town archive. "
    "In 1868 the oil lamps were replaced by a paraffin burner and a Fresnel lens made in Paris, which "
    "could be seen eighteen nautical miles out. During the storm of 1874 the keeper's cottage lost its roof, "
    "but the light did not go out. The lighthouse was electrified in 1931 and automated in 1987; since 2004 "
    "it has housed a small museum about the harbour, the fishing fleet and the families who kept the light. "
)


# --------------------------------------------------------------------------------------------------
# Profiling


def _mixed_output(q, k_pre, v_pre, b_pre, k_cont, v_cont, scale):
    """Attention output of continuation queries q [T, d] over a prefix block (with bias) and the causal
    continuation part; returns [T, d]."""
    T = q.shape[0]
    lp = (q @ k_pre.T) * scale + (b_pre if b_pre is not None else 0.0)
    lc = (q @ k_cont.T) * scale
    causal = torch.ones(T, k_cont.shape[0], dtype=torch.bool, device=q.device).tril()
    lc = lc.masked_fill(~causal, float("-inf"))
    logits = torch.cat([lp, lc], dim=1)
    return torch.softmax(logits, dim=1) @ torch.cat([v_pre, v_cont], dim=0)


def compute_profile(lm: LoadedModel, texts: Sequence[Sequence[int]], prefix_frac: float = 0.75,
                    fractions: Sequence[float] = FRACTIONS, max_queries: int = 512) -> dict:
    from kvcat.attention import use_kvcat_attention
    from kvcat.inference import prefill

    L, H, Hq, d = lm.spec.num_layers, lm.spec.num_kv_heads, lm.spec.num_heads, lm.spec.head_dim
    g = Hq // H
    scale = attention_scale(lm)
    cost = torch.zeros(L, H, len(fractions), dtype=torch.float64)
    for ids in texts:
        ids = list(ids)
        p = int(len(ids) * prefix_frac)
        pre = prefill(lm, ids[:p], capture_queries=True)
        ext = prefill(lm, ids[p:], capture_queries=True, past=pre)  # continuation queries and K/V
        # gradient of the continuation NLL w.r.t. every layer's attention output (input of o_proj)
        grads: dict[int, torch.Tensor] = {}
        outs: dict[int, torch.Tensor] = {}
        hooks = []
        for i, layer in enumerate(lm.model.model.layers):
            def pre_hook(module, args, i=i):
                x = args[0]
                x.retain_grad()
                outs[i] = x
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(pre_hook))
        use_kvcat_attention(lm.model)
        flags = [prm.requires_grad for prm in lm.model.parameters()]
        for prm in lm.model.parameters():
            prm.requires_grad_(False)
        try:
            with torch.enable_grad():
                x = torch.tensor([ids], device=lm.device)
                emb = lm.model.get_input_embeddings()(x).detach().requires_grad_(True)
                logits = lm.model(inputs_embeds=emb).logits[0, p - 1:-1].float()
                nll = torch.nn.functional.cross_entropy(logits, x[0, p:], reduction="sum")
                nll.backward()
            for i, o in outs.items():
                grads[i] = o.grad[0, p:].detach().view(-1, Hq, d)  # [T, Hq, d]
        finally:
            for hk in hooks:
                hk.remove()
            for prm, flag in zip(lm.model.parameters(), flags):
                prm.requires_grad_(flag)
        for layer in range(L):
            K, V = pre.keys[layer].float(), pre.values[layer].float()
            Kc, Vc = ext.keys[layer][:, p:].float(), ext.values[layer][:, p:].float()
            qc = ext.queries[layer].float()  # [Hq, T, d]
            refs = group_queries(pre.queries[layer], H, max_queries)
            for h in range(H):
                base = torch.stack([_mixed_output(qc[h * g + j], K[h], V[h], None, Kc[h], Vc[h], scale)
                                    for j in range(g)])
                gh = grads[layer][:, h * g:(h + 1) * g].transpose(0, 1).float()  # [g, T, d]
                for fi, f in enumerate(fractions):
                    t = max(1, min(p, int(round(f * p))))
                    if t >= p:
                        continue
                    s = hak(K[h], V[h], refs[h].float(), t, scale=scale)
                    new = torch.stack([_mixed_output(qc[h * g + j], s.keys.float(), s.values.float(), s.beta,
                                                     Kc[h], Vc[h], scale) for j in range(g)])
                    cost[layer, h, fi] += (gh * (new - base)).sum(-1).abs().sum().item()
    cost /= max(len(texts), 1)
    return {"version": PROFILE_VERSION, "fingerprint": lm.spec.fingerprint, "fractions": list(fractions),
            "cost": cost.tolist()}


def load_profile(lm: LoadedModel, texts: Sequence[Sequence[int]] | None = None, refresh: bool = False) -> dict:
    """The model's cost profile: memory, then $KVCAT_HOME/budgets/<fingerprint>.json, else computed."""
    return STORE.load(lm, lambda: compute_profile(lm, texts if texts is not None else calibration_texts(lm)), refresh)


# --------------------------------------------------------------------------------------------------
# Allocation


def allocate(cost: torch.Tensor, fractions: Sequence[float], n: int, t: int, steps: int = 48) -> torch.Tensor:
    """Greedy allocation of L*H*t slots over heads from cost curves [L, H, F]; returns counts [L, H]."""
    L, H, _ = cost.shape
    lo_f = min(fractions)
    grid = torch.logspace(math.log10(lo_f), 0.0, steps, dtype=torch.float64)  # fractions, fine grid
    logf = torch.tensor([math.log(f) for f in fractions], dtype=torch.float64)
    lg = grid.log()
    # interpolate each head's cost at the grid (piecewise linear in log f); cost at f = 1 is 0
    c = cost.double().clone()
    c[..., -1] = 0.0 if fractions[-1] == 1.0 else c[..., -1]
    idx = torch.searchsorted(logf, lg).clamp(1, len(fractions) - 1)
    w = ((lg - logf[idx - 1]) / (logf[idx] - logf[idx - 1])).clamp(0, 1)
    curve = c[..., idx - 1] * (1 - w) + c[..., idx] * w  # [L, H, steps]
    curve = torch.cummin(curve, dim=-1).values  # non-increasing in f
    slots = (grid * n).clamp(min=1, max=n)  # [steps]
    curve = _convex_minorant(curve, slots)  # diminishing returns, so the greedy is optimal
    total = L * H * t
    pos = torch.zeros(L, H, dtype=torch.long)
    used = float(slots[0]) * L * H
    if used >= total:
        return torch.full((L, H), t, dtype=torch.long)
    gain = (curve[..., :-1] - curve[..., 1:]) / (slots[1:] - slots[:-1]).clamp_min(1e-9)  # [L, H, steps-1]
    while True:
        cur = gain.gather(-1, pos.clamp(max=steps - 2)[..., None])[..., 0]
        cur = cur.masked_fill(pos >= steps - 1, -1.0)
        flat = int(cur.argmax())
        layer, h = divmod(flat, H)
        if cur[layer, h] < 0:
            break
        add = float(slots[pos[layer, h] + 1] - slots[pos[layer, h]])
        if used + add > total:
            break
        used += add
        pos[layer, h] += 1
    counts = slots[pos].round().long().clamp(1, n)
    return _fix_total(counts, total, n, cur_order=-gain.gather(-1, pos.clamp(max=steps - 2)[..., None])[..., 0])


def _convex_minorant(curve: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Lower convex hull of each curve [..., S] over the points x [S], evaluated at x."""
    flat = curve.reshape(-1, curve.shape[-1])
    out = torch.empty_like(flat)
    xs = x.tolist()
    for r, row in enumerate(flat.tolist()):
        hull: list[int] = []
        for i in range(len(xs)):
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # drop b if it lies above the segment a-i
                if (row[b] - row[a]) * (xs[i] - xs[a]) >= (row[i] - row[a]) * (xs[b] - xs[a]):
                    hull.pop()
                else:
                    break
            hull.append(i)
        for j in range(len(hull) - 1):
            a, b = hull[j], hull[j + 1]
            for i in range(a, b + 1):
                w = (xs[i] - xs[a]) / max(xs[b] - xs[a], 1e-12)
                out[r, i] = row[a] * (1 - w) + row[b] * w
        if len(hull) == 1:
            out[r] = row[0]
    return out.view_as(curve)


def _fix_total(counts: torch.Tensor, total: int, n: int, cur_order: torch.Tensor) -> torch.Tensor:
    """Adjust counts by single slots (most useful heads first) so they sum to exactly `total`."""
    counts = counts.clone()
    diff = total - int(counts.sum())
    order = torch.argsort(cur_order.flatten())  # most gain first
    flat = counts.view(-1)
    i = 0
    while diff != 0 and i < 10 * flat.numel() + abs(diff) * 2:
        j = int(order[i % flat.numel()]) if diff > 0 else int(order[-1 - i % flat.numel()])
        if diff > 0 and flat[j] < n:
            flat[j] += 1
            diff -= 1
        elif diff < 0 and flat[j] > 1:
            flat[j] -= 1
            diff += 1
        i += 1
    return counts


def head_budgets(lm: LoadedModel, n: int, t: int, mode: str = "nonuniform") -> torch.Tensor:
    """[num_layers, num_kv_heads] slot counts with mean t (max n)."""
    L, H = lm.spec.num_layers, lm.spec.num_kv_heads
    if mode == "uniform":
        return uniform_budgets(L, H, t)
    if mode != "nonuniform":
        raise ValueError(f"unknown budgets mode {mode!r}: uniform or nonuniform")
    prof = load_profile(lm)
    cost = torch.tensor(prof["cost"], dtype=torch.float64)
    return allocate(cost, prof["fractions"], n, t)
