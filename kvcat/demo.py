"""`kvcat demo`: compact one long document and answer questions over the compacted cache.

The default goes through `kvcat serve`, `/v1/compact` and the official openai client
(`kvcat.server.demo`); `--offline` runs entirely in transformers (the reference path).
"""

from __future__ import annotations

import time

import typer
from rich.console import Console

from kvcat.defaults import DEFAULT_METHOD

console = Console()


def offline_demo(model: str = "smollm2-135m", method: str = DEFAULT_METHOD, ratio: float = 10.0,
                 context_tokens: int = 3000, seed: int = 0) -> dict:
    """Compact a needle-in-a-haystack document, then ask for the needle; returns the figures printed."""
    from kvcat.compaction import get_method
    from kvcat.data import needle_example
    from kvcat.inference import CacheSession
    from kvcat.models import load_model
    from kvcat.prompts import context_and_question

    lm = load_model(model, dtype="float32")
    example = needle_example(lm.tokenizer, length=context_tokens, depth=0.4, seed=seed)
    ctx_ids, q_ids = context_and_question(lm.tokenizer, example.document, example.question)
    console.print(f"[bold]document[/]: {len(ctx_ids)} tokens of Paul Graham essays with a hidden fact")
    start = time.perf_counter()
    cache = get_method(method).compact(lm, ctx_ids, ratio=ratio)
    seconds = time.perf_counter() - start
    full_bytes = len(ctx_ids) * lm.spec.kv_bytes_per_token()
    console.print(f"[bold]compacted[/] with {method} in {seconds:.1f} s: {cache.num_tokens} -> "
                  f"{cache.num_slots} slots per head; KV memory (bf16) {full_bytes / 2**20:.1f} MiB -> "
                  f"{cache.kv_bytes() / 2**20:.2f} MiB ({full_bytes / cache.kv_bytes():.1f}x smaller)")
    answer_ids = CacheSession(lm, cache).generate(q_ids, max_new_tokens=24)
    answer = lm.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
    console.print(f"[bold]question[/]: {example.question}\n[bold]answer[/]:   {answer}\n"
                  f"[bold]expected[/]: {example.answers[0]}")
    return {"tokens": cache.num_tokens, "slots": cache.num_slots, "full_bytes": full_bytes,
            "compact_bytes": cache.kv_bytes(), "seconds": seconds, "answer": answer}


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("demo")
    def demo(model: str = typer.Option("smollm2-135m", help="zoo name or HF folder"),
             method: str = typer.Option(DEFAULT_METHOD, help="compaction method"),
             ratio: float = typer.Option(10.0, help="compaction ratio N/t"),
             offline: bool = typer.Option(False, help="transformers only, no server")) -> None:
        """Serve a model, compact a long document through /v1/compact, answer questions over it."""
        if offline:
            offline_demo(model=model, method=method, ratio=ratio)
            return
        from kvcat.server.demo import served_demo

        served_demo(model=model, method=method, ratio=ratio)
