"""The one `kvcat` command line: models, compact, eval, bench, serve, train, demo.

Each package contributes its own commands through a `register(app, bench)` function in its `cli` module,
so this file only wires them together and heavy imports (vLLM, training) happen inside the commands.
"""

from __future__ import annotations

import typer
from rich.table import Table

from kvcat import models as zoo
from kvcat.console import console, fail

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="kvcat: KV-cache compaction (Attention Matching) served on vLLM.")
models_app = typer.Typer(no_args_is_help=True, help="Prepare and list local models (no hub downloads).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: JSON and PNG under benchmarks/results/.")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")


@models_app.command("prepare")
def models_prepare(names: list[str] = typer.Argument(..., help=f"zoo names: {', '.join(zoo.ZOO)}"),
                   force: bool = typer.Option(False, help="rebuild even if already prepared")) -> None:
    """Build zoo models as standard HF folders under $KVCAT_HOME/models."""
    for name in names:
        try:
            path = zoo.prepare(name, force=force, log=console.print)
        except zoo.ModelError as exc:
            fail(str(exc))
        console.print(f"{name}: ready at {path} (fingerprint {zoo.fingerprint(path)})")


@models_app.command("list")
def models_list() -> None:
    """Show the zoo and which models are prepared."""
    table = Table("name", "prepared", "description", "path")
    for name, entry in zoo.ZOO.items():
        ready = zoo.is_prepared(name)
        table.add_row(name, "yes" if ready else "no", entry.description,
                      str(zoo.model_path(name)) if ready else "")
    console.print(table)


@bench_app.command("readme")
def bench_readme() -> None:
    """Copy the latest benchmark tables (benchmarks/results/*.md) into the marked sections of README.md and
    benchmarks/README.md."""
    from kvcat.bench import update_readmes

    names = update_readmes()
    console.print(f"README tables updated: {', '.join(names) or 'none (no results yet)'}")


def _register_packages() -> None:
    from kvcat.compaction import cli as compaction_cli
    from kvcat.eval import cli as eval_cli
    from kvcat.server import cli as server_cli
    from kvcat.training import cli as training_cli
    from kvcat import dashboard, demo

    for module in (eval_cli, compaction_cli, server_cli, training_cli, demo, dashboard):
        module.register(app, bench_app)


def main() -> None:
    _register_packages()
    app()


if __name__ == "__main__":
    main()
