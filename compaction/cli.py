"""`kvcat compact FILE --model M --ratio 10 --method am-hak --out doc.kvc`, `kvcat bench compaction|peers`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from kvcat.defaults import DEFAULT_METHOD


def _parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param wants key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            params[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.replace("-", "_")] = raw
    return params


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("compact")
    def compact(
        file: Path = typer.Argument(..., help="a UTF-8 text file: the document to compact"),
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="zoo name or HF folder"),
        ratio: float = typer.Option(None, "--ratio", "-r", help="compaction ratio N / t (above 1)"),
        target_tokens: int = typer.Option(None, "--target-tokens", "-t", help="slots per head instead of --ratio"),
        method: str = typer.Option(DEFAULT_METHOD, "--method", help="compaction method (see --list-methods)"),
        param: list[str] = typer.Option([], "--param", "-p", help="method parameter key=value (repeatable)"),
        out: Path = typer.Option(None, "--out", "-o", help="output .kvc file (default: FILE with .kvc)"),
        device: str = typer.Option(None, help="cpu, cuda, ... (default: CUDA when present)"),
        dtype: str = typer.Option("float32", help="model dtype"),
    ) -> None:
        """Compact a document's KV cache and save it as a .kvc file (safetensors + JSON metadata)."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from kvcat.console import console, fail
        from kvcat.models import ModelError, load_model

        from .base import get_method, resolve_budget

        if ratio is None and target_tokens is None:
            ratio = 10.0
        if ratio is not None and target_tokens is not None:
            fail("give --ratio or --target-tokens, not both")
        if not file.is_file():
            fail(f"{file}: no such file")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            fail(f"{file}: not UTF-8 text")
        if not text.strip():
            fail(f"{file} is empty: nothing to compact")
        out = out or file.with_suffix(".kvc")
        if out.exists() and out.is_dir():
            fail(f"{out} is a directory")
        try:
            meth = get_method(method, **_parse_params(param))
        except ValueError as exc:
            fail(str(exc))
        try:
            lm = load_model(model, dtype=dtype, device=device)
        except (ModelError, ValueError, RuntimeError) as exc:
            fail(str(exc))
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        try:  # check the budget before the expensive part
            resolve_budget(len(ids), ratio, target_tokens)
        except ValueError as exc:
            fail(str(exc))
        start = time.perf_counter()
        try:
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                          TextColumn("{task.completed}/{task.total} layers"), TimeElapsedColumn(),
                          console=console, transient=False) as bar:
                task = bar.add_task(f"{method} prefill + queries", total=lm.spec.num_layers)

                def progress(done: int, total: int) -> None:
                    bar.update(task, description=f"{method} layers", completed=done, total=total)

                cache = meth.compact(lm, ids, ratio=ratio, target_tokens=target_tokens, progress=progress)
        except ValueError as exc:  # CompactionError, ContextTooLongError, CacheError
            fail(str(exc))
        seconds = time.perf_counter() - start
        cache.info.update({"source": str(file), "model": lm.spec.name})
        cache.save(out)
        full = lm.spec.kv_bytes_per_token() * cache.num_tokens
        counts = cache.head_counts().float()
        console.print(f"N = {cache.num_tokens} tokens, t = {counts.mean():.1f} slots per head "
                      f"(min {int(counts.min())}, max {int(counts.max())}), ratio {cache.ratio:.1f}x")
        console.print(f"KV bytes (bf16): {full:,} -> {cache.kv_bytes():,} "
                      f"({full / max(cache.kv_bytes(), 1):.1f}x smaller, padding included)")
        console.print(f"{seconds:.2f} s (prefill {cache.info.get('prefill_s', 0):.2f} s, queries "
                      f"{cache.info.get('queries_s', 0):.2f} s, solve {cache.info.get('solve_s', 0):.2f} s)"
                      f" -> {out}")

    @bench.command("compaction")
    def bench_compaction(
        docs: int = typer.Option(20, help="held-out documents"),
        doc_tokens: int = typer.Option(4096, help="tokens of each document prefix"),
        continuation: int = typer.Option(256, help="continuation tokens for the PPL gap"),
        ratios: str = typer.Option("2,4,8,16,32,50", help="comma-separated ratios"),
        methods: str = typer.Option("main", help="comma-separated methods, 'main' (every method but the slow "
                                                 "am-omp and optimize) or 'all'"),
        needles: int = typer.Option(5, help="needle examples (0 to skip)"),
        qa: int = typer.Option(5, help="QA examples (0 to skip)"),
        question_tokens: int = typer.Option(2048, help="length of the needle haystacks and QA articles"),
        model: str = typer.Option("smollm2-135m", help="model"),
        slow_max_slots: int = typer.Option(256, help="run OMP-fast and gradient compaction only up to this many "
                                                     "slots per head (am-omp: half), too slow above on a CPU"),
        out: Path = typer.Option(Path("benchmarks/results/compaction.json"), help="JSON output"),
        memory_ratio: float = typer.Option(8.0, help="ratio of the peak-memory probes (one fresh process per "
                                                     "method; 0 to skip)"),
        resume: bool = typer.Option(False, help="continue an interrupted run of the same command (same settings "
                                                "and code; its records are in OUT's .partial.json)"),
    ) -> None:
        """Compaction quality/speed benchmark -> benchmarks/results/compaction.json + Pareto PNG."""
        from kvcat.bench import ResumeError, load_script
        from kvcat.console import fail

        try:
            load_script("compaction").run(docs=docs, doc_tokens=doc_tokens, continuation=continuation,
                    ratios=[float(r) for r in ratios.split(",")], methods=methods, needles=needles, qa=qa,
                    model=model, out=out, slow_max_slots=slow_max_slots, question_tokens=question_tokens,
                    memory_ratio=memory_ratio, resume=resume)
        except ResumeError as exc:
            fail(str(exc))

    @bench.command("retrieval")
    def bench_retrieval(
        cases: int = typer.Option(42, help="retrieval cases (needle, multi-key, passage question, in turn)"),
        ratios: str = typer.Option("8,16", help="comma-separated ratios"),
        methods: str = typer.Option("am-hak,am-hak-fast,kvzip,snapkv,streaming-llm", help="comma-separated methods"),
        lengths: str = typer.Option("2048,3072", help="document lengths in tokens, comma-separated"),
        split: str = typer.Option("heldout", help="heldout (reported figures) or tune (choosing defaults)"),
        model: str = typer.Option("smollm2-135m", help="model"),
        out: Path = typer.Option(Path("benchmarks/results/retrieval.json"), help="JSON output"),
        resume: bool = typer.Option(False, help="continue an interrupted run of the same command"),
    ) -> None:
        """Do planted facts survive compaction? -> benchmarks/results/retrieval.json + PNG, paired comparisons."""
        from kvcat.bench import ResumeError, load_script
        from kvcat.console import fail

        if split not in ("heldout", "tune"):
            fail(f"--split is heldout or tune, not {split!r}")
        try:
            load_script("retrieval").run(cases=cases, ratios=[float(r) for r in ratios.split(",")], methods=methods,
                                         lengths=[int(x) for x in lengths.split(",")], split=split, model=model,
                                         out=out, resume=resume)
        except (ResumeError, ValueError) as exc:
            fail(str(exc))

    @bench.command("peers")
    def bench_peers(
        docs: int = typer.Option(20, help="held-out PPL windows"),
        doc_tokens: int = typer.Option(4096, help="tokens of each window's prefix"),
        continuation: int = typer.Option(256, help="continuation tokens for the PPL gap"),
        ratios: str = typer.Option("2,4,8,16,32,50", help="comma-separated ratios (1, the full cache, always runs)"),
        methods: str = typer.Option("am-hak,am-omp-fast,snapkv", help="kvcat methods, comma-separated"),
        presses: str = typer.Option("snapkv,expected-attention,kvzip,streaming-llm,tova,knorm,pyramidkv,"
                                    "adakv-expected-attention", help="kvpress presses, comma-separated "
                                    "(adakv-X: press X inside AdaKVPress)"),
        needles: int = typer.Option(5, help="needle examples (0 to skip)"),
        qa: int = typer.Option(5, help="QA examples (0 to skip)"),
        question_tokens: int = typer.Option(2048, help="length of the needle haystacks and QA articles"),
        model: str = typer.Option("smollm2-135m", help="model"),
        slow_max_slots: int = typer.Option(256, help="run OMP-fast only up to this many slots per head"),
        serving_docs: int = typer.Option(1, help="windows served by plain vLLM (full) and kvcat (compacted); 0 skips"),
        serving_ratios: str = typer.Option("10,32", help="compaction ratios of the serving comparison"),
        out: Path = typer.Option(Path("benchmarks/results/peers.json"), help="JSON output"),
    ) -> None:
        """kvcat vs NVIDIA kvpress on the same held-out data, and plain vLLM vs the kvcat server ->
        benchmarks/results/peers.json + Pareto PNG.

        kvpress runs in its own venv (.peers-venv/, made here by scripts/peers_venv.sh on first use)."""
        import subprocess

        from kvcat.bench import REPO, load_script
        from kvcat.console import fail

        setup = REPO / "scripts" / "peers_venv.sh"
        try:
            proc = subprocess.run(["bash", str(setup)], cwd=REPO)
        except OSError as exc:
            fail(f"could not run {setup}: {exc}")
        if proc.returncode != 0:
            fail(f"{setup} failed (exit {proc.returncode}): the kvpress venv .peers-venv/ could not be made; "
                 "it needs Python 3.11 and PyPI to install kvpress (see the output above)")
        load_script("peers").run(docs=docs, doc_tokens=doc_tokens, continuation=continuation,
                                 ratios=[float(r) for r in ratios.split(",")], methods=methods, presses=presses,
                                 needles=needles, qa=qa, question_tokens=question_tokens, model=model, out=out,
                                 slow_max_slots=slow_max_slots, serving_docs=serving_docs,
                                 serving_ratios=[float(r) for r in serving_ratios.split(",")])
