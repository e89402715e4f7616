"""`kvcat serve`: the HTTP server over vLLM with compacted contexts."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from kvcat.console import fail
from kvcat.server.config import Limits, ServerConfig
from kvcat.server.onthefly import AutoCompaction

# uvicorn closes idle connections after 5 s, the very idle time after which httpx's pool stops reusing them:
# a request sent on a connection the server is closing at that instant fails (ReadError, or a 502 behind a
# proxy; seen once in 945 requests of the 50-client load test). An idle timeout well above the clients' and
# proxies' (ingress-nginx and ALB: 60 s) leaves closing idle connections to them.
KEEP_ALIVE_S = 75.0


def serve(model: str = typer.Option(..., "--model", "-m", help="zoo name or HF folder (KV-CAT checkpoints too)"),
          host: str = typer.Option("127.0.0.1", help="bind address (loopback only unless API keys are configured)"),
          port: int = typer.Option(8000, help="port"),
          beta: bool = typer.Option(ServerConfig.beta, "--beta/--no-beta",
                                    help="honour beta in attention (kvcat backend) or use stock kernels"),
          dtype: str = typer.Option(ServerConfig.dtype, help="engine dtype: auto (bfloat16 on a GPU or a CPU with "
                                                              "AMX, float32 elsewhere), float32, "
                                                              "bfloat16, float16 (GPU only)"),
          compaction_dtype: str = typer.Option(
              ServerConfig.compaction_dtype, help="dtype compaction runs in: auto (float32), float32, or bfloat16 "
                                                  "(about half the seconds where the CPU has AMX, "
                                                  "slightly less exact)"),
          max_model_len: int = typer.Option(None, help="the engine's max tokens per request (slots + prompt)"),
          tensor_parallel_size: int = typer.Option(ServerConfig.tensor_parallel_size, "--tensor-parallel-size", "--tp",
                                                   help="vLLM tensor parallelism (GPUs)"),
          kv_cache_gib: int = typer.Option(None, min=1, help="CPU: whole GiB of paged KV memory "
                                                             "(VLLM_CPU_KVCACHE_SPACE)"),
          store: str = typer.Option(None, "--store", "--store-dir",
                                    help="context store: a folder, or an fsspec URL shared by replicas "
                                         "(default $KVCAT_HOME/contexts)"),
          served_name: str = typer.Option(None, help="model id reported by /v1/models"),
          self_test: bool = typer.Option(ServerConfig.self_test, "--self-test/--no-self-test",
                                         help="end-to-end check at start"),
          api_keys_file: Path = typer.Option(None, help="JSON/YAML file of API keys per tenant (also "
                                                        "KVCAT_API_KEYS='tenant:key,...')"),
          protect_metrics: bool = typer.Option(None, "--protect-metrics/--open-metrics",
                                               help="/metrics needs an API key (default: the key file's choice, open)"),
          protect_health: bool = typer.Option(None, "--protect-health/--open-health",
                                              help="/health and /ready need an API key (default open)"),
          auto_compact_threshold: int = typer.Option(
              None, help="on-the-fly compaction: compact chat and completion prompts longer than this many tokens "
                    "(default off)"),
          auto_compact_ratio: float = typer.Option(AutoCompaction.ratio, help="on-the-fly compaction ratio"),
          auto_compact_method: str = typer.Option(AutoCompaction.method, help="on-the-fly compaction method"),
          auto_compact_keep_turns: int = typer.Option(AutoCompaction.keep_turns,
                                                     help="chat: recent user turns kept uncompressed"),
          auto_compact_keep_tokens: int = typer.Option(AutoCompaction.keep_tokens,
                                                      help="text completions: last prompt tokens kept uncompressed"),
          auto_compact_max_contexts: int = typer.Option(
              AutoCompaction.max_contexts, help="on-the-fly contexts kept per tenant (least recently used "
                                                "evicted; not counted in the tenant's quota)"),
          max_document_tokens: int = typer.Option(None, help="longest document /v1/compact accepts (default: the "
                                                             "model's context)"),
          max_completion_tokens: int = typer.Option(None, help="largest max_tokens a chat may ask for"),
          max_queued_compactions: int = typer.Option(Limits.max_queued_compactions,
                                                    help="compactions waiting or running; more get 429"),
          request_timeout: float = typer.Option(Limits.request_timeout_s, help="seconds a chat completion may take"),
          keep_alive: float = typer.Option(
              KEEP_ALIVE_S, help="seconds an idle HTTP connection stays open; keep it above the client pools' "
                                 "and load balancers' idle timeouts"),
          compaction_timeout: float = typer.Option(Limits.compaction_timeout_s,
                                                   help="seconds a synchronous compaction may take"),
          compaction_nice: int = typer.Option(Limits.compaction_nice, min=0, max=19,
                                              help="how much nicer (lower priority) compaction runs than chats on "
                                                   "shared CPU cores: 0 = equal shares; 10 = chats first, compactions "
                                                   "wait for idle cores"),
          max_body_bytes: int = typer.Option(ServerConfig.max_body_bytes, help="largest request body"),
          max_contexts_per_tenant: int = typer.Option(None, help="quota: stored contexts per tenant"),
          max_bytes_per_tenant: int = typer.Option(None, help="quota: compacted KV bytes per tenant"),
          engine_arg: list[str] = typer.Option(
              None, "--engine-arg", help="KEY=VALUE passed to vLLM's AsyncEngineArgs (JSON values; repeatable), "
                                         "e.g. gpu_memory_utilization=0.5 or attention_backend=TRITON_ATTN"),
          log_level: str = typer.Option("info", help="uvicorn log level")) -> None:
    """Serve MODEL: POST /v1/compact, /v1/contexts, OpenAI /v1/chat/completions with kv_context, /metrics."""
    import uvicorn

    from kvcat.config import choose_dtype
    from kvcat.models import ModelError, resolve
    from kvcat.server.app import create_app
    from kvcat.server.auth import Auth, AuthConfigError, bind_host

    try:
        resolve(model)
        auth = Auth.load(api_keys_file, protect_metrics=protect_metrics, protect_health=protect_health)
    except (ModelError, AuthConfigError) as exc:
        fail(str(exc))
    host, why = bind_host(host, auth)
    if why:
        typer.echo(f"kvcat: {why}", err=True)
    for name, value in (("max-queued-compactions", max_queued_compactions), ("request-timeout", request_timeout),
                        ("compaction-timeout", compaction_timeout), ("max-body-bytes", max_body_bytes),
                        ("keep-alive", keep_alive)):
        if value <= 0:
            fail(f"--{name} must be positive, got {value}")
    try:
        engine_extra = parse_engine_args(engine_arg or [])
    except ValueError as exc:
        fail(str(exc))
    for flag, requested, purpose in (("dtype", dtype, "engine"), ("compaction-dtype", compaction_dtype, "compaction")):
        try:
            choice = choose_dtype(requested, purpose)
        except ValueError as exc:
            fail(f"--{flag}: {exc}")
        typer.echo(f"kvcat: --{flag} {requested} -> {choice.dtype}: {choice.reason}", err=True)
        if choice.slow:
            typer.echo(f"kvcat: warning: --{flag} {choice.dtype} is the slow dtype on this machine; "
                       f"--{flag} auto picks the fast one", err=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    limits = Limits(max_document_tokens=max_document_tokens, max_completion_tokens=max_completion_tokens,
                    max_queued_compactions=max_queued_compactions, request_timeout_s=request_timeout,
                    compaction_timeout_s=compaction_timeout, compaction_nice=compaction_nice)
    config = ServerConfig(model=model, dtype=dtype, compaction_dtype=compaction_dtype, max_model_len=max_model_len,
                          tensor_parallel_size=tensor_parallel_size, beta=beta, kv_cache_gib=kv_cache_gib,
                          store=store, self_test=self_test, served_name=served_name, auth=auth, limits=limits,
                          max_body_bytes=max_body_bytes, max_contexts_per_tenant=max_contexts_per_tenant,
                          max_bytes_per_tenant=max_bytes_per_tenant, engine_extra=engine_extra,
                          auto=AutoCompaction(threshold_tokens=auto_compact_threshold, ratio=auto_compact_ratio,
                                              method=auto_compact_method, keep_turns=auto_compact_keep_turns,
                                              keep_tokens=auto_compact_keep_tokens,
                                              max_contexts=auto_compact_max_contexts))
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_keep_alive=keep_alive, timeout_graceful_shutdown=60))
    app.state.kvcat.on_engine_death = lambda: setattr(server, "should_exit", True)  # drain, then exit 3 below
    server.run()
    if app.state.kvcat.engine_dead:
        fail(f"the vLLM engine died ({app.state.kvcat.error}); exiting so that the server is restarted", code=3)


def parse_engine_args(items: list[str]) -> dict:
    """`KEY=VALUE` strings to AsyncEngineArgs keywords: dashes in KEY become underscores, VALUE is JSON when it
    parses (numbers, true/false, objects) and a string otherwise."""
    import json

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"--engine-arg takes KEY=VALUE (e.g. gpu_memory_utilization=0.5), got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def register(app) -> None:
    app.command("serve")(serve)
