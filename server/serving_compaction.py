"""Compaction jobs: validate a request, run the compaction on one worker thread behind a bounded queue, store
the result, warm the engine with it. Synchronous requests wait for it (cancelled when their client goes away or
time runs out); async ones get a job to poll."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kvcat.compaction import CompactionError, slots_per_head
from kvcat.server import metrics, prompting
from kvcat.server.config import Limits
from kvcat.server.errors import ApiError, Cancelled, invalid
from kvcat.server.protocol import CompactRequest
from kvcat.server.responses import CompactionJob, ErrorDetail, KvContext
from kvcat.server.serving_contexts import ContextRegistry
from kvcat.server.serving_models import ServedModel
from kvcat.server.serving_warm import ContextWarmer
from kvcat.server.store import ContextRecord

log = logging.getLogger("kvcat.server")

Progress = Callable[[int, int], None]
Work = Callable[[Progress | None], ContextRecord]  # one compaction, run on the compaction thread


@dataclass
class Job:
    id: str
    tenant: str
    status: str = "queued"  # queued | running | succeeded | failed
    progress: float = 0.0
    created: int = field(default_factory=lambda: int(time.time()))
    context: KvContext | None = None
    error: ErrorDetail | None = None
    future: asyncio.Future | None = None

    def public(self) -> CompactionJob:
        return CompactionJob(id=self.id, status=self.status, progress=round(self.progress, 4),
                             created=self.created, context=self.context, error=self.error)


class CompactionServing:
    def __init__(self, model: ServedModel, contexts: ContextRegistry, warmer: ContextWarmer, *, beta: bool,
                 limits: Limits):
        self.model, self.contexts, self.warmer, self.beta, self.limits = model, contexts, warmer, beta, limits
        self.jobs: dict[str, Job] = {}
        self.closing = False
        self._queued = 0  # compactions submitted and not finished
        self._mean_seconds = 10.0  # running mean, for Retry-After
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcat-compact",
                                        initializer=lower_priority, initargs=(limits.compaction_nice,))
        self._finishing: set[asyncio.Task] = set()

    @property
    def max_document_tokens(self) -> int:
        return min(self.model.max_positions, self.limits.max_document_tokens or self.model.max_positions)

    def method(self, name: str, params: dict | None = None, query_mode: str | None = None):
        """The compaction method a request names, with its parameters (422 for unknown ones)."""
        from kvcat.compaction import get_method
        from kvcat.compaction.queries import QUERY_MODES

        params = dict(params or {})
        if query_mode is not None:
            if query_mode not in QUERY_MODES:
                raise invalid(f"unknown query_mode {query_mode!r}; choose one of {', '.join(QUERY_MODES)}",
                              "query_mode")
            params["queries"] = query_mode
        try:
            method = get_method(name, **params)
        except CompactionError as exc:
            raise invalid(str(exc), "method") from None
        if not self.beta and hasattr(method, "fit_beta") and "fit_beta" not in params:
            method.fit_beta = False  # stock kernels: no per-slot bias
        return method

    def check_length(self, n: int, param: str) -> None:
        if n > self.max_document_tokens:
            what = ("the model's context holds" if self.max_document_tokens == self.model.max_positions
                    else "this server accepts documents of at most")
            raise invalid(f"the document has {n} tokens but {what} {self.max_document_tokens}", param, 413,
                          "context_length_exceeded")

    def prepare(self, req: CompactRequest, tenant: str) -> Work:
        """Validate a compaction request (cheap checks only) and return the work that compacts it."""
        self.model.check(req.model)
        source = ({"text": req.text} if req.text is not None
                  else {"messages": [{"role": m.role, "content": m.text()} for m in req.messages]})
        try:
            ids = prompting.context_ids(self.model.tokenizer, source)
        except prompting.PromptError as exc:
            raise invalid(str(exc), "messages") from None
        n = len(ids)
        self.check_length(n, "text")
        if n < 2:
            raise invalid("the document is too short to compact", "text")
        try:
            t = slots_per_head(n, req.ratio, req.target_tokens)
        except CompactionError as exc:
            raise invalid(str(exc), "ratio" if req.ratio is not None else "target_tokens") from None
        method = self.method(req.method, req.params, req.query_mode)
        self.contexts.check_quota(tenant, t)
        return self.work(source, ids, method, req.ratio, req.target_tokens, tenant=tenant)

    def work(self, source: dict, ids: list[int], method, ratio: float | None, target_tokens: int | None, *,
             tenant: str, context_id: str | None = None, origin: str = "compact",
             base: ContextRecord | None = None) -> Work:
        """Compact `ids` (or, with `base`, join the compacted block of `ids` to that stored context), store the
        result and observe the metrics."""
        lm = self.model.lm

        def run(progress: Progress | None) -> ContextRecord:
            start = time.perf_counter()
            try:
                if base is None:
                    cache = method.compact(lm, ids, ratio=ratio, target_tokens=target_tokens, progress=progress)
                else:
                    from kvcat.cache import CompactCache
                    from kvcat.compaction.incremental import extend

                    old = CompactCache.load(self.contexts.path(base.id), expect_fingerprint=lm.spec.fingerprint)
                    cache = extend(lm, old, ids, method, ratio=ratio, target_tokens=target_tokens,
                                   progress=progress)
            except CompactionError as exc:
                raise invalid(str(exc)) from None
            if not self.beta:
                _drop_beta(cache)
            seconds = time.perf_counter() - start
            rec = self.contexts.add(cache, model=self.model.name, compaction_seconds=seconds, source=source,
                                    context_id=context_id, origin=origin, tenant=tenant)
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds
            metrics.COMPACTION_FACTOR.labels(self.model.name, rec.method).observe(rec.ratio)
            metrics.COMPACTION_SECONDS.labels(self.model.name, rec.method).observe(seconds)
            return rec

        return run

    # ---- the queue -------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Reserve a place in the bounded compaction queue, or answer 429 with a Retry-After estimate."""
        if self.closing:
            raise ApiError(503, "the server is shutting down", "service_unavailable", code="shutting_down")
        if self._queued >= self.limits.max_queued_compactions:
            wait = max(1, round(self._queued * self._mean_seconds))
            raise ApiError(429, f"{self._queued} compactions are queued or running (the limit); retry in about "
                           f"{wait} s", "rate_limit_error", code="compaction_queue_full",
                           headers={"Retry-After": str(wait)})
        self._queued += 1
        metrics.COMPACTIONS_QUEUED.inc()

    def _submit(self, work: Work, progress: Progress | None) -> asyncio.Future:
        """Run `work` on the compaction thread (after `_admit`); its queue place is freed when it ends."""
        def running(progress: Progress | None) -> ContextRecord:
            metrics.COMPACTIONS_QUEUED.dec()
            metrics.COMPACTIONS_RUNNING.inc()
            try:
                return work(progress)
            finally:
                metrics.COMPACTIONS_RUNNING.dec()

        fut = asyncio.get_running_loop().run_in_executor(self._pool, running, progress)

        def done(_):
            self._queued -= 1

        fut.add_done_callback(done)
        return fut

    async def run(self, work: Work, cancel: threading.Event | None = None) -> ContextRecord:
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
            return await self._submit(work, progress)
        except ApiError:
            raise
        except Cancelled as exc:  # counted once, by the error handler, under its code
            raise ApiError(499 if cancel.is_set() else 504, f"compaction stopped: {exc}", "timeout_error",
                           code="compaction_cancelled") from None
        except Exception as exc:  # noqa: BLE001  (a failed compaction never takes the server down)
            log.exception("compaction failed")
            raise ApiError(500, f"compaction failed: {exc}", "server_error", code="compaction_failed") from None

    async def compact(self, req: CompactRequest, tenant: str, cancel: threading.Event | None = None) -> KvContext:
        """POST /v1/compact: compact and store the document, then warm the engine with it (its first question
        finds it loaded)."""
        rec = await self.run(self.prepare(req, tenant), cancel)
        await self.warmer.warm(rec)
        return KvContext(**rec.public())

    # ---- async jobs ------------------------------------------------------------------------------------
    def submit_job(self, req: CompactRequest, tenant: str) -> Job:
        work = self.prepare(req, tenant)
        self._admit()
        self._forget_old_jobs()
        job = Job(id=f"job-{uuid.uuid4().hex[:24]}", tenant=tenant)
        self.jobs[job.id] = job

        def progress(done: int, total: int) -> None:
            job.progress = min(0.99, done / max(total, 1))

        def run(_):
            job.status = "running"
            return work(progress)

        job.future = self._submit(run, None)
        job.future.add_done_callback(lambda f: self._keep(asyncio.ensure_future(_finish(job, f, self.warmer))))
        return job

    def _keep(self, task: asyncio.Task) -> None:
        self._finishing.add(task)  # a reference until it ends
        task.add_done_callback(self._finishing.discard)

    def _forget_old_jobs(self) -> None:
        done = [j for j in self.jobs.values() if j.status in ("succeeded", "failed")]
        for job in sorted(done, key=lambda j: j.created)[: max(0, len(self.jobs) - self.limits.max_jobs + 1)]:
            self.jobs.pop(job.id, None)

    def get_job(self, job_id: str, tenant: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise ApiError(404, f"no compaction job {job_id!r}", "invalid_request_error", "job_id", "job_not_found")
        return job

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait for running jobs (shutdown); later submissions are refused."""
        self.closing = True
        pending = [j.future for j in self.jobs.values() if j.future is not None and not j.future.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _finish(job: Job, fut: asyncio.Future, warmer: ContextWarmer) -> None:
    """A job's end: succeeded once its context is stored and warmed, or failed with the error."""
    exc = fut.exception()
    if exc is None:
        await warmer.warm(fut.result())
        job.status, job.progress, job.context = "succeeded", 1.0, KvContext(**fut.result().public())
        return
    job.status = "failed"
    if isinstance(exc, ApiError):
        job.error = ErrorDetail(message=exc.message, type=exc.type, code=exc.code)
    else:
        log.error("compaction job %s failed: %r", job.id, exc)
        job.error = ErrorDetail(message=f"compaction failed: {exc}", type="server_error", code="compaction_failed")
    metrics.ERRORS.labels(str(job.error.code)).inc()


def lower_priority(nice: int) -> None:
    """Make the calling thread `nice` steps nicer (Linux: niceness is per thread, and the threads it starts, torch's
    intra-op pool included, inherit it), so the engine's steps win the cores from a running compaction."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: compaction runs at the server's priority
        log.warning("could not lower the compaction thread's priority: %s", exc)


def _drop_beta(cache) -> None:
    """Serving with stock kernels: beta is dropped, and caches that need it to mask padded heads are refused."""
    import torch

    if cache.is_hybrid:
        raise invalid("this cache keeps retrieval heads whole in side slots, which stock attention kernels cannot "
                      "read; compact without whole_share or serve with --beta", "params")
    if any(bool(torch.isinf(b).any()) for b in cache.beta):
        raise invalid("this cache has heads with different budgets (padded with beta = -inf), which stock "
                      "attention kernels cannot mask; compact with uniform budgets or serve with --beta", "params")
    for b in cache.beta:
        b.zero_()
