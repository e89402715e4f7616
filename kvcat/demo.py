"""`kvcat demo`: compact one long document and answer questions over the compacted cache.

The default goes through `kvcat serve`, `/v1/compact` and the official openai client
(`kvcat.server.demo`); `--offline` runs entirely in transformers (the reference path).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import typer

from kvcat.console import config_command, console, option
from kvcat.defaults import DEFAULT_METHOD, DEFAULT_MODEL


@dataclass(frozen=True)
class DemoConfig:
    """Serve a model, compact a long document through /v1/compact, answer questions over it."""

    model: str = option(DEFAULT_MODEL, help="zoo name or HF folder")
    method: str = option(DEFAULT_METHOD, help="compaction method")
    ratio: float = option(10.0, help="compaction ratio N/t")
    context_tokens: int = option(4000, help="length of the document (essays with one planted fact)")
    dtype: str = option("auto", help="the served engine's dtype: auto picks bfloat16 on a GPU or a CPU with AMX, "
                                     "float32 elsewhere (the offline demo runs float32)")
    seed: int = option(0, help="which document and fact")
    offline: bool = option(False, help="transformers only, no server")


def offline_demo(config: DemoConfig = DemoConfig()) -> dict:
    """Compact a needle-in-a-haystack document, then ask for the needle; returns the figures printed."""
    from kvcat.compaction import get_method
    from kvcat.data import needle_example
    from kvcat.inference import CacheSession
    from kvcat.models import load_model
    from kvcat.prompts import context_and_question

    model, method, ratio = config.model, config.method, config.ratio
    lm = load_model(model, dtype="float32")
    example = needle_example(lm.tokenizer, length=config.context_tokens, depth=0.4, seed=config.seed)
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


def run(config: DemoConfig) -> None:
    if config.offline:
        offline_demo(config)
        return
    from kvcat.server.demo import served_demo

    served_demo(config)


def register(app: typer.Typer) -> None:
    app.command("demo")(config_command(DemoConfig, run))
