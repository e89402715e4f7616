"""What every benchmark shares: its base config, loading its script, provenance of its results, writing them.

Benchmarks live in the repository's `benchmarks/` folder (a script, or a folder of modules, per benchmark; not a
package); `kvcat bench NAME` (kvcat.bench_cli) loads them through `load_script`, and `kvcat dashboard` loads
deploy/tools/ the same way (`deploy_tools`): both exist only in a source checkout, not in the installed
package. Every result JSON carries `provenance()`: the machine, the date, the command line and the git commit
that produced it, and records no absolute path of the machine (`portable`), so committed results do not leak
or depend on one. Module level imports only light modules (the CLI imports this file to build its options); a
benchmark's log and peak memory come from kvcat.bench_process (standard library only: the kvpress runner
borrows it).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import importlib.util
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import ClassVar

from kvcat.console import option
from kvcat.defaults import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"


DEPLOY_TOOLS = REPO / "deploy" / "tools"


def result_file(name: str):
    """The `out` option of a benchmark whose result is benchmarks/results/NAME.json."""
    return option(Path(f"benchmarks/results/{name}.json"), help="JSON output (Markdown and PNG beside it)")


@dataclasses.dataclass
class BenchConfig:
    """The settings every benchmark has, one command-line option each: the model it measures and its result
    file (each benchmark gives `out` its own default with `result_file`). Subclasses add theirs after these."""

    model: str = option(DEFAULT_MODEL, help="zoo name or HF folder")
    out: Path = result_file("bench")


@dataclasses.dataclass
class SampleConfig(BenchConfig):
    """A benchmark over a seeded sample of the evaluation data."""

    seed: int = option(0, help="seed of the data sample")
    # in-process transformers runs compute in float32 on every CPU (bf16 is emulated on most); recorded
    compute_dtype: ClassVar[str] = "float32"


@dataclasses.dataclass
class EngineConfig(BenchConfig):
    """A benchmark that measures a served engine (`kvcat serve` on loopback)."""

    dtype: str = option("auto", help="engine dtype: auto (bfloat16 on a GPU or where the CPU has AMX, float32 "
                                     "elsewhere), float32 or bfloat16")

    def engine_dtype(self) -> dict:
        """The dtype both servers of the run compute in, what was asked and why: recorded in the result."""
        from kvcat.config import choose_dtype

        return choose_dtype(self.dtype, "engine").as_dict()


def load_source(path: Path, name: str) -> ModuleType:
    """Import a file of the checkout by path as module `name`; a folder is imported as a package (from its
    __init__.py), so that its modules can import each other relatively."""
    package = path.is_dir()
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py" if package else path,
                                                  submodule_search_locations=[str(path)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_script(name: str) -> ModuleType:
    """Import benchmarks/<name>.py, or the folder benchmarks/<name>/ as a package, as a module (benchmarks is a
    script folder, not a package), once: benchmarks load each other, and the CLI has loaded them all."""
    path = BENCHMARKS / name
    if not path.is_dir():
        path = path.with_suffix(".py")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such benchmark script (benchmarks run from a source checkout)")
    git_commit()  # the commit this run starts from is the one its results name
    module = sys.modules.get(f"kvcat_benchmark_{name}")
    return module or load_source(path, f"kvcat_benchmark_{name}")


def deploy_tools(module: str) -> ModuleType:
    """deploy/tools/<module>.py (dashboard, generate, preview), loaded once: the dashboard tooling is not part
    of the installed package, and a second load would give its exceptions other classes."""
    if not (DEPLOY_TOOLS / "__init__.py").is_file():
        raise FileNotFoundError(f"{DEPLOY_TOOLS} not found: the deploy tooling runs from a source checkout "
                                "(git clone, then pip install -e .), not from an installed kvcat")
    if "kvcat_deploy_tools" not in sys.modules:
        load_source(DEPLOY_TOOLS, "kvcat_deploy_tools")
    return importlib.import_module(f"kvcat_deploy_tools.{module}")


def cpu_model() -> str:
    """The CPU's model name and the ISA flags vLLM's CPU speed depends on (bf16 / AMX: an order of magnitude)."""
    from kvcat.config import cpu_flags, cpu_info

    name = cpu_info("model name") or platform.processor() or platform.machine()
    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'}{'' if {'avx512_bf16', 'amx_bf16'} & flags else '; no bf16'})"


def machine() -> str:
    import torch

    cpu = f"{cpu_model()}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ({cpu}), torch {torch.__version__}"
    return f"{cpu}, {_mem_gib()} GiB RAM, torch {torch.__version__}"


def _mem_gib() -> int:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (ValueError, OSError):
        return 0


@functools.cache
def git_commit() -> str | None:
    """The checkout's commit, read once: `load_script` reads it when a benchmark starts, so a commit made
    while the benchmark runs is not stamped on its results."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    """machine, date (UTC), command and git commit: recorded in every benchmark result."""
    return {"machine": machine(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": portable(shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])), "git_commit": git_commit()}


def _path_prefixes() -> list[tuple[re.Pattern, str]]:
    """(absolute folder, its portable spelling), longest first: the checkout (relative: "" before a "/", "."
    alone), then $KVCAT_HOME, then the home folder. A folder matches only whole: not /rootfs for /root."""
    from kvcat.config import kvcat_home  # imports torch: not at module level

    home = kvcat_home()
    folders = {str(REPO): ".", str(home): "$KVCAT_HOME", str(home.resolve()): "$KVCAT_HOME", str(Path.home()): "~"}
    out = []
    for folder, short in sorted(folders.items(), key=lambda kv: -len(kv[0])):
        if folder != os.sep:
            out.append((re.compile(rf"(?<![\w.~$/-]){re.escape(folder)}(/|(?![\w.-]))"), short))
    return out


def portable(value, prefixes: list[tuple[re.Pattern, str]] | None = None):
    """`value` (a str, a path, or JSON-like dicts / lists of them) with every absolute path under the checkout
    made relative to it, and those under $KVCAT_HOME or the home folder written `$KVCAT_HOME/...` / `~/...`:
    committed results then name no machine's folders, and their checkout paths hold in any clone."""
    prefixes = _path_prefixes() if prefixes is None else prefixes
    if isinstance(value, dict):
        return {k: portable(v, prefixes) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, prefixes) for v in value]
    if not isinstance(value, (str, os.PathLike)):
        return value
    text = os.fspath(value)
    for pattern, short in prefixes:
        text = pattern.sub(lambda m: ("" if m[1] else ".") if short == "." else short + m[1], text)
    return text


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def code_changed_since(commit: str | None, repo: Path = REPO, paths: tuple[str, ...] = (".",)) -> bool:
    """Whether the checkout's code under `paths` differs from `commit` (results and Markdown aside); True
    when unknown."""
    if not commit:
        return True
    try:
        return subprocess.run(["git", "diff", "--quiet", commit, "--", *paths, ":(exclude)benchmarks/results",
                               ":(exclude)*.md"], cwd=repo, capture_output=True, timeout=30).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return True


class BenchError(Exception):
    """A benchmark that cannot start (a checkpoint it cannot continue, a peer's venv it cannot make): `kvcat
    bench` says why in one line, without a traceback."""


class ResumeError(BenchError, ValueError):
    """A checkpoint that cannot be continued (other settings or other code)."""


class Checkpoint:
    """The per-unit records (documents, questions) of a long benchmark, saved after each unit beside its
    result (NAME.partial.json), so that `resume` continues a run that was interrupted. A run resumes only
    with the same configuration and the code of the commit it started from, whose name its result keeps:
    records of two code versions never mix (`code`: the paths whose code makes the records, everything by
    default). The file is removed once the result is written."""

    def __init__(self, out: str | os.PathLike, config: dict, resume: bool = False, log=print, repo: Path = REPO,
                 code: tuple[str, ...] = (".",)):
        out = Path(out)
        self.path = out.with_name(out.stem + ".partial.json")
        self.data = {"config": config, "git_commit": git_commit(),
                     "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if resume and self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("config") != config:
                changed = sorted(k for k in {**config, **old.get("config", {})}
                                 if config.get(k) != old.get("config", {}).get(k))
                raise ResumeError(f"cannot resume {self.path}: it was started with other settings "
                                 f"({', '.join(changed)}); run without --resume to start over")
            if code_changed_since(old.get("git_commit"), repo, code):
                raise ResumeError(f"cannot resume {self.path}: the code ({', '.join(code)}) differs from commit "
                                 f"{old.get('git_commit')} it was started on; run without --resume to start over")
            self.data = old
            log(f"resuming {self.path}: " + ", ".join(f"{len(v)} {k}" for k, v in old.items() if isinstance(v, list))
                + " done")
        elif resume:
            log(f"nothing to resume ({self.path} does not exist): starting")
        elif self.path.exists():
            log(f"starting over: {self.path} is replaced (--resume continues it)")

    def __getitem__(self, kind: str) -> list:
        return self.data.setdefault(kind, [])

    def add(self, kind: str, record: dict) -> None:
        self[kind].append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path, json.dumps(self.data))

    def provenance(self) -> dict:
        """The commit the run started on and when (a resumed run spans several processes)."""
        return {"git_commit": self.data["git_commit"], "started": self.data["started"]}

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def write_result(result: dict, out: str | os.PathLike, table: str | None = None) -> Path:
    """Write a result JSON atomically (a killed benchmark never leaves half a file), and with `table` its
    Markdown table beside it (.md, headed by the provenance), which the README quotes. Both are `portable`:
    no absolute path of this machine is written into them."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefixes = _path_prefixes()
    result = portable(result, prefixes)
    _atomic_write(out, json.dumps(result, indent=2))
    if table is not None:
        table = portable(table, prefixes)
        head = (f"<!-- written by `{result.get('command')}` on {result.get('date')}, {result.get('machine')}, "
                f"commit {result.get('git_commit')} -->\n\n")
        _atomic_write(out.with_suffix(".md"), head + table + "\n")
    return out


def subplots(*args, **kwargs):
    """matplotlib's subplots on the headless Agg backend: (pyplot, figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return (plt, *plt.subplots(*args, **kwargs))


def save_figure(fig, path: str | os.PathLike, title: str | None = None) -> Path:
    """Title, tight layout, PNG at 110 dpi, close."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def publish(result: dict, out: str | os.PathLike, table, plot, log=print) -> Path:
    """The end of every benchmark: JSON + Markdown table (`write_result`), the plot beside them, the table
    printed."""
    text = table(result)
    out = write_result(result, out, text)
    png = plot(result, out.with_suffix(".png"))
    log(f"wrote {out} and {png}")
    print(text)
    return out


def heldout_suite(tokenizer, docs: int, doc_tokens: int, continuation: int, needles: int, qa: int,
                  question_tokens: int, seed: int = 0):
    """The held-out evaluation data the compaction and peer benchmarks share: PPL windows, and needle and
    SQuAD-article examples with their chat prompts split into (context ids, question ids)."""
    from kvcat import data
    from kvcat.prompts import context_and_question

    windows = data.token_windows(tokenizer, doc_tokens, continuation, docs, split="heldout", seed=seed)
    examples = data.needle(tokenizer, n=needles, length=question_tokens, split="heldout", seed=seed) if needles \
        else []
    if qa:
        examples += data.squad(split="heldout", n=qa, seed=seed, context="article",
                               max_context_chars=question_tokens * 4)
    return windows, examples, [context_and_question(tokenizer, ex.document, ex.question) for ex in examples]


READMES = (REPO / "README.md", BENCHMARKS / "README.md")  # the headline tables, and all of them


def update_readmes(readmes=READMES, results: Path = RESULTS) -> list[str]:
    """`update_readme` on the top-level README and benchmarks/README.md; the names updated in either."""
    return sorted({name for readme in readmes if readme.is_file() for name in update_readme(readme, results)})


def update_readme(readme: Path, results: Path = RESULTS) -> list[str]:
    """Copy each benchmark's latest Markdown table (results/NAME.md) into a README between the markers
    `<!-- table:NAME -->` and `<!-- /table:NAME -->`, its provenance line made visible; a `<!-- table:NAME
    headline -->` marker takes only the provenance, the caption and the first table. Returns the names updated."""
    text = readme.read_text()
    done = []
    for name, headline in re.findall(r"<!-- table:([\w-]+)( headline)? -->", text):
        md = results / f"{name}.md"
        if not md.is_file():
            continue
        body = re.sub(r"^<!-- written by (.*?) -->", r"*Written by \1.*", md.read_text().strip())
        opening = f"<!-- table:{name}{headline} -->"
        block = f"{opening}\n{_first_table(body) if headline else body}\n<!-- /table:{name} -->"
        text = re.sub(rf"{re.escape(opening)}.*?<!-- /table:{name} -->", lambda _: block, text, flags=re.S)
        done.append(name)
    readme.write_text(text)
    return done


def _first_table(body: str) -> str:
    """A table's Markdown up to the end of its first table (the top-level README's headline)."""
    blocks = body.split("\n\n")
    first = next((i for i, b in enumerate(blocks) if b.lstrip().startswith("|")), len(blocks) - 1)
    return "\n\n".join(blocks[:first + 1])


def mean_or_none(values) -> float | None:
    """The mean of the values that are not None, to 4 decimals (a table's cell), or None when none is."""
    values = [v for v in values if v is not None]
    return round(statistics.mean(values), 4) if values else None


def config_record(config) -> dict:
    """A benchmark's config dataclass as its result and Checkpoint record it: tuples as lists and paths as
    strings, so that a resumed run's config equals the one read back from its partial JSON."""
    record = {k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
              for k, v in dataclasses.asdict(config).items()}
    if hasattr(config, "compute_dtype"):
        record["compute_dtype"] = config.compute_dtype
    return record
