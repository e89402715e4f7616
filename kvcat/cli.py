"""The one `kvcat` command line: models, compact, eval, bench, serve, train, demo, dashboard.

Each package contributes its own commands through a `register(app)` function in its `cli` module, and the
benchmarks theirs through kvcat.bench_cli, so this file only wires them together and heavy imports (vLLM,
training) happen inside the commands.
`kvcat dashboard` is the exception: its tooling lives in the checkout's deploy/tools/, not in the package,
so only its command line is here and each command loads the tooling by path when it runs.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from kvcat import models as zoo
from kvcat.console import console, fail

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="kvcat: KV-cache compaction (Attention Matching) served on vLLM.")
models_app = typer.Typer(no_args_is_help=True, help="Prepare and list local models (no hub downloads).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: JSON and PNG under benchmarks/results/.")
dashboard_app = typer.Typer(no_args_is_help=True, help="Grafana dashboard and Prometheus rules as code "
                            "(deploy/tools/, in a source checkout): build the files, check them, preview.")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
app.add_typer(dashboard_app, name="dashboard")


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


@models_app.command("heads")
def models_heads(name: str = typer.Argument(..., help="zoo name or HF folder"),
                 refresh: bool = typer.Option(False, help="measure again instead of reading the stored profile"),
                 top: int = typer.Option(10, help="retrieval heads to show")) -> None:
    """A model's head profile: each KV head's retrieval score on tune cases (measured once, then stored)."""
    from kvcat.compaction import heads

    try:
        lm = zoo.load_model(name, dtype="float32")
    except zoo.ModelError as exc:
        fail(str(exc))
    prof = heads.load_profile(lm, refresh=refresh)
    scores = prof["scores"]
    flat = sorted(((s, layer, h) for layer, row in enumerate(scores) for h, s in enumerate(row)), reverse=True)
    table = Table("rank", "layer", "KV head", "retrieval score")
    for rank, (score, layer, h) in enumerate(flat[:top], 1):
        table.add_row(str(rank), str(layer), str(h), f"{score:.3f}")
    console.print(table)
    console.print(f"median over {len(flat)} KV heads: {flat[len(flat) // 2][0]:.4f}; {prof.get('cases')} tune "
                  f"cases; stored at {heads.STORE.path(lm)}")


def _deploy_tools(module: str):
    """deploy/tools/<module>.py, or a one-line error outside a source checkout (it is not installed)."""
    from kvcat.bench import deploy_tools

    try:
        return deploy_tools(module)
    except FileNotFoundError as exc:
        fail(str(exc))


@dashboard_app.command("build")
def dashboard_build() -> None:
    """Generate the Grafana dashboard JSON (grafana-foundation-sdk) and its Kubernetes ConfigMap, and the
    PrometheusRule from deploy/prometheus/rules/."""
    generate, dashboard = _deploy_tools("generate"), _deploy_tools("dashboard")
    try:
        written = generate.write()
    except ImportError as exc:
        fail(str(exc))
    for path in written:
        console.print(f"wrote {path.relative_to(generate.REPO)}")
    console.print(f"{len(dashboard.PANELS)} panels, {sum(len(p.queries) for p in dashboard.PANELS)} queries")


@dashboard_app.command("check")
def dashboard_check() -> None:
    """Exit non-zero if a committed generated file differs from a fresh build."""
    generate = _deploy_tools("generate")
    try:
        old = generate.stale()
    except ImportError as exc:
        fail(str(exc))
    if old:
        fail(f"stale: {', '.join(str(p.relative_to(generate.REPO)) for p in old)}; run `kvcat dashboard build`",
             code=1)
    console.print("generated deploy files are up to date")


@dashboard_app.command("preview")
def dashboard_preview(prometheus: str = typer.Option(..., "--prometheus", help="Prometheus URL, e.g. "
                                                     "http://127.0.0.1:9090"),
                      out: Path = typer.Option(Path("dashboard.png"), "--out", help="PNG to write"),
                      minutes: float = typer.Option(30.0, help="time range, minutes back from now"),
                      model: str = typer.Option(".*", help="model filter (regex)"),
                      method: str = typer.Option(".*", help="method filter (regex)")) -> None:
    """Render the dashboard's panels from a live Prometheus into one PNG (no Grafana needed)."""
    if minutes <= 0:
        fail("--minutes must be positive")
    preview = _deploy_tools("preview")
    try:
        path = preview.preview(prometheus, out, minutes=minutes, model=model, method=method)
    except preview.PrometheusError as exc:
        fail(str(exc))
    console.print(f"wrote {path}")


def _register_packages() -> None:
    from kvcat import bench_cli, demo
    from kvcat.compaction import cli as compaction_cli
    from kvcat.eval import cli as eval_cli
    from kvcat.server import cli as server_cli
    from kvcat.training import cli as training_cli

    bench_cli.register(bench_app)
    for module in (eval_cli, compaction_cli, server_cli, training_cli, demo):
        module.register(app)


def main() -> None:
    _register_packages()
    app()


if __name__ == "__main__":
    main()
