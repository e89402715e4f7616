"""The report of `kvcat bench kvcat`: the chosen checkpoint against the control and the goals, its Markdown
table and its plots."""

from __future__ import annotations

import statistics
from pathlib import Path

CONTROL = "kvcat-ntp"  # the NTP control's checkpoint label: every trained policy's is f"kvcat-{policy}"


def _std(values) -> float | None:
    return round(statistics.stdev(values), 4) if len(values) > 1 else None


def plot(result: dict, out: Path) -> list[str]:
    """Per method: PPL gap vs ratio and retrieval vs ratio, one line per checkpoint (held-out split), with the
    spread (gap: standard deviation over windows; retrieval: binomial standard error over cases)."""
    from kvcat.bench import save_figure, subplots

    rows = [r for r in result["rows"] if r["split"] == "heldout" and r["method"] != "full"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    ratios = sorted({r["ratio"] for r in rows})
    _, fig, axes = subplots(2, len(methods), figsize=(4.2 * len(methods), 6.6), squeeze=False)
    for col, method in enumerate(methods):
        for ck in checkpoints:
            pts = sorted((r["ratio"], r) for r in rows if r["method"] == method and r["checkpoint"] == ck)
            if not pts:
                continue
            x = [p for p, _ in pts]
            dashed = ck in ("base", CONTROL)  # the references; KV-CAT checkpoints solid
            style = {"linestyle": "--" if dashed else "-", "marker": "o", "label": ck, "capsize": 2}
            axes[0][col].errorbar(x, [r["ppl_gap"] for _, r in pts], yerr=[_std(r["ppl_gaps"]) or 0 for _, r in pts],
                                  **style)
            acc = [r["retrieval_acc"] or 0.0 for _, r in pts]
            se = [(a * (1 - a) / max(1, len(r["hits"]))) ** 0.5 for a, (_, r) in zip(acc, pts)]
            axes[1][col].errorbar(x, acc, yerr=se, **style)
        axes[0][col].set(title=method, ylabel="PPL gap (compacted - full)", xscale="log")
        axes[1][col].set(xlabel="compaction ratio", ylabel="retrieval accuracy", xscale="log", ylim=(-0.05, 1.05))
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(ratios, [f"{x:g}x" for x in ratios])
            ax.minorticks_off()
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"KV-CAT on {result['model']} vs its NTP control (held-out; {result['config']['eval_corpus']} "
                 f"windows, retrieval cases)")
    files = [save_figure(fig, out.with_suffix(".png")).name]
    curves = result.get("training_curves") or {}
    if curves:
        _, fig, axes = subplots(1, 2, figsize=(9, 3.4))
        for i, (policy, rows_) in enumerate(curves.items()):
            steps = [r["step"] for r in rows_]
            if policy != "ntp":  # the control trains without the KL term
                axes[0].plot(steps, [r.get("kl") for r in rows_], label=policy, color=f"C{i}")
            axes[1].plot(steps, [r.get("ntp") for r in rows_], label=policy, color=f"C{i}")
        axes[0].set_title("self-distillation KL (masked vs full)")
        axes[1].set_title("NTP loss (full pass)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        files.append(save_figure(fig, out.with_name(f"{out.stem}_training.png")).name)
    return files


def table(result: dict) -> str:
    """Held-out rows: checkpoint x method, "gap ± sd / retrieval" per ratio, uncompressed PPL ± sd; then the
    chosen checkpoint against the control and the goals."""
    rows = [r for r in result["rows"] if r["split"] == "heldout"]
    comp = [r for r in rows if r["method"] != "full"]
    ratios = sorted({r["ratio"] for r in comp})
    cell = {(r["checkpoint"], r["method"], r["ratio"]): r for r in comp}
    full = {r["checkpoint"]: r for r in rows if r["method"] == "full"}
    fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    n_win = len(next(iter(full.values()))["ppl_gaps"])
    n_case = len(next(iter(full.values()))["hits"])
    lines = [f"Held-out: {n_win} windows of {result['config']['eval_corpus']} (never trained on), {n_case} "
             "retrieval cases; gap ± standard deviation over windows / retrieval accuracy.", "",
             "| checkpoint | method | " + " | ".join(f"{x:g}x gap / retrieval" for x in ratios)
             + " | uncompressed PPL | retrieval, full cache |", "|---|---|" + "---|" * (len(ratios) + 2)]
    for ck, m in dict.fromkeys((r["checkpoint"], r["method"]) for r in comp):
        vals = [f"{fmt(c['ppl_gap'])} ± {fmt(_std(c['ppl_gaps']), 2)} / {fmt(c['retrieval_acc'], 2)}"
                if (c := cell.get((ck, m, x))) else "-" for x in ratios]
        f = full[ck]
        lines.append(f"| {ck} | {m} | " + " | ".join(vals) + f" | {fmt(f['base_ppl'])} ± {fmt(_std(f['base_ppls']), 2)}"
                     f" | {fmt(f['retrieval_acc'], 2)} |")
    s, st = result["summary"], result.get("step_time", {})
    goal = lambda ok: "met" if ok else "not met"  # noqa: E731
    lines += ["", f"Chosen on the tune split: **{s['chosen']}** (best retrieval, then gap, with {s['method']} at "
              f"{s['ratio']}x). Against the NTP control, held-out, {s['method']} {s['ratio']}x:", "",
              "| goal | chosen | control | ratio | |", "|---|---|---|---|---|",
              f"| retrieval >= 1.5x the control's | {fmt(s['retrieval'], 2)} | {fmt(s['control_retrieval'], 2)} | "
              f"{fmt(s['retrieval_ratio'], 2)} | {goal(s['retrieval_ok'])} |",
              f"| PPL gap <= 1/1.5 of the control's | {fmt(s['gap'])} | {fmt(s['control_gap'])} | "
              f"{fmt(s['gap_ratio'], 2)} | {goal(s['gap_ok'])} |",
              f"| uncompressed PPL within 2% of the control's | {fmt(s['ppl'])} | {fmt(s['control_ppl'])} | "
              f"{s['ppl_change_pct']:+.2f}% | {goal(s['ppl_ok'])} |",
              f"| training step <= 1.5x NTP's ({st.get('batch')} x {st.get('seq_len')} tokens) | "
              f"{st.get('kvcat_step_s')} s | {st.get('ntp_step_s')} s | {fmt(st.get('ratio'), 2)} | "
              f"{goal((st.get('ratio') or 99) <= 1.5)} |"]
    served = result.get("served")
    if served:
        lines += ["", f"Served: `kvcat serve` loaded {s['chosen']}'s folder unchanged and answered over a "
                      f"{served['compacted_tokens']}-slot context: {served['answer']!r}."]
    return "\n".join(lines)


def summarise(rows: list[dict], chosen: str, method: str, ratio: int) -> dict:
    """The chosen checkpoint against the NTP control on the held-out split, at (method, ratio), and the goals."""
    held = {(r["checkpoint"], r["method"], r["ratio"]): r for r in rows if r["split"] == "heldout"}
    me, ctl = held[(chosen, method, ratio)], held[(CONTROL, method, ratio)]
    acc, cacc = me["retrieval_acc"] or 0.0, ctl["retrieval_acc"] or 0.0
    ppl, cppl = held[(chosen, "full", 1)]["base_ppl"], held[(CONTROL, "full", 1)]["base_ppl"]
    return {"chosen": chosen, "method": method, "ratio": ratio, "retrieval": acc, "control_retrieval": cacc,
            "retrieval_ratio": round(acc / cacc, 3) if cacc else None, "retrieval_ok": acc >= 1.5 * cacc and acc > 0,
            "gap": me["ppl_gap"], "control_gap": ctl["ppl_gap"],
            "gap_ratio": round(me["ppl_gap"] / ctl["ppl_gap"], 3) if ctl["ppl_gap"] > 0 else None,
            "gap_ok": me["ppl_gap"] <= ctl["ppl_gap"] / 1.5, "ppl": ppl, "control_ppl": cppl,
            "ppl_change_pct": round(100 * (ppl / cppl - 1), 3), "ppl_ok": abs(ppl / cppl - 1) <= 0.02}


