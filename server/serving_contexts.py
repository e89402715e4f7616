"""Stored contexts as the API sees them: per-tenant lookup, quotas, deletion that waits for the requests
still reading a context, and the store's gauges."""

from __future__ import annotations

from pathlib import Path

from kvcat.server import metrics
from kvcat.server.engine_api import ContextTransfer
from kvcat.server.errors import ApiError
from kvcat.server.responses import KvContext, KvContextDeleted
from kvcat.server.store import ContextRecord, ContextStore, QuotaExceeded


class ContextRegistry:
    def __init__(self, store: ContextStore, kv_bytes_per_token: int, *, beta: bool):
        self.store = store
        self.kv_bytes_per_token = kv_bytes_per_token
        self.beta = beta  # the engine's mode: part of every context's prefix-cache salt
        self._readers: dict[str, int] = {}  # context id -> requests generating over it now
        self._deleted: set[str] = set()  # deleted while read: the file goes when the last reader ends
        metrics.BEFORE_SCRAPE[:] = [self.refresh_gauges]  # the whole shared store, as of each scrape

    def list(self, tenant: str) -> list[KvContext]:
        return [KvContext(**rec.public()) for rec in self.store.list(tenant)]

    def get(self, context_id: str, tenant: str) -> ContextRecord:
        rec = self.store.get(context_id, tenant)
        if rec is None:
            raise ApiError(404, f"no kv_context {context_id!r} (unknown or deleted; compact the document "
                           "again with POST /v1/compact)", "invalid_request_error", "kv_context",
                           "context_not_found")
        return rec

    def find(self, context_id: str, tenant: str) -> ContextRecord | None:
        return self.store.get(context_id, tenant)

    def delete(self, context_id: str, tenant: str) -> KvContextDeleted:
        self.get(context_id, tenant)
        busy = self._readers.get(context_id, 0) > 0
        self.store.delete(context_id, keep_file=busy)
        if busy:
            self._deleted.add(context_id)
        return KvContextDeleted(id=context_id)

    def check_quota(self, tenant: str, slots: int, replacing: str | None = None) -> None:
        try:
            self.store.check_quota(tenant, slots * self.kv_bytes_per_token, replacing)
        except QuotaExceeded as exc:
            raise ApiError(429, str(exc), "insufficient_quota", code="quota_exceeded") from None

    def add(self, cache, **record) -> ContextRecord:
        try:
            rec = self.store.add(cache, kv_bytes_per_token=self.kv_bytes_per_token, **record)
        except QuotaExceeded as exc:
            raise ApiError(429, str(exc), "insufficient_quota", code="quota_exceeded") from None
        return rec

    def check_file(self, rec: ContextRecord) -> None:
        """404 when a context's file is gone although its record is here (deleted by another replica, or a lost
        disk): checked before the request reaches the engine."""
        if not Path(self.path(rec.id)).is_file():
            raise ApiError(404, f"the stored file of kv_context {rec.id!r} is gone (deleted elsewhere or lost); "
                           "compact the document again", "invalid_request_error", "kv_context", "context_gone")

    def load_failure(self, context_id: str, version: str) -> ApiError:
        """The error for a request whose context the engine could not load: gone (404), rewritten under the same
        id since the request started (409), or unreadable (500)."""
        rec = self.store.get(context_id)
        if rec is None or not Path(self.path(context_id)).is_file():
            return ApiError(404, f"kv_context {context_id!r} was deleted while the request waited",
                            "invalid_request_error", "kv_context", "context_gone")
        if rec.version != version:
            return ApiError(409, f"kv_context {context_id!r} was rewritten while the request waited; ask again",
                            "invalid_request_error", "kv_context", "context_changed")
        return ApiError(500, f"the stored file of kv_context {context_id!r} could not be loaded (truncated or "
                        "corrupt?); compact the document again", "server_error", "kv_context", "context_unreadable")

    def path(self, context_id: str) -> str:
        return str(self.store.path(context_id))

    def transfer(self, rec: ContextRecord) -> ContextTransfer:
        """What a request over `rec` carries to the engine; its salt names the context's prefix-cache blocks (one
        set per context version and beta mode)."""
        salt = f"kvcat:{rec.id}:{rec.version}:{'beta' if self.beta else 'nobeta'}"
        return ContextTransfer(rec.id, self.path(rec.id), rec.num_slots, rec.num_tokens, salt)

    # ---- readers ---------------------------------------------------------------------------------------
    def acquire(self, context_id: str) -> None:
        self._readers[context_id] = self._readers.get(context_id, 0) + 1

    def release(self, context_id: str) -> None:
        left = self._readers.get(context_id, 1) - 1
        if left > 0:
            self._readers[context_id] = left
            return
        self._readers.pop(context_id, None)
        if context_id in self._deleted:
            self._deleted.discard(context_id)
            self.store.remove_file(context_id)

    # ---- gauges ----------------------------------------------------------------------------------------
    def refresh_gauges(self) -> None:
        totals: dict[tuple[str, str], list[int]] = {}
        for rec in self.store.list():
            acc = totals.setdefault((rec.model, rec.method), [0, 0, 0, 0, 0, 0])
            for i, value in enumerate((1, rec.num_tokens, rec.num_slots, rec.kv_bytes_full, rec.kv_bytes_compacted,
                                       rec.kv_bytes_side)):
                acc[i] += value
        gauges = (metrics.CONTEXTS_STORED, metrics.ORIGINAL_TOKENS, metrics.COMPACTED_TOKENS,
                  metrics.KV_BYTES_FULL, metrics.KV_BYTES_COMPACTED, metrics.KV_BYTES_SIDE)
        for gauge in (*gauges, metrics.KV_BYTES_SAVED):
            gauge.clear()
        for (model, method), values in totals.items():
            for gauge, value in zip(gauges, values):
                gauge.labels(model, method).set(value)
            metrics.KV_BYTES_SAVED.labels(model, method).set(values[3] - values[4])
