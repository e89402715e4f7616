"""Compaction benchmark: quality and speed of every compaction method at several ratios.

    kvcat bench compaction                                   # the issue's setting (hours on a 2-core CPU)
    kvcat bench compaction --docs 3 --doc-tokens 2048 --ratios 4,8,16 \\
        --methods am-hak,am-omp-fast,snapkv,h2o,recent,streaming-llm,kvzip --needles 3 --qa 3
    python benchmarks/compaction.py --help                   # the same, without the CLI

Per method and ratio, over HELD-OUT data (kvcat.data):
- ppl_gap: continuation perplexity over the compacted prefix minus over the full prefix (mean over documents
  of per-document gaps; lower is better);
- needle_acc: needle-in-a-haystack answers found after compacting the haystack (chat prompt, greedy);
- qa_f1: SQuAD-article questions, token F1 of the first answer line;
- compact_s: seconds from token ids to CompactCache (prefill + reference queries + solve; the document's
  prefill is shared across methods and ratios in memory, but its time is charged to every row);
- prefill_s: plain prefill seconds of the same documents, measured in the same run;
- peak_rss_mb: peak resident memory of the process while compacting (sampled).
Writes benchmarks/results/compaction.json and compaction.png (quality vs ratio, quality vs seconds).
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
MAIN_METHODS = ("am-hak", "am-omp-fast", "snapkv", "h2o", "recent", "streaming-llm", "kvzip")


def log(msg: str) -> None:
    print(f"[bench compaction {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _answer(lm, cache, question_ids, max_new_tokens=24) -> str:
    from kvcat.inference import CacheSession

    out = CacheSession(lm, cache).generate(question_ids, max_new_tokens=max_new_tokens)
    return lm.tokenizer.decode(out, skip_special_tokens=True)


def run(docs: int = 20, doc_tokens: int = 6144, continuation: int = 256,
        ratios=(2, 4, 8, 16, 32, 50), methods: str | list[str] = "all", needles: int = 10, qa: int = 10,
        model: str = "smollm2-135m", out: Path | str = RESULTS / "compaction.json", seed: int = 0) -> dict:
    from kvcat import data
    from kvcat.bench import PeakRSS, provenance, write_result
    from kvcat.compaction import get_method, method_names
    from kvcat.compaction.queries import clear_memo
    from kvcat.eval.metrics import f1, retrieved
    from kvcat.inference import continuation_nll, full_cache, prefill
    from kvcat.models import load_model
    from kvcat.prompts import context_and_question

    names = method_names() if methods in ("all", ["all"]) else (
        methods.split(",") if isinstance(methods, str) else list(methods))
    ratios = [float(r) for r in ratios]
    out = Path(out)
    lm = load_model(model, dtype="float32")
    tok = lm.tokenizer
    log(f"model {model} on {lm.device}; {docs} docs of {doc_tokens}+{continuation} tokens; ratios {ratios}; "
        f"methods {names}")

    windows = data.token_windows(tok, doc_tokens, continuation, docs, split="heldout", seed=seed)
    needle_ex = data.needle(tok, n=needles, length=doc_tokens, split="heldout", seed=seed) if needles else []
    qa_ex = data.squad(split="heldout", n=qa, seed=seed, context="article",
                       max_context_chars=doc_tokens * 4) if qa else []
    prompts = [(context_and_question(tok, ex.document, ex.question), ex) for ex in needle_ex + qa_ex]

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
        text = _answer(lm, full_cache(prefill(lm, p.context_ids), lm.spec.fingerprint), p.question_ids)
        full_scores[ex.task].append(retrieved(text, ex.answers) if ex.task == "needle" else f1(text, ex.answers))
    mean = lambda xs: round(statistics.mean(xs), 4) if xs else None  # noqa: E731
    log(f"full: ppl {mean(full_ppl)}, prefill {mean(prefill_s)} s, needle {mean(full_scores['needle'])}, "
        f"qa f1 {mean(full_scores['squad'])}")

    acc: dict[tuple[str, float], dict[str, list]] = {
        (m, r): {"gap": [], "needle": [], "squad": [], "compact_s": [], "rss": []} for m in names for r in ratios}
    methods_obj = {m: get_method(m) for m in names}
    # document-major order: the memoized prefill and reference queries of a document serve every method
    for i, w in enumerate(windows):
        clear_memo()
        for m in names:
            for r in ratios:
                with PeakRSS() as mem:
                    cache = methods_obj[m].compact(lm, list(w.prefix_ids), ratio=r)
                ppl = math.exp(continuation_nll(lm, cache, list(w.continuation_ids)).mean().item())
                a = acc[(m, r)]
                a["gap"].append(ppl - full_ppl[i])
                a["compact_s"].append(cache.info["compact_s"])
                a["rss"].append(mem.peak)
        log(f"document {i + 1}/{len(windows)} done")
    for j, (p, ex) in enumerate(prompts):
        clear_memo()
        for m in names:
            for r in ratios:
                with PeakRSS() as mem:
                    cache = methods_obj[m].compact(lm, p.context_ids, ratio=r)
                text = _answer(lm, cache, p.question_ids)
                score = retrieved(text, ex.answers) if ex.task == "needle" else f1(text, ex.answers)
                acc[(m, r)][ex.task].append(score)
                acc[(m, r)]["rss"].append(mem.peak)
        log(f"question {j + 1}/{len(prompts)} done")

    kv_full_mb = lm.spec.kv_bytes_per_token(torch.float32) * doc_tokens / 2**20
    model_mb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    rows = [{"method": "full", "ratio": 1.0, "ppl": mean(full_ppl), "ppl_gap": 0.0,
             "needle_acc": mean(full_scores["needle"]), "qa_f1": mean(full_scores["squad"]),
             "compact_s": None, "prefill_s": mean(prefill_s), "peak_rss_mb": None}]
    for (m, r), a in acc.items():
        rows.append({"method": m, "ratio": r, "ppl_gap": mean(a["gap"]), "needle_acc": mean(a["needle"]),
                     "qa_f1": mean(a["squad"]), "compact_s": mean(a["compact_s"]), "prefill_s": mean(prefill_s),
                     "peak_rss_mb": round(max(a["rss"]), 1) if a["rss"] else None})
    result = {"model": model, **provenance(),
              "config": {"docs": docs, "doc_tokens": doc_tokens, "continuation": continuation, "ratios": ratios,
                         "methods": names, "needles": needles, "qa": qa, "seed": seed, "split": "heldout",
                         "model_mb": round(model_mb, 1), "full_kv_mb_fp32": round(kv_full_mb, 1)},
              "rows": rows}
    write_result(result, out)
    png = plot(result, out.with_suffix(".png"))
    log(f"wrote {out} and {png}")
    print(table(result))
    return result


def table(result: dict) -> str:
    head = "| method | ratio | PPL gap | needle acc | QA F1 | compact s | prefill s | peak RSS MB |\n" \
           "|---|---|---|---|---|---|---|---|"
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [head]
    for r in sorted(result["rows"], key=lambda r: (r["ratio"], r["method"])):
        lines.append(f"| {r['method']} | {r['ratio']:g} | {fmt(r['ppl_gap'])} | {fmt(r['needle_acc'])} | "
                     f"{fmt(r['qa_f1'])} | {fmt(r['compact_s'])} | {fmt(r['prefill_s'])} | {fmt(r['peak_rss_mb'])} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["method"] != "full"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["ratio"])
        ax1.plot([r["ratio"] for r in rs], [r["ppl_gap"] for r in rs], marker="o", label=m)
        ax2.scatter([r["compact_s"] for r in rs], [r["ppl_gap"] for r in rs], label=m)
    prefill_s = next((r["prefill_s"] for r in result["rows"] if r["method"] == "full"), None)
    if prefill_s:
        ax2.axvline(prefill_s, color="grey", ls=":", label="prefill")
        ax2.axvline(2 * prefill_s, color="grey", ls="--", label="2x prefill")
    ax1.set(xscale="log", yscale="symlog", xlabel="compaction ratio", ylabel="continuation PPL gap (lower is better)",
            title="quality vs ratio")
    ax2.set(xscale="log", yscale="symlog", xlabel="compaction seconds (prefill + queries + solve)",
            ylabel="PPL gap", title="quality vs seconds")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(f"{result['model']} on {result['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--doc-tokens", type=int, default=6144)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--ratios", default="2,4,8,16,32,50")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--needles", type=int, default=10)
    ap.add_argument("--qa", type=int, default=10)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(RESULTS / "compaction.json"))
    a = ap.parse_args(argv)
    run(docs=a.docs, doc_tokens=a.doc_tokens, continuation=a.continuation,
        ratios=[float(r) for r in a.ratios.split(",")], methods=a.methods, needles=a.needles, qa=a.qa,
        model=a.model, out=a.out)


if __name__ == "__main__":
    main()
