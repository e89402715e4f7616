"""The server's context store: compacted caches on disk (one CompactCache file each) plus their records.

The file is what vLLM's workers read (the connector loads it by path), so compacted K/V cross the process
boundary as an atomically written file, never through vLLM's IPC. Records are also written beside the
files as JSON, so a restarted server with the same store folder (and model) still serves its contexts.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvcat.cache import CompactCache

_ID = re.compile(r"^ctx-[0-9a-f]{8,32}$")


@dataclass
class ContextRecord:
    id: str
    model: str
    fingerprint: str
    method: str
    num_tokens: int  # N
    num_slots: int  # t (stored width, padded heads included)
    ratio: float
    kv_bytes_full: int
    kv_bytes_compacted: int
    compaction_seconds: float
    created: int
    source: dict = field(default_factory=dict)  # how the context was rendered: {"text": ...} or {"messages": [...]}
    beta_nonzero: bool = False
    origin: str = "compact"  # "compact" (POST /v1/compact) or "auto" (on-the-fly compaction in chat)
    version: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # new for every write under an id

    def public(self) -> dict:
        return {"id": self.id, "object": "kv_context", "model": self.model, "method": self.method,
                "original_tokens": self.num_tokens, "compacted_tokens": self.num_slots,
                "ratio": round(self.ratio, 3), "kv_bytes_full": self.kv_bytes_full,
                "kv_bytes_compacted": self.kv_bytes_compacted,
                "kv_bytes_saved": self.kv_bytes_full - self.kv_bytes_compacted,
                "compaction_seconds": round(self.compaction_seconds, 4), "created": self.created,
                "origin": self.origin}


class ContextStore:
    def __init__(self, root: str | os.PathLike, fingerprint: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, ContextRecord] = {}
        self._lock = threading.Lock()
        for meta in sorted(self.root.glob("ctx-*.json")):
            try:
                rec = ContextRecord(**json.loads(meta.read_text()))
            except (OSError, TypeError, ValueError):
                continue
            if self.path(rec.id).is_file() and (fingerprint is None or rec.fingerprint == fingerprint):
                self._records[rec.id] = rec

    @staticmethod
    def new_id() -> str:
        return f"ctx-{uuid.uuid4().hex[:24]}"

    @staticmethod
    def valid_id(context_id: str) -> bool:
        return bool(_ID.match(context_id))

    def path(self, context_id: str) -> Path:
        return self.root / f"{context_id}.kvc"

    def add(self, cache: CompactCache, *, model: str, compaction_seconds: float, source: dict,
            kv_bytes_per_token: int, context_id: str | None = None, origin: str = "compact") -> ContextRecord:
        cid = context_id or self.new_id()
        cache.save(self.path(cid))
        rec = ContextRecord(
            id=cid, model=model, fingerprint=cache.model_fingerprint, method=cache.method,
            num_tokens=cache.num_tokens, num_slots=cache.num_slots, ratio=cache.num_tokens / cache.num_slots,
            kv_bytes_full=cache.num_tokens * kv_bytes_per_token,
            kv_bytes_compacted=cache.num_slots * kv_bytes_per_token, compaction_seconds=compaction_seconds,
            created=int(time.time()), source=source, origin=origin,
            beta_nonzero=any(bool((b != 0).any()) for b in cache.beta))
        tmp = self.root / f".{cid}.json.tmp"
        tmp.write_text(json.dumps(asdict(rec)))
        os.replace(tmp, self.root / f"{cid}.json")
        with self._lock:
            self._records[cid] = rec
        return rec

    def get(self, context_id: str) -> ContextRecord | None:
        with self._lock:
            return self._records.get(context_id)

    def list(self) -> list[ContextRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: (r.created, r.id))

    def delete(self, context_id: str, keep_file: bool = False) -> ContextRecord | None:
        """Forget a context; `keep_file` leaves its cache file for requests still in flight (then call
        `remove_file`)."""
        with self._lock:
            rec = self._records.pop(context_id, None)
        if rec is not None:
            (self.root / f"{context_id}.json").unlink(missing_ok=True)
            if not keep_file:
                self.remove_file(context_id)
        return rec

    def remove_file(self, context_id: str) -> None:
        self.path(context_id).unlink(missing_ok=True)
