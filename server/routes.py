"""The HTTP routes: thin, typed (`response_model`), each one call into `Serving`.

Probes and metrics are open unless the API-key file protects them; every /v1 route resolves the caller's
tenant from its API key first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from kvcat.server import metrics
from kvcat.server.auth import Auth
from kvcat.server.errors import ApiError
from kvcat.server.protocol import (ChatCompletionRequest, CompactRequest, CompletionRequest, DetokenizeRequest,
                                   SamplingRequest, TokenizeRequest)
from kvcat.server.responses import (ChatCompletionResponse, CompactionJob, CompletionResponse, DetokenizeResponse,
                                    KvContext, KvContextDeleted, KvContextList, ModelList, Ready, TokenizeResponse,
                                    Version)
from kvcat.server.serving import Serving

log = logging.getLogger("kvcat.server")


@dataclass
class AppState:
    """What the routes see: the serving objects once started, or why the start failed."""

    serving: Serving | None = None
    error: str | None = None  # why the start failed, or why the engine died
    engine_dead: bool = False
    on_engine_death: Callable[[], None] | None = None  # what the process does then (`kvcat serve`: exit 3)
    started: int = field(default_factory=lambda: int(time.time()))
    dtypes: dict = field(default_factory=dict)  # 'engine' / 'compaction' -> kvcat.config.DtypeChoice

    def live(self) -> Serving:
        s = self.serving
        if self.engine_dead:
            raise ApiError(503, f"the engine died ({self.error}); the server is stopping", "service_unavailable",
                           code="engine_dead")
        if s is None or not s.ready:
            raise ApiError(503, "the server is starting (engine loading or self-test running)",
                           "service_unavailable", code="not_ready")
        if s.closing:
            raise ApiError(503, "the server is shutting down", "service_unavailable", code="shutting_down")
        return s


    async def check_engine(self) -> bool:
        """Ask the engine whether it can serve; the first failure marks it dead for good."""
        if self.engine_dead:
            return False
        try:
            await self.serving.engine.check_health()
            return True
        except Exception as exc:  # noqa: BLE001  (vLLM's EngineDeadError, or whatever the engine raises)
            if not self.engine_dead:
                self.engine_dead, self.error = True, f"{type(exc).__name__}: {exc}"
                log.error("the engine is dead: %s", self.error)
            return False


@asynccontextmanager
async def watch_disconnect(request: Request):
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


STREAMED = {200: {"content": {"text/event-stream": {}},
                  "description": "the completion, or with \"stream\": true its server-sent events"}}


async def _generate(serve: Callable[..., Awaitable[tuple[BaseModel | AsyncIterator[str], dict[str, str]]]],
                    req: SamplingRequest, who: str, request: Request, response: Response):
    """A chat or text completion as the route returns it: `serve(req, who, cancel)` run while the client is
    watched, then its response model with kvcat's headers, or its server-sent events."""
    async with watch_disconnect(request) as cancel:
        result, headers = await serve(req, who, cancel)
    if isinstance(result, BaseModel):
        response.headers.update(headers)
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers=headers)


def router(state: AppState, auth: Auth) -> APIRouter:
    api = APIRouter()

    def tenant(authorization: str | None = Header(None, include_in_schema=False)) -> str:
        found = auth.tenant_of(authorization)
        if found is None:
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           "invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return found

    metrics_deps = [Depends(tenant)] if auth.protect_metrics else []
    health_deps = [Depends(tenant)] if auth.protect_health else []

    # ---- probes and metrics ------------------------------------------------------------------------------
    @api.get("/health", dependencies=health_deps,
             responses={503: {"description": "the engine died (the process then exits)"}})
    async def health() -> dict[str, str]:
        """Liveness: the process answers and its engine (once started) can serve."""
        if state.engine_dead or (state.serving is not None and not await state.check_engine()):
            return JSONResponse({"status": "engine_dead", "error": state.error}, 503)
        return {"status": "ok"}

    @api.get("/ready", dependencies=health_deps, response_model=Ready,
             responses={503: {"description": "starting, failed to start, or shutting down"}})
    async def ready():
        s = state.serving
        if s is not None and s.ready and not s.closing and await state.check_engine():
            return Ready(status="ready", model=s.model.name, beta=s.beta)
        return JSONResponse({"status": "failed" if state.error else "starting", "error": state.error}, 503)

    @api.get("/metrics", dependencies=metrics_deps, include_in_schema=False)  # Prometheus text format
    async def prometheus():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    # ---- API -------------------------------------------------------------------------------------------
    @api.get("/v1/models", response_model=ModelList)
    async def models(who: str = Depends(tenant)):
        engine = state.dtypes.get("engine")
        return ModelList(data=state.live().model_cards(state.started, engine.dtype if engine else None))

    @api.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_unset=True,
              responses=STREAMED)
    async def completions(req: CompletionRequest, request: Request, response: Response, who: str = Depends(tenant)):
        return await _generate(state.live().completion.complete, req, who, request, response)

    @api.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(req: TokenizeRequest, who: str = Depends(tenant)):
        return state.live().model.tokenize(req)

    @api.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(req: DetokenizeRequest, who: str = Depends(tenant)):
        return state.live().model.detokenize(req)

    @api.get("/version", response_model=Version)
    async def version():
        from importlib.metadata import version as installed

        from kvcat.server.vllm_adapter import PINNED_VLLM

        return Version(version=installed("kvcat"), vllm_version=PINNED_VLLM,
                       dtypes={k: c.as_dict() for k, c in state.dtypes.items()})

    @api.post("/v1/compact", response_model=KvContext | CompactionJob, response_model_exclude_unset=True,
              responses={202: {"model": CompactionJob, "description": "accepted as a job (\"async\": true)"}})
    async def compact(req: CompactRequest, request: Request, response: Response, who: str = Depends(tenant)):
        compaction = state.live().compaction
        if req.run_async:
            job = compaction.submit_job(req, who)
            response.status_code = 202
            response.headers["Location"] = f"/v1/compact/jobs/{job.id}"
            return job.public()
        async with watch_disconnect(request) as cancel:
            return await compaction.compact(req, who, cancel)

    @api.get("/v1/compact/jobs/{job_id}", response_model=CompactionJob)
    async def job(job_id: str, who: str = Depends(tenant)):
        return state.live().compaction.get_job(job_id, who).public()

    @api.get("/v1/contexts", response_model=KvContextList)
    async def contexts(who: str = Depends(tenant)):
        return KvContextList(data=state.live().contexts.list(who))

    @api.get("/v1/contexts/{context_id}", response_model=KvContext)
    async def context(context_id: str, who: str = Depends(tenant)):
        return KvContext(**state.live().contexts.get(context_id, who).public())

    @api.delete("/v1/contexts/{context_id}", response_model=KvContextDeleted)
    async def delete_context(context_id: str, who: str = Depends(tenant)):
        return state.live().contexts.delete(context_id, who)

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, response_model_exclude_unset=True,
              responses=STREAMED)
    async def chat(req: ChatCompletionRequest, request: Request, response: Response, who: str = Depends(tenant)):
        return await _generate(state.live().chat.chat, req, who, request, response)

    return api
