"""Run a set of tasks for a set of compressors: data loading, the harness, a JSON report and a PNG plot."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvcat import data
from kvcat.eval import harness
from kvcat.eval.compressors import EvalError, NamedCompressor
from kvcat.models import LoadedModel

TASKS = ("ppl", "needle", "kv", "hotpotqa", "squad", "base_ppl")
ALIASES = {"retrieval": ("needle", "kv"), "qa": ("hotpotqa", "squad"), "all": TASKS}


def expand_tasks(tasks: list[str] | tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for t in tasks:
        if t in ALIASES:
            out.extend(ALIASES[t])
        elif t in TASKS:
            out.append(t)
        else:
            raise EvalError(f"unknown task {t!r}; choose from {', '.join(TASKS)} or {', '.join(ALIASES)}")
    return list(dict.fromkeys(out))


@dataclass
class EvalSettings:
    tasks: list[str] = field(default_factory=lambda: ["ppl"])
    n: int = 5  # examples (windows) per task
    split: str = "heldout"
    seed: int = 0
    prefix_tokens: int = 1024  # (a) compressed prefix length
    continuation_tokens: int = 128  # (a) continuation length
    needle_length: int = 1024  # (b) haystack tokens
    depths: tuple[float, ...] = data.synthetic.DEFAULT_DEPTHS
    kv_pairs: int = 16  # (b) key-value pairs per example
    squad_context: str = "paragraph"  # (c) "paragraph" or "article"
    base_ppl_tokens: int = 512  # (d) window length
    max_new_tokens: int | None = None  # default per task (harness.MAX_NEW_TOKENS)


@dataclass
class EvalReport:
    model: str
    fingerprint: str
    methods: list[str]
    settings: EvalSettings
    results: list = field(default_factory=list)
    seconds: float = 0.0
    created: str = ""

    def to_dict(self) -> dict:
        return {"model": self.model, "fingerprint": self.fingerprint, "methods": self.methods,
                "settings": asdict(self.settings), "created": self.created, "seconds": round(self.seconds, 2),
                "results": [harness.result_to_dict(r) for r in self.results]}

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")
        return path

    def summary_rows(self) -> list[tuple[str, str, str]]:
        """(task, method, headline metrics) for printing."""
        rows = []
        for r in self.results:
            if isinstance(r, harness.PPLResult):
                text = (f"ppl full {r.full_ppl:.2f} | compressed {r.compressed_ppl:.2f} | none "
                        f"{r.no_context_ppl:.2f} | gap {r.gap:+.3f}")
            elif isinstance(r, harness.RetrievalResult):
                text = f"accuracy {r.accuracy:.2f}"
            elif isinstance(r, harness.QAResult):
                text = f"EM {r.exact_match:.2f} | F1 {r.f1:.2f} | contains {r.contains:.2f}"
            else:
                text = f"ppl {r.ppl:.2f} over {r.tokens} tokens"
            if getattr(r, "achieved_ratio", None):
                text += f" | achieved {r.achieved_ratio:.1f}x"
            rows.append((r.task, r.method, text))
        return rows

    def plot(self, path: str | Path) -> Path:
        """One panel per task: the headline metric of every method (PPL panels show full/compressed/none)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tasks = list(dict.fromkeys(r.task for r in self.results))
        fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4.6 * max(len(tasks), 1), 3.8), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            rs = [r for r in self.results if r.task == task]
            labels = [r.method for r in rs]
            xs = range(len(rs))
            if task == "ppl":
                ax.bar(xs, [r.compressed_ppl for r in rs], color="tab:blue", label="compressed prefix")
                ax.axhline(rs[0].full_ppl, color="tab:green", ls="--", label=f"full {rs[0].full_ppl:.1f}")
                ax.axhline(rs[0].no_context_ppl, color="tab:red", ls=":", label=f"none {rs[0].no_context_ppl:.1f}")
                ax.set_ylabel("continuation perplexity")
                ax.legend(fontsize=7)
            elif task == "base_ppl":
                ax.bar(xs, [r.ppl for r in rs], color="tab:gray")
                ax.set_ylabel("perplexity (uncompressed)")
            elif isinstance(rs[0], harness.RetrievalResult):
                ax.bar(xs, [r.accuracy for r in rs], color="tab:purple")
                ax.set_ylim(0, 1.05)
                ax.set_ylabel("accuracy")
            else:
                width = 0.27
                for k, (name, color) in enumerate([("exact_match", "tab:blue"), ("f1", "tab:orange"),
                                                   ("contains", "tab:green")]):
                    ax.bar([x + (k - 1) * width for x in xs], [getattr(r, name) for r in rs], width,
                           color=color, label=name)
                ax.set_ylim(0, 1.05)
                ax.legend(fontsize=7)
            n = rs[0].n
            ax.set_title(f"{task} (n={n})")
            ax.set_xticks(list(xs))
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        fig.suptitle(f"kvcat eval: {self.model} ({self.settings.split} split)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _json_default(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def load_task_data(lm: LoadedModel, task: str, s: EvalSettings):
    tok = lm.tokenizer
    if task == "ppl":
        return data.token_windows(tok, s.prefix_tokens, s.continuation_tokens, s.n, s.split, seed=s.seed)
    if task == "base_ppl":
        return data.token_windows(tok, 1, s.base_ppl_tokens - 1, s.n, s.split, seed=s.seed)
    if task == "needle":
        return data.needle(tok, n=s.n, length=s.needle_length, depths=tuple(s.depths), split=s.split, seed=s.seed)
    if task == "kv":
        return data.kv_retrieval(s.n, num_pairs=s.kv_pairs, split=s.split, seed=s.seed)
    if task == "hotpotqa":
        return data.hotpotqa(split=s.split, n=s.n, seed=s.seed)
    if task == "squad":
        return data.squad(split=s.split, n=s.n, seed=s.seed, context=s.squad_context)
    raise EvalError(f"unknown task {task!r}")


def run_eval(lm: LoadedModel, compressors: list[NamedCompressor], settings: EvalSettings,
             progress: bool = True, log=None) -> EvalReport:
    """Every task of `settings` for every compressor, in one report."""
    start = time.perf_counter()
    tasks = expand_tasks(settings.tasks)
    report = EvalReport(model=lm.spec.name, fingerprint=lm.spec.fingerprint,
                        methods=[c.label for c in compressors], settings=settings,
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    for task in tasks:
        if log:
            log(f"task {task}: loading data")
        items = load_task_data(lm, task, settings)
        if task == "ppl":
            report.results += harness.ppl_gap(lm, compressors, items, progress)
        elif task == "base_ppl":
            report.results.append(harness.base_ppl(lm, items, progress))
        elif task in ("needle", "kv"):
            report.results += harness.retrieval(lm, compressors, items, progress, settings.max_new_tokens)
        else:
            report.results += harness.qa(lm, compressors, items, progress, settings.max_new_tokens)
    report.seconds = time.perf_counter() - start
    return report
