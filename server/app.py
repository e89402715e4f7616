"""The FastAPI app: middleware, error handlers and the start-up of the engine; the routes are in `routes`.

`create_app(ServerConfig(...))` returns an app whose lifespan loads the model for compaction (transformers),
starts the vLLM engine with the kvcat connector, runs the start-up self-test, and drains on shutdown.
`create_app(config, serving)` serves an already built `Serving` instead (the tests' fake engine).
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvcat.server import metrics
from kvcat.server.config import ServerConfig
from kvcat.server.errors import ApiError
from kvcat.server.responses import ErrorResponse, error_body
from kvcat.server.routes import AppState, router
from kvcat.server.serving import Serving

log = logging.getLogger("kvcat.server")
DEATH_GRACE_S = 3.0  # between the engine's death and the process stopping, /health and /ready answer 503

ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "a field this server does not honour", 401: "missing or wrong API key",
    404: "unknown model, context or job (or another tenant's)",
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


def create_app(config: ServerConfig, serving: Serving | None = None) -> FastAPI:
    state = AppState(serving=serving)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = None
        if state.serving is None:
            try:
                engine = await _start(config, state)
            except Exception as exc:
                state.error = f"{type(exc).__name__}: {exc}"
                log.exception("kvcat server failed to start")
                raise
        watchdog = asyncio.create_task(_watch_engine(config, state)) if config.health_check_s else None
        try:
            yield
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if state.serving is not None:
                await state.serving.drain()
            if engine is not None:
                engine.shutdown()

    app = FastAPI(title="kvcat", version="0.1.0", lifespan=lifespan, responses=ERRORS)
    app.state.kvcat = state
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
        if errs and all(e.get("type") == "extra_forbidden" for e in errs):  # a field this server does not honour
            names = ", ".join(".".join(str(x) for x in e["loc"] if x != "body") for e in errs)
            return _error(400, error_body(f"unsupported field(s): {names}; this server does not honour them (they "
                                          "are refused, never ignored)", "invalid_request_error",
                                          "unsupported_field", ".".join(loc)))
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []) if x != 'body') or 'body'}: {e.get('msg')}"
                        for e in errs)
        return _error(422, error_body(msg, "invalid_request_error", 422, ".".join(loc) or None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error")
        metrics.ERRORS.labels("internal").inc()
        return _error(500, error_body(f"internal error: {type(exc).__name__}", "server_error", 500))

    app.include_router(router(state, config.auth))
    return app


async def _watch_engine(config: ServerConfig, state: AppState) -> None:
    """Check the engine every `health_check_s`; when it has died, call `state.on_engine_death` (`kvcat serve`
    stops uvicorn and exits with status 3, so that Docker or Kubernetes restarts it)."""
    while True:
        await asyncio.sleep(config.health_check_s)
        if state.serving is not None and not await state.check_engine():
            log.error("the engine died (%s); stopping in %g s", state.error, DEATH_GRACE_S)
            await asyncio.sleep(DEATH_GRACE_S)  # probes and load balancers see 503 first
            if state.on_engine_death is not None:
                state.on_engine_death()
            return


async def _start(config: ServerConfig, state: AppState):
    """Load the compaction model, start the engine, run the end-to-end self-test; sets `state.serving`."""
    from kvcat.compaction import get_method
    from kvcat.config import kvcat_home
    from kvcat.defaults import DEFAULT_METHOD
    from kvcat.models import load_model
    from kvcat.server.selftest import self_test
    from kvcat.server.store import ContextStore, open_blobs
    from kvcat.server.vllm_adapter.engine import Engine, EngineConfig

    dtypes = config.dtypes()
    state.dtypes = dtypes
    for purpose, choice in dtypes.items():
        log.info("%s dtype %s (asked: %s): %s", purpose, choice.dtype, choice.requested, choice.reason)
    lm = await asyncio.to_thread(load_model, config.model, dtypes["compaction"].dtype)
    for method in {DEFAULT_METHOD, config.auto.method}:  # a head profile is measured now, not in a request
        await asyncio.to_thread(get_method(method).prepare_model, lm)
    name = config.served_name or lm.spec.name
    ecfg = EngineConfig(model=str(lm.spec.path), dtype=dtypes["engine"].dtype, max_model_len=config.max_model_len,
                        tensor_parallel_size=config.tensor_parallel_size, beta=config.beta,
                        kv_cache_gib=config.kv_cache_gib, served_name=name, extra=config.engine_extra)
    location = config.store or str(kvcat_home() / "contexts")
    store = await asyncio.to_thread(ContextStore, open_blobs(location, kvcat_home() / "store-mirror"),
                                    lm.spec.fingerprint, config.max_contexts_per_tenant, config.max_bytes_per_tenant)
    if store.quarantined:
        metrics.QUARANTINED.inc(len(store.quarantined))
    engine = await asyncio.to_thread(Engine.start, ecfg)
    serving = Serving(engine, lm, store, name, beta=config.beta, auto=config.auto, limits=config.limits)
    state.serving = serving
    if config.self_test:
        await self_test(serving)
    serving.ready = True
    log.info("kvcat server ready: model %s, beta %s, store %s (%d contexts, %d quarantined), API keys %s",
             name, config.beta, location, len(store.list()), len(store.quarantined),
             f"for {len(config.auth.tenants)} tenants" if config.auth.enabled else "off")
    return engine
