"""The peers benchmark's summary: kvcat's and kvpress's records scored with the same metrics, side by side."""

from __future__ import annotations

from kvcat.bench import mean_or_none
from kvcat.defaults import AM_METHODS
from kvcat.eval.metrics import answered, mean_ppl, ppl, ppl_gap

FAIRNESS_TOLERANCE = 0.01


def summarize(windows: list[dict], cases: list[dict], peer_runs: list[dict], names: list[str], ratios: list[float],
              sign_test, gold: list[list[str]], contexts: list[int]) -> dict:
    """Rows (system, method, ratio: PPL gap, retrieval accuracy overall and per kind, served ratio, seconds,
    memory), the per-case answers of every system, AM paired against every press, and the fairness check.
    `cases`: kvcat's records (`retrieval.score_document`) in the order kvpress was asked; `gold`: each case's
    gold answers; `contexts`: the token count of every window, then of every document, as kvpress ran them."""
    reference = [tuple(w["reference"]) for w in windows]
    kinds = sorted({cs["kind"] for cs in cases})

    def accuracy(correct: list[bool]) -> dict:
        if not correct:
            return {"retrieval_acc": None}
        return {"retrieval_acc": mean_or_none(correct),
                **{f"acc_{k}": mean_or_none([x for x, cs in zip(correct, cases) if cs["kind"] == k]) for k in kinds}}

    per_case = {("kvcat", "full", 1.0): [bool(cs["full"]) for cs in cases]}
    # a document is compressed once for all its questions: seconds per window and per document, as kvpress's
    first_of_document = list({cs.get("document", cs["id"]): cs for cs in cases}.values())
    rows = [{"system": "kvcat", "method": "full", "ratio": 1.0,
             "ppl": round(mean_ppl([tuple(w["full"]) for w in windows]), 4) if windows else None,
             "ppl_gap": round(ppl_gap([tuple(w["full"]) for w in windows], reference), 4) if windows else None,
             **accuracy(per_case[("kvcat", "full", 1.0)]),
             "compress_s": mean_or_none([w["prefill_s"] for w in windows] + [cs["prefill_s"] for cs in
                                                                               first_of_document]),
             "peak_rss_mb": round(max([w["prefill_rss"] for w in windows] + [cs["prefill_rss"] for cs in cases]), 1)
             if windows or cases else None}]
    for m in names:
        for r in ratios:
            key = f"{m}|{r:g}"
            got = [w["rows"][key] for w in windows] + [cs["rows"][key] for cs in cases]
            once = [w["rows"][key] for w in windows] + [cs["rows"][key] for cs in first_of_document]
            if all("skipped" in g for g in got):
                rows.append({"system": "kvcat", "method": m, "ratio": r, "skipped": got[0]["skipped"]})
                continue
            nll = [(tuple(w["rows"][key]["nll"]), ref) for w, ref in zip(windows, reference)
                   if "nll" in w["rows"][key]]
            correct = [bool(cs["rows"][key].get("correct")) for cs in cases]
            per_case[("kvcat", m, r)] = correct
            rows.append({"system": "kvcat", "method": m, "ratio": r,
                         "ppl": round(mean_ppl([a for a, _ in nll]), 4) if nll else None,
                         "ppl_gap": round(ppl_gap([a for a, _ in nll], [b for _, b in nll]), 4) if nll else None,
                         **accuracy(correct),
                         "compress_s": mean_or_none([g.get("compact_s") for g in once]),
                         "peak_rss_mb": round(max(g["rss"] for g in got if "rss" in g), 1),
                         "served_ratio": mean_or_none([g.get("served_ratio") for g in got])})
    n_win = len(windows)
    peer_full = None
    answers = {}
    for rec in peer_runs:
        method = "full" if rec["press"] == "none" else rec["press"]
        row = {"system": "kvpress", "method": method, "ratio": float(rec["ratio"])}
        if rec.get("error"):
            rows.append({**row, "error": rec["error"]})
            continue
        nlls = [(x["nll_sum"], x["count"]) for x in rec["windows"]]
        texts = [x["text"].strip() for x in rec["prompts"]]
        correct = [bool(answered(t, g)) for t, g in zip(texts, gold)]
        per_case[("kvpress", method, row["ratio"])] = correct
        answers[f"{method}|{row['ratio']:g}"] = texts
        if method == "full":
            peer_full = nlls
        kept, widest = rec["kept_per_head"], rec["widest_head"]
        rows.append({**row, "ppl": round(mean_ppl(nlls), 4) if nlls else None,
                     "ppl_gap": round(ppl_gap(nlls, reference), 4) if nlls else None, **accuracy(correct),
                     "compress_s": mean_or_none(rec["compress_s"]),
                     "compress_s_windows": mean_or_none(rec["compress_s"][:n_win]), "peak_rss_mb": rec["peak_rss_mb"],
                     "mean_ratio": mean_or_none([n / k for n, k in zip(contexts, kept) if k]),
                     "served_ratio": mean_or_none([n / k for n, k in zip(contexts, widest) if k])})
    if peer_full is None:
        raise RuntimeError("kvpress's full-cache run failed: no fairness check possible")
    paired = []
    for am in [m for m in names if m in AM_METHODS]:
        for (system, other, r), theirs in per_case.items():
            if system != "kvpress" or r == 1.0 or ("kvcat", am, r) not in per_case:
                continue
            mine = per_case[("kvcat", am, r)]
            wins = sum(bool(a and not b) for a, b in zip(mine, theirs))
            losses = sum(bool(b and not a) for a, b in zip(mine, theirs))
            paired.append({"am": am, "other": other, "ratio": r, "only_am": wins, "only_other": losses,
                           "p_sign": round(sign_test(wins, losses), 4)})
    kvcat_full = [tuple(w["full"]) for w in windows]
    kv_ppl, kp_ppl = mean_ppl(kvcat_full), mean_ppl(peer_full)
    rel = abs(kp_ppl - kv_ppl) / kv_ppl
    per_window = [abs(ppl(*b) - ppl(*a)) / ppl(*a) for a, b in zip(kvcat_full, peer_full)]
    full_texts = [cs["full_answer"] for cs in cases]
    fairness = {"kvcat_full_ppl": round(kv_ppl, 5), "kvpress_full_ppl": round(kp_ppl, 5),
                "relative_difference": float(f"{rel:.3g}"),
                "max_window_relative_difference": float(f"{max(per_window):.3g}"),
                "reference_ppl": round(mean_ppl(reference), 5), "tolerance": FAIRNESS_TOLERANCE,
                "ok": rel <= FAIRNESS_TOLERANCE,
                "full_cache_answers_equal": f"{sum(a == b for a, b in zip(full_texts, answers.get('full|1', [])))}"
                                            f"/{len(cases)}",
                "reference": "full-prefix PPL: kvcat.eval.harness.full_prefix_nll, one uncached pass"}
    return {"rows": rows, "paired": paired, "fairness": fairness, "windows": windows,
            "cases": [{**cs, "kvpress": {k: v[j] for k, v in answers.items()}} for j, cs in enumerate(cases)]}
