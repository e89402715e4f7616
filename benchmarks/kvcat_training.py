"""KV-CAT on SmolLM2-135M: does continued pretraining with a train-time KV sparsification policy make the KV
cache easier to compress afterwards, without hurting the uncompressed model?

    kvcat bench kvcat                       # the full experiment (about 2 h on a 2-core CPU machine)
    kvcat bench kvcat --steps 30 --eval-windows 4 --needles 4   # smaller (about 1.5 h)
    kvcat bench kvcat --smoke               # checks the pipeline in minutes (writes kvcat-smoke.json)

1. Train one checkpoint per policy (rand, attn, am, router) from the same base, on the same TRAIN-split
   sequences with the same compute (steps x global batch x seq-len), retention 0.5. Finished checkpoints
   are reused (the trainer resumes or returns at once).
2. Evaluate the base model and every checkpoint on HELD-OUT data, with each post-hoc compaction method
   (AM-HAK, SnapKV, truncation = keep the most recent tokens) at ratios 2, 4, 8:
   - ppl_gap: continuation perplexity over the compacted prefix minus over the full prefix, the mean over
     windows of each one's gap (kvcat.eval.metrics.ppl_gap, as `kvcat eval`; lower = better);
   - retrieval_acc: needle-in-a-haystack answers found after compacting the haystack;
   - base_ppl: continuation perplexity over the full prefix, mean over windows (the uncompressed ability;
     per checkpoint);
   - grad_steps_to_target (AM-HAK rows): Adam steps of gradient-based compaction (from AM-HAK) to reach
     a fixed target loss, the target being half of the base model's initial loss on the same window.
3. Step time of KV-CAT training (router policy) against plain NTP training (`w_kl = 0`, no masked pass),
   same batch and sequence length, in this run.
Writes benchmarks/results/kvcat.json and PNG plots beside it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from kvcat.console import option
from kvcat.defaults import DEFAULT_MODEL
from kvcat.eval.metrics import mean_ppl, ppl_gap, window_nll
from kvcat.training.config import TrainConfig

METHODS = {"am-hak": ("am-hak", {}), "snapkv": ("snapkv", {}), "truncation": ("truncation", {})}


@dataclass
class KVCatTrainingConfig:
    """The settings of `kvcat bench kvcat`, one command-line option each."""

    model: str = option(DEFAULT_MODEL, help="zoo name or HF folder: the base of every checkpoint")
    policies: tuple[str, ...] = option(("rand", "attn", "am", "router"), help="policies to train")
    retention: float = option(0.5, help="fraction of prefix KV slots a policy keeps while training")
    # training (identical for every policy)
    steps: int = option(60, help="training steps per policy (about 15 min each on 2 CPU cores: a small fraction "
                                 "of the paper's training)")
    docs: int | None = option(None, help="training documents (default: the whole TRAIN split)")
    seq_len: int = option(512, help="training sequence length")
    batch_size: int = option(2, help="sequences per micro-batch")
    grad_accum: int = option(2, help="micro-batches per step")
    lr: float = option(1e-4, help="peak learning rate")
    corpora: tuple[str, ...] = option(TrainConfig.corpora, help="training corpora (TRAIN split)")
    # evaluation (held-out split)
    eval_windows: int = option(8, help="held-out PPL windows")
    prefix_tokens: int = option(1024, help="tokens of each window's compacted prefix")
    continuation_tokens: int = option(128, help="continuation tokens for the PPL gap")
    ratios: tuple[int, ...] = option((2, 4, 8), help="compaction ratios")
    methods: tuple[str, ...] = option(tuple(METHODS), help="post-hoc compaction methods")
    retrieval_examples: int = option(8, flags=("--needles",), help="held-out needle examples for retrieval")
    retrieval_tokens: int = option(1024, help="needle haystack length in tokens")
    grad_windows: int = option(2, help="windows of the gradient-compaction measure")
    grad_ratio: int = option(4, help="ratio of the gradient-compaction measure (AM-HAK rows)")
    grad_max_steps: int = option(100, help="Adam steps the gradient-compaction measure gives up after")
    # step-time ratio
    timing_steps: int = option(3, help="steps timed for the step-time ratio")
    work_dir: Path | None = option(None, help="checkpoints (default $KVCAT_HOME/bench-kvcat/<config>)")
    out: Path = option(Path("benchmarks/results/kvcat.json"), help="result JSON (Markdown and plots beside it)")


# --smoke: checks the pipeline in minutes
SMOKE = dict(steps=2, docs=8, seq_len=128, batch_size=1, grad_accum=1, eval_windows=1, prefix_tokens=192,
             continuation_tokens=32, retrieval_examples=1, retrieval_tokens=192, grad_windows=1,
             grad_max_steps=5, timing_steps=2, out=Path("benchmarks/results/kvcat-smoke.json"))


def smoke_config(config: KVCatTrainingConfig) -> KVCatTrainingConfig:
    """SMOKE's value for every field left at its default: options given beside --smoke still apply."""
    default = KVCatTrainingConfig()
    return replace(config, **{k: v for k, v in SMOKE.items() if getattr(config, k) == getattr(default, k)})


def log(msg: str) -> None:
    print(f"[kvcat-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# 1. Training


def train_config(bc: KVCatTrainingConfig, policy: str, **over):
    return TrainConfig(model=bc.model, policy=policy, retention=bc.retention, steps=bc.steps, seq_len=bc.seq_len,
                       batch_size=bc.batch_size, grad_accum=bc.grad_accum, lr=bc.lr, corpora=tuple(bc.corpora),
                       max_docs=bc.docs, warmup_steps=max(1, min(20, bc.steps // 10)),
                       save_every=max(1, bc.steps // 4), **over)


def train_all(bc: KVCatTrainingConfig, work: Path) -> dict[str, Path]:
    from kvcat.training.trainer import Trainer

    paths = {}
    for policy in bc.policies:
        out = work / policy
        trainer = Trainer(train_config(bc, policy), out, log=log, progress=sys.stderr.isatty())
        if trainer.step < bc.steps:
            log(f"training {policy}: {bc.steps} steps x {trainer.global_batch()} x {bc.seq_len} tokens -> {out}")
        trainer.run()
        paths[policy] = out
        del trainer
    return paths


def training_curves(paths: dict[str, Path]) -> dict[str, list[dict]]:
    from kvcat.training.checkpoint import read_log

    return {p: read_log(path) for p, path in paths.items()}


def step_time_ratio(bc: KVCatTrainingConfig) -> dict:
    """Median step time of KV-CAT (router) over plain NTP training, same batch, length and machine."""
    from kvcat.training.trainer import Trainer

    times = {}
    for label, cfg in [("ntp", train_config(bc, "router", w_kl=0.0)), ("kvcat", train_config(bc, "router"))]:
        cfg = replace(cfg, steps=bc.timing_steps + 1)
        trainer = Trainer(cfg, None, log=log, progress=False)
        trainer.train_step()  # warm-up
        times[label] = statistics.median(trainer.train_step()["seconds"] for _ in range(bc.timing_steps))
        del trainer
    return {"ntp_step_s": round(times["ntp"], 4), "kvcat_step_s": round(times["kvcat"], 4),
            "ratio": round(times["kvcat"] / times["ntp"], 3), "steps_timed": bc.timing_steps,
            "batch": bc.batch_size * bc.grad_accum, "seq_len": bc.seq_len}


# --------------------------------------------------------------------------------------------------
# 2. Evaluation


def get_compaction(label: str):
    """The post-hoc methods of the evaluation ("truncation" is the registry's "recent")."""
    from kvcat.compaction import get_method

    name, params = METHODS[label]
    return get_method(name, **params)


def evaluate(bc: KVCatTrainingConfig, label: str, path, policy: str, windows, needles,
             grad_targets: dict) -> list[dict]:
    from kvcat.eval.harness import MAX_NEW_TOKENS, full_prefix_nll
    from kvcat.eval.metrics import retrieved
    from kvcat.inference import CacheSession, continuation_nll, full_cache, prefill
    from kvcat.models import load_model
    from kvcat.prompts import context_and_question

    lm = load_model(path, dtype="float32")
    tok = lm.tokenizer
    full = [window_nll(full_prefix_nll(lm, w)) for w in windows]  # the reference of every gap, as `kvcat eval`'s
    base_ppl = mean_ppl(full)

    def answer_ok(cache, question_ids, answers) -> float:
        out = CacheSession(lm, cache).generate(question_ids, max_new_tokens=MAX_NEW_TOKENS["needle"])
        return retrieved(tok.decode(out, skip_special_tokens=True), answers)

    prompts = [context_and_question(tok, ex.document, ex.question) for ex in needles]
    full_acc = statistics.mean(
        answer_ok(full_cache(prefill(lm, p.context_ids), lm.spec.fingerprint), p.question_ids, ex.answers)
        for p, ex in zip(prompts, needles)) if needles else None
    rows = [{"checkpoint": label, "policy": policy, "method": "full", "ratio": 1, "ppl_gap": 0.0,
             "retrieval_acc": full_acc, "base_ppl": round(base_ppl, 4), "grad_steps_to_target": None}]

    # Context-major: every (method, ratio) of one context in a row, so the memoized prefill and reference
    # queries of that context (kvcat.compaction.queries) serve them all.
    combos = [(m, r) for m in bc.methods for r in bc.ratios]
    methods = {m: get_compaction(m) for m in bc.methods}
    nll: dict = {c: [] for c in combos}  # (sum NLL, tokens) per window
    hits: dict = {c: [] for c in combos}
    t0 = time.perf_counter()
    for w in windows:
        for m, r in combos:
            cache = methods[m].compact(lm, list(w.prefix_ids), ratio=r)
            nll[(m, r)].append(window_nll(continuation_nll(lm, cache, list(w.continuation_ids))))
    for p, ex in zip(prompts, needles):
        for m, r in combos:
            hits[(m, r)].append(answer_ok(methods[m].compact(lm, p.context_ids, ratio=r), p.question_ids, ex.answers))
    log(f"{label}: {len(combos)} method x ratio over {len(windows)} windows and {len(needles)} needles "
        f"({time.perf_counter() - t0:.0f} s)")
    for m, r in combos:
        grad = grad_steps(bc, lm, windows[:bc.grad_windows], grad_targets, label) \
            if m == "am-hak" and r == bc.grad_ratio else None
        acc = statistics.mean(hits[(m, r)]) if needles else None
        rows.append({"checkpoint": label, "policy": policy, "method": m, "ratio": r,
                     "ppl_gap": round(ppl_gap(nll[(m, r)], full), 4),
                     "retrieval_acc": acc, "base_ppl": round(base_ppl, 4), "grad_steps_to_target": grad})
        log(f"{label} {m} {r}x: gap {rows[-1]['ppl_gap']:.3f} retrieval {acc} grad steps {grad}")
    return rows


def grad_steps(bc: KVCatTrainingConfig, lm, windows, targets: dict, label: str) -> float | None:
    """Mean steps to the target over the windows (a window that never reaches it counts as max steps);
    the base model's initial loss fixes each window's target (half of it)."""
    from kvcat.compaction.optimize import steps_to_target

    steps = []
    for i, w in enumerate(windows):
        target = targets.get(i)
        report = steps_to_target(lm, list(w.prefix_ids), ratio=bc.grad_ratio,
                                 target_loss=target if target is not None else -1.0, max_steps=bc.grad_max_steps)
        if target is None:  # the base model sets the target
            targets[i] = target = 0.5 * report["initial_loss"]
            hit = next((s for s, v in enumerate(report["loss_curve"]) if v <= target), None)
        else:
            hit = report["steps_to_target"]
        steps.append(bc.grad_max_steps if hit is None else hit)
    return round(statistics.mean(steps), 2) if steps else None


# --------------------------------------------------------------------------------------------------
# 3. Report


def plot(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["method"] != "full"]
    methods = sorted({r["method"] for r in rows})
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in result["rows"]))
    files = []
    for metric, ylabel in [("ppl_gap", "PPL gap (compacted - full)"), ("retrieval_acc", "needle accuracy")]:
        fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), squeeze=False)
        for ax, method in zip(axes[0], methods):
            for ck in checkpoints:
                pts = sorted((r["ratio"], r[metric]) for r in rows if r["method"] == method and r["checkpoint"] == ck
                             and r[metric] is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=ck, linestyle="--" if ck == "base" else "-")
            ax.set_title(method)
            ax.set_xlabel("compaction ratio")
            ax.set_xscale("log", base=2)
            ax.set_ylabel(ylabel)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"KV-CAT on {result['model']}: {ylabel}")
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_{metric}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    curves = result.get("training_curves") or {}
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for policy, rows_ in curves.items():
            steps = [r["step"] for r in rows_]
            axes[0].plot(steps, [r.get("kl") for r in rows_], label=policy)
            axes[1].plot(steps, [r.get("ntp") for r in rows_], label=policy)
        axes[0].set_title("self-distillation KL (masked vs full)")
        axes[1].set_title("NTP loss (full pass)")
        for ax in axes:
            ax.set_xlabel("step")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_training.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def table(result: dict) -> str:
    """Checkpoint x method rows of "PPL gap / retrieval" per ratio, each checkpoint's uncompressed PPL and
    gradient-compaction steps, then the gap shrink against the base and the step-time ratio."""
    rows = [r for r in result["rows"] if r["method"] != "full"]
    ratios = sorted({r["ratio"] for r in rows})
    cell = {(r["checkpoint"], r["method"], r["ratio"]): r for r in rows}
    full = {r["checkpoint"]: r for r in result["rows"] if r["method"] == "full"}
    fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = ["| checkpoint | method | " + " | ".join(f"{x:g}x gap / retrieval" for x in ratios)
             + " | base PPL | retrieval, full cache | grad steps to target |",
             "|---|---|" + "---|" * (len(ratios) + 3)]
    for ck, m in dict.fromkeys((r["checkpoint"], r["method"]) for r in rows):
        vals = [f"{fmt(c['ppl_gap'])} / {fmt(c['retrieval_acc'], 2)}" if (c := cell.get((ck, m, x))) else "-"
                for x in ratios]
        grad = next((r["grad_steps_to_target"] for r in rows if r["checkpoint"] == ck and r["method"] == m
                     and r["grad_steps_to_target"] is not None), None)
        lines.append(f"| {ck} | {m} | " + " | ".join(vals) + f" | {fmt(full[ck]['base_ppl'])} | "
                     f"{fmt(full[ck]['retrieval_acc'], 2)} | {fmt(grad, 1)} |")
    notes = []
    for ck, s in result.get("summary", {}).items():
        best = s["best_gap_shrink"]
        shrink = f"{best['shrink']:.2f}x ({best['method']} {best['ratio']}x)" if best else "-"
        notes.append(f"| {ck} | {shrink} | {s['base_ppl_change_pct']:+.2f}% |")
    st = result.get("step_time", {})
    return "\n".join(lines + ["", "| checkpoint | best PPL-gap shrink vs base | uncompressed PPL vs base |",
                               "|---|---|---|", *notes, "",
                               f"Step time, KV-CAT (router) vs plain NTP, same batch ({st.get('batch')} x "
                               f"{st.get('seq_len')} tokens): {st.get('kvcat_step_s')} s vs {st.get('ntp_step_s')} s, "
                               f"ratio **{result.get('step_time_ratio')}**."])


def summarise(result: dict) -> dict:
    """Best PPL-gap shrink of each policy against the base (same method and ratio), and base-PPL drift."""
    rows = result["rows"]
    base = {(r["method"], r["ratio"]): r for r in rows if r["checkpoint"] == "base"}
    base_ppl = next(r["base_ppl"] for r in rows if r["checkpoint"] == "base")
    out = {}
    for ck in dict.fromkeys(r["checkpoint"] for r in rows if r["checkpoint"] != "base"):
        best = None
        for r in rows:
            b = base.get((r["method"], r["ratio"]))
            if r["checkpoint"] != ck or r["method"] == "full" or b is None or r["ppl_gap"] <= 0:
                continue
            shrink = b["ppl_gap"] / r["ppl_gap"]
            if best is None or shrink > best["shrink"]:
                best = {"shrink": round(shrink, 3), "method": r["method"], "ratio": r["ratio"]}
        ppl = next(r["base_ppl"] for r in rows if r["checkpoint"] == ck)
        out[ck] = {"best_gap_shrink": best, "base_ppl_change_pct": round(100 * (ppl / base_ppl - 1), 3)}
    return out


def run(config: KVCatTrainingConfig, smoke: bool = False) -> dict:
    """KV-CAT on SmolLM2: train each policy on the same data and compute, then evaluate base vs checkpoints
    under AM-HAK, SnapKV and truncation (PPL gap, retrieval, base PPL, gradient-compaction steps), and the
    step-time ratio of KV-CAT against plain NTP training."""
    from kvcat.bench import config_record
    from kvcat.config import kvcat_home
    from kvcat.data import needle, token_windows
    from kvcat.models import load_model

    bc = smoke_config(config) if smoke else config
    tag = f"{bc.model}-s{bc.steps}-l{bc.seq_len}-b{bc.batch_size * bc.grad_accum}-d{bc.docs or 'all'}-r{bc.retention:g}"
    work = Path(bc.work_dir) if bc.work_dir else kvcat_home() / "bench-kvcat" / tag
    started = time.time()
    log(f"config: {json.dumps(config_record(bc))}")

    # Every training/eval input is checked before the long part starts.
    for policy in bc.policies:
        train_config(bc, policy).validate()

    timing = step_time_ratio(bc)
    log(f"step time: NTP {timing['ntp_step_s']} s, KV-CAT {timing['kvcat_step_s']} s, ratio {timing['ratio']}")
    paths = train_all(bc, work)

    base = load_model(bc.model, dtype="float32")
    windows = token_windows(base.tokenizer, bc.prefix_tokens, bc.continuation_tokens, bc.eval_windows,
                            split="heldout")
    needles = needle(base.tokenizer, n=bc.retrieval_examples, length=bc.retrieval_tokens, split="heldout")
    base_path = base.spec.path
    del base
    grad_targets: dict = {}
    rows = evaluate(bc, "base", base_path, "none", windows, needles, grad_targets)
    for policy, path in paths.items():
        rows += evaluate(bc, f"kvcat-{policy}", path, policy, windows, needles, grad_targets)

    from kvcat.bench import provenance, write_result

    result = {"model": bc.model, **provenance(), "rows": rows, "step_time_ratio": timing["ratio"],
              "step_time": timing, "config": config_record(bc), "checkpoints": {p: str(v) for p, v in paths.items()},
              "training_curves": training_curves(paths), "smoke": smoke,
              "wall_s": round(time.time() - started, 1)}
    result["summary"] = summarise(result)
    out_path = Path(bc.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result["plots"] = plot(result, out_path)
    write_result(result, out_path, table(result))
    log(f"wrote {out_path} and {', '.join(result['plots'])}; summary: {json.dumps(result['summary'])}")
    return result

