"""Peer benchmark: kvcat's compaction against NVIDIA kvpress's presses, on the same token ids, same metrics.

    kvcat bench peers                        # 8 PPL windows + 42 retrieval cases, ratios 4-32 (hours; --resume)
    kvcat bench peers --docs 1 --cases 3 --ratios 8 --presses snapkv,tova --serving-docs 0 \\
        --out /tmp/peers.json                # minutes

kvpress needs transformers < 5.3, so it runs in its own venv (.peers-venv/, made by scripts/peers_venv.sh)
as a subprocess: benchmarks/kvpress_runner.py. This script, in kvcat's venv, prepares the HELD-OUT data
(kvcat.data PPL windows, and the retrieval cases of `kvcat bench retrieval`: planted number, one of four
numbers, passage question; chat prompts split by kvcat.prompts.context_and_question), hands kvpress the very
token ids, runs kvcat's own methods in this process, and scores every system's outputs here with the same
kvcat.eval.metrics functions:
- ppl_gap: per window, exp(mean NLL of continuation[1:]) over the compressed prefix minus the full-prefix
  PPL of the same window (kvcat.eval.harness.full_prefix_nll: one uncached pass, the shared reference);
  the mean over windows (kvcat.eval.metrics.ppl_gap, as `kvcat eval` and `kvcat bench compaction`);
- retrieval: metrics.retrieved of the greedy answer (48 new tokens) after compressing the document, before
  the question is seen; accuracy overall and per kind, per case in the JSON, and paired against kvcat's AM
  (cases only AM answers / only the press answers, two-sided sign test);
- compress_s: seconds from token ids to compressed cache, prefill included (kvcat: prefill + queries +
  solve; kvpress: the prefill under the press, its scoring included), mean over windows and cases;
- peak_rss_mb: peak resident memory of the process (kvcat's, or the kvpress runner's) while compressing;
- serving (the first --serving-docs windows, as text): vLLM's own OpenAI server (no kvcat code loaded)
  answering over the full document, against the kvcat server over the compacted context (serve.py's
  measure): TTFT, decode tokens/s, KV bytes per context, contexts per KV budget; ratios to plain vLLM.
Ratio r means round(N / r) KV slots per head kept on average, in both systems (kvpress: compression_ratio
1 - 1/r). Ratio 1 is the full cache in both: the fairness check wants their full-cache PPLs on the same
windows within 1% (both values and the relative difference are in the JSON).
Every window and case is saved as it ends (peers.partial.json): `--resume` continues an interrupted run from
there, with the same settings and code. kvpress's runs are stored in peers.kvpress.json as they end and reused
by every later run on the same data and package versions (kvpress_runner.py), resumed or not: a change to
kvcat's methods reruns kvcat's side only.
Writes benchmarks/results/peers.json, .md (table) and .png (PPL gap and retrieval accuracy vs ratio).
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

from kvcat.bench import mean_or_none
from kvcat.console import option
from kvcat.defaults import AM_METHODS, DEFAULT_MODEL
from kvcat.eval.metrics import mean_ppl, ppl, ppl_gap, retrieved

REPO = Path(__file__).resolve().parents[1]
PEERS_PYTHON = REPO / ".peers-venv" / "bin" / "python"
RUNNER = Path(__file__).resolve().parent / "kvpress_runner.py"
FAIRNESS_TOLERANCE = 0.01
MAX_NEW_TOKENS = 48  # as `kvcat bench retrieval`
# the code kvcat's records come from (kvpress's runs are keyed by their data and versions instead)
CODE = ("kvcat", "compaction", "benchmarks/peers.py", "benchmarks/compaction.py", "benchmarks/retrieval.py",
        "pyproject.toml")


@dataclass
class PeersConfig:
    """The settings of `kvcat bench peers`, one command-line option each."""

    docs: int = option(8, help="held-out PPL windows")
    doc_tokens: int = option(2048, help="tokens of each window's prefix")
    continuation: int = option(256, help="continuation tokens for the PPL gap")
    cases: int = option(42, help="held-out retrieval cases (those of `kvcat bench retrieval`; 0 to skip)")
    lengths: tuple[int, ...] = option((2048, 3072), help="retrieval document lengths in tokens")
    ratios: tuple[float, ...] = option((8.0, 16.0, 4.0, 32.0),
                                       help="compression ratios, run in this order (1, the full cache, always runs)")
    methods: tuple[str, ...] = option(("am-hak", "am-hak-fast", "snapkv"), help="kvcat methods")
    presses: tuple[str, ...] = option(("snapkv", "expected-attention", "adakv-expected-attention", "kvzip",
                                       "compactor", "leverage", "tova", "streaming-llm", "fastkvzip", "kvzap"),
                                      help="kvpress presses, as benchmarks/kvpress_runner.py names them (adakv-X: "
                                           "press X inside AdaKVPress)")
    model: str = option(DEFAULT_MODEL, help="zoo name or HF folder")
    slow_max_slots: int = option(256, help="run OMP-fast only up to this many slots per head")
    serving_docs: int = option(1, help="windows served by plain vLLM (full) and kvcat (compacted); 0 skips")
    serving_ratios: tuple[float, ...] = option((10.0, 32.0), help="compaction ratios of the serving comparison")
    seed: int = option(0, help="seed of the held-out sample")
    out: Path = option(Path("benchmarks/results/peers.json"), help="JSON output (Markdown and PNG beside it)")


def log(msg: str) -> None:
    print(f"[bench peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_kvpress(job: dict, store: Path) -> dict:
    """The kvpress runner in the peers venv on `job`; returns its result, the job's runs only (raises when it
    cannot run). The runner keeps every run in `store` as it ends and reuses the runs stored there on the
    same data and versions."""
    if not PEERS_PYTHON.is_file():
        raise RuntimeError(f"{PEERS_PYTHON} is missing: make the peers venv first (bash scripts/peers_venv.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        proc = subprocess.run([str(PEERS_PYTHON), str(RUNNER), str(job_file), str(store)], cwd=REPO)
    if proc.returncode != 0 or not store.is_file():
        raise RuntimeError(f"the kvpress runner failed (exit {proc.returncode}); see its output above")
    result = json.loads(store.read_text())
    wanted = {(str(p), float(r)) for p, r in job["runs"]}
    return {**result, "runs": [rec for rec in result["runs"] if (rec["press"], float(rec["ratio"])) in wanted]}


def run(config: PeersConfig, resume: bool = False) -> dict:
    """kvcat vs NVIDIA kvpress on the same held-out data, and plain vLLM vs the kvcat server ->
    benchmarks/results/peers.json + PNG."""
    import torch

    from kvcat import data
    from kvcat.bench import Checkpoint, PeakRSS, config_record, load_script, provenance, publish
    from kvcat.compaction import get_method
    from kvcat.compaction.queries import clear_memo, document_state
    from kvcat.eval.harness import full_prefix_nll
    from kvcat.eval.metrics import window_nll
    from kvcat.inference import CacheSession, continuation_nll, full_cache, prefill
    from kvcat.models import load_model
    from kvcat.prompts import context_and_question

    c = config
    compaction, retrieval = load_script("compaction"), load_script("retrieval")  # SLOW limits; sign test
    names, press_names = list(c.methods), list(c.presses)
    ratios = list(dict.fromkeys(float(r) for r in c.ratios if r > 1))  # ratio 1, the full cache, runs anyway
    record = {**config_record(c), "max_new_tokens": MAX_NEW_TOKENS, "split": "heldout"}
    # kvcat's records come from its model and methods and this script (CODE; the server and training code may
    # change between the sessions of a long resumed run); kvpress's runs are reused by their data instead
    done = Checkpoint(c.out, record, resume, log, code=CODE)
    kvpress_store = Path(c.out).with_name(Path(c.out).stem + ".kvpress.json")
    lm = load_model(c.model, dtype="float32")
    tok = lm.tokenizer
    windows = data.token_windows(tok, c.doc_tokens, c.continuation, c.docs, split="heldout", seed=c.seed)
    suite = data.retrieval_suite(tok, n=c.cases, lengths=tuple(c.lengths), split="heldout", seed=c.seed) \
        if c.cases else []
    prompts = [context_and_question(tok, ex.document, ex.question) for ex in suite]
    log(f"model {c.model}; {c.docs} windows of {c.doc_tokens}+{c.continuation} tokens, {len(suite)} retrieval "
        f"cases; ratios {ratios}; kvcat {names}; kvpress {press_names}")

    # ---- kvcat, in this process, one window or case at a time (saved as each ends) ----
    combos = [(m, r) for m in names for r in ratios]
    methods_obj = {m: get_method(m) for m in names}
    prefill(lm, list(windows[0].prefix_ids[:64]) if windows else prompts[0].context_ids[:64])  # warm-up

    def compact_all(ids: list[int], use) -> dict:
        """Every (method, ratio) on one context; one prefill and reconstruction serve them all (each
        compaction is still charged its seconds)."""
        clear_memo()
        document_state(lm, torch.tensor(ids), token_nll=True).keep_queries = True
        rows = {}
        for m, r in combos:
            if not compaction.runs(m, len(ids), r, c.slow_max_slots):
                rows[f"{m}|{r:g}"] = {"skipped": compaction.too_slow(m, c.slow_max_slots)}
                continue
            with PeakRSS() as mem:
                cache = methods_obj[m].compact(lm, ids, ratio=r)
            rows[f"{m}|{r:g}"] = {**use(cache), "compact_s": cache.info["compact_s"], "rss": mem.peak,
                                  "ratio": cache.ratio}
        return rows

    def timed_prefill(ids: list[int]):
        """The plain prefill of one context with its seconds and peak RSS: what each compaction is set against."""
        start = time.perf_counter()
        with PeakRSS() as mem:
            pre = prefill(lm, ids)
        return pre, time.perf_counter() - start, mem.peak

    def answer(cache, p) -> str:
        return tok.decode(CacheSession(lm, cache).generate(p.question_ids, max_new_tokens=MAX_NEW_TOKENS),
                          skip_special_tokens=True).strip()

    for i, w in enumerate(windows):
        if i < len(done["windows"]):
            continue
        pre, prefill_s, prefill_rss = timed_prefill(list(w.prefix_ids))
        full = window_nll(continuation_nll(lm, full_cache(pre, lm.spec.fingerprint), list(w.continuation_ids)))
        del pre
        rows = compact_all(list(w.prefix_ids), lambda cache, w=w: {
            "nll": window_nll(continuation_nll(lm, cache, list(w.continuation_ids)))})
        done.add("windows", {"reference": window_nll(full_prefix_nll(lm, w)), "full": full, "prefill_s": prefill_s,
                             "prefill_rss": prefill_rss, "rows": rows})
        log(f"kvcat: window {i + 1}/{len(windows)} done")
    for j, (p, ex) in enumerate(zip(prompts, suite)):
        if j < len(done["cases"]):
            continue
        pre, prefill_s, prefill_rss = timed_prefill(p.context_ids)
        full = answer(full_cache(pre, lm.spec.fingerprint), p)
        del pre
        rows = compact_all(p.context_ids, lambda cache, p=p, ex=ex: _scored_answer(answer(cache, p), ex))
        done.add("cases", {"id": ex.id, "kind": ex.task, "tokens": len(p.context_ids), "expected": ex.answers[0],
                           "prefill_s": prefill_s, "prefill_rss": prefill_rss,
                           **{f"full_{k}": v for k, v in _scored_answer(full, ex).items()}, "rows": rows})
        log(f"kvcat: case {j + 1}/{len(suite)} {ex.id} done: full={int(done['cases'][-1]['full_correct'])} "
            + " ".join(f"{k}={int(v['correct'])}" for k, v in rows.items() if "correct" in v))

    # ---- kvpress, in its own venv, on the same token ids ----
    job = {"model": str(lm.spec.path),
           "windows": [{"context": list(w.prefix_ids), "continuation": list(w.continuation_ids)} for w in windows],
           "prompts": [{"context": p.context_ids, "question": p.question_ids} for p in prompts],
           "runs": [["none", 1.0]] + [[p, r] for r in ratios for p in press_names],
           "max_new_tokens": MAX_NEW_TOKENS, "stop_ids": [tok.eos_token_id]}
    start = time.perf_counter()
    peer = run_kvpress(job, kvpress_store)
    log(f"kvpress done in {time.perf_counter() - start:.0f} s")

    result = {"model": c.model, **provenance(), **done.provenance(),
              "config": {**record, "ratios": [1.0] + sorted(ratios), "kvpress": peer["versions"],
                         "ratio_convention": "kvcat ratio r = N / kept slots per head; kvpress compression_ratio "
                                             "= 1 - 1/r (fraction removed), kept count matched to round(N / r)"},
              **summarize(done["windows"], done["cases"], peer["runs"], names, ratios, retrieval.sign_test, suite,
                          [len(w.prefix_ids) for w in windows] + [len(p.context_ids) for p in prompts])}
    if c.serving_docs:
        log(f"serving: plain vLLM (full document) vs kvcat server (compacted), {c.serving_docs} window(s)")
        docs_ = [(tok.decode(w.prefix_ids), len(w.prefix_ids)) for w in windows[:c.serving_docs]]
        serve = load_script("serve")
        result["serving"], result["config"]["serving"] = serve.measure(
            serve.ServeConfig(model=c.model, ratios=c.serving_ratios), docs_, plain_vllm=True)
    fair = result["fairness"]
    if not fair["ok"]:
        log(f"FAIRNESS CHECK FAILED: full-cache PPL kvcat {fair['kvcat_full_ppl']} vs kvpress "
            f"{fair['kvpress_full_ppl']} ({fair['relative_difference']:.2%})")
    publish(result, c.out, table, plot, log)
    done.finish()
    return result


def _scored_answer(text: str, ex) -> dict:
    return {"correct": retrieved(text, ex.answers), "answer": text}


def summarize(windows: list[dict], cases: list[dict], peer_runs: list[dict], names: list[str], ratios: list[float],
              sign_test, suite, contexts: list[int]) -> dict:
    """Rows (system, method, ratio: PPL gap, retrieval accuracy overall and per kind, seconds, memory), the
    per-case answers of every system, AM paired against every press, and the fairness check."""
    reference = [tuple(w["reference"]) for w in windows]
    kinds = sorted({ex.task for ex in suite})

    def accuracy(correct: list[bool]) -> dict:
        if not correct:
            return {"retrieval_acc": None}
        return {"retrieval_acc": mean_or_none(correct),
                **{f"acc_{k}": mean_or_none([x for x, ex in zip(correct, suite) if ex.task == k]) for k in kinds}}

    per_case = {("kvcat", "full", 1.0): [cs["full_correct"] for cs in cases]}
    rows = [{"system": "kvcat", "method": "full", "ratio": 1.0,
             "ppl": round(mean_ppl([tuple(w["full"]) for w in windows]), 4) if windows else None,
             "ppl_gap": round(ppl_gap([tuple(w["full"]) for w in windows], reference), 4) if windows else None,
             **accuracy(per_case[("kvcat", "full", 1.0)]),
             # over the same documents as the methods' seconds (cases recorded before 2026-12-06 lack theirs)
             "compress_s": mean_or_none([w["prefill_s"] for w in windows] + [cs["prefill_s"] for cs in cases
                                                                               if "prefill_s" in cs]),
             "peak_rss_mb": round(max(w["prefill_rss"] for w in windows), 1) if windows else None}]
    for m in names:
        for r in ratios:
            key = f"{m}|{r:g}"
            got = [w["rows"][key] for w in windows] + [cs["rows"][key] for cs in cases]
            if all("skipped" in g for g in got):
                rows.append({"system": "kvcat", "method": m, "ratio": r, "skipped": got[0]["skipped"]})
                continue
            nll = [(tuple(w["rows"][key]["nll"]), ref) for w, ref in zip(windows, reference)
                   if "nll" in w["rows"][key]]
            correct = [cs["rows"][key].get("correct") for cs in cases]
            per_case[("kvcat", m, r)] = correct
            rows.append({"system": "kvcat", "method": m, "ratio": r,
                         "ppl": round(mean_ppl([a for a, _ in nll]), 4) if nll else None,
                         "ppl_gap": round(ppl_gap([a for a, _ in nll], [b for _, b in nll]), 4) if nll else None,
                         **accuracy(correct),
                         "compress_s": mean_or_none([g.get("compact_s") for g in got]),
                         "peak_rss_mb": round(max(g["rss"] for g in got if "rss" in g), 1),
                         "achieved_ratio": mean_or_none([g.get("ratio") for g in got])})
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
        correct = [_scored_answer(t, ex)["correct"] for t, ex in zip(texts, suite)]
        per_case[("kvpress", method, row["ratio"])] = correct
        answers[f"{method}|{row['ratio']:g}"] = texts
        if method == "full":
            peer_full = nlls
        kept = rec["kept_per_head"]
        rows.append({**row, "ppl": round(mean_ppl(nlls), 4) if nlls else None,
                     "ppl_gap": round(ppl_gap(nlls, reference), 4) if nlls else None, **accuracy(correct),
                     "compress_s": mean_or_none(rec["compress_s"]),
                     "compress_s_windows": mean_or_none(rec["compress_s"][:n_win]), "peak_rss_mb": rec["peak_rss_mb"],
                     "achieved_ratio": mean_or_none([n / k for n, k in zip(contexts, kept) if k])})
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
                             "windows and cases)", "", head, *secs,
                             "| | fastest kvcat AM / fastest kvpress press | " + " | ".join(ratio_line) + " |"]))
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
    fig.suptitle(f"{result['model']} on {result['machine']}; full-cache PPL kvcat {fair.get('kvcat_full_ppl')} / "
                 f"kvpress {fair.get('kvpress_full_ppl')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
