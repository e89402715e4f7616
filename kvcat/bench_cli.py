"""`kvcat bench`: one command per benchmark, its options the fields of the benchmark's config dataclass.

The benchmarks register themselves here, in one table (BENCHMARKS), so that the packages they measure
(compaction, server, training) know nothing of them. Each benchmark is loaded while the command line is built
(its config gives the options), which is why benchmark scripts import only light modules at their top.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import typer


def _flag(name: str, help: str) -> inspect.Parameter:
    """A --NAME/--no-NAME option of a benchmark's `run` that is not one of its settings."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                             default=typer.Option(False, help=help))


RESUME = _flag("resume", "continue an interrupted run of the same command (same settings and code; its records "
                         "are in OUT's .partial.json)")


@dataclass(frozen=True)
class Benchmark:
    """How `kvcat bench NAME` runs benchmarks/<script>: `run(config, **options)` with `config` its config
    dataclass; BenchError and `errors` end in a one-line error instead of a traceback."""

    script: str
    config: str
    options: tuple[inspect.Parameter, ...] = ()
    errors: tuple[type[Exception], ...] = ()


# in the order of `kvcat bench --help`
BENCHMARKS = {
    "compaction": Benchmark("compaction", "CompactionConfig", (RESUME,)),
    "retrieval": Benchmark("retrieval", "RetrievalConfig", (RESUME,), errors=(ValueError,)),
    "peers": Benchmark("peers", "PeersConfig", (RESUME,)),
    "serve": Benchmark("serve", "ServeConfig"),
    "onthefly": Benchmark("onthefly", "OnTheFlyConfig", errors=(ValueError,)),
    "load": Benchmark("load", "LoadConfig", errors=(ValueError,)),
    "kvcat": Benchmark("kvcat_training", "KVCatTrainingConfig", errors=(ValueError,), options=(
        _flag("smoke", "a tiny configuration that checks the pipeline in minutes (it sets only the options left at "
                       "their default)"),
        _flag("resume", "continue an interrupted run (finished and interrupted training is always reused)"),
        inspect.Parameter("stop_after", inspect.Parameter.KEYWORD_ONLY, annotation=float, default=typer.Option(
            0.0, help="minutes: stop at the first checkpoint after this long (0: run to the end); --resume "
                      "continues")))),
}


def bench_command(benchmark: Benchmark):
    """The command of one benchmark (`kvcat.console.config_command` over its config dataclass); outside a source
    checkout, a command that says the benchmarks are not there."""
    from kvcat.bench import BenchError, load_script
    from kvcat.console import config_command, fail

    try:
        module = load_script(benchmark.script)
    except FileNotFoundError as exc:  # an installed kvcat without the checkout: say so when asked to run
        message = str(exc)

        def unavailable() -> None:
            fail(message)

        unavailable.__doc__ = message
        return unavailable

    def start(cfg, **options):
        try:
            return module.run(cfg, **options)
        except (BenchError, *benchmark.errors) as exc:
            fail(str(exc))

    return config_command(getattr(module, benchmark.config), start, doc=module.run.__doc__,
                          **{p.name: p for p in benchmark.options})


def bench_readme() -> None:
    """Copy the latest benchmark tables (benchmarks/results/*.md) into the marked sections of README.md and
    benchmarks/README.md."""
    from kvcat.bench import update_readmes
    from kvcat.console import console

    names = update_readmes()
    console.print(f"README tables updated: {', '.join(names) or 'none (no results yet)'}")


def register(bench: typer.Typer) -> None:
    """Every `kvcat bench` command: `readme`, then one per benchmark."""
    bench.command("readme")(bench_readme)
    for name, benchmark in BENCHMARKS.items():
        bench.command(name)(bench_command(benchmark))
