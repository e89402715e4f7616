"""Chat completions over a stored context, an on-the-fly compacted prompt, or the plain prompt: OpenAI's
response and streaming formats, limits, cancellation and the latency metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from kvcat.server import metrics, prompting
from kvcat.server.config import Limits
from kvcat.server.engine_api import Chunk, ContextHandle, EngineClient, GenParams
from kvcat.server.errors import ApiError, Cancelled, invalid
from kvcat.server.protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                   ChatCompletionResponse, ChoiceLogprobs, ChunkChoice, Delta, ErrorDetail,
                                   KvCompactionInfo, PromptTokensDetails, TokenLogprob, TopLogprob, Usage)
from kvcat.server.serving_contexts import ContextRegistry
from kvcat.server.serving_models import ServedModel
from kvcat.server.serving_onthefly import OnTheFlyServing
from kvcat.server.store import ContextRecord

log = logging.getLogger("kvcat.server")
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


@dataclass
class Turn:
    """One chat request, resolved: what the engine runs and what the response reports."""

    req: ChatCompletionRequest
    ids: list[int]  # prompt tokens after the context (all of them without one)
    params: GenParams
    handle: ContextHandle | None
    method: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))
    context_id: str | None = None
    version: str | None = None  # of the context's record when the request started
    compaction: KvCompactionInfo | None = None

    @property
    def labels(self) -> tuple[str, str]:
        return self.method, "compacted" if self.handle else "full"


class ChatServing:
    def __init__(self, model: ServedModel, engine: EngineClient, contexts: ContextRegistry,
                 onthefly: OnTheFlyServing, *, beta: bool, limits: Limits):
        self.model, self.engine, self.contexts, self.onthefly = model, engine, contexts, onthefly
        self.beta, self.limits = beta, limits

    async def chat(self, req: ChatCompletionRequest, tenant: str, cancel: threading.Event | None = None
                   ) -> tuple[ChatCompletionResponse | AsyncIterator[str], dict[str, str]]:
        """(the response, or an SSE stream of it; extra response headers). `cancel` (the client went away) and
        the request timeout stop the generation and free its engine slot."""
        start = time.perf_counter()
        cancel = cancel or threading.Event()
        self.model.check(req.model)
        messages = [m.for_template() for m in req.messages]
        rec, outcome, headers = None, None, {}
        if req.kv_context is not None:
            rec = self.contexts.get(req.kv_context, tenant)
        else:
            found = await self.onthefly.resolve(req, messages, tenant, cancel)
            if found is not None:
                rec, messages, outcome = found.context, found.rest, found.info()
        turn = self._turn(req, messages, rec, tenant)
        if outcome is not None:
            turn.compaction = KvCompactionInfo(**outcome, uncompressed_tokens=len(turn.ids))
            headers = {"X-Kvcat-Compaction": outcome["outcome"], "X-Kvcat-Context": rec.id}
            metrics.ONTHEFLY_REQUESTS.labels(self.model.name, rec.method, outcome["outcome"]).inc()
            metrics.ONTHEFLY_BYTES_SAVED.labels(self.model.name, rec.method).inc(
                rec.kv_bytes_full - rec.kv_bytes_compacted)
        chunks = self._generate(turn, start, cancel)
        if req.stream:
            return self._sse(turn, chunks), headers
        return await self._complete(turn, chunks, cancel), headers

    # ---- the prompt --------------------------------------------------------------------------------------
    def _turn(self, req: ChatCompletionRequest, messages: list[dict], rec: ContextRecord | None, tenant: str
              ) -> Turn:
        """Prompt ids, generation parameters and the context handle of a request (over `rec` when given)."""
        tokenizer, handle = self.model.tokenizer, None
        try:
            if rec is not None:
                self.contexts.check_file(rec)
                ids = prompting.question_ids(tokenizer, rec.source, messages)
                salt = f"kvcat:{rec.id}:{rec.version}:{'beta' if self.beta else 'nobeta'}"
                handle = ContextHandle(rec.id, self.contexts.path(rec.id), rec.num_slots, rec.num_tokens, salt)
                # positions as the reference path counts them (N + question), and the engine's own limit
                # (t slots + question)
                used = rec.num_tokens + len(ids)
                limit = min(self.model.max_positions,
                            used + self.engine.max_model_len - (rec.num_slots + len(ids)))
            else:
                ids = prompting.plain_ids(tokenizer, messages)
                used, limit = len(ids), min(self.model.max_positions, self.engine.max_model_len)
        except prompting.PromptError as exc:
            raise invalid(str(exc), "messages") from None
        if used >= limit:
            raise invalid(f"the prompt needs {used} positions but the model's context holds {limit}", "messages",
                          413, "context_length_exceeded")
        params = GenParams(max_tokens=self._max_tokens(req, used, limit), min_tokens=req.min_tokens, n=req.n,
                           **self._sampling(req), seed=req.seed, stop=req.stop or [],
                           stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
                           structured=_structured(req), logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                           cache_salt=prefix_salt(tenant, req.cache_salt) if handle is None else None)
        return Turn(req, ids, params, handle, rec.method if rec else "none",
                    context_id=handle.context_id if handle else None, version=rec.version if rec else None)

    def _sampling(self, req: ChatCompletionRequest) -> dict:
        """The request's sampling fields; those it leaves out come from the model's generation_config (as vLLM
        does), then vLLM's defaults (temperature 1)."""
        given = {name: getattr(req, name) for name in SAMPLING if getattr(req, name) is not None}
        out = {**self.model.sampling_defaults, **given}
        out.setdefault("temperature", 1.0)
        if req.logit_bias:
            vocab = len(self.model.tokenizer)
            bias = {int(k): v for k, v in req.logit_bias.items()}
            if max(bias) >= vocab:
                raise invalid(f"logit_bias names token {max(bias)}, beyond the vocabulary of {vocab}", "logit_bias")
            out["logit_bias"] = bias
        return out

    def _max_tokens(self, req: ChatCompletionRequest, used: int, limit: int) -> int:
        """The request's max_tokens, else the room its prompt leaves in the context (as vLLM)."""
        room, cap = limit - used, self.limits.max_completion_tokens
        max_tokens = req.max_completion_tokens or req.max_tokens or min(room, cap or room)
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
        if turn.handle:
            self.contexts.acquire(turn.handle.context_id)
        in_flight = metrics.CHATS_IN_FLIGHT.labels(self.model.name, turn.labels[1])
        in_flight.inc()
        finished, first = False, True
        stream = aiter(self.engine.generate(turn.ids, turn.params, turn.handle, turn.id))
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
            if turn.handle:
                self.contexts.release(turn.handle.context_id)

    def _engine_failure(self, turn: Turn) -> ApiError:
        if turn.handle is not None:
            return self.contexts.load_failure(turn.handle.context_id, turn.version)
        return ApiError(500, "the engine failed this request", "server_error", code="engine_error")

    async def _complete(self, turn: Turn, chunks: AsyncIterator[Chunk], cancel: threading.Event
                        ) -> ChatCompletionResponse:
        n = turn.params.n
        texts, finish, logprobs, count, last = [""] * n, [None] * n, [[] for _ in range(n)], 0, None
        try:
            async for chunk in chunks:
                texts[chunk.index] += chunk.text
                finish[chunk.index] = chunk.finish_reason or finish[chunk.index]
                logprobs[chunk.index] += self._logprobs(turn, chunk)
                count, last = count + len(chunk.token_ids), chunk
        except Cancelled as exc:  # counted once, by the error handler, under its code
            raise ApiError(499 if cancel.is_set() else 504, f"generation stopped: {exc}", "timeout_error",
                           code="request_cancelled") from None
        choices = [ChatChoice(index=i, message=AssistantMessage(content=texts[i]), finish_reason=finish[i] or "stop",
                              logprobs=ChoiceLogprobs(content=logprobs[i]) if turn.req.logprobs else None)
                   for i in range(n)]
        extra = {k: v for k, v in (("kv_context", turn.context_id), ("kv_compaction", turn.compaction)) if v}
        return ChatCompletionResponse(id=turn.id, created=turn.created, model=self.model.name, choices=choices,
                                      usage=self._usage(turn, last, count), system_fingerprint=self.model.fingerprint,
                                      **extra)

    async def _sse(self, turn: Turn, chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
        def event(**fields) -> str:
            body = ChatCompletionChunk(id=turn.id, created=turn.created, model=self.model.name,
                                       system_fingerprint=self.model.fingerprint, **fields)
            return f"data: {body.model_dump_json(exclude_unset=True)}\n\n"

        extra = {k: v for k, v in (("kv_context", turn.context_id), ("kv_compaction", turn.compaction)) if v}
        yield event(choices=[ChunkChoice(index=i, delta=Delta(role="assistant", content=""), logprobs=None,
                                         finish_reason=None) for i in range(turn.params.n)], **extra)
        last, count = None, 0
        try:
            async for chunk in chunks:
                last, count = chunk, count + len(chunk.token_ids)
                logprobs = ChoiceLogprobs(content=self._logprobs(turn, chunk)) if turn.req.logprobs else None
                if chunk.text or chunk.finish_reason or logprobs:
                    yield event(choices=[ChunkChoice(index=chunk.index, delta=Delta(content=chunk.text),
                                                     logprobs=logprobs, finish_reason=chunk.finish_reason)])
        except Exception as exc:  # noqa: BLE001  (the status line is sent: errors go in the stream)
            yield _error_event(exc)
        if turn.req.stream_options and turn.req.stream_options.include_usage:
            yield event(choices=[], usage=self._usage(turn, last, count))
        yield "data: [DONE]\n\n"

    # ---- response pieces ---------------------------------------------------------------------------------
    def _logprobs(self, turn: Turn, chunk: Chunk) -> list[TokenLogprob]:
        if not turn.req.logprobs:
            return []
        top, decode, out = turn.req.top_logprobs or 0, self.model.tokenizer.decode, []

        def entry(token_id: int, logprob: float) -> dict:
            text = decode([token_id])
            return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}

        for token_id, step in zip(chunk.token_ids, chunk.logprobs or []):
            best = sorted(step.items(), key=lambda kv: -kv[1])[:top]
            out.append(TokenLogprob(**entry(token_id, step.get(token_id, -math.inf)),
                                    top_logprobs=[TopLogprob(**entry(t, lp)) for t, lp in best]))
        return out

    @staticmethod
    def _usage(turn: Turn, last: Chunk | None, completion: int) -> Usage:
        usage = Usage(prompt_tokens=len(turn.ids), completion_tokens=completion,
                      total_tokens=len(turn.ids) + completion)
        if turn.handle is not None:
            usage.kv_context_slots = turn.handle.num_slots
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


def _structured(req: ChatCompletionRequest) -> dict | None:
    """vLLM structured-output parameters for the request's response_format."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    return {"json_object": True} if fmt.type == "json_object" else {"json": fmt.json_schema.schema_}


def prefix_salt(tenant: str, client_salt: str | None) -> str:
    """The prefix-cache namespace of a plain request: its tenant's, split further by the client's `cache_salt`.
    Without it, a tenant could learn from `cached_tokens` that another tenant sent the same prompt. (Requests
    over a context are salted by the context, which belongs to one tenant.)"""
    return json.dumps([tenant, client_salt])


def _error_event(exc: Exception) -> str:
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
