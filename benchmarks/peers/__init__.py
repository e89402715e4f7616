"""Peer benchmark: kvcat's compaction against NVIDIA kvpress's presses, on the same token ids, same metrics.

    kvcat bench peers                        # 8 PPL windows + 42 retrieval cases, ratios 4-32 (hours; --resume)
    kvcat bench peers --docs 1 --cases 3 --ratios 8 --presses snapkv,tova --serving-docs 0 \\
        --out /tmp/peers.json                # minutes

kvpress needs transformers < 5.3, so it runs in its own venv (.peers-venv/, made by scripts/peers_venv.sh)
as a subprocess: benchmarks/kvpress_runner.py. This benchmark, in kvcat's venv, prepares the HELD-OUT data
(kvcat.data PPL windows, and the 42 planted-fact retrieval cases of `kvcat.data.retrieval_suite`: planted
number, one of four numbers, passage question; not yet the six-kind suite of `kvcat bench retrieval`; chat
prompts split by kvcat.prompts.context_and_question), hands kvpress the very
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

from .kvpress import make_venv, run_kvpress
from .report import plot, table
from .summary import scored_answer, summarize

MAX_NEW_TOKENS = 48  # as `kvcat bench retrieval`
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
                                       "compactor", "leverage", "tova", "streaming-llm", "fastkvzip", "kvzap"),
                                      help="kvpress presses, as benchmarks/kvpress_runner.py names them (adakv-X: "
                                           "press X inside AdaKVPress)")
    docs: int = option(8, help="held-out PPL windows")
    doc_tokens: int = option(2048, help="tokens of each window's prefix")
    continuation: int = option(256, help="continuation tokens for the PPL gap")
    cases: int = option(42, help="held-out planted-fact retrieval cases (0 to skip)")
    lengths: tuple[int, ...] = option((2048, 3072), help="retrieval document lengths in tokens")
    slow_max_slots: int = option(256, help="run OMP-fast only up to this many slots per head")
    serving_docs: int = option(1, help="windows served by plain vLLM (full) and kvcat (compacted); 0 skips")
    serving_ratios: tuple[float, ...] = option((10.0, 32.0), help="compaction ratios of the serving comparison")


def run(config: PeersConfig, resume: bool = False) -> dict:
    """kvcat vs NVIDIA kvpress on the same held-out data, and plain vLLM vs the kvcat server ->
    benchmarks/results/peers.json + PNG."""
    import torch

    from kvcat import data
    from kvcat.bench import Checkpoint, config_record, load_script, provenance, publish
    from kvcat.bench_process import PeakRSS
    from kvcat.compaction import method_from_spec
    from kvcat.compaction.queries import clear_memo, document_state
    from kvcat.eval.harness import full_prefix_nll
    from kvcat.eval.metrics import window_nll
    from kvcat.inference import CacheSession, continuation_nll, full_cache, prefill
    from kvcat.models import load_model
    from kvcat.prompts import context_and_question

    make_venv()  # in seconds once made; first, so that a venv that cannot be made fails before the hours below
    c = config
    compaction, retrieval = load_script("compaction"), load_script("retrieval")  # SLOW limits; sign test
    names, press_names = list(c.methods), list(c.presses)
    ratios = list(dict.fromkeys(float(r) for r in c.ratios if r > 1))  # ratio 1, the full cache, runs anyway
    record = {**config_record(c), "max_new_tokens": MAX_NEW_TOKENS, "split": "heldout"}
    # kvcat's records come from its model and methods and this script (CODE; the server and training code may
    # change between the sessions of a long resumed run); kvpress's runs are reused by their data instead
    done = Checkpoint(c.out, record, resume, log, code=CODE)
    kvpress_store = Path(c.out).with_name(Path(c.out).stem + ".kvpress.json")
    lm = load_model(c.model, dtype=c.compute_dtype)
    tok = lm.tokenizer
    windows = data.token_windows(tok, c.doc_tokens, c.continuation, c.docs, split="heldout", seed=c.seed)
    suite = data.retrieval_suite(tok, n=c.cases, lengths=tuple(c.lengths), split="heldout", seed=c.seed) \
        if c.cases else []
    prompts = [context_and_question(tok, ex.document, ex.question) for ex in suite]
    log(f"model {c.model}; {c.docs} windows of {c.doc_tokens}+{c.continuation} tokens, {len(suite)} retrieval "
        f"cases; ratios {ratios}; kvcat {names}; kvpress {press_names}")

    # ---- kvcat, in this process, one window or case at a time (saved as each ends) ----
    combos = [(m, r) for m in names for r in ratios]
    methods_obj = {m: method_from_spec(m) for m in names}
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
        rows = compact_all(p.context_ids, lambda cache, p=p, ex=ex: scored_answer(answer(cache, p), ex))
        done.add("cases", {"id": ex.id, "kind": ex.task, "tokens": len(p.context_ids), "expected": ex.answers[0],
                           "prefill_s": prefill_s, "prefill_rss": prefill_rss,
                           **{f"full_{k}": v for k, v in scored_answer(full, ex).items()}, "rows": rows})
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

