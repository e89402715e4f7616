"""Retrieval benchmark: do the facts of a document survive its compaction, whatever their form?

    kvcat bench retrieval                      # 144 held-out cases, ratios 8 and 16 (hours on 2 cores)
    kvcat bench retrieval --split tune --cases-per-kind 6 --out /tmp/tune.json   # choosing defaults: tune split

Cases (`kvcat.data.suite`): six kinds, `--cases-per-kind` each: a planted magic number, one of four such
numbers, a planted passage's shop name, documents of essays, speeches, a novel or scripture holding 3-6 facts of
mixed forms (numbers, codes, words, names; the tune and held-out splits use different sentence forms), and
natural-text questions (SQuAD, HotpotQA bridge) whose answering paragraphs sit among distractor paragraphs.
Each document is compacted once, before any question is known (as `/v1/compact` does), then each of its
questions is asked over the compacted cache (chat prompt, greedy, 48 new tokens); correct = a gold answer appears
in the generation as whole words, case, white space and punctuation folded (`metrics.answered`).
Per case and method: correct or not, the answer, compaction seconds and compaction over the plain prefill of
the same document (timed just before, in the same process), and the served ratio: the full KV bytes over the
bytes a server holds, the widest head's slots for every head plus a hybrid's side slots (methods with uneven
head budgets, KVzip's global one, save less there than their mean ratio says). The full document and no
document are the references. Paired comparisons: for each ratio, AM against every other method on the same
cases (cases only AM gets right, cases only the other gets right, and the exact two-sided McNemar / sign-test p-value).
Writes benchmarks/results/retrieval.json, .md and .png; `--resume` continues an interrupted run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from kvcat.bench import SampleConfig, mean_or_none, result_file
from kvcat.bench_process import logger
from kvcat.console import option
from kvcat.data.suite import SUITE_KINDS
from kvcat.defaults import AM_METHODS
from kvcat.eval.stats import sign_test

MAX_NEW_TOKENS = 48  # small models echo the question first; a passage answer comes after it

log = logger("bench retrieval")


@dataclass
class RetrievalConfig(SampleConfig):
    """The settings of `kvcat bench retrieval`, one command-line option each."""

    out: Path = result_file("retrieval")
    cases_per_kind: int = option(24, help="cases of each kind")
    kinds: tuple[str, ...] = option(SUITE_KINDS, help="suite kinds: " + ", ".join(SUITE_KINDS))
    ratios: tuple[float, ...] = option((8.0, 16.0), help="compaction ratios")
    methods: tuple[str, ...] = option(("am-hak", "am-hak-fast", "kvzip", "snapkv", "streaming-llm"),
                                      help="compaction methods, each a name or name:key=value:... (a variant)")
    lengths: tuple[int, ...] | None = option(None, help="document lengths in tokens (default: each kind's own, "
                                                        "chosen on the tune split: kvcat.data.suite.KIND_LENGTHS)")
    split: str = option("heldout", help="heldout (reported figures) or tune (choosing defaults)")

    def suite_spec(self):
        """The cases; a bad split, kind or length is a ValueError naming it."""
        from kvcat.data.suite import SuiteSpec

        return SuiteSpec(split=self.split, kinds=tuple(self.kinds), cases_per_kind=self.cases_per_kind,
                         lengths=tuple(self.lengths) if self.lengths else None, seed=self.seed)

    def __post_init__(self):
        self.suite_spec()


def run(config: RetrievalConfig, resume: bool = False) -> dict:
    """Do a document's facts survive compaction? -> benchmarks/results/retrieval.json + PNG, paired comparisons."""
    from kvcat.bench import Checkpoint, config_record, provenance, publish
    from kvcat.compaction import method_from_spec
    from kvcat.data.suite import by_document, retrieval_cases
    from kvcat.inference import prefill
    from kvcat.models import load_model
    from kvcat.prompts import context_and_question

    c = config
    names, ratios = list(c.methods), list(c.ratios)
    record = {**config_record(c), "max_new_tokens": MAX_NEW_TOKENS}
    done = Checkpoint(c.out, record, resume, log)
    lm = load_model(c.model, dtype=c.compute_dtype)
    tok = lm.tokenizer
    suite = retrieval_cases(tok, c.suite_spec())
    documents = by_document(suite)
    compactors = {m: method_from_spec(m) for m in names}
    log(f"model {c.model}; {len(suite)} {c.split} cases in {len(documents)} documents; ratios {ratios}; "
        f"methods {names}")
    prefill(lm, context_and_question(tok, suite[0].document, suite[0].question).context_ids[:64])  # warm-up

    seen = {rec["id"] for rec in done["cases"]}
    for i, (doc_id, cases) in enumerate(documents.items()):
        if all(ex.id in seen for ex in cases):
            continue
        for rec in score_document(lm, cases, compactors, ratios):
            if rec["id"] in seen:  # an interrupted run stored part of this document's cases
                continue
            done.add("cases", rec)
            hits = " ".join(f"{k}={int(v['correct'])}" for k, v in rec["rows"].items())
            log(f"document {i + 1}/{len(documents)} {rec['id']}: full={int(rec['full'])} {hits}")

    result = {"model": c.model, **provenance(), **done.provenance(), "config": record,
              "rows": aggregate(done["cases"], names, ratios), "paired": paired(done["cases"], names, ratios),
              "cases": done["cases"]}
    publish(result, c.out, table, plot, log)
    done.finish()
    return result


def timed_prefill(lm, ids: list[int]):
    """The plain prefill of one context (the last context's memo cleared first), its seconds and its peak RSS:
    what each compaction of it is set against."""
    from kvcat.bench_process import PeakRSS
    from kvcat.compaction.queries import clear_memo
    from kvcat.inference import prefill

    clear_memo()
    start = time.perf_counter()
    with PeakRSS() as mem:
        pre = prefill(lm, ids)
    return pre, time.perf_counter() - start, mem.peak


def compactions(lm, ids: list[int], compactors: dict, ratios: list[float], skip=None):
    """Each method at each ratio on one context (after `timed_prefill`): yields its key "method|ratio", the
    cache (None where `skip(method, tokens, ratio)` gives a reason), that reason, and the compaction's peak RSS.
    One reconstruction serves them all; each compaction is still charged its seconds."""
    import torch

    from kvcat.bench_process import PeakRSS
    from kvcat.compaction.queries import document_state

    document_state(lm, torch.tensor(ids), token_nll=True).keep_queries = True
    for m, method in compactors.items():
        for r in ratios:
            reason = skip(m, len(ids), r) if skip else None
            if reason:
                yield f"{m}|{r:g}", None, reason, None
                continue
            with PeakRSS() as mem:
                cache = method.compact(lm, ids, ratio=r)
            yield f"{m}|{r:g}", cache, None, mem.peak


def score_document(lm, cases, compactors: dict, ratios: list[float], skip=None) -> list[dict]:
    """One document's cases (all about the same document): prefilled once, each question asked over the full
    document and over none, then compacted once per method and ratio, before any question is seen (as
    `/v1/compact` does), each question asked over every compacted cache. `skip(method, tokens, ratio)` -> a
    reason leaves a (method, ratio) out of this document. Returns a record per case (`kvcat bench peers` keeps
    the same records)."""
    from kvcat.data.suite import suite_kind
    from kvcat.eval.metrics import answered
    from kvcat.inference import CacheSession, full_cache
    from kvcat.prompts import context_and_question

    tok = lm.tokenizer

    def ask(cache, question_ids) -> str:
        return tok.decode(CacheSession(lm, cache).generate(question_ids, max_new_tokens=MAX_NEW_TOKENS),
                          skip_special_tokens=True).strip()

    prompts = [context_and_question(tok, ex.document, ex.question) for ex in cases]
    ids = prompts[0].context_ids  # the same document: the same context tokens for every question
    pre, prefill_s, prefill_rss = timed_prefill(lm, ids)
    full_kv = full_cache(pre, lm.spec.fingerprint)
    recs = [{"id": ex.id, "document": ex.metadata.get("document_id", ex.id), "kind": suite_kind(ex),
             "length": ex.metadata["length"],
             "depth": ex.metadata.get("depth", ex.metadata.get("actual_depth")), "tokens": len(ids),
             "expected": ex.answers[0], "prefill_s": prefill_s, "prefill_rss": prefill_rss, "rows": {}}
            for ex in cases]
    for rec, ex, p in zip(recs, cases, prompts):
        full = ask(full_kv, p.question_ids)
        none = ask(None, context_and_question(tok, "", ex.question).ids)
        rec.update(full=answered(full, ex.answers), full_answer=full, none=answered(none, ex.answers))
    del pre, full_kv
    for key, cache, reason, rss in compactions(lm, ids, compactors, ratios, skip):
        for rec, ex, p in zip(recs, cases, prompts):
            if cache is None:
                rec["rows"][key] = {"skipped": reason}
                continue
            text = ask(cache, p.question_ids)
            rec["rows"][key] = {"correct": answered(text, ex.answers), "answer": text,
                                "compact_s": cache.info["compact_s"],
                                "vs_prefill": cache.info["compact_s"] / prefill_s,
                                "served_ratio": cache.served_ratio, "rss": rss, "fit": cache.info.get("fit")}
    return recs


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
    kinds = [k for k in SUITE_KINDS if "acc_" + k in full] + sorted(
        k[4:] for k in full if k.startswith("acc_") and k[4:] not in SUITE_KINDS)
    ratios = sorted({r["ratio"] for r in rows[2:]})
    methods = list(dict.fromkeys(r["method"] for r in rows[2:]))
    cell = {(r["method"], r["ratio"]): r for r in rows[2:]}
    lines = [f"**Retrieval accuracy, {len(result['cases'])} {result['config']['split']} cases** (full document "
             f"{full['accuracy']:.2f}, no document {none['accuracy']:.2f})", "",
             "| method | " + " | ".join(f"{x:g}x (of full)" for x in ratios)
             + " | compaction / prefill | served ratio |",
             "|---|" + "---|" * (len(ratios) + 2)]
    for m in methods:
        acc = [f"{cell[(m, x)]['accuracy']:.2f} ({_of_full(cell[(m, x)])})" for x in ratios]
        speed = "/".join(f"{cell[(m, x)]['compact_over_prefill']:.2f}" for x in ratios)
        served = "/".join("-" if cell[(m, x)].get("served_ratio") is None else f"{cell[(m, x)]['served_ratio']:.1f}"
                          for x in ratios)
        lines.append(f"| {m} | " + " | ".join(acc) + f" | {speed} | {served} |")
    lines += ["", "**Per kind** (accuracy; full document and no document first)", "",
              "| kind | full | none | " + " | ".join(f"{m} {x:g}x" for m in methods for x in ratios) + " |",
              "|---|---|---|" + "---|" * (len(methods) * len(ratios))]
    for k in kinds:
        lines.append(f"| {k} | {full['acc_' + k]:.2f} | {none['acc_' + k]:.2f} | "
                     + " | ".join(f"{cell[(m, x)]['acc_' + k]:.2f}" for m in methods for x in ratios) + " |")
    pairs = result.get("paired") or []
    if pairs:
        lines += ["", "**Paired, same cases**: cases only AM answers / only the other answers (exact McNemar p)", "",
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
