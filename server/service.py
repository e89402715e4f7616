"""Serving logic behind the routes: compaction jobs, the context store, chat completions over contexts.

Nothing here imports vLLM: the engine comes in as `kvcat.server.vllm_adapter.engine.Engine` (or any object
with the same `generate`), so the routes and this logic stay testable and vLLM stays in one sub-package.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kvcat.compaction import CompactionError
from kvcat.server import metrics, onthefly, prompting
from kvcat.server.onthefly import AutoCompaction, AutoCompactionError
from kvcat.server.protocol import ChatCompletionRequest, CompactRequest
from kvcat.server.store import ContextRecord, ContextStore, QuotaExceeded

log = logging.getLogger("kvcat.server")


class ApiError(Exception):
    """An error returned to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code=None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code = code if code is not None else status
        self.headers = headers or {}


class Cancelled(Exception):
    """Work stopped because its client went away or its time ran out."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past these the server answers 413, 422, 429 or 504, never queues forever."""

    max_document_tokens: int | None = None  # default: the model's context
    max_completion_tokens: int | None = None  # default: what fits the context
    max_queued_compactions: int = 8  # waiting + running; more get 429 with Retry-After
    request_timeout_s: float | None = 600.0  # a chat completion, generation included
    compaction_timeout_s: float | None = 1800.0  # one synchronous /v1/compact or on-the-fly compaction


@dataclass
class Job:
    id: str
    tenant: str = "default"
    status: str = "queued"  # queued | running | succeeded | failed
    progress: float = 0.0
    created: int = field(default_factory=lambda: int(time.time()))
    result: dict | None = None
    error: dict | None = None
    future: asyncio.Future | None = None

    def public(self) -> dict:
        return {"id": self.id, "object": "compaction.job", "status": self.status,
                "progress": round(self.progress, 4), "created": self.created, "context": self.result,
                "error": self.error}


class KvcatService:
    def __init__(self, engine, lm, store: ContextStore, model_name: str, *, beta: bool = True,
                 max_jobs: int = 64, auto: AutoCompaction | None = None, limits: Limits | None = None):
        self.engine, self.lm, self.store = engine, lm, store
        self.model_name, self.beta = model_name, beta
        self.limits = limits or Limits()
        self._queued = 0  # compactions submitted and not finished
        self._mean_compaction_s = 10.0  # running mean, for Retry-After
        self.tokenizer = lm.tokenizer
        self.jobs: dict[str, Job] = {}
        self.max_jobs = max_jobs
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcat-compact")
        self._inflight: dict[str, int] = {}
        self._deleted: set[str] = set()
        self.auto = auto or AutoCompaction()
        self._auto_locks: dict[str, asyncio.Lock] = {}
        self.ready = False
        self.closing = False
        self._refresh_gauges()

    # ---- model names -------------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return [self.model_name]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.model_name, str(self.lm.spec.path), self.lm.spec.name):
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "invalid_request_error", "model", "model_not_found")

    @property
    def max_positions(self) -> int:
        return int(self.lm.spec.max_positions)

    # ---- compaction --------------------------------------------------------------------------------
    def _source(self, req: CompactRequest) -> dict:
        if req.text is not None:
            return {"text": req.text}
        return {"messages": [{"role": m.role, "content": m.text()} for m in req.messages]}

    def _method(self, name: str, params: dict, query_mode: str | None = None):
        from kvcat.compaction import get_method
        from kvcat.compaction.queries import QUERY_MODES

        params = dict(params)
        if query_mode is not None:
            if query_mode not in QUERY_MODES:
                raise ApiError(422, f"unknown query_mode {query_mode!r}; choose one of {', '.join(QUERY_MODES)}",
                               "invalid_request_error", "query_mode")
            params["queries"] = query_mode
        try:
            method = get_method(name, **params)
        except CompactionError as exc:
            raise ApiError(422, str(exc), "invalid_request_error", "method") from None
        if not self.beta and "fit_beta" in method.defaults and "fit_beta" not in params:
            method.params["fit_beta"] = False  # stock kernels: no per-slot bias
        return method

    @property
    def max_document_tokens(self) -> int:
        return min(self.max_positions, self.limits.max_document_tokens or self.max_positions)

    def prepare_compaction(self, req: CompactRequest, tenant: str = "default"):
        """Validate a compaction request (cheap checks only) and return a callable doing the work."""
        self.check_model(req.model)
        source = self._source(req)
        try:
            ids = prompting.context_ids(self.tokenizer, source)
        except prompting.PromptError as exc:
            raise ApiError(422, str(exc), "invalid_request_error", "messages") from None
        n = len(ids)
        if n > self.max_document_tokens:
            what = "the model's context holds" if self.max_document_tokens == self.max_positions else \
                "this server accepts documents of at most"
            raise ApiError(413, f"the document has {n} tokens but {what} {self.max_document_tokens}",
                           "invalid_request_error", "text", "context_length_exceeded")
        if n < 2:
            raise ApiError(422, "the document is too short to compact", "invalid_request_error", "text")
        t = req.target_tokens if req.target_tokens is not None else max(1, round(n / req.ratio))
        if t >= n:
            raise ApiError(422, f"a budget of {t} slots does not compact a {n}-token document; use a larger "
                           "ratio or fewer target_tokens", "invalid_request_error",
                           "ratio" if req.ratio is not None else "target_tokens")
        method = self._method(req.method, req.params, req.query_mode)
        self._check_quota(tenant, t)
        return self._compaction_job(source, ids, method, req.ratio, req.target_tokens, tenant=tenant)

    def _check_quota(self, tenant: str, slots: int, replacing: str | None = None) -> None:
        try:
            self.store.check_quota(tenant, slots * self.engine.kv_bytes_per_token(), replacing)
        except QuotaExceeded as exc:
            raise ApiError(429, str(exc), "insufficient_quota", code="quota_exceeded") from None

    def _compaction_job(self, source: dict, ids: list[int], method, ratio: float | None,
                        target_tokens: int | None, *, context_id: str | None = None, origin: str = "compact",
                        base: ContextRecord | None = None, tenant: str = "default"):
        """The work of one compaction, as a callable for the compaction thread: compact `ids` (or, with `base`,
        join the compacted block of `ids` to that stored context), store the result, observe metrics."""

        def run(progress) -> ContextRecord:
            start = time.perf_counter()
            try:
                if base is None:
                    cache = method.compact(self.lm, ids, ratio=ratio, target_tokens=target_tokens,
                                           progress=progress)
                else:
                    from kvcat.cache import CompactCache
                    from kvcat.compaction.incremental import extend

                    old = CompactCache.load(self.store.path(base.id), expect_fingerprint=self.lm.spec.fingerprint)
                    cache = extend(self.lm, old, ids, method, ratio=ratio, target_tokens=target_tokens,
                                   progress=progress)
            except CompactionError as exc:
                raise ApiError(422, str(exc), "invalid_request_error") from None
            if not self.beta:
                import torch

                if any(bool(torch.isinf(b).any()) for b in cache.beta):
                    raise ApiError(422, "this cache has heads with different budgets (padded with beta = "
                                   "-inf), which stock attention kernels cannot mask; compact with uniform "
                                   "budgets or serve with --beta", "invalid_request_error", "params")
                for b in cache.beta:
                    b.zero_()
            seconds = time.perf_counter() - start
            try:
                rec = self.store.add(cache, model=self.model_name, compaction_seconds=seconds, source=source,
                                     kv_bytes_per_token=self.engine.kv_bytes_per_token(), context_id=context_id,
                                     origin=origin, tenant=tenant)
            except QuotaExceeded as exc:
                raise ApiError(429, str(exc), "insufficient_quota", code="quota_exceeded") from None
            self._mean_compaction_s = 0.8 * self._mean_compaction_s + 0.2 * seconds
            labels = (self.model_name, rec.method)
            metrics.COMPACTION_RATIO.labels(*labels).observe(rec.ratio)
            metrics.COMPACTION_SECONDS.labels(*labels).observe(seconds)
            self._refresh_gauges()
            return rec

        return run

    def _admit(self) -> None:
        """Reserve a place in the bounded compaction queue, or answer 429 with a Retry-After estimate."""
        if self.closing:
            raise ApiError(503, "the server is shutting down", "service_unavailable", code="shutting_down")
        if self._queued >= self.limits.max_queued_compactions:
            wait = max(1, round(self._queued * self._mean_compaction_s))
            raise ApiError(429, f"{self._queued} compactions are queued or running (the limit); retry in about "
                           f"{wait} s", "rate_limit_error", code="compaction_queue_full",
                           headers={"Retry-After": str(wait)})
        self._queued += 1

    def _submit(self, run, progress=None) -> asyncio.Future:
        """Run a compaction on the compaction thread (after `_admit`); the queue place is freed when it ends."""
        fut = asyncio.get_running_loop().run_in_executor(self._pool, run, progress)

        def done(_):
            self._queued -= 1

        fut.add_done_callback(done)
        return fut

    async def _run_compaction(self, run, cancel: threading.Event | None = None) -> ContextRecord:
        """Run a compaction and wait for it; `cancel` (a client that went away) or the time limit stop it at
        the next layer boundary, before anything is stored."""
        cancel = cancel or threading.Event()
        start, limit = time.monotonic(), self.limits.compaction_timeout_s

        def progress(done: int, total: int) -> None:
            if cancel.is_set():
                raise Cancelled("the client went away")
            if limit is not None and time.monotonic() - start > limit:
                raise Cancelled(f"the compaction took longer than {limit:g} s")

        self._admit()
        try:
            return await self._submit(run, progress)
        except ApiError:
            raise
        except Cancelled as exc:
            metrics.ERRORS.labels("compaction_cancelled").inc()
            raise ApiError(504 if not cancel.is_set() else 499, f"compaction stopped: {exc}", "timeout_error",
                           code="compaction_cancelled") from None
        except Exception as exc:  # noqa: BLE001  (a failed compaction never takes the server down)
            log.exception("compaction failed")
            raise ApiError(500, f"compaction failed: {exc}", "server_error", code="compaction_failed") from None

    async def compact(self, req: CompactRequest, tenant: str = "default",
                      cancel: threading.Event | None = None) -> dict:
        return (await self._run_compaction(self.prepare_compaction(req, tenant), cancel)).public()

    def submit_job(self, req: CompactRequest, tenant: str = "default") -> Job:
        run = self.prepare_compaction(req, tenant)
        self._admit()
        self._trim_jobs()
        job = Job(id=f"job-{uuid.uuid4().hex[:24]}", tenant=tenant)
        self.jobs[job.id] = job

        def progress(done: int, total: int) -> None:
            job.progress = min(0.99, done / max(total, 1))

        def work():
            job.status = "running"
            return run(progress)

        fut = self._submit(lambda _progress: work())

        def finished(f: asyncio.Future) -> None:
            exc = f.exception()
            if exc is None:
                job.status, job.progress, job.result = "succeeded", 1.0, f.result().public()
            else:
                job.status = "failed"
                if isinstance(exc, ApiError):
                    job.error = {"message": exc.message, "type": exc.type, "code": exc.code}
                else:
                    log.error("compaction job %s failed: %r", job.id, exc)
                    job.error = {"message": f"compaction failed: {exc}", "type": "server_error",
                                 "code": "compaction_failed"}
                metrics.ERRORS.labels("compaction_failed").inc()

        fut.add_done_callback(finished)
        job.future = fut
        return job

    def _trim_jobs(self) -> None:
        done = [j for j in self.jobs.values() if j.status in ("succeeded", "failed")]
        for job in sorted(done, key=lambda j: j.created)[: max(0, len(self.jobs) - self.max_jobs + 1)]:
            self.jobs.pop(job.id, None)

    def get_job(self, job_id: str, tenant: str = "default") -> Job:
        job = self.jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise ApiError(404, f"no compaction job {job_id!r}", "invalid_request_error", "job_id", "job_not_found")
        return job

    # ---- contexts ----------------------------------------------------------------------------------
    def list_contexts(self, tenant: str = "default") -> list[ContextRecord]:
        return self.store.list(tenant)

    def get_context(self, context_id: str, tenant: str = "default") -> ContextRecord:
        rec = self.store.get(context_id, tenant)
        if rec is None:
            raise ApiError(404, f"no kv_context {context_id!r} (unknown or deleted; compact the document "
                           "again with POST /v1/compact)", "invalid_request_error", "kv_context",
                           "context_not_found")
        return rec

    def delete_context(self, context_id: str, tenant: str = "default") -> dict:
        self.get_context(context_id, tenant)
        busy = self._inflight.get(context_id, 0) > 0
        self.store.delete(context_id, keep_file=busy)
        if busy:
            self._deleted.add(context_id)
        self._refresh_gauges()
        return {"id": context_id, "object": "kv_context.deleted", "deleted": True}

    def _refresh_gauges(self) -> None:
        totals: dict[tuple[str, str], list[int]] = {}
        for rec in self.store.list():
            acc = totals.setdefault((rec.model, rec.method), [0, 0, 0, 0, 0])
            acc[0] += 1
            acc[1] += rec.num_tokens
            acc[2] += rec.num_slots
            acc[3] += rec.kv_bytes_full
            acc[4] += rec.kv_bytes_compacted
        gauges = (metrics.CONTEXTS_STORED, metrics.ORIGINAL_TOKENS, metrics.COMPACTED_TOKENS,
                  metrics.KV_BYTES_FULL, metrics.KV_BYTES_COMPACTED)
        for gauge in (*gauges, metrics.KV_BYTES_SAVED):
            gauge.clear()
        for (model, method), values in totals.items():
            for gauge, value in zip(gauges, values):
                gauge.labels(model, method).set(value)
            metrics.KV_BYTES_SAVED.labels(model, method).set(values[3] - values[4])

    # ---- chat --------------------------------------------------------------------------------------
    def _build(self, req: ChatCompletionRequest, messages: list[dict], rec: ContextRecord | None):
        """Prompt ids, generation parameters and the context handle of a chat request (over `rec` when given)."""
        from kvcat.server.vllm_adapter.engine import ContextHandle, GenParams

        handle = None
        try:
            if rec is not None:
                ids = prompting.question_ids(self.tokenizer, rec.source, messages)
                salt = f"kvcat:{rec.id}:{rec.version}:{'beta' if self.beta else 'nobeta'}"
                handle = ContextHandle(rec.id, str(self.store.path(rec.id)), rec.num_slots, rec.num_tokens, salt)
                # positions as the reference path counts them (N + question), and the engine's own limit
                # (t slots + question)
                used, limit = rec.num_tokens + len(ids), self.max_positions
                engine_room = self.engine.max_model_len - (rec.num_slots + len(ids))
                limit = min(limit, used + engine_room)
            else:
                ids = prompting.plain_ids(self.tokenizer, messages)
                used, limit = len(ids), min(self.max_positions, self.engine.max_model_len)
        except prompting.PromptError as exc:
            raise ApiError(422, str(exc), "invalid_request_error", "messages") from None
        if used >= limit:
            raise ApiError(413, f"the prompt needs {used} positions but the model's context holds {limit}",
                           "invalid_request_error", "messages", "context_length_exceeded")
        room = limit - used
        cap = self.limits.max_completion_tokens
        max_tokens = req.max_completion_tokens or req.max_tokens or min(room, cap or 512)
        if cap is not None and max_tokens > cap:
            raise ApiError(422, f"max_tokens {max_tokens} is above this server's limit of {cap}",
                           "invalid_request_error", "max_tokens")
        if max_tokens > room:
            raise ApiError(413, f"the prompt needs {used} positions and max_tokens {max_tokens} more, but the "
                           f"model's context holds {limit}", "invalid_request_error", "max_tokens",
                           "context_length_exceeded")
        k = None
        if req.logprobs:
            k = req.top_logprobs or 0
        if req.min_tokens > max_tokens:
            raise ApiError(422, f"min_tokens {req.min_tokens} exceeds max_tokens {max_tokens}",
                           "invalid_request_error", "min_tokens")
        params = GenParams(max_tokens=max_tokens, min_tokens=req.min_tokens,
                           temperature=1.0 if req.temperature is None else req.temperature,
                           top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=req.stop or [],
                           logprobs=k, cache_salt=req.cache_salt if handle is None else None)
        return ids, params, handle

    # ---- on-the-fly compaction ----------------------------------------------------------------------
    def auto_policy_check(self) -> None:
        """Refuse a bad server-wide on-the-fly policy at start-up (raises AutoCompactionError)."""
        from kvcat.compaction import method_names

        self.auto.validate(self.engine.block_size, method_names())

    def auto_policy(self, req: ChatCompletionRequest) -> AutoCompaction:
        from kvcat.compaction import method_names

        if req.kv_compaction is None or req.kv_compaction == "off":
            override = req.kv_compaction
        else:
            override = req.kv_compaction.model_dump(exclude_none=True)
        policy = self.auto.merged(override)
        try:
            policy.validate(self.engine.block_size, method_names())
        except AutoCompactionError as exc:
            raise ApiError(422, str(exc), "invalid_request_error", "kv_compaction") from None
        return policy

    async def _auto_context(self, req: ChatCompletionRequest, messages: list[dict], tenant: str,
                            cancel: threading.Event) -> tuple[ContextRecord, list[dict], dict] | None:
        """On-the-fly compaction of a long plain chat: (context record, the messages that follow it uncompressed,
        what happened), or None to serve the prompt as it is."""
        policy = self.auto_policy(req)
        if not policy.enabled:
            return None
        try:
            if len(prompting.plain_ids(self.tokenizer, messages)) <= policy.threshold_tokens:
                return None
        except prompting.PromptError as exc:
            raise ApiError(422, str(exc), "invalid_request_error", "messages") from None
        cut = onthefly.split(messages, policy.keep_turns)
        if cut is None:
            return None
        key = onthefly.context_key(self.lm.spec.fingerprint, cut.source, policy, self.beta, tenant)
        lock = self._auto_locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:  # concurrent requests for one prefix compact it once
                return await self._auto_resolve(cut, key, policy, tenant, cancel)
        finally:
            if not lock.locked():
                self._auto_locks.pop(key, None)

    async def _auto_resolve(self, cut: onthefly.Split, key: str, policy: AutoCompaction, tenant: str,
                            cancel: threading.Event):
        fp = self.lm.spec.fingerprint
        method = self._method(policy.method, {})
        rec = self.store.get(key, tenant)
        if rec is not None:
            return rec, cut.rest, self._auto_info(rec, "hit")
        for src, rest in cut.prefixes:  # the longest stored prefix of this conversation
            base = self.store.get(onthefly.context_key(fp, src, policy, self.beta, tenant), tenant)
            if base is None:
                continue
            tail = prompting.question_ids(self.tokenizer, src, rest)
            if len(tail) <= policy.threshold_tokens:  # the turns since then still fit uncompressed
                return base, rest, self._auto_info(base, "prefix-hit")
            new = onthefly.new_tokens(self.tokenizer, src, cut.source)
            if new is not None and len(new) >= 2:
                self._check_quota(tenant, base.num_slots + round(len(new) / policy.ratio), replacing=key)
                run = self._compaction_job(cut.source, new, method, policy.ratio, None, context_id=key,
                                           origin="auto", base=base, tenant=tenant)
                rec = await self._run_compaction(run, cancel)
                metrics.ONTHEFLY_COMPACTIONS.labels(self.model_name, rec.method, "incremental").inc()
                return rec, cut.rest, self._auto_info(rec, "incremental")
            break
        ids = prompting.context_ids(self.tokenizer, cut.source)
        if len(ids) / policy.ratio < self.engine.block_size:  # too little before the kept turns to compact
            return None
        if len(ids) > self.max_document_tokens:
            raise ApiError(413, f"the prompt's leading part has {len(ids)} tokens but this server compacts at most "
                           f"{self.max_document_tokens}", "invalid_request_error", "messages",
                           "context_length_exceeded")
        self._check_quota(tenant, round(len(ids) / policy.ratio), replacing=key)
        run = self._compaction_job(cut.source, ids, method, policy.ratio, None, context_id=key, origin="auto",
                                   tenant=tenant)
        rec = await self._run_compaction(run, cancel)
        metrics.ONTHEFLY_COMPACTIONS.labels(self.model_name, rec.method, "scratch").inc()
        return rec, cut.rest, self._auto_info(rec, "compacted")

    @staticmethod
    def _auto_info(rec: ContextRecord, outcome: str) -> dict:
        return {"outcome": outcome, "cache_hit": outcome in ("hit", "prefix-hit"), "context": rec.id,
                "original_tokens": rec.num_tokens, "compacted_tokens": rec.num_slots,
                "compaction_seconds": round(rec.compaction_seconds, 4) if outcome in ("compacted", "incremental")
                else 0.0}

    def _logprob_entries(self, chunk, top: int) -> list[dict]:
        out = []
        for tid, step in zip(chunk.token_ids, chunk.logprobs or []):
            def entry(t, lp):
                text = self.tokenizer.decode([t])
                return {"token": text, "logprob": max(lp, -9999.0), "bytes": list(text.encode())}

            best = sorted(step.items(), key=lambda kv: -kv[1])[:top]
            out.append({**entry(tid, step.get(tid, -math.inf)), "top_logprobs": [entry(t, lp) for t, lp in best]})
        return out

    async def chat(self, req: ChatCompletionRequest, tenant: str = "default", cancel: threading.Event | None = None
                   ) -> tuple[dict | AsyncIterator[str], dict[str, str]]:
        """A chat completion: (the response body, or an SSE stream of it; extra response headers). `cancel` (the
        client went away) and the request timeout stop the generation and free its engine slot."""
        start = time.perf_counter()
        cancel = cancel or threading.Event()
        deadline = None if self.limits.request_timeout_s is None else time.monotonic() + self.limits.request_timeout_s
        self.check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        rec, auto = None, None
        if req.kv_context is not None:
            rec = self.get_context(req.kv_context, tenant)
        else:
            found = await self._auto_context(req, messages, tenant, cancel)
            if found is not None:
                rec, messages, auto = found
        ids, params, handle = self._build(req, messages, rec)
        mode = "compacted" if handle else "full"
        method = rec.method if rec else "none"
        labels = (self.model_name, method, mode)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        headers = {}
        extra = {"kv_context": handle.context_id} if handle else {}
        if auto is not None:
            auto["uncompressed_tokens"] = len(ids)
            extra["kv_compaction"] = auto
            headers = {"X-Kvcat-Compaction": auto["outcome"], "X-Kvcat-Context": rec.id}
            metrics.ONTHEFLY_REQUESTS.labels(self.model_name, rec.method, auto["outcome"]).inc()
            metrics.ONTHEFLY_BYTES_SAVED.labels(self.model_name, rec.method).inc(
                rec.kv_bytes_full - rec.kv_bytes_compacted)
        if handle:
            self._inflight[handle.context_id] = self._inflight.get(handle.context_id, 0) + 1
        state = {"first": None, "done": False}

        async def stream_chunks():
            try:
                async for chunk in self.engine.generate(ids, params, handle, request_id):
                    if cancel.is_set():
                        raise Cancelled("the client went away")
                    if deadline is not None and time.monotonic() > deadline:
                        raise Cancelled(f"the request took longer than {self.limits.request_timeout_s:g} s")
                    if state["first"] is None and chunk.token_ids:
                        state["first"] = time.perf_counter() - start
                        metrics.TTFT_SECONDS.labels(*labels).observe(state["first"])
                    yield chunk
                state["done"] = True
                metrics.E2E_SECONDS.labels(*labels).observe(time.perf_counter() - start)
                metrics.REQUESTS.labels(*labels).inc()
            finally:
                if not state["done"]:
                    try:
                        await self.engine.abort(request_id)
                    except Exception:  # noqa: BLE001
                        pass
                if handle:
                    self._release(handle.context_id)

        if not req.stream:
            text, toks, finish, last, lps = "", [], None, None, []
            try:
                async for chunk in stream_chunks():
                    text += chunk.text
                    toks += chunk.token_ids
                    finish = chunk.finish_reason or finish
                    last = chunk
                    if req.logprobs:
                        lps += self._logprob_entries(chunk, req.top_logprobs or 0)
            except Cancelled as exc:
                metrics.ERRORS.labels("request_cancelled").inc()
                raise ApiError(499 if cancel.is_set() else 504, f"generation stopped: {exc}", "timeout_error",
                               code="request_cancelled") from None
            usage = self._usage(last, len(ids), len(toks), handle)
            return {"id": request_id, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": {"content": lps} if req.logprobs else None,
                                 "finish_reason": finish or "stop"}],
                    "usage": usage, "system_fingerprint": self.lm.spec.fingerprint, **extra}, headers

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def sse():
            base = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_name, "system_fingerprint": self.lm.spec.fingerprint}
            yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], **extra})
            last, n = None, 0
            try:
                async for chunk in stream_chunks():
                    last, n = chunk, n + len(chunk.token_ids)
                    lp = ({"content": self._logprob_entries(chunk, req.top_logprobs or 0)}
                          if req.logprobs else None)
                    if chunk.text or chunk.finish_reason or lp:
                        yield _sse({**base, "choices": [{"index": 0, "delta": {"content": chunk.text},
                                                         "logprobs": lp, "finish_reason": chunk.finish_reason}]})
            except ApiError as exc:
                yield _sse({"error": {"message": exc.message, "type": exc.type, "code": exc.code}})
            except Cancelled as exc:
                metrics.ERRORS.labels("request_cancelled").inc()
                yield _sse({"error": {"message": f"generation stopped: {exc}", "type": "timeout_error",
                                      "code": "request_cancelled"}})
            except Exception as exc:  # noqa: BLE001
                log.exception("streaming failed")
                metrics.ERRORS.labels("engine_error").inc()
                yield _sse({"error": {"message": f"generation failed: {exc}", "type": "server_error",
                                      "code": 500}})
            if include_usage:
                yield _sse({**base, "choices": [], "usage": self._usage(last, len(ids), n, handle)})
            yield "data: [DONE]\n\n"

        return sse(), headers

    def _usage(self, last, prompt_tokens: int, completion: int, handle) -> dict:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion}
        if handle is not None:
            usage["kv_context_slots"] = handle.num_slots
        if last is not None and last.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": int(last.cached_tokens)}
        return usage

    def _release(self, context_id: str) -> None:
        left = self._inflight.get(context_id, 1) - 1
        if left > 0:
            self._inflight[context_id] = left
            return
        self._inflight.pop(context_id, None)
        if context_id in self._deleted:
            self._deleted.discard(context_id)
            self.store.remove_file(context_id)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait for in-flight compaction jobs (shutdown); later submissions are refused."""
        self.closing = True
        pending = [j.future for j in self.jobs.values() if j.future is not None and not j.future.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
