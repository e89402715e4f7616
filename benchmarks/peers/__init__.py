"""Peer benchmark: kvcat's compaction against NVIDIA kvpress's presses, on the same token ids, same metrics.

    kvcat bench peers                        # 8 PPL windows + 144 retrieval cases, ratios 4-32 (many hours; --resume)
    kvcat bench peers --docs 1 --cases-per-kind 1 --ratios 8 --presses snapkv,tova --serving-docs 0 \\
        --out /tmp/peers.json                # minutes

kvpress needs transformers < 5.3, so it runs in its own venv (.peers-venv/, made by scripts/peers_venv.sh)
as a subprocess: benchmarks/kvpress_runner.py. This benchmark, in kvcat's venv, prepares the HELD-OUT data
(kvcat.data PPL windows, and the six-kind retrieval suite of `kvcat bench retrieval`, kvcat.data.suite: planted
number, one of four numbers, a planted passage, documents holding several facts, SQuAD and HotpotQA among
distractors; chat prompts split by kvcat.prompts.context_and_question), hands kvpress the very token ids, runs
kvcat's own methods in this process, and scores every system's outputs here with the same kvcat.eval.metrics
functions:
- ppl_gap: per window, exp(mean NLL of continuation[1:]) over the compressed prefix minus the full-prefix
  PPL of the same window (kvcat.eval.harness.full_prefix_nll: one uncached pass, the shared reference);
  the mean over windows (kvcat.eval.metrics.ppl_gap, as `kvcat eval` and `kvcat bench compaction`);
- retrieval: metrics.answered of the greedy answer (48 new tokens); each document is compressed once, before
  any question is seen, and each of its questions asked over it (both systems; kvcat's side is `kvcat bench
  retrieval`'s own `score_document`); accuracy overall and per kind, per case in the JSON, and paired against
  kvcat's AM (cases only AM answers / only the press answers, exact McNemar / two-sided sign test);
- served ratio: N over the slots a paged engine holds per head, one count for every head and layer (kvcat: its
  cache's `served_ratio`, side slots counted; kvpress: the widest head of any layer), beside the mean ratio
  (N over the mean entries kept per head): a press with uneven budgets saves only the first in a paged engine;
- compress_s: seconds from token ids to compressed cache, prefill included (kvcat: prefill + queries +
  solve; kvpress: the prefill under the press, its scoring included), mean over windows and documents;
- peak_rss_mb: peak resident memory of the process (kvcat's, or the kvpress runner's) while compressing;
- serving (the first --serving-docs windows, as text): vLLM's own OpenAI server (no kvcat code loaded)
  answering over the full document, against the kvcat server over the compacted context (serve.py's
  measure): TTFT, decode tokens/s, KV bytes per context, contexts per KV budget; ratios to plain vLLM.
Ratio r means round(N / r) KV slots per head kept on average, in both systems (kvpress: compression_ratio
1 - 1/r). Ratio 1 is the full cache in both: the fairness check wants their full-cache PPLs on the same
windows within 1% (both values and the relative difference are in the JSON).
Every window and document is saved as it ends (peers.partial.json): `--resume` continues an interrupted run
from there, with the same settings and code. kvpress's runs are stored in peers.kvpress.json as they end and
reused by every later run on the same data and package versions (kvpress_runner.py), resumed or not: a change
to kvcat's methods reruns kvcat's side only.
Writes benchmarks/results/peers.json, .md (table) and .png (PPL gap and retrieval accuracy vs ratio).
Here: the settings and the run (kvcat's side, then kvpress's, then serving); kvpress.py: kvpress's venv and
runner; summary.py: both systems scored alike; report.py: the table and the plot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from kvcat.bench import SampleConfig, result_file
from kvcat.bench_process import logger
from kvcat.console import option
from kvcat.data.suite import SUITE_KINDS

from .kvpress import make_venv, run_kvpress
from .report import plot, table
from .summary import summarize

# the code kvcat's records come from (kvpress's runs are keyed by their data and versions instead)
CODE = ("kvcat", "compaction", "benchmarks/peers", "benchmarks/compaction.py", "benchmarks/retrieval.py",
        "pyproject.toml")

log = logger("bench peers")


@dataclass
class PeersConfig(SampleConfig):
    """The settings of `kvcat bench peers`, one command-line option each."""

    out: Path = result_file("peers")
    ratios: tuple[float, ...] = option((8.0, 16.0, 4.0, 32.0),
                                       help="compression ratios, run in this order (1, the full cache, always runs)")
    methods: tuple[str, ...] = option(("am-hak", "am-hak-fast", "snapkv"), help="kvcat methods")
    presses: tuple[str, ...] = option(("snapkv", "expected-attention", "adakv-expected-attention", "kvzip",
                                       "kvzip-layerwise", "chunkkv-snapkv", "compactor", "leverage", "tova",
                                       "streaming-llm", "fastkvzip", "kvzap"),
                                      help="kvpress presses, as benchmarks/kvpress_runner.py names them (adakv-X, "
                                           "chunkkv-X: press X inside AdaKVPress, ChunkKVPress)")
    docs: int = option(8, help="held-out PPL windows")
    doc_tokens: int = option(2048, help="tokens of each window's prefix")
    continuation: int = option(256, help="continuation tokens for the PPL gap")
    cases_per_kind: int = option(24, help="held-out retrieval cases of each suite kind (0 to skip retrieval)")
    kinds: tuple[str, ...] = option(SUITE_KINDS, help="suite kinds: " + ", ".join(SUITE_KINDS))
    lengths: tuple[int, ...] | None = option(None, help="retrieval document lengths in tokens (default: each "
                                                        "kind's own, kvcat.data.suite.KIND_LENGTHS)")
    slow_max_slots: int = option(256, help="run OMP-fast only up to this many slots per head")
    serving_docs: int = option(1, help="windows served by plain vLLM (full) and kvcat (compacted); 0 skips")
    serving_ratios: tuple[float, ...] = option((10.0, 32.0), help="compaction ratios of the serving comparison")

    def suite_spec(self):
        """The retrieval cases (None with --cases-per-kind 0); a bad kind or length is a ValueError naming it."""
        from kvcat.data.suite import SuiteSpec

        if not self.cases_per_kind:
            return None
        return SuiteSpec(split="heldout", kinds=tuple(self.kinds), cases_per_kind=self.cases_per_kind,
                         lengths=tuple(self.lengths) if self.lengths else None, seed=self.seed)

    def __post_init__(self):
        if self.cases_per_kind < 0:
            raise ValueError("--cases-per-kind must be 0 or more")
        self.suite_spec()


def run(config: PeersConfig, resume: bool = False) -> dict:
    """kvcat vs NVIDIA kvpress on the same held-out data, and plain vLLM vs the kvcat server ->
    benchmarks/results/peers.json + PNG."""
    from kvcat import data
    from kvcat.bench import Checkpoint, config_record, load_script, provenance, publish
    from kvcat.compaction import method_from_spec
    from kvcat.data.suite import by_document, retrieval_cases
    from kvcat.eval.harness import full_prefix_nll
    from kvcat.eval.metrics import window_nll
    from kvcat.inference import continuation_nll, full_cache, prefill
    from kvcat.models import load_model
    from kvcat.prompts import context_and_question

    make_venv()  # in seconds once made; first, so that a venv that cannot be made fails before the hours below
    c = config
    compaction, retrieval = load_script("compaction"), load_script("retrieval")  # SLOW limits; documents, sign test
    names, press_names = list(c.methods), list(c.presses)
    ratios = list(dict.fromkeys(float(r) for r in c.ratios if r > 1))  # ratio 1, the full cache, runs anyway
    record = {**config_record(c), "max_new_tokens": retrieval.MAX_NEW_TOKENS, "split": "heldout"}
    # kvcat's records come from its model and methods and these scripts (CODE; the server and training code may
    # change between the sessions of a long resumed run); kvpress's runs are reused by their data instead
    done = Checkpoint(c.out, record, resume, log, code=CODE)
    kvpress_store = Path(c.out).with_name(Path(c.out).stem + ".kvpress.json")
    lm = load_model(c.model, dtype=c.compute_dtype)
    tok = lm.tokenizer
    windows = data.token_windows(tok, c.doc_tokens, c.continuation, c.docs, split="heldout", seed=c.seed)
    spec = c.suite_spec()
    suite = retrieval_cases(tok, spec) if spec else []
    documents = list(by_document(suite).values())
    log(f"model {c.model}; {c.docs} windows of {c.doc_tokens}+{c.continuation} tokens, {len(suite)} retrieval "
        f"cases in {len(documents)} documents; ratios {ratios}; kvcat {names}; kvpress {press_names}")

    # ---- kvcat, in this process, one window or document at a time (saved as each ends) ----
    methods_obj = {m: method_from_spec(m) for m in names}
    prefill(lm, list(windows[0].prefix_ids[:64]) if windows else [tok.eos_token_id] * 8)  # warm-up

    def skip(m: str, tokens: int, r: float) -> str | None:
        return None if compaction.runs(m, tokens, r, c.slow_max_slots) else compaction.too_slow(m, c.slow_max_slots)

    for i, w in enumerate(windows):
        if i < len(done["windows"]):
            continue
        ids = list(w.prefix_ids)
        pre, prefill_s, prefill_rss = retrieval.timed_prefill(lm, ids)
        full = window_nll(continuation_nll(lm, full_cache(pre, lm.spec.fingerprint), list(w.continuation_ids)))
        del pre
        rows = {key: {"skipped": reason} if cache is None else
                {"nll": window_nll(continuation_nll(lm, cache, list(w.continuation_ids))),
                 "compact_s": cache.info["compact_s"], "rss": rss, "served_ratio": cache.served_ratio}
                for key, cache, reason, rss in retrieval.compactions(lm, ids, methods_obj, ratios, skip)}
        done.add("windows", {"reference": window_nll(full_prefix_nll(lm, w)), "full": full, "prefill_s": prefill_s,
                             "prefill_rss": prefill_rss, "rows": rows})
        log(f"kvcat: window {i + 1}/{len(windows)} done")
    seen = {rec["id"] for rec in done["cases"]}
    for j, cases in enumerate(documents):
        if all(ex.id in seen for ex in cases):
            continue
        for rec in retrieval.score_document(lm, cases, methods_obj, ratios, skip):
            if rec["id"] not in seen:  # an interrupted run may have stored part of this document's cases
                done.add("cases", rec)
        log(f"kvcat: document {j + 1}/{len(documents)} done: " + "; ".join(
            f"{rec['id']} full={int(rec['full'])} " + " ".join(f"{k}={int(v['correct'])}" for k, v in
                                                               rec["rows"].items() if "correct" in v)
            for rec in done["cases"][-len(cases):]))

    # ---- kvpress, in its own venv, on the same token ids ----
    asked = [[context_and_question(tok, ex.document, ex.question) for ex in cases] for cases in documents]
    job = {"model": str(lm.spec.path),
           "windows": [{"context": list(w.prefix_ids), "continuation": list(w.continuation_ids)} for w in windows],
           "documents": [{"context": ps[0].context_ids, "questions": [p.question_ids for p in ps]}
                         for ps in asked],
           "runs": [["none", 1.0]] + [[p, r] for r in ratios for p in press_names],
           "max_new_tokens": retrieval.MAX_NEW_TOKENS, "stop_ids": [tok.eos_token_id]}
    start = time.perf_counter()
    peer = run_kvpress(job, kvpress_store)
    log(f"kvpress done in {time.perf_counter() - start:.0f} s")

    order = [ex for cases in documents for ex in cases]  # the kvpress answers' order
    by_id = {rec["id"]: rec for rec in done["cases"]}
    result = {"model": c.model, **provenance(), **done.provenance(),
              "config": {**record, "ratios": [1.0] + sorted(ratios), "kvpress": peer["versions"],
                         "ratio_convention": "kvcat ratio r = N / kept slots per head; kvpress compression_ratio "
                                             "= 1 - 1/r (fraction removed), kept count matched to round(N / r)"},
              **summarize(done["windows"], [by_id[ex.id] for ex in order], peer["runs"], names, ratios,
                          retrieval.sign_test, [ex.answers for ex in order],
                          [len(w.prefix_ids) for w in windows] + [len(ps[0].context_ids) for ps in asked])}
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
