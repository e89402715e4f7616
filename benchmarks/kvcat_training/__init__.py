"""KV-CAT on SmolLM2-135M against its NTP control: does continued pretraining with a train-time KV
sparsification policy make the KV cache easier to compress, beyond what the same training without the
compaction objective does?

    kvcat bench kvcat                       # the full experiment (several hours on a 2-core CPU machine)
    kvcat bench kvcat --resume              # continue an interrupted one (training and evaluation)
    kvcat bench kvcat --smoke               # checks the pipeline in minutes (writes kvcat-smoke.json)

1. Train one checkpoint per policy from the same base, on the same TRAIN-split sequences with the same compute
   (steps x global batch x seq-len), retention 1/8: `ntp` is the control (KL weight 0: same data, steps and
   optimizer, nothing hidden), the others distil the full pass into a pass that sees only the policy's slots.
   Sequences never cross documents, and `planted_frac` of them plant a fact in the prefix and ask about it in
   the continuation (training/data.py). Finished checkpoints are reused (the trainer resumes or returns).
2. Choose the best KV-CAT checkpoint on the TUNE split (retrieval, then PPL gap, with the default AM at
   `select_ratio`), then evaluate the base, the control and every checkpoint on HELD-OUT data that no training
   saw: continuation windows of `eval_corpus` (a corpus never trained on) and the retrieval cases of the
   compaction benchmark's held-out split (a needle, one of several keys, a question about a passage), with
   each post-hoc method at each ratio. Every cell keeps its per-window gaps and per-case hits (the spread).
3. Step time of the chosen policy against the NTP control, same batch and sequence length, in this run.
4. The chosen checkpoint served: `kvcat serve` loads the folder unchanged and answers over a compacted context.
Writes benchmarks/results/kvcat.json, its Markdown table and PNG plots beside it.
Here: the settings and the run, step by step; train.py: steps 1 and 3; evaluate.py: steps 2 and 4; report.py:
the summary against the goals, the table and the plots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from kvcat.bench import BenchConfig, result_file
from kvcat.bench_process import logger
from kvcat.console import option
from kvcat.defaults import DEFAULT_METHOD
from kvcat.training.config import TrainConfig

from .evaluate import choose, evaluate, served_check
from .report import plot, summarise, table
from .train import step_time_ratio, train_all, train_config, training_curves

METHODS = (DEFAULT_METHOD, "am-hak", "snapkv", "truncation")  # post-hoc; "truncation": the registry's "recent"
CODE = ("kvcat", "compaction", "training", "benchmarks/kvcat_training", "pyproject.toml")

log = logger("bench kvcat")


@dataclass
class KVCatTrainingConfig(BenchConfig):
    """The settings of `kvcat bench kvcat`, one command-line option each (`model`: the base of every
    checkpoint)."""

    out: Path = result_file("kvcat")
    policies: tuple[str, ...] = option(("ntp", "rand", "am", "router"),
                                       help="policies to train (ntp: the control, trained with KL weight 0)")
    # 1/8, the ratio the goals are judged at: on the tune split (30 steps, AM-HAK-fast 8x) the AM policy trained
    # at 1/8 had gap 1.40 against 1.77 at 1/2 and the control's 1.80, same retrieval (benchmarks/NOTES.md)
    retention: float = option(0.125, help="fraction of prefix KV slots a policy keeps while training")
    # training (identical for every policy): 120 x 4 x 512 = 245,760 tokens, 4x the last published run
    steps: int = option(120, help="training steps per policy (7-22 s each on 2 CPU cores)")
    docs: int | None = option(None, help="training documents (default: the whole TRAIN split)")
    seq_len: int = option(512, help="training sequence length")
    batch_size: int = option(2, help="sequences per micro-batch")
    grad_accum: int = option(2, help="micro-batches per step")
    lr: float = option(1e-4, help="peak learning rate")
    corpora: tuple[str, ...] = option(TrainConfig.corpora, help="training corpora (TRAIN split)")
    planted_frac: float = option(0.25, help="fraction of training sequences with a planted fact asked about")
    # evaluation: never-trained-on windows, the compaction benchmark's retrieval cases
    eval_corpus: str = option("jane_austen", help="corpus of the PPL windows (not among the training corpora)")
    eval_windows: int = option(8, help="held-out PPL windows")
    tune_windows: int = option(4, help="tune-split PPL windows (choose the best checkpoint)")
    prefix_tokens: int = option(1024, help="tokens of each window's compacted prefix")
    continuation_tokens: int = option(128, help="continuation tokens for the PPL gap")
    retrieval_tokens: tuple[int, ...] = option((2048,), help="retrieval document lengths")
    retrieval_cases: int = option(12, help="held-out retrieval cases (needle, multi-key, passage in turn)")
    tune_cases: int = option(6, help="tune-split retrieval cases (choose the best checkpoint)")
    ratios: tuple[int, ...] = option((2, 4, 8, 16), help="compaction ratios")
    methods: tuple[str, ...] = option(METHODS, help="post-hoc compaction methods")
    select_ratio: int = option(8, help="the ratio at which the best checkpoint is chosen (default AM)")
    # step-time ratio, served check
    timing_steps: int = option(3, help="steps timed for the step-time ratio")
    serve_check: bool = option(True, help="serve the chosen checkpoint with `kvcat serve` and ask over a context")
    work_dir: Path | None = option(None, help="checkpoints (default $KVCAT_HOME/bench-kvcat/<config>)")


# --smoke: checks the pipeline in minutes
SMOKE = dict(steps=2, docs=8, seq_len=128, batch_size=1, grad_accum=1, planted_frac=0.25, eval_windows=1,
             tune_windows=1, prefix_tokens=192, continuation_tokens=32, retrieval_cases=1, tune_cases=1,
             retrieval_tokens=(256,), ratios=(2, 8), timing_steps=2, serve_check=False,
             out=Path("benchmarks/results/kvcat-smoke.json"))


def smoke_config(config: KVCatTrainingConfig) -> KVCatTrainingConfig:
    """SMOKE's value for every field left at its default: options given beside --smoke still apply."""
    default = KVCatTrainingConfig()
    return replace(config, **{k: v for k, v in SMOKE.items() if getattr(config, k) == getattr(default, k)})


def run(config: KVCatTrainingConfig, smoke: bool = False, resume: bool = False) -> dict:
    """KV-CAT on SmolLM2 against its NTP control: train each policy on the same data and compute, choose the best
    checkpoint on the tune split, evaluate every checkpoint on held-out data no training saw (PPL gap and
    retrieval at each ratio, with their spread), time the training step against NTP, serve the chosen one."""
    from kvcat.bench import Checkpoint, config_record, provenance, write_result
    from kvcat.config import kvcat_home
    from kvcat.data import retrieval_suite, token_windows
    from kvcat.models import load_model
    from kvcat.training.checkpoint import META_FILE

    bc = smoke_config(config) if smoke else config
    if "ntp" not in bc.policies:
        raise ValueError("the experiment needs its control: include ntp in --policies")
    if bc.eval_corpus in bc.corpora:
        raise ValueError(f"--eval-corpus {bc.eval_corpus} is a training corpus; evaluate on one never trained on")
    method = bc.methods[0]
    tag = (f"{bc.model}-s{bc.steps}-l{bc.seq_len}-b{bc.batch_size * bc.grad_accum}-d{bc.docs or 'all'}"
           f"-r{bc.retention:g}-p{bc.planted_frac:g}")
    work = Path(bc.work_dir) if bc.work_dir else kvcat_home() / "bench-kvcat" / tag
    record = config_record(bc)
    log(f"config: {json.dumps(record)}")
    for policy in bc.policies:  # every training input is checked before the long part starts
        train_config(bc, policy).validate()
    done = Checkpoint(bc.out, record, resume, log, code=CODE)

    paths = train_all(bc, work)
    base = load_model(bc.model, dtype="float32")
    tok, base_path = base.tokenizer, base.spec.path
    del base
    data = {split: (token_windows(tok, bc.prefix_tokens, bc.continuation_tokens, n_win, split=split,
                                  corpora=(bc.eval_corpus,)),
                    retrieval_suite(tok, n=n_case, lengths=tuple(bc.retrieval_tokens), split=split))
            for split, n_win, n_case in (("tune", bc.tune_windows, bc.tune_cases),
                                         ("heldout", bc.eval_windows, bc.retrieval_cases))}
    checkpoints = {"base": ("none", base_path), **{f"kvcat-{p}": (p, path) for p, path in paths.items()}}
    all_cells = [(m, r) for m in bc.methods for r in bc.ratios]

    def rows_of(label: str, split: str, cells) -> list[dict]:
        for rec in done["evaluations"]:
            if rec["checkpoint"] == label and rec["split"] == split:
                return rec["rows"]
        policy, path = checkpoints[label]
        rows = evaluate(label, path, policy, split, *data[split], cells)
        done.add("evaluations", {"checkpoint": label, "split": split, "rows": rows})
        return rows

    tune = [r for label in checkpoints if checkpoints[label][0] not in ("none", "ntp")
            for r in rows_of(label, "tune", [(method, bc.select_ratio)])]
    chosen = choose(tune, method, bc.select_ratio)
    log(f"chosen on the tune split: {chosen}")
    rows = tune + [r for label in checkpoints for r in rows_of(label, "heldout", all_cells)]

    timing = step_time_ratio(bc, checkpoints[chosen][0])
    log(f"step time: NTP {timing['ntp_step_s']} s, {timing['policy']} {timing['kvcat_step_s']} s, "
        f"ratio {timing['ratio']}")
    served = None
    if bc.serve_check:
        ex = data["heldout"][1][0]
        served = served_check(checkpoints[chosen][1], ex.document, ex.question)
        log(f"served {chosen}: {served}")

    result = {"model": bc.model, **provenance(), **done.provenance(), "rows": rows, "step_time": timing,
              "config": record, "checkpoints": {p: str(v) for p, v in paths.items()},
              "training_data": {p: json.loads((v / META_FILE).read_text()).get("data") for p, v in paths.items()},
              "eval_data": {split: {"windows": [w.document_id for w in d[0]], "cases": [ex.id for ex in d[1]]}
                            for split, d in data.items()},
              "training_curves": training_curves(paths), "smoke": smoke, "served": served}
    result["summary"] = summarise(rows, chosen, method, bc.select_ratio)
    out_path = Path(bc.out)
    result["plots"] = plot(result, out_path)
    write_result(result, out_path, table(result))
    done.finish()
    log(f"wrote {out_path} and {', '.join(result['plots'])}; summary: {json.dumps(result['summary'])}")
    return result
