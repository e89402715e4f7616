"""`kvcat serve` (and `kvcat bench serve`): the HTTP server over vLLM with compacted contexts."""

from __future__ import annotations

import os

import typer


def serve(model: str = typer.Option(..., "--model", "-m", help="zoo name or HF folder (KV-CAT checkpoints too)"),
          host: str = typer.Option("127.0.0.1", help="bind address"),
          port: int = typer.Option(8000, help="port"),
          beta: bool = typer.Option(True, "--beta/--no-beta",
                                    help="honour beta in attention (kvcat backend) or use stock kernels"),
          dtype: str = typer.Option("auto", help="engine dtype: auto, float32, bfloat16, float16"),
          max_model_len: int = typer.Option(None, help="the engine's max tokens per request (slots + prompt)"),
          tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "--tp",
                                                   help="vLLM tensor parallelism (GPUs)"),
          kv_cache_gib: float = typer.Option(None, help="CPU: GiB of paged KV memory (VLLM_CPU_KVCACHE_SPACE)"),
          store_dir: str = typer.Option(None, help="where compacted contexts are kept (default: a temp folder)"),
          served_name: str = typer.Option(None, help="model id reported by /v1/models"),
          self_test: bool = typer.Option(True, "--self-test/--no-self-test", help="end-to-end check at start"),
          auto_compact_threshold: int = typer.Option(
              None, help="on-the-fly compaction: compact chat prompts longer than this many tokens (default off)"),
          auto_compact_ratio: float = typer.Option(10.0, help="on-the-fly compaction ratio"),
          auto_compact_method: str = typer.Option("am-hak", help="on-the-fly compaction method"),
          auto_compact_keep_turns: int = typer.Option(1, help="recent user turns kept uncompressed"),
          log_level: str = typer.Option("info", help="uvicorn log level")) -> None:
    """Serve MODEL: POST /v1/compact, /v1/contexts, OpenAI /v1/chat/completions with kv_context, /metrics."""
    import uvicorn

    from kvcat.models import ModelError, resolve
    from kvcat.server.app import ServerConfig, create_app
    from kvcat.server.onthefly import AutoCompaction

    try:
        resolve(model)
    except ModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = ServerConfig(model=model, dtype=dtype, max_model_len=max_model_len,
                          tensor_parallel_size=tensor_parallel_size, beta=beta, kv_cache_gib=kv_cache_gib,
                          store_dir=store_dir, self_test=self_test, served_name=served_name,
                          auto=AutoCompaction(auto_compact_threshold, auto_compact_ratio, auto_compact_method,
                                              auto_compact_keep_turns))
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=60)


def bench_serve(model: str = typer.Option("smollm2-135m", help="zoo name or HF folder"),
                doc_tokens: int = typer.Option(8000, help="document length in tokens"),
                ratios: str = typer.Option("10,32", help="compaction ratios, comma-separated"),
                method: str = typer.Option("am-hak", help="compaction method"),
                dtype: str = typer.Option("bfloat16", help="engine dtype"),
                docs: int = typer.Option(3, help="held-out documents"),
                budget_gib: float = typer.Option(1.0, help="the fixed KV budget for contexts_in_budget"),
                out: str = typer.Option("benchmarks/results/serve.json", help="JSON output (PNG beside it)")) -> None:
    """TTFT, decode speed, KV bytes and contexts per KV budget: compacted vs full-context chat."""
    from kvcat.bench import load_script

    load_script("serve").run(model=model, doc_tokens=doc_tokens, ratios=[float(r) for r in ratios.split(",")],
                             method=method, dtype=dtype, docs=docs, budget_gib=budget_gib, out=out)


def bench_onthefly(model: str = typer.Option("smollm2-135m", help="zoo name or HF folder"),
                   ratio: float = typer.Option(10.0, help="compaction ratio"),
                   method: str = typer.Option("am-hak", help="compaction method"),
                   doc_tokens: int = typer.Option(8000, help="document length of the session"),
                   turns: int = typer.Option(20, help="turns of the session"),
                   threshold: int = typer.Option(1024, help="on-the-fly compaction threshold (tokens)"),
                   quality_tokens: int = typer.Option(4096, help="prefix length of the quality comparison"),
                   windows: int = typer.Option(4, help="held-out windows of the quality comparison"),
                   needles: int = typer.Option(4, help="needles of the quality comparison"),
                   out: str = typer.Option("benchmarks/results/onthefly.json", help="JSON output (PNG beside it)"),
                   ) -> None:
    """A multi-turn session with on-the-fly compaction vs full context, and incremental vs from-scratch."""
    from kvcat.bench import load_script

    load_script("onthefly").run(model=model, ratio=ratio, method=method, doc_tokens=doc_tokens, turns=turns,
                                threshold=threshold, quality_tokens=quality_tokens, windows=windows,
                                needles=needles, out=out)


def register(app, bench) -> None:
    app.command("serve")(serve)
    bench.command("serve")(bench_serve)
    bench.command("onthefly")(bench_onthefly)
