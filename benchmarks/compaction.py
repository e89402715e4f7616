"""Compaction benchmark: quality and speed of the compaction methods at several ratios, side by side.

    kvcat bench compaction                     # 20 held-out 4k-token documents, ratios 2-50 (hours on 2 cores)
    kvcat bench compaction --docs 2 --doc-tokens 2048 --ratios 8,32 --needles 2 --qa 2     # minutes
    kvcat bench compaction --methods am-omp,optimize,am-hak --docs 3 --ratios 16,32,50 --needles 0 --qa 0 \
        --out benchmarks/results/compaction-slow.json          # the slow methods on their own

Per method and ratio, over HELD-OUT data (kvcat.data):
- ppl_gap: continuation perplexity (256 tokens) over the compacted prefix minus over the full prefix, the
  mean over documents of each one's gap (kvcat.eval.metrics.ppl_gap: `kvcat eval` reports the same number
  on the same windows);
- needle_acc: needle-in-a-haystack answers found after compacting the haystack (chat prompt, greedy);
- qa_f1: SQuAD-article questions, token F1 of the first answer line;
- compact_s: seconds from token ids to CompactCache (prefill + reference queries + solve; the document's
  prefill is shared across methods and ratios in memory, but its time is charged to every row);
- prefill_s: plain prefill seconds of the same documents, measured in the same run; compact_over_prefill:
  compact_s over the prefill of the same document timed just before it (the fair ratio on a busy machine);
- peak_rss_mb / peak_extra_mb: peak resident memory of the process while compacting, and its rise over the
  memory held before the document's first compaction (model excluded; memory freed by an earlier method
  stays resident, so these overstate the later methods);
- memory_alone: per method (and the plain prefill), one compaction at --memory-ratio in a fresh process:
  its peak resident memory above the process with the model loaded, and that over the full KV cache.
Each document, question and memory probe is saved as it is done (compaction.partial.json): `--resume`
continues an interrupted run with the same settings and code.
"main" methods are every registered one except am-omp and optimize; OMP-fast and optimize run only where
t <= --slow-max-slots (am-omp: half of it), the rest is recorded as skipped.
Writes benchmarks/results/compaction.json, .png (quality vs ratio, vs seconds, retrieval) and .md (tables).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvcat.bench import SampleConfig, result_file
from kvcat.bench_process import logger
from kvcat.console import option
from kvcat.defaults import AM_METHODS
from kvcat.eval.metrics import mean_ppl, ppl_gap, window_nll

log = logger("bench compaction")


# cost grows with t^2..t^4: these run only where t <= their limit (see --slow-max-slots); the peers benchmark too
SLOW = {"am-omp": 0.5, "am-omp-fast": 1.0, "optimize": 1.0}  # fraction of slow_max_slots


def runs(method: str, tokens: int, ratio: float, slow_max_slots: int) -> bool:
    """Whether `method` runs at `ratio` on a `tokens`-token context: the SLOW ones only up to their limit."""
    return round(tokens / ratio) <= SLOW.get(method, math.inf) * slow_max_slots


def too_slow(method: str, slow_max_slots: int) -> str:
    """The note of a (method, ratio) row the SLOW limit left out."""
    return f"t > {int(SLOW.get(method, 0) * slow_max_slots)} slots: too slow on this machine"


# The speed goals, in compaction seconds over the prefill seconds of the same document: every AM method, the fastest.
SPEED_GOALS = {"AM": 2.5, "fastest AM": 1.5}
MAIN = ("am-hak", "am-hak-fast", "am-omp-fast", "snapkv", "h2o", "kvzip", "recent", "streaming-llm", "random",
        "key-norm")


@dataclass
class CompactionConfig(SampleConfig):
    """The settings of `kvcat bench compaction`, one command-line option each."""

    out: Path = result_file("compaction")
    docs: int = option(20, help="held-out documents")
    doc_tokens: int = option(4096, help="tokens of each document prefix")
    continuation: int = option(256, help="continuation tokens for the PPL gap")
    ratios: tuple[float, ...] = option((2.0, 4.0, 8.0, 16.0, 32.0, 50.0), help="compaction ratios")
    methods: tuple[str, ...] = option(("main",), help="methods, or 'main' (every method but the slow am-omp "
                                                      "and optimize) or 'all'")
    needles: int = option(5, help="needle examples (0 to skip)")
    qa: int = option(5, help="QA examples (0 to skip)")
    question_tokens: int = option(2048, help="length of the needle haystacks and QA articles")
    slow_max_slots: int = option(256, help="run OMP-fast and gradient compaction only up to this many slots per "
                                           "head (am-omp: half), too slow above on a CPU")
    memory_ratio: float = option(8.0, help="ratio of the peak-memory probes (one fresh process per method; 0 to "
                                           "skip)")


def run(config: CompactionConfig, resume: bool = False) -> dict:
    """Compaction quality/speed benchmark -> benchmarks/results/compaction.json + Pareto PNG."""
    from kvcat.compaction import method_from_spec, method_names
    from kvcat.compaction.queries import clear_memo

    from kvcat.bench import Checkpoint, config_record, heldout_suite, provenance, publish
    from kvcat.bench_process import PeakRSS
    from kvcat.eval.harness import MAX_NEW_TOKENS, full_prefix_nll
    from kvcat.eval.metrics import f1, retrieved
    from kvcat.inference import CacheSession, continuation_nll, full_cache, prefill
    from kvcat.models import load_model

    c = config
    names = {("all",): method_names(), ("main",): list(MAIN)}.get(tuple(c.methods), list(c.methods))
    record = {**config_record(c), "methods": names, "split": "heldout"}
    # one record per document / question, saved as each is done: `resume` continues an interrupted run
    done = Checkpoint(c.out, record, resume, log)
    lm = load_model(c.model, dtype=c.compute_dtype)
    tok = lm.tokenizer
    log(f"model {c.model} on {lm.device}; {c.docs} docs of {c.doc_tokens}+{c.continuation} tokens; ratios "
        f"{list(c.ratios)}; methods {names}")

    windows, examples, chats = heldout_suite(tok, c.docs, c.doc_tokens, c.continuation, c.needles, c.qa,
                                             c.question_tokens, c.seed)
    methods_obj = {m: method_from_spec(m) for m in names}

    def answer(cache, question_ids) -> str:
        out_ids = CacheSession(lm, cache).generate(question_ids, max_new_tokens=MAX_NEW_TOKENS["needle"])
        return tok.decode(out_ids, skip_special_tokens=True)

    def score(text: str, ex) -> float:
        return retrieved(text, ex.answers) if ex.task == "needle" else f1(text, ex.answers)

    def compact_all(ids: list[int]):
        """(key, cache, memory) for every (method, ratio) on one context, one at a time: its memoized prefill
        and reference queries serve them all. Slow methods run only up to slow_max_slots."""
        clear_memo()
        base = PeakRSS.rss()
        for m in names:
            for r in c.ratios:
                if not runs(m, len(ids), r, c.slow_max_slots):
                    continue
                with PeakRSS() as mem:
                    cache = methods_obj[m].compact(lm, ids, ratio=r)
                yield f"{m}|{r:g}", cache, {"rss": mem.peak, "extra": mem.peak - base}

    def document(w) -> dict:
        """The plain prefill's seconds, the continuation NLL over every compaction with its time, and over the
        full prefix (one uncached pass: the reference of `kvcat eval`'s gaps too)."""
        start = time.perf_counter()
        prefill(lm, list(w.prefix_ids))
        prefill_s = time.perf_counter() - start
        rows = {}
        for key, cache, mem in compact_all(list(w.prefix_ids)):
            # compact_s against the prefill of the same document inside it (robust to a busy machine)
            rows[key] = {"nll": window_nll(continuation_nll(lm, cache, list(w.continuation_ids))),
                         "compact_s": cache.info["compact_s"],
                         "vs_prefill": cache.info["compact_s"] / cache.info["prefill_s"], **mem}
        return {"full_nll": window_nll(full_prefix_nll(lm, w)), "prefill_s": prefill_s, "rows": rows}

    def question(p, ex) -> dict:
        full = score(answer(full_cache(prefill(lm, p.context_ids), lm.spec.fingerprint), p.question_ids), ex)
        rows = {key: {"score": score(answer(cache, p.question_ids), ex), **mem}
                for key, cache, mem in compact_all(p.context_ids)}
        return {"task": ex.task, "full": full, "rows": rows}

    warm_up(lm, list(windows[0].prefix_ids))
    probes = (["prefill"] + [m for m in names if runs(m, c.doc_tokens, c.memory_ratio, c.slow_max_slots)]
              if c.memory_ratio else [])
    units = [("docs", i, lambda w=w: document(w)) for i, w in enumerate(windows)]
    units += [("questions", j, lambda p=p, ex=ex: question(p, ex)) for j, (p, ex) in enumerate(zip(chats, examples))]
    units += [("memory", k, lambda m=m: memory_alone(m, c.memory_ratio, c.doc_tokens, c.continuation, c.model))
              for k, m in enumerate(probes)]
    for kind, i, work in units:
        if i < len(done[kind]):
            continue
        done.add(kind, work())
        log(f"{kind} {i + 1}/{sum(u[0] == kind for u in units)} done")

    result = {"model": c.model, **provenance(), **done.provenance(),
              "config": {**record, "model_mb": round(sum(p.numel() * p.element_size()
                                                         for p in lm.model.parameters()) / 2**20, 1),
                         "full_kv_mb_fp32": round(full_kv_mb(lm, c.doc_tokens), 1)},
              "rows": aggregate(done["docs"], done["questions"], names, list(c.ratios), c.slow_max_slots),
              "memory_alone": done["memory"]}
    publish(result, c.out, table, plot, log)
    done.finish()
    return result


WARM_UP_TOKENS = 64


def warm_up(lm, ids: list[int]) -> None:
    """One short prefill, so that one-time allocations and kernel set-up are not charged to the first row."""
    from kvcat.inference import prefill

    prefill(lm, ids[:WARM_UP_TOKENS])


def full_kv_mb(lm, tokens: int) -> float:
    """The fp32 K/V of `tokens` tokens, in MiB: what the memory goal is stated against."""
    import torch

    return lm.spec.kv_bytes_per_token(torch.float32) * tokens / 2**20


def memory_alone(method: str, ratio: float, doc_tokens: int, continuation: int, model: str) -> dict:
    """Peak resident memory of one compaction (or of the plain prefill, method "prefill") of the first
    held-out document in a fresh process, above that process after loading the model and a WARM_UP_TOKENS warm-up
    forward: what one compaction adds to a serving process. (In the benchmark's own process the memory
    freed by earlier methods stays resident, so its per-row peaks overstate the later methods.)"""
    import json
    import subprocess

    probe = "import json, sys; from kvcat.bench import load_script; load_script('compaction').memory_probe(" \
            "*json.loads(sys.argv[1]))"
    cmd = [sys.executable, "-c", probe, json.dumps([method, ratio, doc_tokens, continuation, model])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {method} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_probe(method: str, ratio: float, doc_tokens: int, continuation: int, model: str) -> None:
    import gc
    import json

    from kvcat.compaction import get_method

    from kvcat.bench import heldout_suite
    from kvcat.bench_process import PeakRSS
    from kvcat.inference import prefill
    from kvcat.models import load_model

    lm = load_model(model, dtype="float32")
    windows, _, _ = heldout_suite(lm.tokenizer, 1, doc_tokens, continuation, 0, 0, doc_tokens)
    ids = list(windows[0].prefix_ids)
    warm_up(lm, ids)
    gc.collect()
    base = PeakRSS.rss()
    with PeakRSS() as mem:
        if method == "prefill":
            prefill(lm, ids)
        else:
            get_method(method).compact(lm, ids, ratio=ratio)
    kv_mb = full_kv_mb(lm, len(ids))
    print(json.dumps({"method": method, "ratio": None if method == "prefill" else ratio,
                      "warm_model_rss_mb": round(base, 1), "peak_above_mb": round(mem.peak - base, 1),
                      "over_full_kv": round((mem.peak - base) / kv_mb, 3)}))


def aggregate(docs: list[dict], questions: list[dict], names: list[str], ratios: list[float],
              slow_max_slots: int) -> list[dict]:
    """The result rows: the full prefix, then per (method, ratio) the means over documents and questions (the
    PPL gap: `kvcat.eval.metrics.ppl_gap`, as `kvcat eval` reports it)."""
    def mean(xs):
        return round(statistics.mean(xs), 4) if xs else None

    def task(name: str, key: str | None = None) -> list[float]:
        return [q["full"] if key is None else q["rows"][key]["score"] for q in questions
                if q["task"] == name and (key is None or key in q["rows"])]

    prefill_s = mean([d["prefill_s"] for d in docs])
    rows = [{"method": "full", "ratio": 1.0, "ppl": round(mean_ppl([d["full_nll"] for d in docs]), 4),
             "ppl_gap": 0.0, "needle_acc": mean(task("needle")), "qa_f1": mean(task("squad")), "compact_s": None,
             "prefill_s": prefill_s, "peak_rss_mb": None, "peak_extra_mb": None}]
    for m in names:
        for r in ratios:
            key = f"{m}|{r:g}"
            ran = [d for d in docs if key in d["rows"]]
            if not ran:
                rows.append({"method": m, "ratio": r, "skipped": too_slow(m, slow_max_slots)})
                continue
            recs = [d["rows"][key] for d in ran]
            mems = recs + [q["rows"][key] for q in questions if key in q["rows"]]
            gap = ppl_gap([x["nll"] for x in recs], [d["full_nll"] for d in ran])
            rows.append({"method": m, "ratio": r, "ppl_gap": round(gap, 4),
                         "needle_acc": mean(task("needle", key)), "qa_f1": mean(task("squad", key)),
                         "compact_s": mean([x["compact_s"] for x in recs]), "prefill_s": prefill_s,
                         "compact_over_prefill": mean([x["vs_prefill"] for x in recs]),
                         "peak_rss_mb": round(max(x["rss"] for x in mems), 1),
                         "peak_extra_mb": round(max(x["extra"] for x in mems), 1)})
    return rows


def table(result: dict) -> str:
    """Pivot tables (methods x ratios) of PPL gap, needle accuracy, QA F1 and compaction time / prefill time;
    the PPL table ends with the best AM method's gap against the best other method's, side by side."""
    rows = [r for r in result["rows"] if r["method"] != "full" and "skipped" not in r]
    ratios = sorted({r["ratio"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["ratio"]): r for r in rows}
    full = next(r for r in result["rows"] if r["method"] == "full")
    head = "| method | " + " | ".join(f"{x:g}x" for x in ratios) + " |\n|---|" + "---|" * len(ratios)

    def pivot(title: str, value) -> str:
        lines = [f"**{title}**", "", head]
        for m in methods:
            vals = [value(cell[(m, x)]) if (m, x) in cell else None for x in ratios]
            lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
        return "\n".join(lines)

    gap = pivot(f"Continuation PPL gap (lower is better; full-context PPL {full['ppl']:.2f})", lambda r: r["ppl_gap"])
    vs = []
    for x in ratios:
        am = [cell[(m, x)]["ppl_gap"] for m in AM_METHODS if (m, x) in cell]
        other = [cell[(m, x)]["ppl_gap"] for m in methods if m not in AM_METHODS and (m, x) in cell]
        vs.append(f"{min(other) / min(am):.2f}x" if am and other and min(am) > 0 else "-")
    gap += "\n| best other / best AM | " + " | ".join(vs) + " |"
    parts = [gap]
    if full.get("needle_acc") is not None:
        parts.append(pivot(f"Needle accuracy (full context {full['needle_acc']:.2f})", lambda r: r["needle_acc"]))
    if full.get("qa_f1") is not None:
        parts.append(pivot(f"SQuAD F1 (full context {full['qa_f1']:.2f})", lambda r: r["qa_f1"]))
    parts.append(pivot(f"Compaction seconds / prefill seconds of the same document (prefill {full['prefill_s']:.1f} s)",
                       lambda r: r["compact_over_prefill"]))
    alone = result.get("memory_alone")
    if alone:
        kv_mb = result["config"]["full_kv_mb_fp32"]
        ratio = result['config']['memory_ratio']
        parts.append(f"**Peak memory of one compaction at {ratio:g}x in a fresh process, above the loaded "
                     f"model, / the full KV cache ({kv_mb:.0f} MB)**\n\n| " + " | ".join(a["method"] for a in alone)
                     + " |\n|" + "---|" * len(alone) + "\n| "
                     + " | ".join(f"{a['over_full_kv']:.2f}" for a in alone) + " |")
    return "\n\n".join(parts)


def plot(result: dict, path: Path) -> Path:
    from kvcat.bench import save_figure, subplots

    rows = [r for r in result["rows"] if r["method"] != "full" and "skipped" not in r]
    # the third panel: retrieval where the run asked needles, else the time against the prefill
    needles = any(r["needle_acc"] is not None for r in rows)
    third, third_label = ("needle_acc", "needle accuracy") if needles else \
        ("compact_over_prefill", "compaction s / prefill s")
    _, fig, (ax1, ax2, ax3) = subplots(1, 3, figsize=(17, 4.5))
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["ratio"])
        style = dict(marker="o", lw=2.5 if m in AM_METHODS else 1.2, label=m)
        ax1.plot([r["ratio"] for r in rs], [r["ppl_gap"] for r in rs], **style)
        ax2.scatter([r["compact_s"] for r in rs], [r["ppl_gap"] for r in rs], label=m)
        ax3.plot([r["ratio"] for r in rs], [r.get(third) for r in rs], **style)
    goals = " and ".join(f"{x:g}x" for x in SPEED_GOALS.values())
    ax3.set(xscale="log", xlabel="compaction ratio", ylabel=third_label,
            title="retrieval vs ratio" if needles else f"speed vs ratio (grey: the goals, {goals})")
    goal_styles = zip(SPEED_GOALS.items(), ("--", "-."))
    prefill_s = next((r["prefill_s"] for r in result["rows"] if r["method"] == "full"), None)
    if prefill_s:
        ax2.axvline(prefill_s, color="grey", ls=":", label="prefill")
    for (goal, times), ls in goal_styles:
        if not needles:
            ax3.axhline(times, color="grey", ls=ls, label=f"goal, {goal}: {times:g}x prefill")
        if prefill_s:
            ax2.axvline(times * prefill_s, color="grey", ls=ls, label=f"{times:g}x prefill ({goal} goal)")
    ax1.set(xscale="log", yscale="symlog", xlabel="compaction ratio", ylabel="continuation PPL gap (lower is better)",
            title="quality vs ratio")
    ax2.set(xscale="log", yscale="symlog", xlabel="compaction seconds (prefill + queries + solve)",
            ylabel="PPL gap", title="quality vs seconds")
    ax1.legend(fontsize=7)
    return save_figure(fig, path, f"{result['model']} on {result['machine']}")
