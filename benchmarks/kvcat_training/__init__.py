"""KV-CAT on SmolLM2-135M against its NTP control and the base: does continued pretraining on what the served
compaction keeps make compacted contexts keep more, without losing what the base could do?

    kvcat bench kvcat                       # the whole experiment (about six hours on a 2-core CPU machine)
    kvcat bench kvcat --stop-after 150      # ... split over sessions: stops at a checkpoint after 150 minutes
    kvcat bench kvcat --resume              # continue it (training and evaluation)
    kvcat bench kvcat --smoke               # checks the pipeline in minutes (writes kvcat-smoke.json)

1. Train each variant from the same base on the same TRAIN-split sequences with the same compute (steps x batch
   x seq-len), policy `served` (what the served default keeps, retention 1/8): a variant is a teacher (the frozen
   base's full-cache outputs, or the trained model's own: the paper's self-distillation) with the weights trained
   and the peak rate (all at 2e-5, or the attention projections at a higher rate); embeddings frozen, warm-up.
   A quarter of the sequences are conversations about facts of training-only forms (training/facts.py).
2. Choose the variant on the TUNE split (retrieval, then PPL gap, with the default method at `select_ratio`),
   then train the NTP control with the chosen variant's optimisation (same data, steps, weights, rate).
3. Evaluate the base, the control and the chosen variant on HELD-OUT data that no training or choice saw:
   continuation windows of `eval_corpus` (a corpus never trained on) and the retrieval suite's held-out cases
   (six kinds, natural-text QA included; kvcat.data.suite), at full cache and after each method at each ratio.
4. Paired tests (exact McNemar on the same cases, a t interval on the per-window gap difference), the step
   time of the chosen variant against its control, and the chosen checkpoint served by `kvcat serve`.
Writes benchmarks/results/kvcat.json, its Markdown table and PNG plots beside it.
Here: the settings and the run; train.py: training and timing; evaluate.py: evaluation and the choice;
report.py: the summary against the goals, the table and the plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from kvcat.bench import BenchConfig, result_file
from kvcat.bench_process import logger
from kvcat.console import option
from kvcat.defaults import DEFAULT_METHOD

from .evaluate import choose, evaluate, served_check
from .report import plot, summarise, table
from .train import SessionEnd, Variant, step_time_ratio, train, training_curves

CODE = ("kvcat", "compaction", "training", "benchmarks/kvcat_training", "pyproject.toml")

log = logger("bench kvcat")


@dataclass
class KVCatTrainingConfig(BenchConfig):
    """The settings of `kvcat bench kvcat`, one command-line option each (`model`: the base of every checkpoint)."""

    out: Path = result_file("kvcat")
    policy: str = option("served", help="train-time policy of every variant (served: what the served default keeps)")
    variants: tuple[str, ...] = option(("base/all@2e-5", "self/all@2e-5", "base/attention@1e-4"),
                                       help="TEACHER/PARAMS@LR: teacher base or self, params all or attention")
    retention: float = option(0.125, help="fraction of prefix KV slots the policy keeps while training")
    # training (identical for every variant and the control): 60 x 4 x 1,024 = 245,760 tokens
    steps: int = option(60, help="training steps per variant")
    docs: int | None = option(None, help="training documents (default: the whole TRAIN split)")
    seq_len: int = option(1024, help="training sequence length")
    batch_size: int = option(2, help="sequences per micro-batch")
    grad_accum: int = option(2, help="micro-batches per step")
    corpora: tuple[str, ...] = option(("paul_graham", "sotu", "moby_dick", "kjv"), help="training corpora (TRAIN)")
    planted_frac: float = option(0.25, help="fraction of training sequences that are fact conversations")
    # evaluation
    eval_corpus: str = option("jane_austen", help="corpus of the PPL windows (not among the training corpora)")
    eval_windows: int = option(32, help="held-out PPL windows")
    windows_per_document: int = option(3, help="most PPL windows from one document (non-overlapping; the held-out "
                                               "split of jane_austen has 15 long enough)")
    tune_windows: int = option(8, help="tune-split PPL windows (the choice)")
    prefix_tokens: int = option(1024, help="tokens of each window's compacted prefix")
    continuation_tokens: int = option(128, help="continuation tokens for the PPL gap")
    cases_per_kind: int = option(16, help="held-out retrieval cases per suite kind (six kinds)")
    tune_cases_per_kind: int = option(6, help="tune-split retrieval cases per suite kind (the choice)")
    ratios: tuple[int, ...] = option((8, 16), help="compaction ratios")
    methods: tuple[str, ...] = option((DEFAULT_METHOD, "snapkv"), help="post-hoc compaction methods (the first is "
                                                                         "the default the goals read)")
    select_ratio: int = option(8, help="the ratio at which the variant is chosen (first method)")
    timing_steps: int = option(3, help="steps timed for the step-time ratio")
    serve_check: bool = option(True, help="serve the chosen checkpoint with `kvcat serve` and ask over a context")
    work_dir: Path | None = option(None, help="checkpoints (default $KVCAT_HOME/bench-kvcat/<config>)")


# --smoke: checks the pipeline in minutes
SMOKE = dict(steps=2, docs=8, seq_len=256, batch_size=1, grad_accum=1, eval_windows=2, tune_windows=2,
             prefix_tokens=192, continuation_tokens=32, cases_per_kind=1, tune_cases_per_kind=1,
             variants=("base/attention@1e-4", "self/all@2e-5"), timing_steps=2, serve_check=False,
             out=Path("benchmarks/results/kvcat-smoke.json"))


def smoke_config(config: KVCatTrainingConfig) -> KVCatTrainingConfig:
    """SMOKE's value for every field left at its default: options given beside --smoke still apply."""
    default = KVCatTrainingConfig()
    return replace(config, **{k: v for k, v in SMOKE.items() if getattr(config, k) == getattr(default, k)})


def run(config: KVCatTrainingConfig, smoke: bool = False, resume: bool = False, stop_after: float = 0.0) -> dict:
    """KV-CAT against its NTP control and the base: train the variants on the same data and compute, choose one on
    the tune split, train the control alike, evaluate the three on held-out data no training saw (PPL gap and the
    retrieval suite, paired tests), time a step against NTP, serve the chosen one. --stop-after splits it over
    sessions."""
    from kvcat.bench import Checkpoint, config_record, provenance, write_result
    from kvcat.config import kvcat_home
    from kvcat.data import token_windows
    from kvcat.data.suite import SuiteSpec, retrieval_cases
    from kvcat.models import load_model
    from kvcat.training.checkpoint import META_FILE

    bc = smoke_config(config) if smoke else config
    variants = [Variant.parse(v) for v in bc.variants]
    if not variants:
        raise ValueError("name at least one variant (--variants)")
    if bc.eval_corpus in bc.corpora:
        raise ValueError(f"--eval-corpus {bc.eval_corpus} is a training corpus; evaluate on one never trained on")
    if bc.select_ratio not in bc.ratios:
        raise ValueError(f"--select-ratio {bc.select_ratio} is not among --ratios {list(bc.ratios)}")
    if stop_after < 0:
        raise ValueError("--stop-after is minutes, 0 or more")
    from .train import train_config

    for v in variants:  # every training input is checked before the long part starts
        train_config(bc, v).validate()
        train_config(bc, v.control()).validate()
    deadline = time.time() + 60 * stop_after if stop_after else None
    method = bc.methods[0]
    tag = (f"{bc.model}-{bc.policy}-s{bc.steps}-l{bc.seq_len}-b{bc.batch_size * bc.grad_accum}-d{bc.docs or 'all'}"
           f"-r{bc.retention:g}-p{bc.planted_frac:g}")
    work = Path(bc.work_dir) if bc.work_dir else kvcat_home() / "bench-kvcat" / tag
    record = config_record(bc)
    log(f"config: {json.dumps(record)}")
    done = Checkpoint(bc.out, record, resume, log, code=CODE)

    def check_time(where: str) -> None:
        if deadline is not None and time.time() > deadline:
            raise SessionEnd(f"time is up after {where}")

    try:
        base = load_model(bc.model, dtype="float32")
        tok, base_path = base.tokenizer, base.spec.path
        del base
        data = {split: (token_windows(tok, bc.prefix_tokens, bc.continuation_tokens, n_win, split=split,
                                      corpora=(bc.eval_corpus,), per_document=bc.windows_per_document),
                        retrieval_cases(tok, SuiteSpec(split=split, cases_per_kind=n_case)))
                for split, n_win, n_case in (("tune", bc.tune_windows, bc.tune_cases_per_kind),
                                             ("heldout", bc.eval_windows, bc.cases_per_kind))}
        paths = {"base": base_path}

        def rows_of(label: str, policy: str, split: str, cells) -> list[dict]:
            for rec in done["evaluations"]:
                if rec["checkpoint"] == label and rec["split"] == split:
                    return rec["rows"]
            check_time(f"the last evaluation, before {label} on {split}")
            rows = evaluate(label, paths[label], policy, split, *data[split], cells, progress=True)
            done.add("evaluations", {"checkpoint": label, "split": split, "rows": rows})
            return rows

        for v in variants:
            check_time("the last training")
            paths[v.label] = train(bc, v, work, deadline)
        tune = [r for v in variants for r in rows_of(v.label, bc.policy, "tune", [(method, bc.select_ratio)])]
        chosen = next(v for v in variants if v.label == choose(tune, [v.label for v in variants], method,
                                                               bc.select_ratio))
        log(f"chosen on the tune split: {chosen.label}")
        control = chosen.control()
        check_time("choosing")
        paths[control.label] = train(bc, control, work, deadline)
        all_cells = [(m, r) for m in bc.methods for r in bc.ratios]
        rows = tune + [r for label, policy in (("base", "none"), (control.label, "ntp"), (chosen.label, bc.policy))
                       for r in rows_of(label, policy, "heldout", all_cells)]
        check_time("the held-out evaluations")
    except SessionEnd as stop:
        log(f"stopped: {stop}. Continue with the same command and --resume.")
        return {"stopped": str(stop)}

    timing = done["timing"][0] if done["timing"] else None
    if timing is None:
        timing = step_time_ratio(bc, chosen)
        done.add("timing", timing)
    log(f"step time: NTP {timing['ntp_step_s']} s, {chosen.label} {timing['kvcat_step_s']} s, ratio {timing['ratio']}")
    served = None
    if bc.serve_check:
        ex = data["heldout"][1][0]
        served = served_check(paths[chosen.label], ex.document, ex.question)
        log(f"served {chosen.label}: {served}")

    trained = {label: path for label, path in paths.items() if label != "base"}
    result = {"model": bc.model, **provenance(), **done.provenance(), "rows": rows, "step_time": timing,
              "config": record, "chosen": chosen.label, "control": control.label,
              "checkpoints": {label: str(path) for label, path in trained.items()},
              "training_data": {label: json.loads((p / META_FILE).read_text()).get("data")
                                for label, p in trained.items()},
              "eval_data": {split: {"windows": [w.document_id for w in d[0]], "cases": [ex.id for ex in d[1]]}
                            for split, d in data.items()},
              "training_curves": training_curves(trained), "smoke": smoke, "served": served}
    result["summary"] = summarise(rows, chosen.label, control.label, method, list(bc.ratios), timing)
    out_path = Path(bc.out)
    result["plots"] = plot(result, out_path)
    write_result(result, out_path, table(result))
    done.finish()
    log(f"wrote {out_path} and {', '.join(result['plots'])}; goals: {json.dumps(result['summary']['goals'])}")
    return result
