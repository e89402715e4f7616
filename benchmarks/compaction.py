"""Compaction benchmark: quality and speed of the compaction methods at several ratios, side by side.

    kvcat bench compaction                     # 20 held-out 4k-token documents, ratios 2-50 (hours on 2 cores)
    kvcat bench compaction --docs 2 --doc-tokens 2048 --ratios 8,32 --needles 2 --qa 2     # minutes
    kvcat bench compaction --methods am-omp,optimize,am-hak --docs 3 --ratios 16,32,50 --needles 0 --qa 0 \
        --out benchmarks/results/compaction-slow.json          # the slow methods on their own

Per method and ratio, over HELD-OUT data (kvcat.data):
- ppl_gap: continuation perplexity (256 tokens) over the compacted prefix minus over the full prefix;
- needle_acc: needle-in-a-haystack answers found after compacting the haystack (chat prompt, greedy);
- qa_f1: SQuAD-article questions, token F1 of the first answer line;
- compact_s: seconds from token ids to CompactCache (prefill + reference queries + solve; the document's
  prefill is shared across methods and ratios in memory, but its time is charged to every row);
- prefill_s: plain prefill seconds of the same documents, measured in the same run; compact_over_prefill:
  compact_s over the prefill of the same document timed just before it (the fair ratio on a busy machine);
- peak_rss_mb / peak_extra_mb: peak resident memory of the process while compacting, and its rise over the
  memory held before the document's first compaction (model excluded).
"main" methods are every registered one except am-omp and optimize; OMP-fast and optimize run only where
t <= --slow-max-slots (am-omp: half of it), the rest is recorded as skipped.
Writes benchmarks/results/compaction.json, .png (quality vs ratio, vs seconds, retrieval) and .md (tables).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[bench compaction {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# cost grows with t^2..t^4: these run only where t <= their limit (see --slow-max-slots)
SLOW = {"am-omp": 0.5, "am-omp-fast": 1.0, "optimize": 1.0}  # fraction of slow_max_slots


MAIN = ("am-hak", "am-omp-fast", "snapkv", "h2o", "kvzip", "recent", "streaming-llm", "random", "key-norm")


def run(docs: int = 20, doc_tokens: int = 4096, continuation: int = 256,
        ratios=(2, 4, 8, 16, 32, 50), methods: str | list[str] = "main", needles: int = 5, qa: int = 5,
        model: str = "smollm2-135m", out: Path | str = RESULTS / "compaction.json", seed: int = 0,
        slow_max_slots: int = 256, question_tokens: int = 2048) -> dict:
    from kvcat.bench import PeakRSS, heldout_suite, provenance, publish
    from kvcat.compaction import get_method, method_names
    from kvcat.compaction.queries import clear_memo
    from kvcat.eval.harness import MAX_NEW_TOKENS
    from kvcat.eval.metrics import f1, retrieved
    from kvcat.inference import continuation_nll, full_cache, prefill
    from kvcat.models import load_model

    if methods in ("all", "main"):
        names = method_names() if methods == "all" else list(MAIN)
    else:
        names = methods.split(",") if isinstance(methods, str) else list(methods)
    ratios = [float(r) for r in ratios]
    out = Path(out)
    lm = load_model(model, dtype="float32")
    tok = lm.tokenizer
    log(f"model {model} on {lm.device}; {docs} docs of {doc_tokens}+{continuation} tokens; ratios {ratios}; "
        f"methods {names}")

    windows, examples, chats = heldout_suite(tok, docs, doc_tokens, continuation, needles, qa, question_tokens, seed)
    prompts = list(zip(chats, examples))

    def answer(cache, question_ids) -> str:
        out_ids = CacheSession(lm, cache).generate(question_ids, max_new_tokens=MAX_NEW_TOKENS["needle"])
        return tok.decode(out_ids, skip_special_tokens=True)

    def score(text: str, ex) -> float:
        return retrieved(text, ex.answers) if ex.task == "needle" else f1(text, ex.answers)

    def combos(n: int):
        """(method, ratio) pairs to run on an n-token context; slow methods only up to slow_max_slots."""
        return [(m, r) for m in names for r in ratios if round(n / r) <= SLOW.get(m, math.inf) * slow_max_slots]

    from kvcat.inference import CacheSession

    # the warm-up and the full-cache reference of every document, timing the plain prefill
    prefill(lm, list(windows[0].prefix_ids[:64]))
    full_ppl, prefill_s = [], []
    for w in windows:
        start = time.perf_counter()
        pre = prefill(lm, list(w.prefix_ids))
        prefill_s.append(time.perf_counter() - start)
        full_ppl.append(math.exp(continuation_nll(lm, full_cache(pre, lm.spec.fingerprint),
                                                  list(w.continuation_ids)).mean().item()))
    full_scores = {"needle": [], "squad": []}
    for p, ex in prompts:
        full_scores[ex.task].append(score(answer(full_cache(prefill(lm, p.context_ids), lm.spec.fingerprint),
                                                 p.question_ids), ex))
    mean = lambda xs: round(statistics.mean(xs), 4) if xs else None  # noqa: E731
    log(f"full: ppl {mean(full_ppl)}, prefill {mean(prefill_s)} s, needle {mean(full_scores['needle'])}, "
        f"qa f1 {mean(full_scores['squad'])}")

    acc: dict[tuple[str, float], dict[str, list]] = {
        (m, r): {"gap": [], "needle": [], "squad": [], "compact_s": [], "vs_prefill": [], "rss": [], "extra": []}
        for m in names for r in ratios}
    methods_obj = {m: get_method(m) for m in names}

    def compact_all(ids: list[int], use) -> None:
        """Every (method, ratio) on one context; its memoized prefill and queries serve them all."""
        clear_memo()
        base = PeakRSS.rss()
        for m, r in combos(len(ids)):
            with PeakRSS() as mem:
                cache = methods_obj[m].compact(lm, ids, ratio=r)
            a = acc[(m, r)]
            a["rss"].append(mem.peak)
            a["extra"].append(mem.peak - base)
            use(a, cache)

    # document-major order: the memoized prefill and reference queries of a document serve every method
    for i, w in enumerate(windows):
        def ppl_gap(a, cache, i=i, w=w):
            ppl = math.exp(continuation_nll(lm, cache, list(w.continuation_ids)).mean().item())
            a["gap"].append(ppl - full_ppl[i])
            a["compact_s"].append(cache.info["compact_s"])
            # against the prefill of the same document a moment earlier (robust to a busy machine)
            a["vs_prefill"].append(cache.info["compact_s"] / cache.info["prefill_s"])

        compact_all(list(w.prefix_ids), ppl_gap)
        log(f"document {i + 1}/{len(windows)} done")
    for j, (p, ex) in enumerate(prompts):
        compact_all(p.context_ids, lambda a, cache, p=p, ex=ex: a[ex.task].append(score(answer(cache, p.question_ids),
                                                                                        ex)))
        log(f"question {j + 1}/{len(prompts)} done")

    kv_full_mb = lm.spec.kv_bytes_per_token(torch.float32) * doc_tokens / 2**20
    model_mb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    rows = [{"method": "full", "ratio": 1.0, "ppl": mean(full_ppl), "ppl_gap": 0.0,
             "needle_acc": mean(full_scores["needle"]), "qa_f1": mean(full_scores["squad"]),
             "compact_s": None, "prefill_s": mean(prefill_s), "peak_rss_mb": None, "peak_extra_mb": None}]
    for (m, r), a in acc.items():
        if not a["gap"]:
            limit = int(SLOW.get(m, 0) * slow_max_slots)
            rows.append({"method": m, "ratio": r, "skipped": f"t > {limit} slots: too slow on this machine"})
            continue
        rows.append({"method": m, "ratio": r, "ppl_gap": mean(a["gap"]), "needle_acc": mean(a["needle"]),
                     "qa_f1": mean(a["squad"]), "compact_s": mean(a["compact_s"]), "prefill_s": mean(prefill_s),
                     "compact_over_prefill": mean(a["vs_prefill"]),
                     "peak_rss_mb": round(max(a["rss"]), 1), "peak_extra_mb": round(max(a["extra"]), 1)})
    result = {"model": model, **provenance(),
              "config": {"docs": docs, "doc_tokens": doc_tokens, "continuation": continuation, "ratios": ratios,
                         "methods": names, "needles": needles, "qa": qa, "question_tokens": question_tokens,
                         "seed": seed, "split": "heldout",
                         "slow_max_slots": slow_max_slots, "model_mb": round(model_mb, 1),
                         "full_kv_mb_fp32": round(kv_full_mb, 1)},
              "rows": rows}
    publish(result, out, table, plot, log)
    return result


AM = ("am-hak", "am-omp", "am-omp-fast")


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
        am = [cell[(m, x)]["ppl_gap"] for m in AM if (m, x) in cell]
        other = [cell[(m, x)]["ppl_gap"] for m in methods if m not in AM and (m, x) in cell]
        vs.append(f"{min(other) / min(am):.2f}x" if am and other and min(am) > 0 else "-")
    gap += "\n| best other / best AM | " + " | ".join(vs) + " |"
    parts = [gap]
    if full.get("needle_acc") is not None:
        parts.append(pivot(f"Needle accuracy (full context {full['needle_acc']:.2f})", lambda r: r["needle_acc"]))
    if full.get("qa_f1") is not None:
        parts.append(pivot(f"SQuAD F1 (full context {full['qa_f1']:.2f})", lambda r: r["qa_f1"]))
    parts.append(pivot(f"Compaction seconds / prefill seconds of the same document (prefill {full['prefill_s']:.1f} s)",
                       lambda r: r["compact_over_prefill"]))
    kv_mb = result["config"].get("full_kv_mb_fp32")
    if kv_mb:
        parts.append(pivot(f"Peak memory while compacting, above the model, / the full KV cache ({kv_mb:.0f} MB)",
                           lambda r: r["peak_extra_mb"] / kv_mb))
    return "\n\n".join(parts)


def plot(result: dict, path: Path) -> Path:
    from kvcat.bench import save_figure, subplots

    rows = [r for r in result["rows"] if r["method"] != "full" and "skipped" not in r]
    _, fig, (ax1, ax2, ax3) = subplots(1, 3, figsize=(17, 4.5))
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["ratio"])
        style = dict(marker="o", lw=2.5 if m in AM else 1.2, label=m)
        ax1.plot([r["ratio"] for r in rs], [r["ppl_gap"] for r in rs], **style)
        ax2.scatter([r["compact_s"] for r in rs], [r["ppl_gap"] for r in rs], label=m)
        if rs[0]["needle_acc"] is not None:
            ax3.plot([r["ratio"] for r in rs], [r["needle_acc"] for r in rs], **style)
    ax3.set(xscale="log", xlabel="compaction ratio", ylabel="needle accuracy", title="retrieval vs ratio")
    prefill_s = next((r["prefill_s"] for r in result["rows"] if r["method"] == "full"), None)
    if prefill_s:
        ax2.axvline(prefill_s, color="grey", ls=":", label="prefill")
        ax2.axvline(2 * prefill_s, color="grey", ls="--", label="2x prefill")
    ax1.set(xscale="log", yscale="symlog", xlabel="compaction ratio", ylabel="continuation PPL gap (lower is better)",
            title="quality vs ratio")
    ax2.set(xscale="log", yscale="symlog", xlabel="compaction seconds (prefill + queries + solve)",
            ylabel="PPL gap", title="quality vs seconds")
    ax1.legend(fontsize=7)
    return save_figure(fig, path, f"{result['model']} on {result['machine']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--doc-tokens", type=int, default=4096)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--ratios", default="2,4,8,16,32,50")
    ap.add_argument("--methods", default="main", help="comma-separated, 'main' (MAIN) or 'all'")
    ap.add_argument("--needles", type=int, default=5)
    ap.add_argument("--qa", type=int, default=5)
    ap.add_argument("--question-tokens", type=int, default=2048)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--slow-max-slots", type=int, default=256)
    ap.add_argument("--out", default=str(RESULTS / "compaction.json"))
    a = ap.parse_args(argv)
    run(docs=a.docs, doc_tokens=a.doc_tokens, continuation=a.continuation,
        ratios=[float(r) for r in a.ratios.split(",")], methods=a.methods, needles=a.needles, qa=a.qa,
        model=a.model, out=a.out, slow_max_slots=a.slow_max_slots, question_tokens=a.question_tokens)


if __name__ == "__main__":
    main()
