"""`kvcat eval`: run the evaluation harness for compaction methods; JSON report plus PNG plot."""

from __future__ import annotations

from pathlib import Path

import typer

from kvcat.defaults import DEFAULT_MODEL
from kvcat.eval.runner import EvalSettings

_DEFAULTS = EvalSettings()  # the one source of the task options' defaults


def register(app) -> None:
    app.command("eval")(eval_command)


def eval_command(
    model: str = typer.Option(DEFAULT_MODEL, help="zoo name or local HF folder"),
    method: list[str] = typer.Option(["full"], "--method", "-m",
                                     help="compaction method (repeatable); built-ins: full, none"),
    ratio: list[float] = typer.Option([], "--ratio", "-r", help="compression ratio N/t (repeatable)"),
    task: list[str] = typer.Option(list(_DEFAULTS.tasks), "--task", "-t",
                                   help="ppl, needle, kv, hotpotqa, squad, base_ppl (repeatable); "
                                        "aliases: retrieval, qa, all"),
    n: int = typer.Option(_DEFAULTS.n, help="examples per task"),
    split: str = typer.Option(_DEFAULTS.split, help="data split: heldout (reported figures), tune (choosing "
                                                    "defaults) or train"),
    seed: int = typer.Option(_DEFAULTS.seed),
    prefix_tokens: int = typer.Option(_DEFAULTS.prefix_tokens, help="ppl: tokens of the compressed prefix"),
    continuation_tokens: int = typer.Option(_DEFAULTS.continuation_tokens,
                                            help="ppl: tokens of the scored continuation"),
    needle_length: int = typer.Option(_DEFAULTS.needle_length, help="needle: haystack length in tokens"),
    depth: list[float] = typer.Option([], "--depth", help="needle: depths in [0, 1] (repeatable; default "
                                      + ", ".join(f"{d:g}" for d in _DEFAULTS.depths) + ")"),
    kv_pairs: int = typer.Option(_DEFAULTS.kv_pairs, help="kv: key-value pairs per example"),
    squad_context: str = typer.Option(_DEFAULTS.squad_context, help="squad: 'paragraph' or 'article' contexts"),
    base_ppl_tokens: int = typer.Option(_DEFAULTS.base_ppl_tokens, help="base_ppl: window length in tokens"),
    max_new_tokens: int | None = typer.Option(_DEFAULTS.max_new_tokens, help="answer length (default per task)"),
    baselines: bool = typer.Option(True, help="also evaluate the full and none baselines"),
    out: Path = typer.Option(Path("kvcat-eval.json"), help="JSON report path"),
    plot: Path | None = typer.Option(None, help="PNG plot path (default: the JSON path with .png)"),
    dtype: str = typer.Option("float32"),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when present)"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Evaluate methods on compressed-prefix PPL, retrieval and QA (plus base PPL); write JSON and a plot."""
    from rich.console import Console
    from rich.table import Table

    from kvcat.console import fail
    from kvcat.data import DataError
    from kvcat.eval.compressors import EvalError, resolve_all
    from kvcat.eval.runner import expand_tasks, run_eval
    from kvcat.inference import ContextTooLongError
    from kvcat.models import ModelError, load_model

    console = Console(stderr=True)
    if split not in ("train", "tune", "heldout"):
        fail(f"unknown split {split!r}; choose heldout, tune or train")
    if n < 1:
        fail("--n must be at least 1")
    if any(not 0 <= d <= 1 for d in depth):
        fail("--depth values must be within [0, 1]")
    try:
        tasks = expand_tasks(task)
        compressors = resolve_all(method, ratio or None, baselines)
    except EvalError as exc:
        fail(str(exc))
    try:
        lm = load_model(model, dtype=dtype, device=device)
    except ModelError as exc:
        fail(str(exc))
    settings = EvalSettings(tasks=tasks, n=n, split=split, seed=seed, prefix_tokens=prefix_tokens,
                            continuation_tokens=continuation_tokens, needle_length=needle_length,
                            depths=tuple(depth) or _DEFAULTS.depths, kv_pairs=kv_pairs, squad_context=squad_context,
                            base_ppl_tokens=base_ppl_tokens, max_new_tokens=max_new_tokens)
    console.print(f"evaluating {', '.join(c.label for c in compressors)} on {', '.join(tasks)} "
                  f"({lm.spec.name}, n={n}, {split} split)")
    try:
        report = run_eval(lm, compressors, settings, progress=progress, log=console.print)
    except (DataError, EvalError, ContextTooLongError, ValueError) as exc:
        fail(str(exc))
    json_path = report.save_json(out)
    png_path = report.plot(plot or out.with_suffix(".png"))
    table = Table("task", "method", "result")
    for row in report.summary_rows():
        table.add_row(*row)
    Console().print(table)
    console.print(f"wrote {json_path} and {png_path} ({report.seconds:.0f} s)")
