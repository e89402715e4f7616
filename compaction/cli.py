"""`kvcat compact FILE --model M --ratio 10 --method am-hak --out doc.kvc`."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from kvcat.defaults import DEFAULT_METHOD, DEFAULT_MODEL


def register(app: typer.Typer) -> None:
    @app.command("compact")
    def compact(
        file: Path = typer.Argument(..., help="a UTF-8 text file: the document to compact"),
        model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="zoo name or HF folder"),
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

        from kvcat.compaction import get_method, parse_params, slots_per_head

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
            meth = get_method(method, **parse_params(param))
        except ValueError as exc:
            fail(str(exc))
        try:
            lm = load_model(model, dtype=dtype, device=device)
        except (ModelError, ValueError, RuntimeError) as exc:
            fail(str(exc))
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        try:  # check the budget before the expensive part
            slots_per_head(len(ids), ratio, target_tokens)
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
                      f"({full / max(cache.kv_bytes(), 1):.1f}x smaller, padding and side slots included)")
        console.print(f"{seconds:.2f} s (prefill {cache.info.get('prefill_s', 0):.2f} s, queries "
                      f"{cache.info.get('queries_s', 0):.2f} s, solve {cache.info.get('solve_s', 0):.2f} s)"
                      f" -> {out}")

