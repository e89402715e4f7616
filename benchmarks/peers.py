"""Peer benchmark: kvcat's compaction against NVIDIA kvpress's presses, on the same token ids, same metrics.

    kvcat bench peers                                      # 20 held-out 4k-token windows, ratios 2-50 (hours)
    kvcat bench peers --docs 1 --doc-tokens 512 --continuation 64 --ratios 8 --presses snapkv,knorm \\
        --needles 1 --qa 0 --out /tmp/peers.json           # minutes

kvpress needs transformers < 5.3, so it runs in its own venv (.peers-venv/, made by scripts/peers_venv.sh)
as a subprocess: benchmarks/kvpress_runner.py. This script, in kvcat's venv, prepares the HELD-OUT data
exactly as `kvcat bench compaction` does (kvcat.data windows, needles and SQuAD articles; chat prompts split
by kvcat.prompts.context_and_question), hands kvpress the very token ids, runs kvcat's own methods in this
process, and scores every system's outputs here with the same kvcat.eval.metrics functions:
- ppl_gap: per window, exp(mean NLL of continuation[1:]) over the compressed prefix minus the full-prefix
  PPL of the same window (kvcat.eval.harness.full_prefix_nll: one uncached pass, the shared reference);
  the mean over windows (kvcat.eval.metrics.ppl_gap, as `kvcat eval` and `kvcat bench compaction`);
- needle_acc: metrics.retrieved of the greedy answer after compressing the haystack (chat prompt);
- qa_f1: metrics.f1 of the first answer line on SQuAD-article questions;
- compress_s: seconds from token ids to compressed cache, prefill included (kvcat: prefill + queries +
  solve; kvpress: the prefill under the press, its scoring included), mean over the PPL windows;
- peak_rss_mb: peak resident memory of the process (kvcat's, or the kvpress runner's) while compressing;
- serving (the first --serving-docs windows, as text): vLLM's own OpenAI server (no kvcat code loaded)
  answering over the full document, against the kvcat server over the compacted context (serve.py's
  measure): TTFT, decode tokens/s, KV bytes per context, contexts per KV budget; ratios to plain vLLM.
Ratio r means round(N / r) KV slots per head kept on average, in both systems (kvpress: compression_ratio
1 - 1/r). Ratio 1 is the full cache in both: the fairness check wants their full-cache PPLs on the same
windows within 1% (both values and the relative difference are in the JSON).
Writes benchmarks/results/peers.json, .md (table) and .png (PPL gap and needle accuracy vs ratio).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvcat.console import option
from kvcat.defaults import AM_METHODS, DEFAULT_MODEL
from kvcat.eval.metrics import mean_ppl, ppl, ppl_gap, window_nll

REPO = Path(__file__).resolve().parents[1]
PEERS_PYTHON = REPO / ".peers-venv" / "bin" / "python"
RUNNER = Path(__file__).resolve().parent / "kvpress_runner.py"
FAIRNESS_TOLERANCE = 0.01


@dataclass
class PeersConfig:
    """The settings of `kvcat bench peers`, one command-line option each."""

    docs: int = option(20, help="held-out PPL windows")
    doc_tokens: int = option(4096, help="tokens of each window's prefix")
    continuation: int = option(256, help="continuation tokens for the PPL gap")
    ratios: tuple[float, ...] = option((2.0, 4.0, 8.0, 16.0, 32.0, 50.0),
                                       help="compression ratios (1, the full cache, always runs)")
    methods: tuple[str, ...] = option(("am-hak", "am-omp-fast", "snapkv"), help="kvcat methods")
    presses: tuple[str, ...] = option(("snapkv", "expected-attention", "kvzip", "streaming-llm", "tova", "knorm",
                                       "pyramidkv", "adakv-expected-attention"),
                                      help="kvpress presses, as benchmarks/kvpress_runner.py names them (adakv-X: "
                                           "press X inside AdaKVPress)")
    needles: int = option(5, help="needle examples (0 to skip)")
    qa: int = option(5, help="QA examples (0 to skip)")
    question_tokens: int = option(2048, help="length of the needle haystacks and QA articles")
    model: str = option(DEFAULT_MODEL, help="zoo name or HF folder")
    slow_max_slots: int = option(256, help="run OMP-fast only up to this many slots per head")
    serving_docs: int = option(1, help="windows served by plain vLLM (full) and kvcat (compacted); 0 skips")
    serving_ratios: tuple[float, ...] = option((10.0, 32.0), help="compaction ratios of the serving comparison")
    seed: int = option(0, help="seed of the held-out sample")
    out: Path = option(Path("benchmarks/results/peers.json"), help="JSON output (Markdown and PNG beside it)")


def log(msg: str) -> None:
    print(f"[bench peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.mean(xs), 4) if xs else None


def run_kvpress(job: dict) -> dict:
    """The kvpress runner in the peers venv on `job`; returns its result (raises when it cannot run)."""
    if not PEERS_PYTHON.is_file():
        raise RuntimeError(f"{PEERS_PYTHON} is missing: make the peers venv first (bash scripts/peers_venv.sh)")
    with tempfile.TemporaryDirectory(prefix="kvcat-peers-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        proc = subprocess.run([str(PEERS_PYTHON), str(RUNNER), str(job_file), str(result_file)], cwd=REPO)
        if proc.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"the kvpress runner failed (exit {proc.returncode}); see its output above")
        return json.loads(result_file.read_text())


def run(config: PeersConfig) -> dict:
    """kvcat vs NVIDIA kvpress on the same held-out data, and plain vLLM vs the kvcat server ->
    benchmarks/results/peers.json + Pareto PNG.

    kvpress runs in its own venv (.peers-venv/, made here by scripts/peers_venv.sh on first use)."""
    from kvcat.bench import PeakRSS, config_record, heldout_suite, load_script, provenance, publish
    from kvcat.compaction import get_method
    from kvcat.compaction.queries import clear_memo
    from kvcat.eval.harness import MAX_NEW_TOKENS, full_prefix_nll
    from kvcat.eval.metrics import f1, retrieved
    from kvcat.inference import CacheSession, continuation_nll, full_cache, prefill
    from kvcat.models import load_model

    c = config
    compaction = load_script("compaction")  # its SLOW limits, the same here
    names, press_names = list(c.methods), list(c.presses)
    all_ratios = sorted({float(r) for r in c.ratios})
    ratios = [r for r in all_ratios if r > 1]  # ratio 1 is the full cache, run in both systems anyway
    lm = load_model(c.model, dtype="float32")
    tok = lm.tokenizer
    log(f"model {c.model}; {c.docs} windows of {c.doc_tokens}+{c.continuation} tokens; ratios {ratios}; kvcat "
        f"{names}; kvpress {press_names}; {c.needles} needles, {c.qa} QA")

    windows, examples, prompts = heldout_suite(tok, c.docs, c.doc_tokens, c.continuation, c.needles, c.qa,
                                               c.question_tokens, c.seed)
    max_new = [MAX_NEW_TOKENS.get(ex.task, 32) for ex in examples]

    def score(text: str, ex) -> float:
        return retrieved(text, ex.answers) if ex.task == "needle" else f1(text, ex.answers)

    def tasks(scores: list[float]) -> dict[str, float | None]:
        return {"needle_acc": _mean([s for s, ex in zip(scores, examples) if ex.task == "needle"]),
                "qa_f1": _mean([s for s, ex in zip(scores, examples) if ex.task != "needle"])}

    # ---- kvpress, in its own venv, on the same token ids ----
    job = {"model": str(lm.spec.path),
           "windows": [{"context": list(w.prefix_ids), "continuation": list(w.continuation_ids)} for w in windows],
           "prompts": [{"context": p.context_ids, "question": p.question_ids, "max_new_tokens": m}
                       for p, m in zip(prompts, max_new)],
           "runs": [["none", 1.0]] + [[p, r] for p in press_names for r in ratios],
           "max_new_tokens": max(max_new, default=32), "stop_ids": [tok.eos_token_id]}
    start = time.perf_counter()
    peer = run_kvpress(job)
    log(f"kvpress done in {time.perf_counter() - start:.0f} s")

    # ---- kvcat, in this process; every PPL is from (sum NLL, tokens) per window ----
    reference, kvcat_full, prefill_s, prefill_rss = [], [], [], []
    prefill(lm, list(windows[0].prefix_ids[:64]))  # warm-up
    for w in windows:
        reference.append(window_nll(full_prefix_nll(lm, w)))
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            pre = prefill(lm, list(w.prefix_ids))
        prefill_s.append(time.perf_counter() - t0)
        prefill_rss.append(mem.peak)
        kvcat_full.append(window_nll(continuation_nll(lm, full_cache(pre, lm.spec.fingerprint),
                                                      list(w.continuation_ids))))

    def answer(cache, p, m) -> str:
        return tok.decode(CacheSession(lm, cache).generate(p.question_ids, max_new_tokens=m), skip_special_tokens=True)

    full_texts = [answer(full_cache(prefill(lm, p.context_ids), lm.spec.fingerprint), p, m)
                  for p, m in zip(prompts, max_new)]
    combos = [(m, r) for m in names for r in ratios]
    acc = {k: {"nll": {}, "scores": [None] * len(examples), "compact_s": [], "rss": [], "ratio": [],
               "skipped": False} for k in combos}
    methods_obj = {m: get_method(m) for m in names}

    def compact_all(ids: list[int], use) -> None:
        """Every (method, ratio) on one context; the memoized prefill and queries serve them all."""
        clear_memo()
        for m, r in combos:
            if not compaction.runs(m, len(ids), r, c.slow_max_slots):
                acc[(m, r)]["skipped"] = True
                continue
            with PeakRSS() as mem:
                cache = methods_obj[m].compact(lm, ids, ratio=r)
            a = acc[(m, r)]
            a["rss"].append(mem.peak)
            a["ratio"].append(cache.ratio)
            use(a, cache)

    for i, w in enumerate(windows):
        def nll(a, cache, i=i, w=w):
            a["nll"][i] = window_nll(continuation_nll(lm, cache, list(w.continuation_ids)))
            a["compact_s"].append(cache.info["compact_s"])

        compact_all(list(w.prefix_ids), nll)
        log(f"kvcat: window {i + 1}/{len(windows)} done")
    for j, (p, ex, m) in enumerate(zip(prompts, examples, max_new)):
        def ask(a, cache, j=j, p=p, ex=ex, m=m):
            a["scores"][j] = score(answer(cache, p, m), ex)

        compact_all(p.context_ids, ask)
        log(f"kvcat: question {j + 1}/{len(prompts)} done")

    # ---- rows, all scored here ----
    rows = [{"system": "kvcat", "method": "full", "ratio": 1.0, "ppl": round(mean_ppl(kvcat_full), 4),
             "ppl_gap": round(ppl_gap(kvcat_full, reference), 4),
             **tasks([score(t, ex) for t, ex in zip(full_texts, examples)]),
             "compress_s": _mean(prefill_s), "peak_rss_mb": round(max(prefill_rss), 1)}]
    for (m, r), a in acc.items():
        if a["skipped"] and not a["nll"]:
            rows.append({"system": "kvcat", "method": m, "ratio": r,
                         "skipped": compaction.too_slow(m, c.slow_max_slots)})
            continue
        nlls = list(a["nll"].values())
        rows.append({"system": "kvcat", "method": m, "ratio": r, "ppl": round(mean_ppl(nlls), 4),
                     "ppl_gap": round(ppl_gap(nlls, [reference[i] for i in a["nll"]]), 4),
                     **tasks(a["scores"]),
                     "compress_s": _mean(a["compact_s"]), "peak_rss_mb": round(max(a["rss"]), 1),
                     "achieved_ratio": _mean(a["ratio"])})
    n_win = len(windows)
    contexts = [len(w.prefix_ids) for w in windows] + [len(p.context_ids) for p in prompts]
    peer_full, peer_texts = None, []
    for rec in peer["runs"]:
        method = "full" if rec["press"] == "none" else rec["press"]
        row = {"system": "kvpress", "method": method, "ratio": float(rec["ratio"])}
        if rec.get("error"):
            rows.append({**row, "error": rec["error"]})
            continue
        nlls = [(x["nll_sum"], x["count"]) for x in rec["windows"]]
        texts = [x["text"] for x in rec["prompts"]]
        if method == "full":
            peer_full, peer_texts = nlls, texts
        kept = rec["kept_per_head"]
        rows.append({**row, "ppl": round(mean_ppl(nlls), 4), "ppl_gap": round(ppl_gap(nlls, reference), 4),
                     **tasks([score(t, ex) for t, ex in zip(texts, examples)]),
                     "compress_s": _mean(rec["compress_s"][:n_win]), "peak_rss_mb": rec["peak_rss_mb"],
                     "achieved_ratio": _mean([n / k for n, k in zip(contexts, kept) if k])})
    if peer_full is None:
        raise RuntimeError("kvpress's full-cache run failed: no fairness check possible")

    serving, serving_info = [], {}
    if c.serving_docs:
        log(f"serving: plain vLLM (full document) vs kvcat server (compacted), {c.serving_docs} window(s)")
        docs_ = [(tok.decode(w.prefix_ids), len(w.prefix_ids)) for w in windows[:c.serving_docs]]
        serve = load_script("serve")
        serving, serving_info = serve.measure(serve.ServeConfig(model=c.model, ratios=c.serving_ratios), docs_,
                                              plain_vllm=True)

    kv_ppl, kp_ppl = mean_ppl(kvcat_full), mean_ppl(peer_full)
    rel = abs(kp_ppl - kv_ppl) / kv_ppl
    per_window = [abs(ppl(*b) - ppl(*a)) / ppl(*a) for a, b in zip(kvcat_full, peer_full)]
    fairness = {"kvcat_full_ppl": round(kv_ppl, 5), "kvpress_full_ppl": round(kp_ppl, 5),
                "relative_difference": float(f"{rel:.3g}"),
                "max_window_relative_difference": float(f"{max(per_window):.3g}"),
                "reference_ppl": round(mean_ppl(reference), 5), "tolerance": FAIRNESS_TOLERANCE,
                "ok": rel <= FAIRNESS_TOLERANCE,
                "full_cache_answers_equal": f"{sum(a == b for a, b in zip(full_texts, peer_texts))}/{len(prompts)}",
                "reference": "full-prefix PPL: kvcat.eval.harness.full_prefix_nll, one uncached pass"}
    if not fairness["ok"]:
        log(f"FAIRNESS CHECK FAILED: full-cache PPL kvcat {kv_ppl:.4f} vs kvpress {kp_ppl:.4f} ({rel:.2%})")
    result = {"model": c.model, **provenance(),
              "config": {**config_record(c), "ratios": all_ratios, "split": "heldout", "kvpress": peer["versions"],
                         "serving": serving_info,
                         "ratio_convention": "kvcat ratio r = N / kept slots per head; kvpress compression_ratio "
                                             "= 1 - 1/r (fraction removed), kept count matched to round(N / r)"},
              "rows": rows, "fairness": fairness, "serving": serving}
    log(f"fairness: kvcat {kv_ppl:.4f} vs kvpress {kp_ppl:.4f} ({rel:.4%})")
    publish(result, c.out, table, plot, log)
    return result


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


def _best_at(cell: dict, keys, ratio: float, metric: str) -> tuple[float | None, str | None, float | None]:
    """At one ratio: the lowest `metric` among kvcat's AM methods, and the kvpress press with the lowest
    `metric` with its value (None where a side has no row)."""
    am = [cell[("kvcat", m, ratio)][metric] for m in AM_METHODS if ("kvcat", m, ratio) in cell]
    kp = {m: cell[(s, m, ratio)][metric] for s, m in keys if s == "kvpress" and (s, m, ratio) in cell}
    top = min(kp, key=kp.get) if kp else None
    return (min(am) if am else None), top, (kp[top] if top else None)


def table(result: dict) -> str:
    """One pivot (system/method x ratio) of "PPL gap / needle accuracy", the best kvcat AM gap over the best
    kvpress gap per ratio, then QA F1 when asked, the fairness check and the presses that failed."""
    rows = _scored(result)
    ratios = sorted({r["ratio"] for r in rows})
    keys = list(dict.fromkeys((r["system"], r["method"]) for r in rows))
    cell = {(r["system"], r["method"], r["ratio"]): r for r in rows}
    needles = any(r.get("needle_acc") is not None for r in rows)
    head = "| system | method | " + " | ".join(f"{x:g}x" for x in ratios) + " |\n|---|---|" + "---|" * len(ratios)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731

    def line(system: str, method: str, value) -> str:
        vals = [value(cell[(system, method, x)]) if (system, method, x) in cell else "-" for x in ratios]
        return f"| {system} | {method} | " + " | ".join(vals) + " |"

    fair = result.get("fairness", {})
    full = {r["system"]: r for r in result["rows"] if r["method"] == "full"}
    what = "PPL gap / needle accuracy" if needles else "PPL gap"
    lines = [f"**kvcat vs kvpress: {what}** (lower gap is better; full-prefix PPL {fair.get('reference_ppl', 0):.3f}"
             + (f"; full-context needle accuracy kvcat {fmt(full.get('kvcat', {}).get('needle_acc'))}, kvpress "
                f"{fmt(full.get('kvpress', {}).get('needle_acc'))}" if needles else "") + ")", "", head]
    for s, m in keys:
        lines.append(line(s, m, lambda r: fmt(r["ppl_gap"]) + (f" / {fmt(r.get('needle_acc'))}" if needles else "")))
    best = best_press(result)
    vs, names = [], []
    for x in ratios:
        am, top, kp = _best_at(cell, keys, x, "ppl_gap")
        names.append(top or "-")
        vs.append(f"{am / kp:.2f}x" if am is not None and top and kp > 0 else "-")
    lines.append("| | best kvpress press | " + " | ".join(names) + " |")
    lines.append("| | best kvcat AM gap / best kvpress gap | " + " | ".join(vs) + " |")
    parts = ["\n".join(lines)]
    if any(r.get("qa_f1") is not None for r in rows):
        qa = [f"**SQuAD F1** (full context kvcat {fmt(full.get('kvcat', {}).get('qa_f1'))}, kvpress "
              f"{fmt(full.get('kvpress', {}).get('qa_f1'))})", "", head]
        qa += [line(s, m, lambda r: fmt(r.get("qa_f1"))) for s, m in keys]
        parts.append("\n".join(qa))
    secs = [line(s, m, lambda r: f"{r['compress_s']:.1f}" if r.get("compress_s") is not None else "-")
            for s, m in keys]
    ratio_line = []
    for x in ratios:
        am, top, kp = _best_at(cell, keys, x, "compress_s")
        ratio_line.append(f"{am / kp:.2f}x" if am is not None and top else "-")
    parts.append("\n".join(["**Compression seconds** (token ids to compressed cache, prefill included)", "", head,
                             *secs, "| | fastest kvcat AM / fastest kvpress press | " + " | ".join(ratio_line) + " |"]))
    if fair:
        parts.append(f"Fairness (ratio 1, same windows): full-cache PPL kvcat {fair['kvcat_full_ppl']:.4f}, kvpress "
                     f"{fair['kvpress_full_ppl']:.4f}, relative difference {fair['relative_difference']:.2e} "
                     f"({'within' if fair['ok'] else 'OUTSIDE'} {fair['tolerance']:.0%}). Best kvpress press overall: "
                     f"{best or '-'}.")
    if result.get("serving"):
        from kvcat.bench import load_script

        parts.append("**Serving: plain vLLM with the full document vs the kvcat server with the compacted context** "
                     "(one engine each, same settings; ratios against plain vLLM's cold full-document request)\n\n"
                     + load_script("serve").table({"rows": result["serving"]}))
    failed = {r["method"]: r["error"] for r in result["rows"] if r.get("error")}
    if failed:
        parts.append("Failed on this model: " + "; ".join(f"{m} ({e})" for m, e in failed.items()))
    return "\n\n".join(parts)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _scored(result)
    best = best_press(result)
    serving = result.get("serving") or []
    fig, axes = plt.subplots(1, 3 if serving else 2, figsize=(19 if serving else 13, 4.8))
    ax1, ax2 = axes[:2]
    for s, m in dict.fromkeys((r["system"], r["method"]) for r in rows):
        rs = sorted((r for r in rows if r["system"] == s and r["method"] == m), key=lambda r: r["ratio"])
        kvcat = s == "kvcat"
        star = not kvcat and m == best
        style = dict(marker="o" if kvcat else ("*" if star else "s"), ms=11 if star else 5,
                     ls="-" if kvcat else "--", lw=2.5 if kvcat or star else 1.0, alpha=1.0 if kvcat or star else 0.7,
                     label=f"{s}: {m}" + (" (best kvpress)" if star else ""))
        ax1.plot([r["ratio"] for r in rs], [r["ppl_gap"] for r in rs], **style)
        if any(r.get("needle_acc") is not None for r in rs):
            ax2.plot([r["ratio"] for r in rs], [r.get("needle_acc") for r in rs], **style)
    ax1.set(xscale="log", yscale="symlog", xlabel="compression ratio (N / kept slots per head)",
            ylabel="continuation PPL gap (lower is better)", title="PPL gap: kvcat (solid) vs kvpress (dashed)")
    ax2.set(xscale="log", xlabel="compression ratio", ylabel="needle accuracy", ylim=(-0.05, 1.05),
            title="retrieval vs ratio")
    full = {r["system"]: r.get("needle_acc") for r in result["rows"] if r["method"] == "full"}
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
    fig.suptitle(f"{result['model']} on {result['machine']}; full-cache PPL kvcat {fair.get('kvcat_full_ppl')} / "
                 f"kvpress {fair.get('kvpress_full_ppl')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
