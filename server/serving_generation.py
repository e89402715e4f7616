"""What chat and text completions share: a request resolved into engine work (a `Turn`: prompt ids,
`SamplingParams` within the limits, the `ContextTransfer` of its context), generation with cancellation and the
request timeout, collecting or streaming the chunks, usage, and the latency metrics. `serving_chat` and
`serving_completion` add their response formats."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from kvcat.server import metrics
from kvcat.server.config import Limits
from kvcat.server.engine_api import Chunk, ContextTransfer, EngineClient, SamplingParams
from kvcat.server.errors import ApiError, Cancelled, invalid
from kvcat.server.protocol import SamplingRequest
from kvcat.server.responses import ErrorDetail, KvCompactionInfo, PromptTokensDetails, Usage
from kvcat.server.serving_contexts import ContextRegistry
from kvcat.server.serving_models import ServedModel
from kvcat.server.serving_onthefly import OnTheFlyServing, Resolved
from kvcat.server.store import ContextRecord

log = logging.getLogger("kvcat.server")


@dataclass
class Turn:
    """One request, resolved: what the engine runs and what the response reports."""

    req: SamplingRequest
    ids: list[int]  # prompt tokens after the context (all of them without one)
    params: SamplingParams
    context: ContextTransfer | None
    method: str
    id: str  # chatcmpl-... or cmpl-...
    created: int = field(default_factory=lambda: int(time.time()))
    context_id: str | None = None
    version: str | None = None  # of the context's record when the request started
    compaction: KvCompactionInfo | None = None

    @property
    def labels(self) -> tuple[str, str]:
        return self.method, "compacted" if self.context else "full"

    def extra_fields(self) -> dict:
        """kvcat's fields of a response: the context it was generated over, what on-the-fly compaction did."""
        return {k: v for k, v in (("kv_context", self.context_id), ("kv_compaction", self.compaction)) if v}


@dataclass
class Collected:
    """A finished generation, per completion index: text, finish reason, the chunks (for logprobs)."""

    texts: list[str]
    finish: list[str | None]
    chunks: list[list[Chunk]]
    count: int = 0  # generated tokens over all completions
    last: Chunk | None = None


class GenerationServing:
    id_prefix = "cmpl"

    def __init__(self, model: ServedModel, engine: EngineClient, contexts: ContextRegistry,
                 onthefly: OnTheFlyServing, *, limits: Limits):
        self.model, self.engine, self.contexts, self.onthefly = model, engine, contexts, onthefly
        self.limits = limits

    def _context(self, req: SamplingRequest, tenant: str, found: Resolved | None) -> ContextRecord | None:
        """The context a request runs over: the one on-the-fly compaction found or made for it, else the stored one
        it names (`kv_context`), else none; 404 when its file is gone."""
        rec = found.context if found is not None else None
        if rec is None and req.kv_context is not None:
            rec = self.contexts.get(req.kv_context, tenant)
        if rec is not None:
            self.contexts.check_file(rec)
        return rec

    def _on_the_fly(self, turn: Turn, found: Resolved) -> dict[str, str]:
        """Report what on-the-fly compaction did for `turn`: in the response, its headers and the metrics."""
        rec = found.context
        turn.compaction = KvCompactionInfo(**found.info(), uncompressed_tokens=len(turn.ids))
        metrics.ONTHEFLY_REQUESTS.labels(self.model.name, rec.method, found.outcome).inc()
        metrics.ONTHEFLY_BYTES_SAVED.labels(self.model.name, rec.method).inc(rec.kv_bytes_full - rec.kv_bytes_compacted)
        return {"X-Kvcat-Compaction": found.outcome, "X-Kvcat-Context": rec.id}

    # ---- the prompt --------------------------------------------------------------------------------------
    def _turn(self, req: SamplingRequest, ids: list[int], rec: ContextRecord | None, tenant: str) -> Turn:
        """The engine work of a request: its prompt ids (after `rec`'s slots when given), its sampling parameters
        within the room the prompt leaves, and the context transfer."""
        if rec is not None:
            # positions as the reference path counts them (N + question), and the engine's own limit
            # (t slots + question)
            used = rec.num_tokens + len(ids)
            limit = min(self.model.max_positions, used + self.engine.max_model_len - (rec.num_slots + len(ids)))
        else:
            used, limit = len(ids), min(self.model.max_positions, self.engine.max_model_len)
        if used >= limit:
            raise invalid(f"the prompt needs {used} positions but the model's context holds {limit}", "messages",
                          413, "context_length_exceeded")
        salt = prefix_salt(tenant, req.cache_salt) if rec is None else None
        params = req.to_sampling_params(self._max_tokens(req, used, limit), self.model.sampling_defaults, salt)
        if params.logit_bias:
            self.model.check_token_ids(params.logit_bias, "logit_bias")
        return Turn(req, ids, params, self.contexts.transfer(rec) if rec else None, rec.method if rec else "none",
                    f"{self.id_prefix}-{uuid.uuid4().hex[:24]}", context_id=rec.id if rec else None,
                    version=rec.version if rec else None)

    def _max_tokens(self, req: SamplingRequest, used: int, limit: int) -> int:
        """The request's max_tokens, else the room its prompt leaves in the context (as vLLM)."""
        room, cap = limit - used, self.limits.max_completion_tokens
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or min(room, cap or room)
        if cap is not None and max_tokens > cap:
            raise invalid(f"max_tokens {max_tokens} is above this server's limit of {cap}", "max_tokens")
        if max_tokens > room:
            raise invalid(f"the prompt needs {used} positions and max_tokens {max_tokens} more, but the model's "
                          f"context holds {limit}", "max_tokens", 413, "context_length_exceeded")
        if req.min_tokens > max_tokens:
            raise invalid(f"min_tokens {req.min_tokens} exceeds max_tokens {max_tokens}", "min_tokens")
        return max_tokens

    # ---- generation --------------------------------------------------------------------------------------
    async def _generate(self, turn: Turn, start: float, cancel: threading.Event) -> AsyncIterator[Chunk]:
        """The engine's chunks, stopped by `cancel` or the request timeout (counted from the request's arrival,
        time in the engine's queue included); the engine request is aborted and the context released however
        it ends."""
        timeout = self.limits.request_timeout_s
        deadline = None if timeout is None else start + timeout
        labels = (self.model.name, *turn.labels)
        if turn.context:
            self.contexts.acquire(turn.context.context_id)
        in_flight = metrics.CHATS_IN_FLIGHT.labels(self.model.name, turn.labels[1])
        in_flight.inc()
        finished, first = False, True
        stream = aiter(self.engine.generate(turn.ids, turn.params, turn.context, turn.id))
        try:
            while True:
                try:
                    chunk = await _next_or_stop(stream, cancel, deadline, timeout)
                except StopAsyncIteration:
                    break
                if chunk.finish_reason == "error":  # vLLM's request-level failure (a context that cannot load)
                    raise self._engine_failure(turn)
                if first and chunk.token_ids:
                    first = False
                    metrics.TTFT_SECONDS.labels(*labels).observe(time.perf_counter() - start)
                yield chunk
            finished = True
            metrics.E2E_SECONDS.labels(*labels).observe(time.perf_counter() - start)
            metrics.REQUESTS.labels(*labels).inc()
        finally:
            if not finished:
                await stream.aclose()
                try:
                    await self.engine.abort(turn.id)
                except Exception:  # noqa: BLE001  (the request may be gone already)
                    pass
            in_flight.dec()
            if turn.context:
                self.contexts.release(turn.context.context_id)

    def _engine_failure(self, turn: Turn) -> ApiError:
        if turn.context is not None:
            return self.contexts.load_failure(turn.context.context_id, turn.version)
        return ApiError(500, "the engine failed this request", "server_error", code="engine_error")

    async def _collect(self, turn: Turn, chunks: AsyncIterator[Chunk], cancel: threading.Event) -> Collected:
        """Every chunk of a non-streamed request; a cancellation or timeout becomes 499 / 504."""
        n = turn.params.n
        out = Collected([""] * n, [None] * n, [[] for _ in range(n)])
        try:
            async for chunk in chunks:
                out.texts[chunk.index] += chunk.text
                out.finish[chunk.index] = chunk.finish_reason or out.finish[chunk.index]
                out.chunks[chunk.index].append(chunk)
                out.count, out.last = out.count + len(chunk.token_ids), chunk
        except Cancelled as exc:  # counted once, by the error handler, under its code
            raise ApiError(499 if cancel.is_set() else 504, f"generation stopped: {exc}", "timeout_error",
                           code="request_cancelled") from None
        return out

    async def _stream(self, turn: Turn, chunks: AsyncIterator[Chunk], opening: list[str],
                      event: Callable[[Chunk], str | None], usage_event: Callable[[Usage], str]) -> AsyncIterator[str]:
        """Server-sent events: `opening`, one `event(chunk)` per chunk (None: nothing to send), errors as an event,
        the usage when asked, then [DONE]."""
        for line in opening:
            yield line
        last, count = None, 0
        try:
            async for chunk in chunks:
                last, count = chunk, count + len(chunk.token_ids)
                line = event(chunk)
                if line:
                    yield line
        except Exception as exc:  # noqa: BLE001  (the status line is sent: errors go in the stream)
            yield error_event(exc)
        if turn.req.stream_options and turn.req.stream_options.include_usage:
            yield usage_event(self._usage(turn, last, count))
        yield "data: [DONE]\n\n"

    @staticmethod
    def _usage(turn: Turn, last: Chunk | None, completion: int) -> Usage:
        usage = Usage(prompt_tokens=len(turn.ids), completion_tokens=completion,
                      total_tokens=len(turn.ids) + completion)
        if turn.context is not None:
            usage.kv_context_slots = turn.context.num_slots
        if last is not None and last.cached_tokens is not None:
            usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=int(last.cached_tokens))
        return usage



async def _next_or_stop(stream: AsyncIterator[Chunk], cancel: threading.Event, deadline: float | None,
                        timeout: float | None, poll_s: float = 0.25) -> Chunk:
    """The stream's next chunk; Cancelled as soon as the client goes away or the deadline passes, even while the
    request still waits in the engine's queue and no chunk comes."""
    step = asyncio.ensure_future(anext(stream))
    try:
        while True:
            wait = poll_s if deadline is None else min(poll_s, deadline - time.perf_counter())
            if cancel.is_set():
                raise Cancelled("the client went away")
            if wait <= 0:
                raise Cancelled(f"the request took longer than {timeout:g} s")
            done, _ = await asyncio.wait({step}, timeout=wait)
            if done:
                return step.result()
    except BaseException:
        step.cancel()  # the engine's generator ends at its pending await (and can then be closed)
        await asyncio.wait({step})
        raise


def prefix_salt(tenant: str, client_salt: str | None) -> str:
    """The prefix-cache namespace of a plain request: its tenant's, split further by the client's `cache_salt`.
    Without it, a tenant could learn from `cached_tokens` that another tenant sent the same prompt. (Requests
    over a context are salted by the context, which belongs to one tenant.)"""
    return json.dumps([tenant, client_salt])


def error_event(exc: Exception) -> str:
    """An error inside a stream whose status line is already sent."""
    if isinstance(exc, ApiError):
        detail = ErrorDetail(message=exc.message, type=exc.type, code=exc.code)
    elif isinstance(exc, Cancelled):
        metrics.ERRORS.labels("request_cancelled").inc()
        detail = ErrorDetail(message=f"generation stopped: {exc}", type="timeout_error", code="request_cancelled")
    else:
        log.error("streaming failed: %r", exc)
        metrics.ERRORS.labels("engine_error").inc()
        detail = ErrorDetail(message=f"generation failed: {exc}", type="server_error", code=500)
    return f"data: {{\"error\": {detail.model_dump_json()}}}\n\n"
