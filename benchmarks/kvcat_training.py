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
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from kvcat.bench import mean_or_none
from kvcat.console import option
from kvcat.defaults import DEFAULT_METHOD, DEFAULT_MODEL
from kvcat.eval.metrics import mean_ppl, ppl_gap, window_nll
from kvcat.training.config import TrainConfig

METHODS = (DEFAULT_METHOD, "am-hak", "snapkv", "truncation")  # post-hoc; "truncation": the registry's "recent"
REGISTRY = {"truncation": "recent"}
MAX_NEW_TOKENS = 48  # as benchmarks/retrieval.py: a passage answer comes after the echoed question
CODE = ("kvcat", "compaction", "training", "benchmarks/kvcat_training.py", "pyproject.toml")
CONTROL = "kvcat-ntp"  # the NTP control's checkpoint label: every trained policy's is f"kvcat-{policy}"


@dataclass
class KVCatTrainingConfig:
    """The settings of `kvcat bench kvcat`, one command-line option each."""

    model: str = option(DEFAULT_MODEL, help="zoo name or HF folder: the base of every checkpoint")
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
    retrieval_cases: int = option(12, help="held-out retrieval cases (needle, multi-key, passage in turn)")
    tune_cases: int = option(6, help="tune-split retrieval cases (choose the best checkpoint)")
    retrieval_tokens: tuple[int, ...] = option((2048,), help="retrieval document lengths")
    ratios: tuple[int, ...] = option((2, 4, 8, 16), help="compaction ratios")
    methods: tuple[str, ...] = option(METHODS, help="post-hoc compaction methods")
    select_ratio: int = option(8, help="the ratio at which the best checkpoint is chosen (default AM)")
    # step-time ratio, served check
    timing_steps: int = option(3, help="steps timed for the step-time ratio")
    serve_check: bool = option(True, help="serve the chosen checkpoint with `kvcat serve` and ask over a context")
    work_dir: Path | None = option(None, help="checkpoints (default $KVCAT_HOME/bench-kvcat/<config>)")
    out: Path = option(Path("benchmarks/results/kvcat.json"), help="result JSON (Markdown and plots beside it)")


# --smoke: checks the pipeline in minutes
SMOKE = dict(steps=2, docs=8, seq_len=128, batch_size=1, grad_accum=1, planted_frac=0.25, eval_windows=1,
             tune_windows=1, prefix_tokens=192, continuation_tokens=32, retrieval_cases=1, tune_cases=1,
             retrieval_tokens=(256,), ratios=(2, 8), timing_steps=2, serve_check=False,
             out=Path("benchmarks/results/kvcat-smoke.json"))


def smoke_config(config: KVCatTrainingConfig) -> KVCatTrainingConfig:
    """SMOKE's value for every field left at its default: options given beside --smoke still apply."""
    default = KVCatTrainingConfig()
    return replace(config, **{k: v for k, v in SMOKE.items() if getattr(config, k) == getattr(default, k)})


def log(msg: str) -> None:
    print(f"[kvcat-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# 1. Training


def train_config(bc: KVCatTrainingConfig, policy: str, **over):
    """The TrainConfig of one policy: everything but the policy (and the control's KL weight 0) is shared."""
    fields = dict(model=bc.model, policy=policy, retention=bc.retention, steps=bc.steps, seq_len=bc.seq_len,
                  batch_size=bc.batch_size, grad_accum=bc.grad_accum, lr=bc.lr, corpora=tuple(bc.corpora),
                  max_docs=bc.docs, planted_frac=bc.planted_frac, warmup_steps=max(1, min(20, bc.steps // 10)),
                  save_every=max(1, bc.steps // 8), w_kl=0.0 if policy == "ntp" else TrainConfig.w_kl)
    return TrainConfig(**(fields | over))


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


def step_time_ratio(bc: KVCatTrainingConfig, policy: str) -> dict:
    """Median step time of KV-CAT (`policy`) over the NTP control, same batch, length and machine."""
    from kvcat.training.trainer import Trainer

    times = {}
    for label, pol in (("ntp", "ntp"), ("kvcat", policy)):
        trainer = Trainer(train_config(bc, pol, steps=bc.timing_steps + 1), None, log=log, progress=False)
        trainer.train_step()  # warm-up
        times[label] = statistics.median(trainer.train_step()["seconds"] for _ in range(bc.timing_steps))
        del trainer
    return {"policy": policy, "ntp_step_s": round(times["ntp"], 4), "kvcat_step_s": round(times["kvcat"], 4),
            "ratio": round(times["kvcat"] / times["ntp"], 3), "steps_timed": bc.timing_steps,
            "batch": bc.batch_size * bc.grad_accum, "seq_len": bc.seq_len}


# --------------------------------------------------------------------------------------------------
# 2. Evaluation


def evaluate(label: str, path, policy: str, split: str, windows, cases, cells: list[tuple[str, int]]) -> list[dict]:
    """One checkpoint on one split: the full-cache row, then one row per (method, ratio) in `cells`, each with
    its per-window PPL gaps and per-case retrieval hits."""
    from kvcat.compaction import get_method
    from kvcat.compaction.queries import clear_memo
    from kvcat.eval.harness import full_prefix_nll
    from kvcat.eval.metrics import retrieved
    from kvcat.inference import CacheSession, continuation_nll, full_cache, prefill
    from kvcat.models import load_model
    from kvcat.prompts import context_and_question

    lm = load_model(path, dtype="float32")
    tok = lm.tokenizer
    t0 = time.perf_counter()
    full = [window_nll(full_prefix_nll(lm, w)) for w in windows]  # the reference of every gap, as `kvcat eval`'s
    prompts = [context_and_question(tok, ex.document, ex.question) for ex in cases]

    def hit(cache, prompt, ex) -> float:
        out = CacheSession(lm, cache).generate(prompt.question_ids, max_new_tokens=MAX_NEW_TOKENS)
        return retrieved(tok.decode(out, skip_special_tokens=True), ex.answers)

    methods = {m: get_method(REGISTRY.get(m, m)) for m in dict.fromkeys(m for m, _ in cells)}
    nll: dict = {c: [] for c in cells}
    hits: dict = {c: [] for c in cells}
    full_hits = []
    # Context-major: every (method, ratio) of one context in a row, so the memoized prefill and reference
    # queries of that context (kvcat.compaction.queries) serve them all.
    for w in windows:
        clear_memo()
        for m, r in cells:
            nll[(m, r)].append(window_nll(continuation_nll(lm, methods[m].compact(lm, list(w.prefix_ids), ratio=r),
                                                           list(w.continuation_ids))))
    for prompt, ex in zip(prompts, cases):
        clear_memo()
        full_hits.append(hit(full_cache(prefill(lm, prompt.context_ids), lm.spec.fingerprint), prompt, ex))
        for m, r in cells:
            hits[(m, r)].append(hit(methods[m].compact(lm, prompt.context_ids, ratio=r), prompt, ex))
    clear_memo()
    base = {"checkpoint": label, "policy": policy, "split": split, "base_ppl": round(mean_ppl(full), 4),
            "base_ppls": [round(mean_ppl([f]), 4) for f in full]}
    rows = [{**base, "method": "full", "ratio": 1, "ppl_gap": 0.0, "ppl_gaps": [0.0] * len(full),
             "retrieval_acc": mean_or_none(full_hits), "hits": full_hits}]
    for m, r in cells:
        gaps = [round(ppl_gap([c], [f]), 4) for c, f in zip(nll[(m, r)], full)]
        rows.append({**base, "method": m, "ratio": r, "ppl_gap": round(ppl_gap(nll[(m, r)], full), 4),
                     "ppl_gaps": gaps, "retrieval_acc": mean_or_none(hits[(m, r)]), "hits": hits[(m, r)]})
    log(f"{label} ({split}): {len(cells)} method x ratio over {len(windows)} windows and {len(cases)} cases "
        f"({time.perf_counter() - t0:.0f} s); " + ", ".join(
            f"{r['method']} {r['ratio']}x gap {r['ppl_gap']:.3f} acc {r['retrieval_acc']}" for r in rows[1:]))
    return rows


def _std(values) -> float | None:
    return round(statistics.stdev(values), 4) if len(values) > 1 else None


def choose(tune_rows: list[dict], method: str, ratio: int) -> str:
    """The KV-CAT checkpoint (never the base or the control) with the best tune-split retrieval at `ratio`
    under `method`, ties broken by the smaller PPL gap."""
    cands = [r for r in tune_rows if r["method"] == method and r["ratio"] == ratio
             and r["policy"] not in ("none", "ntp")]
    if not cands:
        raise ValueError("no KV-CAT checkpoint to choose from: train at least one policy besides ntp")
    best = max(cands, key=lambda r: (r["retrieval_acc"] or 0.0, -r["ppl_gap"]))
    return best["checkpoint"]


# --------------------------------------------------------------------------------------------------
# 3. Served check


def served_check(path: Path, doc: str, question: str) -> dict:
    """`kvcat serve` on the checkpoint folder as it is: /v1/compact a document, then one chat over it."""
    import httpx

    from kvcat.server.launch import ServerProcess

    with ServerProcess(str(path), dtype="float32", kv_cache_gib=2) as srv:
        r = httpx.post(srv.base + "/v1/compact", json={"text": doc, "ratio": 4}, timeout=600)
        r.raise_for_status()
        ctx = r.json()
        client = srv.openai(timeout=600)
        model = client.models.list().data[0].id
        resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                              max_tokens=24, temperature=0, extra_body={"kv_context": ctx["id"]})
        return {"served": True, "model_id": model, "compacted_tokens": ctx["compacted_tokens"],
                "answer": resp.choices[0].message.content}


# --------------------------------------------------------------------------------------------------
# 4. Report


def plot(result: dict, out: Path) -> list[str]:
    """Per method: PPL gap vs ratio and retrieval vs ratio, one line per checkpoint (held-out split), with the
    spread (gap: standard deviation over windows; retrieval: binomial standard error over cases)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["split"] == "heldout" and r["method"] != "full"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    ratios = sorted({r["ratio"] for r in rows})
    fig, axes = plt.subplots(2, len(methods), figsize=(4.2 * len(methods), 6.6), squeeze=False)
    for col, method in enumerate(methods):
        for ck in checkpoints:
            pts = sorted((r["ratio"], r) for r in rows if r["method"] == method and r["checkpoint"] == ck)
            if not pts:
                continue
            x = [p for p, _ in pts]
            dashed = ck in ("base", CONTROL)  # the references; KV-CAT checkpoints solid
            style = {"linestyle": "--" if dashed else "-", "marker": "o", "label": ck, "capsize": 2}
            axes[0][col].errorbar(x, [r["ppl_gap"] for _, r in pts], yerr=[_std(r["ppl_gaps"]) or 0 for _, r in pts],
                                  **style)
            acc = [r["retrieval_acc"] or 0.0 for _, r in pts]
            se = [(a * (1 - a) / max(1, len(r["hits"]))) ** 0.5 for a, (_, r) in zip(acc, pts)]
            axes[1][col].errorbar(x, acc, yerr=se, **style)
        axes[0][col].set(title=method, ylabel="PPL gap (compacted - full)", xscale="log")
        axes[1][col].set(xlabel="compaction ratio", ylabel="retrieval accuracy", xscale="log", ylim=(-0.05, 1.05))
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(ratios, [f"{x:g}x" for x in ratios])
            ax.minorticks_off()
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"KV-CAT on {result['model']} vs its NTP control (held-out; {result['config']['eval_corpus']} "
                 f"windows, retrieval cases)")
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files = [path.name]
    curves = result.get("training_curves") or {}
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for i, (policy, rows_) in enumerate(curves.items()):
            steps = [r["step"] for r in rows_]
            if policy != "ntp":  # the control trains without the KL term
                axes[0].plot(steps, [r.get("kl") for r in rows_], label=policy, color=f"C{i}")
            axes[1].plot(steps, [r.get("ntp") for r in rows_], label=policy, color=f"C{i}")
        axes[0].set_title("self-distillation KL (masked vs full)")
        axes[1].set_title("NTP loss (full pass)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_training.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def table(result: dict) -> str:
    """Held-out rows: checkpoint x method, "gap ± sd / retrieval" per ratio, uncompressed PPL ± sd; then the
    chosen checkpoint against the control and the goals."""
    rows = [r for r in result["rows"] if r["split"] == "heldout"]
    comp = [r for r in rows if r["method"] != "full"]
    ratios = sorted({r["ratio"] for r in comp})
    cell = {(r["checkpoint"], r["method"], r["ratio"]): r for r in comp}
    full = {r["checkpoint"]: r for r in rows if r["method"] == "full"}
    fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    n_win = len(next(iter(full.values()))["ppl_gaps"])
    n_case = len(next(iter(full.values()))["hits"])
    lines = [f"Held-out: {n_win} windows of {result['config']['eval_corpus']} (never trained on), {n_case} "
             "retrieval cases; gap ± standard deviation over windows / retrieval accuracy.", "",
             "| checkpoint | method | " + " | ".join(f"{x:g}x gap / retrieval" for x in ratios)
             + " | uncompressed PPL | retrieval, full cache |", "|---|---|" + "---|" * (len(ratios) + 2)]
    for ck, m in dict.fromkeys((r["checkpoint"], r["method"]) for r in comp):
        vals = [f"{fmt(c['ppl_gap'])} ± {fmt(_std(c['ppl_gaps']), 2)} / {fmt(c['retrieval_acc'], 2)}"
                if (c := cell.get((ck, m, x))) else "-" for x in ratios]
        f = full[ck]
        lines.append(f"| {ck} | {m} | " + " | ".join(vals) + f" | {fmt(f['base_ppl'])} ± {fmt(_std(f['base_ppls']), 2)}"
                     f" | {fmt(f['retrieval_acc'], 2)} |")
    s, st = result["summary"], result.get("step_time", {})
    goal = lambda ok: "met" if ok else "not met"  # noqa: E731
    lines += ["", f"Chosen on the tune split: **{s['chosen']}** (best retrieval, then gap, with {s['method']} at "
              f"{s['ratio']}x). Against the NTP control, held-out, {s['method']} {s['ratio']}x:", "",
              "| goal | chosen | control | ratio | |", "|---|---|---|---|---|",
              f"| retrieval >= 1.5x the control's | {fmt(s['retrieval'], 2)} | {fmt(s['control_retrieval'], 2)} | "
              f"{fmt(s['retrieval_ratio'], 2)} | {goal(s['retrieval_ok'])} |",
              f"| PPL gap <= 1/1.5 of the control's | {fmt(s['gap'])} | {fmt(s['control_gap'])} | "
              f"{fmt(s['gap_ratio'], 2)} | {goal(s['gap_ok'])} |",
              f"| uncompressed PPL within 2% of the control's | {fmt(s['ppl'])} | {fmt(s['control_ppl'])} | "
              f"{s['ppl_change_pct']:+.2f}% | {goal(s['ppl_ok'])} |",
              f"| training step <= 1.5x NTP's ({st.get('batch')} x {st.get('seq_len')} tokens) | "
              f"{st.get('kvcat_step_s')} s | {st.get('ntp_step_s')} s | {fmt(st.get('ratio'), 2)} | "
              f"{goal((st.get('ratio') or 99) <= 1.5)} |"]
    served = result.get("served")
    if served:
        lines += ["", f"Served: `kvcat serve` loaded {s['chosen']}'s folder unchanged and answered over a "
                      f"{served['compacted_tokens']}-slot context: {served['answer']!r}."]
    return "\n".join(lines)


def summarise(rows: list[dict], chosen: str, method: str, ratio: int) -> dict:
    """The chosen checkpoint against the NTP control on the held-out split, at (method, ratio), and the goals."""
    held = {(r["checkpoint"], r["method"], r["ratio"]): r for r in rows if r["split"] == "heldout"}
    me, ctl = held[(chosen, method, ratio)], held[(CONTROL, method, ratio)]
    acc, cacc = me["retrieval_acc"] or 0.0, ctl["retrieval_acc"] or 0.0
    ppl, cppl = held[(chosen, "full", 1)]["base_ppl"], held[(CONTROL, "full", 1)]["base_ppl"]
    return {"chosen": chosen, "method": method, "ratio": ratio, "retrieval": acc, "control_retrieval": cacc,
            "retrieval_ratio": round(acc / cacc, 3) if cacc else None, "retrieval_ok": acc >= 1.5 * cacc and acc > 0,
            "gap": me["ppl_gap"], "control_gap": ctl["ppl_gap"],
            "gap_ratio": round(me["ppl_gap"] / ctl["ppl_gap"], 3) if ctl["ppl_gap"] > 0 else None,
            "gap_ok": me["ppl_gap"] <= ctl["ppl_gap"] / 1.5, "ppl": ppl, "control_ppl": cppl,
            "ppl_change_pct": round(100 * (ppl / cppl - 1), 3), "ppl_ok": abs(ppl / cppl - 1) <= 0.02}


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
