"""The report of `kvcat bench kvcat`: the chosen variant against the control and the base, with paired tests, the
goals, the Markdown table and the plots."""

from __future__ import annotations

from pathlib import Path

from kvcat.eval.stats import mcnemar, paired_mean_ci

BASE, CONTROL = "base", "control"  # the references' roles; their rows carry their own checkpoint labels


def _row(rows: list[dict], label: str, method: str, ratio: int) -> dict:
    for r in rows:
        if r["split"] == "heldout" and r["checkpoint"] == label and r["method"] == method and r["ratio"] == ratio:
            return r
    raise KeyError((label, method, ratio))


def summarise(rows: list[dict], chosen: str, control: str, method: str, ratios: list[int], step: dict) -> dict:
    """The chosen checkpoint against the control and the base on the held-out split, and every goal."""
    out: dict = {"chosen": chosen, "control": control, "method": method, "ratios": {}}
    full = {k: _row(rows, k, "full", 1) for k in (chosen, control, "base")}
    for r in ratios:
        me, ctl, base = (_row(rows, k, method, r) for k in (chosen, control, "base"))
        gap_ci = paired_mean_ci(me["ppl_gaps"], ctl["ppl_gaps"])
        out["ratios"][str(r)] = {
            "retrieval": me["retrieval_acc"], "control_retrieval": ctl["retrieval_acc"],
            "base_retrieval": base["retrieval_acc"],
            "vs_control": mcnemar(me["hits"], ctl["hits"]), "vs_base": mcnemar(me["hits"], base["hits"]),
            "gap": me["ppl_gap"], "control_gap": ctl["ppl_gap"], "base_gap": base["ppl_gap"],
            "gap_ratio": round(me["ppl_gap"] / ctl["ppl_gap"], 3) if ctl["ppl_gap"] > 0 else None,
            "gap_difference_ci": gap_ci}
    at8 = out["ratios"].get("8") or next(iter(out["ratios"].values()))
    cacc = at8["control_retrieval"] or 0.0
    ppl, bppl = full[chosen]["base_ppl"], full["base"]["base_ppl"]
    full_hits, base_hits = sum(full[chosen]["hits"]), sum(full["base"]["hits"])
    out["goals"] = {
        "retrieval_vs_control": {"value": round(at8["retrieval"] / cacc, 3) if cacc else None,
                                 "met": at8["retrieval"] >= 1.5 * cacc and at8["retrieval"] > 0},
        "retrieval_vs_base": {"value": round(at8["retrieval"] - at8["base_retrieval"], 4),
                              "met": at8["retrieval"] >= at8["base_retrieval"]},
        "gap_vs_control": {"value": at8["gap_ratio"],
                           "met": at8["gap_ratio"] is not None and at8["gap_ratio"] <= 1 / 1.5},
        "uncompressed_ppl_vs_base_pct": {"value": round(100 * (ppl / bppl - 1), 3), "met": abs(ppl / bppl - 1) <= 0.02},
        "full_retrieval_vs_base_cases": {"value": full_hits - base_hits, "met": abs(full_hits - base_hits) <= 2},
        "step_time_ratio": {"value": step.get("ratio"), "met": (step.get("ratio") or 99) <= 1.5},
    }
    out["full"] = {k: {"ppl": v["base_ppl"], "retrieval": v["retrieval_acc"], "hits": sum(v["hits"])}
                   for k, v in full.items()}
    return out


def table(result: dict) -> str:
    """Held-out rows (base, control, chosen; every method and ratio), the paired tests, then the goals."""
    rows = [r for r in result["rows"] if r["split"] == "heldout"]
    s = result["summary"]
    labels = ["base", s["control"], s["chosen"]]
    comp = [r for r in rows if r["method"] != "full"]
    ratios = sorted({r["ratio"] for r in comp})
    methods = list(dict.fromkeys(r["method"] for r in comp))
    fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    full = {r["checkpoint"]: r for r in rows if r["method"] == "full"}
    n_win, n_case = len(full["base"]["ppl_gaps"]), len(full["base"]["hits"])
    lines = [f"Held-out: {n_win} PPL windows of {result['config']['eval_corpus']} (never trained on) and {n_case} "
             "retrieval cases of the suite (six kinds); PPL gap / retrieval accuracy.", "",
             "| checkpoint | full: PPL / retrieval | " + " | ".join(f"{m} {x}x" for m in methods for x in ratios)
             + " |", "|---|---|" + "---|" * (len(methods) * len(ratios))]
    for ck in labels:
        f = full[ck]
        cells = []
        for m in methods:
            for x in ratios:
                r = _row(rows, ck, m, x)
                cells.append(f"{fmt(r['ppl_gap'])} / {fmt(r['retrieval_acc'], 2)}")
        lines.append(f"| {ck} | {fmt(f['base_ppl'])} / {fmt(f['retrieval_acc'], 2)} | " + " | ".join(cells) + " |")
    lines += ["", f"Chosen on the tune split: **{s['chosen']}**; control **{s['control']}** (NTP, same data, steps "
              f"and optimisation). Paired, {s['method']}, held-out: cases only the chosen / only the other answers "
              "(exact McNemar p); PPL gap difference chosen - control with its 95% interval.", "",
              "| ratio | vs control | vs base | gap difference (chosen - control) |", "|---|---|---|---|"]
    for x, v in s["ratios"].items():
        c, b, ci = v["vs_control"], v["vs_base"], v["gap_difference_ci"]
        lines.append(f"| {x}x | {c['only_a']} / {c['only_b']} (p {c['p']:.2f}) | {b['only_a']} / {b['only_b']} "
                     f"(p {b['p']:.2f}) | {ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}] |")
    g, st = s["goals"], result.get("step_time", {})
    ok = lambda k: "met" if g[k]["met"] else "not met"  # noqa: E731
    at8 = s["ratios"].get("8") or next(iter(s["ratios"].values()))
    lines += ["", "| goal (held-out) | value | |", "|---|---|---|",
              f"| 8x retrieval >= 1.5x the control's | {fmt(at8['retrieval'], 2)} vs {fmt(at8['control_retrieval'], 2)}"
              f" | {ok('retrieval_vs_control')} |",
              f"| 8x retrieval >= the base's | {fmt(at8['retrieval'], 2)} vs {fmt(at8['base_retrieval'], 2)} | "
              f"{ok('retrieval_vs_base')} |",
              f"| 8x PPL gap <= 0.67x the control's | {fmt(at8['gap'])} vs {fmt(at8['control_gap'])} "
              f"({fmt(g['gap_vs_control']['value'], 2)}x) | {ok('gap_vs_control')} |",
              f"| uncompressed PPL within 2% of the base's | {g['uncompressed_ppl_vs_base_pct']['value']:+.2f}% | "
              f"{ok('uncompressed_ppl_vs_base_pct')} |",
              f"| full-document retrieval within 2 cases of the base's | "
              f"{g['full_retrieval_vs_base_cases']['value']:+d} cases | {ok('full_retrieval_vs_base_cases')} |",
              f"| step <= 1.5x NTP's ({st.get('batch')} x {st.get('seq_len')} tokens, base pass included) | "
              f"{st.get('kvcat_step_s')} s vs {st.get('ntp_step_s')} s ({fmt(st.get('ratio'), 2)}x) | "
              f"{ok('step_time_ratio')} |"]
    served = result.get("served")
    if served:
        lines += ["", f"Served: `kvcat serve` loaded {s['chosen']}'s folder unchanged and answered over a "
                      f"{served['compacted_tokens']}-slot context: {served['answer']!r}."]
    return "\n".join(lines)


def plot(result: dict, out: Path) -> list[str]:
    """Held-out PPL gap and retrieval against the ratio, per method, one line per checkpoint (binomial standard
    errors on retrieval), and the training curves."""
    from kvcat.bench import save_figure, subplots

    rows = [r for r in result["rows"] if r["split"] == "heldout" and r["method"] != "full"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    s = result["summary"]
    checkpoints = ["base", s["control"], s["chosen"]]
    ratios = sorted({r["ratio"] for r in rows})
    _, fig, axes = subplots(2, len(methods), figsize=(4.2 * len(methods), 6.6), squeeze=False)
    for col, method in enumerate(methods):
        for ck in checkpoints:
            pts = [_row(rows, ck, method, x) for x in ratios]
            style = {"linestyle": "-" if ck == s["chosen"] else "--", "marker": "o", "label": ck, "capsize": 2}
            axes[0][col].plot(ratios, [r["ppl_gap"] for r in pts], **{k: v for k, v in style.items() if k != "capsize"})
            acc = [r["retrieval_acc"] or 0.0 for r in pts]
            se = [(a * (1 - a) / max(1, len(r["hits"]))) ** 0.5 for a, r in zip(acc, pts)]
            axes[1][col].errorbar(ratios, acc, yerr=se, **style)
        axes[0][col].set(title=method, ylabel="PPL gap (compacted - full)", xscale="log")
        axes[1][col].set(xlabel="compaction ratio", ylabel="retrieval accuracy", xscale="log", ylim=(-0.05, 1.05))
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(ratios, [f"{x:g}x" for x in ratios])
            ax.minorticks_off()
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"KV-CAT on {result['model']}: chosen variant, NTP control, base (held-out)")
    files = [save_figure(fig, out.with_suffix(".png")).name]
    curves = result.get("training_curves") or {}
    if curves:
        _, fig, axes = subplots(1, 3, figsize=(12, 3.4))
        for i, (label, log_rows) in enumerate(curves.items()):
            steps = [r["step"] for r in log_rows]
            for ax, key in zip(axes, ("kl", "answer", "ntp")):
                if any(key in r for r in log_rows):
                    ax.plot(steps, [r.get(key) for r in log_rows], label=label, color=f"C{i}")
        for ax, title in zip(axes, ("KL teacher -> masked pass", "planted answers' CE (masked pass)", "NTP (full)")):
            ax.set(title=title, xlabel="step")
            ax.legend(fontsize=7)
        files.append(save_figure(fig, out.with_name(f"{out.stem}_training.png")).name)
    return files
