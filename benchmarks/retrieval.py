"""Retrieval benchmark: do facts planted anywhere in a document survive its compaction?

    kvcat bench retrieval                      # 42 held-out cases, ratios 8 and 16 (about an hour on 2 cores)
    kvcat bench retrieval --split tune --cases 12 --out /tmp/tune.json      # choosing defaults: tune split

Cases (`kvcat.data.retrieval_suite`): a single planted magic number, one of four magic numbers (the other
three are distractors of the same form), and a question about a planted passage whose answer is a name;
depths 0.1-0.9, documents of 2,048 and 3,072 tokens of essays (at 4,096 SmolLM2-135M misses more of them
with the whole document in its prompt). The document is compacted before the
question is known (as `/v1/compact` does), then the question is asked over the compacted cache (chat prompt,
greedy, 48 new tokens); correct = the answer appears in the generation.
Per case and method: correct or not, the answer, compaction seconds and compaction over the plain prefill of
the same document (timed just before, in the same process), and the served ratio: N over the widest head's
slots, what a paged engine holds (methods with uneven head budgets, KVzip's global one, save less there than
their mean ratio says). The full document and no document are the
references. Paired comparisons: for each ratio, AM against every other method on the same cases (cases only
AM gets right, cases only the other gets right, and a two-sided sign-test p-value).
Writes benchmarks/results/retrieval.json, .md and .png; `--resume` continues an interrupted run.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvcat.bench import mean_or_none
from kvcat.console import option
from kvcat.defaults import AM_METHODS, DEFAULT_MODEL

MAX_NEW_TOKENS = 48  # small models echo the question first; a passage answer comes after it


def log(msg: str) -> None:
    print(f"[bench retrieval {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class RetrievalConfig:
    """The settings of `kvcat bench retrieval`, one command-line option each."""

    cases: int = option(42, help="retrieval cases (needle, multi-key, passage question, in turn)")
    ratios: tuple[float, ...] = option((8.0, 16.0), help="compaction ratios")
    methods: tuple[str, ...] = option(("am-hak", "am-hak-fast", "kvzip", "snapkv", "streaming-llm"),
                                      help="compaction methods")
    lengths: tuple[int, ...] = option((2048, 3072), help="document lengths in tokens")
    split: str = option("heldout", help="heldout (reported figures) or tune (choosing defaults)")
    model: str = option(DEFAULT_MODEL, help="zoo name or HF folder")
    seed: int = option(0, help="seed of the case sample")
    out: Path = option(Path("benchmarks/results/retrieval.json"), help="JSON output (Markdown and PNG beside it)")

    def __post_init__(self):
        if self.split not in ("heldout", "tune"):
            raise ValueError(f"--split is heldout or tune, not {self.split!r}")


def run(config: RetrievalConfig, resume: bool = False) -> dict:
    """Do planted facts survive compaction? -> benchmarks/results/retrieval.json + PNG, paired comparisons."""
    import torch

    from kvcat import data
    from kvcat.bench import Checkpoint, config_record, provenance, publish
    from kvcat.compaction import get_method
    from kvcat.compaction.queries import clear_memo, document_state
    from kvcat.eval.metrics import retrieved
    from kvcat.inference import CacheSession, full_cache, prefill
    from kvcat.models import load_model
    from kvcat.prompts import context_and_question

    c = config
    names, ratios = list(c.methods), list(c.ratios)
    record = {**config_record(c), "max_new_tokens": MAX_NEW_TOKENS}
    done = Checkpoint(c.out, record, resume, log)
    lm = load_model(c.model, dtype="float32")
    tok = lm.tokenizer
    suite = data.retrieval_suite(tok, n=c.cases, lengths=tuple(c.lengths), split=c.split, seed=c.seed)
    compactors = {m: get_method(m) for m in names}
    log(f"model {c.model}; {c.cases} {c.split} cases; ratios {ratios}; methods {names}")
    prefill(lm, context_and_question(tok, suite[0].document, suite[0].question).context_ids[:64])  # warm-up

    def ask(cache, question_ids) -> str:
        return tok.decode(CacheSession(lm, cache).generate(question_ids, max_new_tokens=MAX_NEW_TOKENS),
                          skip_special_tokens=True).strip()

    def case(ex) -> dict:
        p = context_and_question(tok, ex.document, ex.question)
        clear_memo()
        start = time.perf_counter()
        pre = prefill(lm, p.context_ids)
        prefill_s = time.perf_counter() - start
        full = ask(full_cache(pre, lm.spec.fingerprint), p.question_ids)
        del pre
        none = ask(None, context_and_question(tok, "", ex.question).ids)
        # one reconstruction per case, shared by the ratios (each compaction is still charged its seconds)
        document_state(lm, torch.tensor(p.context_ids), token_nll=True).keep_queries = True
        rows = {}
        for m in names:
            for r in ratios:
                cache = compactors[m].compact(lm, p.context_ids, ratio=r)
                text = ask(cache, p.question_ids)
                rows[f"{m}|{r:g}"] = {"correct": retrieved(text, ex.answers), "answer": text,
                                      "compact_s": cache.info["compact_s"],
                                      "vs_prefill": cache.info["compact_s"] / prefill_s,
                                      "served_ratio": cache.num_tokens / cache.num_slots}
        return {"id": ex.id, "kind": ex.task, "length": ex.metadata["length"], "depth": ex.metadata["depth"],
                "tokens": len(p.context_ids), "expected": ex.answers[0], "prefill_s": prefill_s,
                "full": retrieved(full, ex.answers), "full_answer": full, "none": retrieved(none, ex.answers),
                "rows": rows}

    for i, ex in enumerate(suite):
        if i < len(done["cases"]):
            continue
        rec = case(ex)
        done.add("cases", rec)
        hits = " ".join(f"{k}={int(v['correct'])}" for k, v in rec["rows"].items())
        log(f"case {i + 1}/{c.cases} {ex.id}: full={int(rec['full'])} {hits}")

    result = {"model": c.model, **provenance(), **done.provenance(), "config": record,
              "rows": aggregate(done["cases"], names, ratios), "paired": paired(done["cases"], names, ratios),
              "cases": done["cases"]}
    publish(result, c.out, table, plot, log)
    done.finish()
    return result


def aggregate(cases: list[dict], names: list[str], ratios: list[float]) -> list[dict]:
    """Accuracy overall and per kind, the share of the full context's accuracy kept, and compaction time."""
    kinds = sorted({c["kind"] for c in cases})
    full = mean_or_none([c["full"] for c in cases])
    rows = [{"method": "full", "ratio": 1.0, "accuracy": full,
             **{f"acc_{k}": mean_or_none([c["full"] for c in cases if c["kind"] == k]) for k in kinds},
             "prefill_s": mean_or_none([c["prefill_s"] for c in cases])},
            {"method": "none", "ratio": None, "accuracy": mean_or_none([c["none"] for c in cases]),
             **{f"acc_{k}": mean_or_none([c["none"] for c in cases if c["kind"] == k]) for k in kinds}}]
    for m in names:
        for r in ratios:
            key = f"{m}|{r:g}"
            got = [c["rows"][key] for c in cases]
            acc = mean_or_none([g["correct"] for g in got])
            rows.append({"method": m, "ratio": r, "accuracy": acc,
                         **{f"acc_{k}": mean_or_none([c["rows"][key]["correct"] for c in cases if c["kind"] == k])
                            for k in kinds},
                         "of_full": round(acc / full, 4) if full else None,
                         "served_ratio": mean_or_none([g["served_ratio"] for g in got if "served_ratio" in g]),
                         "compact_s": mean_or_none([g["compact_s"] for g in got]),
                         "compact_over_prefill": mean_or_none([g["vs_prefill"] for g in got])})
    return rows


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value for `wins` against `losses` (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(cases: list[dict], names: list[str], ratios: list[float]) -> list[dict]:
    """AM against each other method on the same cases, per ratio."""
    out = []
    ams = [m for m in names if m in AM_METHODS]
    for i, am in enumerate(ams):
        for other in [m for m in names if m != am and m not in ams[:i]]:  # each pair of AM methods once
            for r in ratios:
                a = [c["rows"][f"{am}|{r:g}"]["correct"] for c in cases]
                b = [c["rows"][f"{other}|{r:g}"]["correct"] for c in cases]
                wins = sum(bool(x and not y) for x, y in zip(a, b))
                losses = sum(bool(y and not x) for x, y in zip(a, b))
                out.append({"am": am, "other": other, "ratio": r, "only_am": wins, "only_other": losses,
                            "p_sign": round(sign_test(wins, losses), 4)})
    return out


def table(result: dict) -> str:
    rows = result["rows"]
    full, none = rows[0], rows[1]
    kinds = sorted(k[4:] for k in full if k.startswith("acc_"))
    ratios = sorted({r["ratio"] for r in rows[2:]})
    methods = list(dict.fromkeys(r["method"] for r in rows[2:]))
    cell = {(r["method"], r["ratio"]): r for r in rows[2:]}
    n = result["config"]["cases"]
    lines = [f"**Retrieval accuracy, {n} {result['config']['split']} cases** (full document "
             f"{full['accuracy']:.2f}, no document {none['accuracy']:.2f}; per kind: "
             + ", ".join(f"{k} {full['acc_' + k]:.2f} / {none['acc_' + k]:.2f}" for k in kinds) + ")", "",
             "| method | " + " | ".join(f"{x:g}x (of full)" for x in ratios) + " | "
             + " | ".join(f"{k} {x:g}x" for x in ratios for k in kinds) + " | compaction / prefill | served ratio |",
             "|---|" + "---|" * (len(ratios) * (1 + len(kinds)) + 2)]
    for m in methods:
        acc = [f"{cell[(m, x)]['accuracy']:.2f} ({_of_full(cell[(m, x)])})" for x in ratios]
        per = [f"{cell[(m, x)]['acc_' + k]:.2f}" for x in ratios for k in kinds]
        speed = "/".join(f"{cell[(m, x)]['compact_over_prefill']:.2f}" for x in ratios)
        served = "/".join("-" if cell[(m, x)].get("served_ratio") is None else f"{cell[(m, x)]['served_ratio']:.1f}"
                          for x in ratios)
        lines.append(f"| {m} | " + " | ".join(acc + per) + f" | {speed} | {served} |")
    pairs = result.get("paired") or []
    if pairs:
        lines += ["", "**Paired, same cases**: cases only AM answers / only the other answers (sign-test p)", "",
                  "| AM vs | " + " | ".join(f"{x:g}x" for x in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for am, other in dict.fromkeys((p["am"], p["other"]) for p in pairs):
            got = {p["ratio"]: p for p in pairs if (p["am"], p["other"]) == (am, other)}
            lines.append(f"| {am} vs {other} | " + " | ".join(
                f"{got[x]['only_am']} / {got[x]['only_other']} (p {got[x]['p_sign']:.2f})" for x in ratios) + " |")
    return "\n".join(lines)


def _of_full(row: dict) -> str:
    """Accuracy as a share of the full document's; '-' when the full document answers nothing."""
    return "-" if row["of_full"] is None else f"{row['of_full']:.2f}"


def plot(result: dict, path: Path) -> Path:
    from kvcat.bench import save_figure, subplots

    rows = result["rows"]
    _, fig, (ax1, ax2) = subplots(1, 2, figsize=(12, 4.5))
    for m in dict.fromkeys(r["method"] for r in rows[2:]):
        rs = sorted((r for r in rows[2:] if r["method"] == m), key=lambda r: r["ratio"])
        style = dict(marker="o", lw=2.5 if m in AM_METHODS else 1.2, label=m)
        ax1.plot([r["ratio"] for r in rs], [r["accuracy"] for r in rs], **style)
        ax2.scatter([r["compact_over_prefill"] for r in rs], [r["accuracy"] for r in rs], label=m)
    ax1.axhline(rows[0]["accuracy"], color="grey", ls="--", label="full document")
    ax1.axhline(rows[1]["accuracy"], color="grey", ls=":", label="no document")
    ax1.set(xscale="log", xlabel="compaction ratio", ylabel="retrieval accuracy", ylim=(-0.02, 1.02),
            title="facts kept vs ratio")
    ax2.set(xlabel="compaction seconds / prefill seconds", ylabel="retrieval accuracy", ylim=(-0.02, 1.02),
            title="facts kept vs compaction time")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    return save_figure(fig, path, f"{result['model']} on {result['machine']}")
