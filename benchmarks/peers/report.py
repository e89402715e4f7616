"""The peers benchmark's report: its Markdown table and its PNG (PPL gap and retrieval vs ratio, serving)."""

from __future__ import annotations

import statistics
from pathlib import Path

from kvcat.defaults import AM_METHODS


def _scored(result: dict) -> list[dict]:
    return [r for r in result["rows"] if r["method"] != "full" and "ppl_gap" in r and r["ppl_gap"] is not None]


def best_press(result: dict) -> str | None:
    """The kvpress press with the lowest mean PPL gap over the ratios (among those run at every ratio)."""
    rows = [r for r in _scored(result) if r["system"] == "kvpress"]
    ratios = {r["ratio"] for r in rows}
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r["ppl_gap"])
    full = {m: g for m, g in by.items() if len(g) == len(ratios)} or by
    return min(full, key=lambda m: statistics.mean(full[m])) if full else None


def _best_at(cell: dict, keys, ratio: float, metric: str, higher: bool = False):
    """At one ratio: the best `metric` among kvcat's AM methods, and the best kvpress press with its value
    (None where a side has no row)."""
    pick = max if higher else min
    am = [cell[("kvcat", m, ratio)].get(metric) for m in AM_METHODS if ("kvcat", m, ratio) in cell]
    am = [v for v in am if v is not None]
    kp = {m: cell[(s, m, ratio)].get(metric) for s, m in keys if s == "kvpress" and (s, m, ratio) in cell}
    kp = {m: v for m, v in kp.items() if v is not None}
    top = pick(kp, key=kp.get) if kp else None
    return (pick(am) if am else None), top, (kp[top] if top else None)


def _served(row: dict) -> str:
    served, mean = row.get("served_ratio"), row.get("mean_ratio")
    if served is None:
        return "-"
    return f"{served:.1f}" + (f" ({mean:.1f})" if mean is not None and abs(mean - served) > 0.05 else "")


def table(result: dict) -> str:
    """One pivot (system/method x ratio) of "PPL gap / retrieval accuracy", the best kvcat AM against the best
    kvpress press per ratio on both, per-kind accuracy, the paired counts, seconds, fairness and the presses
    that did not run."""
    rows = _scored(result)
    ratios = sorted({r["ratio"] for r in rows})
    keys = list(dict.fromkeys((r["system"], r["method"]) for r in rows))
    cell = {(r["system"], r["method"], r["ratio"]): r for r in rows}
    head = "| system | method | " + " | ".join(f"{x:g}x" for x in ratios) + " |\n|---|---|" + "---|" * len(ratios)
    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731

    def line(system: str, method: str, value) -> str:
        vals = [value(cell[(system, method, x)]) if (system, method, x) in cell else "-" for x in ratios]
        return f"| {system} | {method} | " + " | ".join(vals) + " |"

    fair = result.get("fairness", {})
    full = {r["system"]: r for r in result["rows"] if r["method"] == "full"}
    n_cases = len(result.get("cases", []))
    lines = [f"**kvcat vs kvpress: continuation PPL gap / retrieval accuracy** ({len(result.get('windows', []))} "
             f"windows, {n_cases} retrieval cases; lower gap, higher accuracy is better; full-prefix PPL "
             f"{fair.get('reference_ppl', 0):.3f}; full-document accuracy kvcat "
             f"{fmt(full.get('kvcat', {}).get('retrieval_acc'), 2)}, kvpress "
             f"{fmt(full.get('kvpress', {}).get('retrieval_acc'), 2)})", "", head]
    for s, m in keys:
        lines.append(line(s, m, lambda r: f"{fmt(r.get('ppl_gap'))} / {fmt(r.get('retrieval_acc'), 2)}"))
    for metric, higher, what in (("retrieval_acc", True, "accuracy"), ("ppl_gap", False, "gap")):
        names, vs = [], []
        for x in ratios:
            am, top, kp = _best_at(cell, keys, x, metric, higher)
            names.append(top or "-")
            vs.append(f"{am / kp:.2f}x" if am is not None and top and kp > 0 else "-")
        lines.append(f"| | best kvpress press by {what} | " + " | ".join(names) + " |")
        lines.append(f"| | best kvcat AM {what} / best press {what} | " + " | ".join(vs) + " |")
    parts = ["\n".join(lines)]
    kinds = sorted(k[4:] for k in full.get("kvcat", {}) if k.startswith("acc_"))
    if kinds:
        parts.append("\n".join([f"**Retrieval accuracy per kind** ({', '.join(kinds)}; full document kvcat "
                                 + ", ".join(fmt(full['kvcat'].get('acc_' + k), 2) for k in kinds) + ")", "", head,
                                 *[line(s, m, lambda r: " / ".join(fmt(r.get("acc_" + k), 2) for k in kinds))
                                   for s, m in keys]]))
    pairs = result.get("paired") or []
    if pairs:
        pl = ["**Paired, same cases**: cases only AM answers / only the press answers (two-sided sign-test p)", "",
              "| AM vs press | " + " | ".join(f"{x:g}x" for x in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for am, other in dict.fromkeys((p["am"], p["other"]) for p in pairs):
            got = {p["ratio"]: p for p in pairs if (p["am"], p["other"]) == (am, other)}
            pl.append(f"| {am} vs {other} | " + " | ".join(
                f"{got[x]['only_am']} / {got[x]['only_other']} (p {got[x]['p_sign']:.2f})" if x in got else "-"
                for x in ratios) + " |")
        parts.append("\n".join(pl))
    secs = [line(s, m, lambda r: f"{r['compress_s']:.1f}" if r.get("compress_s") is not None else "-")
            for s, m in keys]
    ratio_line = []
    for x in ratios:
        am, top, kp = _best_at(cell, keys, x, "compress_s")
        ratio_line.append(f"{am / kp:.2f}x" if am is not None and top else "-")
    parts.append("\n".join(["**Compression seconds** (token ids to compressed cache, prefill included; mean over "
                             "windows and documents, each compressed once)", "", head, *secs,
                             "| | fastest kvcat AM / fastest kvpress press | " + " | ".join(ratio_line) + " |"]))
    parts.append("\n".join(["**Served ratio** (N over the slots a paged engine holds per head: one count for every "
                             "head and layer, the widest head's; in brackets N over the mean kept per head, what a "
                             "per-head cache would hold)", "", head,
                             *[line(s, m, _served) for s, m in keys]]))
    if fair:
        parts.append(f"Fairness (ratio 1, same windows): full-cache PPL kvcat {fair['kvcat_full_ppl']:.4f}, kvpress "
                     f"{fair['kvpress_full_ppl']:.4f}, relative difference {fair['relative_difference']:.2e} "
                     f"({'within' if fair['ok'] else 'OUTSIDE'} {fair['tolerance']:.0%}); full-document answers "
                     f"equal in {fair.get('full_cache_answers_equal')} cases.")
    if result.get("serving"):
        from kvcat.bench import load_script

        parts.append("**Serving: plain vLLM with the full document vs the kvcat server with the compacted context** "
                     "(one engine each, same settings; ratios against plain vLLM's cold full-document request)\n\n"
                     + load_script("serve").table({"rows": result["serving"]}))
    failed = {r["method"]: r["error"] for r in result["rows"] if r.get("error")}
    if failed:
        parts.append("Not run or failed: " + "; ".join(f"{m} ({e})" for m, e in failed.items()))
    return "\n\n".join(parts)


def plot(result: dict, path: Path) -> Path:
    from kvcat.bench import save_figure, subplots

    rows = _scored(result)
    best = best_press(result)
    serving = result.get("serving") or []
    _, fig, axes = subplots(1, 3 if serving else 2, figsize=(19 if serving else 13, 4.8))
    ax1, ax2 = axes[:2]
    for s, m in dict.fromkeys((r["system"], r["method"]) for r in rows):
        rs = sorted((r for r in rows if r["system"] == s and r["method"] == m), key=lambda r: r["ratio"])
        kvcat = s == "kvcat"
        star = not kvcat and m == best
        style = dict(marker="o" if kvcat else ("*" if star else "s"), ms=11 if star else 5,
                     ls="-" if kvcat else "--", lw=2.5 if kvcat or star else 1.0, alpha=1.0 if kvcat or star else 0.7,
                     label=f"{s}: {m}" + (" (best kvpress)" if star else ""))
        ax1.plot([r["ratio"] for r in rs], [r["ppl_gap"] for r in rs], **style)
        if any(r.get("retrieval_acc") is not None for r in rs):
            ax2.plot([r["ratio"] for r in rs], [r.get("retrieval_acc") for r in rs], **style)
    ax1.set(xscale="log", yscale="symlog", xlabel="compression ratio (N / kept slots per head)",
            ylabel="continuation PPL gap (lower is better)", title="PPL gap: kvcat (solid) vs kvpress (dashed)")
    ax2.set(xscale="log", xlabel="compression ratio", ylabel="retrieval accuracy", ylim=(-0.05, 1.05),
            title="retrieval vs ratio")
    full = {r["system"]: r.get("retrieval_acc") for r in result["rows"] if r["method"] == "full"}
    if full.get("kvcat") is not None:
        ref = ax2.axhline(full["kvcat"], color="grey", ls=":", label="full context")
        ax2.legend(handles=[ref], fontsize=7, loc="upper right")
    ratios = sorted({r["ratio"] for r in rows})
    for ax in (ax1, ax2):
        ax.set_xticks(ratios, [f"{x:g}x" for x in ratios])
        ax.minorticks_off()
    gaps = [r["ppl_gap"] for r in rows]
    if gaps:
        ax1.set_ylim(bottom=min(0.0, min(gaps)))
    ax1.legend(fontsize=7)
    if serving:
        ax3 = axes[2]
        labels = [f"{r['system']}\n{r['mode']}" + ("" if r["ratio"] == 1 else f"\n{r['ratio']:g}x") for r in serving]
        bars = ax3.bar(range(len(serving)), [r["ttft_s"] for r in serving],
                       color=["tab:grey" if r["system"] == "vllm" else "tab:blue" for r in serving])
        ax3.bar_label(bars, [f"{r['contexts_in_budget']} ctx" for r in serving], fontsize=7)
        ax3.set_xticks(range(len(serving)), labels, fontsize=6)
        ax3.set(yscale="log", ylabel="time to first token, s (log)",
                title="serving: TTFT; bar labels = contexts in the KV budget")
    fair = result.get("fairness", {})
    return save_figure(fig, path, f"{result['model']} on {result['machine']}; full-cache PPL kvcat "
                       f"{fair.get('kvcat_full_ppl')} / kvpress {fair.get('kvpress_full_ppl')}")
