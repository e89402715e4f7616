"""The FastAPI app: thin routes over `KvcatService`; the vLLM engine runs in the same process.

`create_app(ServerConfig(...))` returns an app whose lifespan loads the model for compaction (transformers),
starts the vLLM engine with the kvcat connector, runs the start-up self-test, and drains on shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvcat.server import metrics
from kvcat.server.auth import Auth
from kvcat.server.onthefly import AutoCompaction
from kvcat.server.protocol import ChatCompletionRequest, CompactRequest, error_body
from kvcat.server.service import ApiError, KvcatService, Limits

log = logging.getLogger("kvcat.server")


@dataclass
class ServerConfig:
    model: str  # zoo name or HF folder
    dtype: str = "auto"  # the engine's dtype
    compaction_dtype: str = "float32"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    beta: bool = True
    kv_cache_gib: int | None = None
    store: str | None = None  # a folder or an fsspec URL; default $KVCAT_HOME/contexts
    self_test: bool = True
    served_name: str | None = None
    auto: AutoCompaction = field(default_factory=AutoCompaction)  # on-the-fly compaction (off by default)
    auth: Auth = field(default_factory=Auth)  # no keys: one tenant, loopback only (see `kvcat serve`)
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = 32 * 2**20
    max_contexts_per_tenant: int | None = None
    max_bytes_per_tenant: int | None = None
    engine_extra: dict = field(default_factory=dict)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error format: every 4xx and 5xx of this server."""

    error: ErrorDetail


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    401: "missing or wrong API key", 404: "unknown model, context or job (or another tenant's)",
    413: "document, prompt or body too large", 422: "invalid request", 429: "queue full or quota exceeded",
    499: "the client went away", 500: "internal error", 503: "starting or shutting down", 504: "timed out",
}.items()}


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes (by Content-Length, or while they stream in)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length and (not length.isdigit() or int(length) > self.limit):
            body = json.dumps(error_body(f"the request body is over {self.limit} bytes", "invalid_request_error",
                                         "body_too_large")).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return None
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(f"the request body is over {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


def _error(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


@asynccontextmanager
async def _watch_disconnect(request: Request):
    """An Event set when the client disconnects while the block runs (the work then stops early)."""
    cancel = threading.Event()

    async def watch():
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(0.25)

    task = asyncio.create_task(watch())
    try:
        yield cancel
    finally:
        task.cancel()


def create_app(config: ServerConfig, service: KvcatService | None = None) -> FastAPI:
    state: dict = {"service": service, "error": None, "started": time.time()}
    auth = config.auth

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = None
        if state["service"] is None:
            try:
                engine = await _start(config, state)
            except Exception as exc:
                state["error"] = f"{type(exc).__name__}: {exc}"
                log.exception("kvcat server failed to start")
                raise
        try:
            yield
        finally:
            svc = state["service"]
            if svc is not None:
                await svc.drain()
            if engine is not None:
                engine.shutdown()

    app = FastAPI(title="kvcat", version="0.1.0", lifespan=lifespan, responses=ERRORS)
    app.state.kvcat = state

    def svc() -> KvcatService:
        s = state["service"]
        if s is None or not s.ready:
            raise ApiError(503, "the server is starting (engine loading or self-test running)",
                           "service_unavailable", code="not_ready")
        if s.closing:
            raise ApiError(503, "the server is shutting down", "service_unavailable", code="shutting_down")
        return s

    def tenant(authorization: str | None = Header(None, include_in_schema=False)) -> str:
        found = auth.tenant_of(authorization)
        if found is None:
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           "invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return found

    open_or_tenant = {"metrics": [Depends(tenant)] if auth.protect_metrics else [],
                      "health": [Depends(tenant)] if auth.protect_health else []}

    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        metrics.ERRORS.labels("body_too_large").inc()
        return _error(413, error_body(str(exc), "invalid_request_error", "body_too_large"))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.ERRORS.labels(str(exc.code)).inc()
        return _error(exc.status, error_body(exc.message, exc.type, exc.code, exc.param), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        metrics.ERRORS.labels(str(exc.status_code)).inc()
        return _error(exc.status_code, error_body(str(exc.detail), "invalid_request_error", exc.status_code),
                      getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        metrics.ERRORS.labels("validation").inc()
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []) if x != 'body') or 'body'}: {e.get('msg')}"
                        for e in errs)
        return _error(422, error_body(msg, "invalid_request_error", 422, ".".join(loc) or None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error")
        metrics.ERRORS.labels("internal").inc()
        return _error(500, error_body(f"internal error: {type(exc).__name__}", "server_error", 500))

    # ---- probes and metrics --------------------------------------------------------------------------
    @app.get("/health", dependencies=open_or_tenant["health"])
    async def health():
        return {"status": "ok"}

    @app.get("/ready", dependencies=open_or_tenant["health"])
    async def ready():
        s = state["service"]
        if s is not None and s.ready and not s.closing:
            return {"status": "ready", "model": s.model_name, "beta": s.beta}
        return _error(503, {"status": "failed" if state["error"] else "starting", "error": state["error"]})

    @app.get("/metrics", dependencies=open_or_tenant["metrics"], include_in_schema=False)  # Prometheus text
    async def prometheus():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    # ---- API ------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(who: str = Depends(tenant)):
        s = svc()
        return {"object": "list", "data": [{"id": m, "object": "model", "created": int(state["started"]),
                                            "owned_by": "kvcat", "max_model_len": s.max_positions,
                                            "kv_block_size": s.engine.block_size,
                                            "kv_bytes_per_token": s.engine.kv_bytes_per_token()}
                                           for m in s.model_ids()]}

    @app.post("/v1/compact")
    async def compact(req: CompactRequest, request: Request, who: str = Depends(tenant)):
        s = svc()
        if req.run_async:
            job = s.submit_job(req, who)
            return JSONResponse(job.public(), status_code=202,
                                headers={"Location": f"/v1/compact/jobs/{job.id}"})
        async with _watch_disconnect(request) as cancel:
            return await s.compact(req, who, cancel)

    @app.get("/v1/compact/jobs/{job_id}")
    async def job(job_id: str, who: str = Depends(tenant)):
        return svc().get_job(job_id, who).public()

    @app.get("/v1/contexts")
    async def contexts(who: str = Depends(tenant)):
        return {"object": "list", "data": [r.public() for r in svc().list_contexts(who)]}

    @app.get("/v1/contexts/{context_id}")
    async def context(context_id: str, who: str = Depends(tenant)):
        return svc().get_context(context_id, who).public()

    @app.delete("/v1/contexts/{context_id}")
    async def delete_context(context_id: str, who: str = Depends(tenant)):
        return svc().delete_context(context_id, who)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request, who: str = Depends(tenant)):
        async with _watch_disconnect(request) as cancel:
            result, headers = await svc().chat(req, who, cancel)
        if isinstance(result, dict):
            return JSONResponse(result, headers=headers)
        return StreamingResponse(result, media_type="text/event-stream", headers=headers)

    return app


async def _start(config: ServerConfig, state: dict):
    """Load the compaction model, start the engine, run the end-to-end self-test; sets state['service']."""
    from kvcat.config import kvcat_home
    from kvcat.models import load_model
    from kvcat.server.store import ContextStore, open_blobs
    from kvcat.server.vllm_adapter.engine import Engine, EngineConfig

    lm = await asyncio.to_thread(load_model, config.model, config.compaction_dtype)
    name = config.served_name or lm.spec.name
    ecfg = EngineConfig(model=str(lm.spec.path), dtype=config.dtype, max_model_len=config.max_model_len,
                        tensor_parallel_size=config.tensor_parallel_size, beta=config.beta,
                        kv_cache_gib=config.kv_cache_gib, served_name=name, extra=config.engine_extra)
    location = config.store or str(kvcat_home() / "contexts")
    store = await asyncio.to_thread(ContextStore, open_blobs(location, kvcat_home() / "store-mirror"),
                                    lm.spec.fingerprint, config.max_contexts_per_tenant, config.max_bytes_per_tenant)
    if store.quarantined:
        metrics.QUARANTINED.inc(len(store.quarantined))
    engine = await asyncio.to_thread(Engine.start, ecfg)
    service = KvcatService(engine, lm, store, name, beta=config.beta, auto=config.auto, limits=config.limits)
    service.auto_policy_check()
    state["service"] = service
    if config.self_test:
        await self_test(service)
    service.ready = True
    log.info("kvcat server ready: model %s, beta %s, store %s (%d contexts, %d quarantined), API keys %s",
             name, config.beta, location, len(store.list()), len(store.quarantined),
             f"for {len(config.auth.tenants)} tenants" if config.auth.enabled else "off")
    return engine


SELF_TEST_TEXT = ("Mira keeps bees on the roof of the old library. Every spring she counts the hives, "
                  "and this year there were seven.")


async def self_test(service: KvcatService, tolerance: float | None = None) -> dict:
    """End to end through the connector: an identity context (every token kept, beta 0) must give the
    same first token and logprob as the same prompt prefilled by the engine. Also warms the engine up."""
    from kvcat.inference import full_cache, prefill
    from kvcat.server import prompting
    from kvcat.server.vllm_adapter.engine import ContextHandle, GenParams

    tok = service.tokenizer
    source = {"text": SELF_TEST_TEXT}
    ctx = prompting.context_ids(tok, source)
    q = prompting.question_ids(tok, source, [{"role": "user", "content": "How many hives?"}])
    cache = await asyncio.to_thread(lambda: full_cache(prefill(service.lm, ctx), service.lm.spec.fingerprint))
    path = Path(service.store.root) / f".selftest-{os.getpid()}.kvc"
    cache.save(path)
    params = GenParams(max_tokens=1, temperature=0.0, logprobs=1)
    try:
        async def first(ids, handle):
            async for chunk in service.engine.generate(ids, params, handle):
                if chunk.token_ids:
                    t = chunk.token_ids[0]
                    return t, chunk.logprobs[0][t]
            raise RuntimeError("no token generated")

        plain = await first(ctx + q, None)
        handle = ContextHandle("selftest", str(path), cache.num_slots, cache.num_tokens,
                               f"kvcat-selftest-{time.time_ns()}")
        injected = await first(q, handle)
    finally:
        path.unlink(missing_ok=True)
    tol = tolerance if tolerance is not None else (1e-3 if service.engine.dtype == "float32" else 0.15)
    diff = abs(plain[1] - injected[1])
    if plain[0] != injected[0] or diff > tol:
        raise RuntimeError(f"kvcat start-up self-test failed: a context injected through the KV connector "
                           f"gave token {injected[0]} (logprob {injected[1]:.5f}) where the engine's own prefill "
                           f"gave {plain[0]} ({plain[1]:.5f}); vLLM's internals may have changed")
    return {"token": plain[0], "logprob_diff": diff}
