"""The durable context store: every acknowledged compacted context, as a CompactCache file plus a record.

Tiers: a context's K/V lives in vLLM's paged blocks while requests use it (and after, until vLLM's prefix
cache evicts them, LRU), in host RAM in each worker's small LRU of loaded contexts
(`vllm_adapter.worker_contexts`), and always on disk here; only DELETE removes it from disk.

Durability: `add` writes the cache file, then the record, each atomically (temporary file, fsync, rename,
fsync of the folder), and only then makes the context visible; a context whose record exists was fully
written. At start every record is loaded and its cache file verified (format, checksum, model): corrupt or
orphaned files are moved to `quarantine/` (never served, never deleted), stale temporary files removed.

Blobs go through a small `BlobStore` interface: `LocalDisk` (default), or `FsspecStore` for a store shared by
several replicas (any fsspec URL; files are mirrored into a local folder, because vLLM's workers read
contexts by local path). Tenants: each record names its tenant; lookups for another tenant find nothing.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

from kvcat.cache import CacheError, CompactCache, atomic_write

log = logging.getLogger("kvcat.server")
_ID = re.compile(r"^ctx-[0-9a-f]{8,32}$")
QUARANTINE = "quarantine"
IN_FLIGHT_S = 600.0  # a temporary or record-less file younger than this may be another replica's write in progress


class QuotaExceeded(Exception):
    """A tenant already holds as many contexts (or bytes) as its quota allows."""


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
    kv_bytes_compacted: int  # paged slots plus side slots
    compaction_seconds: float
    created: int
    source: dict = field(default_factory=dict)  # {"text": ...}, {"messages": [...]} or {"token_ids": {count, sha256}}
    beta_nonzero: bool = False
    kv_bytes_side: int = 0  # a hybrid's side slots (retrieval heads kept whole), part of kv_bytes_compacted
    fit: dict = field(default_factory=dict)  # heads carrying a fit, in all and per layer (`compaction.base.fit_stats`)
    origin: str = "compact"  # "compact" (POST /v1/compact) or "auto" (on-the-fly compaction in chat)
    version: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # new for every write under an id
    tenant: str = "default"

    def public(self) -> dict:
        return {"id": self.id, "object": "kv_context", "model": self.model, "method": self.method,
                "original_tokens": self.num_tokens, "compacted_tokens": self.num_slots,
                "ratio": round(self.ratio, 3), "kv_bytes_full": self.kv_bytes_full,
                "kv_bytes_compacted": self.kv_bytes_compacted, "kv_bytes_side": self.kv_bytes_side,
                "kv_bytes_saved": self.kv_bytes_full - self.kv_bytes_compacted,
                "compaction_seconds": round(self.compaction_seconds, 4), "created": self.created,
                "origin": self.origin, **({"fit": self.fit} if self.fit else {})}

    @classmethod
    def from_json(cls, text: str) -> "ContextRecord":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------------------------------
# Blob stores


class BlobStore(Protocol):
    def put(self, name: str, data: bytes) -> None: ...  # atomic: readers see all of it or none
    def get(self, name: str) -> bytes: ...
    def exists(self, name: str) -> bool: ...
    def delete(self, name: str) -> None: ...
    def names(self) -> list[str]: ...  # every blob name, temporary ones (".name.xxxx") included
    def quarantine(self, name: str) -> None: ...  # move aside, never delete
    def local_path(self, name: str) -> Path: ...  # a local file with the blob's content (for vLLM's workers)
    def age_s(self, name: str) -> float | None: ...  # seconds since the blob was written (None: unknown)

    local_root: Path  # the local folder those files are in


class LocalDisk:
    def __init__(self, root: str | os.PathLike):
        self.root = self.local_root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, data: bytes) -> None:
        atomic_write(self.root / name, data)

    def get(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file())

    def quarantine(self, name: str) -> None:
        target = self.root / QUARANTINE
        target.mkdir(exist_ok=True)
        if (self.root / name).exists():
            os.replace(self.root / name, target / f"{int(time.time())}-{name}")

    def local_path(self, name: str) -> Path:
        return self.root / name

    def age_s(self, name: str) -> float | None:
        try:
            return time.time() - (self.root / name).stat().st_mtime
        except OSError:
            return None


class FsspecStore:
    """A shared store at any fsspec URL (s3://bucket/prefix, gs://..., memory://...), mirrored locally."""

    def __init__(self, url: str, cache_dir: str | os.PathLike):
        import fsspec

        self.fs, self.base = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.base, exist_ok=True)
        self.local = LocalDisk(cache_dir)
        self.local_root = self.local.root

    def _p(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"

    def put(self, name: str, data: bytes) -> None:
        tmp = f".{name}.{uuid.uuid4().hex[:8]}"
        self.fs.pipe_file(self._p(tmp), data)
        self.fs.mv(self._p(tmp), self._p(name))
        self.local.put(name, data)

    def get(self, name: str) -> bytes:
        return self.fs.cat_file(self._p(name))

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._p(name))

    def delete(self, name: str) -> None:
        if self.fs.exists(self._p(name)):
            self.fs.rm_file(self._p(name))
        self.local.delete(name)

    def names(self) -> list[str]:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.base, detail=False)
                      if self.fs.isfile(p))

    def quarantine(self, name: str) -> None:
        if self.fs.exists(self._p(name)):
            self.fs.mv(self._p(name), self._p(f"{QUARANTINE}/{int(time.time())}-{name}"))
        self.local.delete(name)

    def local_path(self, name: str) -> Path:
        if not self.local.exists(name):
            self.local.put(name, self.get(name))
        return self.local.local_path(name)

    def age_s(self, name: str) -> float | None:
        try:
            modified = self.fs.modified(self._p(name))
        except (NotImplementedError, OSError, AttributeError):
            return None
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=datetime.timezone.utc)
        return time.time() - modified.timestamp()


def open_blobs(location: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> BlobStore:
    """A folder path, or an fsspec URL (scheme://...) mirrored into `cache_dir`."""
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        return FsspecStore(text, cache_dir or Path.home() / ".cache" / "kvcat" / "store-mirror")
    return LocalDisk(text.removeprefix("file://"))


# --------------------------------------------------------------------------------------------------
# The store


class ContextStore:
    """Every acknowledged context of this model. Several replicas may share one store: a lookup that misses
    and every listing read what the others wrote or deleted since, quotas count the shared store, and the
    clean-up at start leaves files young enough to be another replica's write in progress."""

    def __init__(self, blobs: BlobStore | str | os.PathLike, fingerprint: str | None = None,
                 max_contexts_per_tenant: int | None = None, max_bytes_per_tenant: int | None = None,
                 in_flight_s: float = IN_FLIGHT_S):
        self.blobs = blobs if not isinstance(blobs, (str, os.PathLike)) else LocalDisk(blobs)
        self.fingerprint = fingerprint
        self.max_contexts, self.max_bytes = max_contexts_per_tenant, max_bytes_per_tenant
        self.in_flight_s = in_flight_s
        self._foreign: set[str] = set()  # ids of records another model's server wrote
        self._records: dict[str, ContextRecord] = {}
        self._lock = threading.Lock()
        self.quarantined: list[str] = []
        self._reload()

    @property
    def root(self) -> Path:
        """The local folder of the context files (for scratch files beside them)."""
        return self.blobs.local_root

    def _reload(self) -> None:
        names = self.blobs.names()
        records = [n for n in names if n.endswith(".json") and n.startswith("ctx-")]
        known = set()
        for name in records:
            cid = name[:-5]
            known.add(f"{cid}.kvc")
            try:
                rec = ContextRecord.from_json(self.blobs.get(name).decode())
                if rec.id != cid or not self.valid_id(cid):
                    raise ValueError(f"record names {rec.id!r}")
                if self.fingerprint is not None and rec.fingerprint != self.fingerprint:
                    self._foreign.add(cid)
                    continue  # another model's context: left alone, not served by this one
                cache = CompactCache.from_bytes(self.blobs.get(f"{cid}.kvc"), expect_fingerprint=rec.fingerprint,
                                                where=f"{cid}.kvc")
                if cache.num_tokens != rec.num_tokens or cache.num_slots != rec.num_slots:
                    raise ValueError("the cache file does not match its record")
            except (OSError, ValueError, TypeError, CacheError, UnicodeDecodeError) as exc:
                log.error("context %s is corrupt (%s): moved to %s/", cid, exc, QUARANTINE)
                self.blobs.quarantine(name)
                self.blobs.quarantine(f"{cid}.kvc")
                self.quarantined.append(cid)
                continue
            self._records[cid] = rec
        for name in names:
            if name.startswith(".") or (name.endswith(".kvc") and name not in known):
                age = self.blobs.age_s(name)
                if age is None or age < self.in_flight_s:
                    continue  # maybe another replica's write in progress: left alone
            if name.startswith("."):  # an interrupted atomic write: never acknowledged
                self.blobs.delete(name)
            elif name.endswith(".kvc") and name not in known:  # a cache whose record was never written
                log.warning("orphaned cache file %s (no record): moved to %s/", name, QUARANTINE)
                self.blobs.quarantine(name)
                self.quarantined.append(name[:-4])

    @staticmethod
    def new_id() -> str:
        return f"ctx-{uuid.uuid4().hex[:24]}"

    @staticmethod
    def valid_id(context_id: str) -> bool:
        return bool(_ID.match(context_id))

    def path(self, context_id: str) -> Path:
        """The local file vLLM's workers load."""
        return self.blobs.local_path(f"{context_id}.kvc")

    def usage(self, tenant: str) -> tuple[int, int]:
        """(contexts, compacted KV bytes) a tenant holds against its quota, over the whole (shared) store. On-the-fly
        contexts do not count: the server evicts them itself (least recently used, `AutoCompaction.max_contexts`)."""
        self.sync()
        with self._lock:
            mine = [r for r in self._records.values() if r.tenant == tenant and r.origin != "auto"]
        return len(mine), sum(r.kv_bytes_compacted for r in mine)

    def check_quota(self, tenant: str, new_bytes: int = 0, replacing: str | None = None) -> None:
        count, used = self.usage(tenant)
        old = self.get(replacing, tenant) if replacing else None
        if old is not None:
            count, used = count - 1, used - old.kv_bytes_compacted
        if self.max_contexts is not None and count + 1 > self.max_contexts:
            raise QuotaExceeded(f"tenant {tenant!r} holds {count} contexts, its quota; delete some first")
        if self.max_bytes is not None and used + new_bytes > self.max_bytes:
            raise QuotaExceeded(f"tenant {tenant!r} would hold {used + new_bytes} bytes of compacted KV, over its "
                                f"quota of {self.max_bytes}; delete some contexts first")

    def add(self, cache: CompactCache, *, model: str, compaction_seconds: float, source: dict,
            kv_bytes_per_token: int, context_id: str | None = None, origin: str = "compact",
            tenant: str = "default") -> ContextRecord:
        cid = context_id or self.new_id()
        per_slot = kv_bytes_per_token / (cache.num_layers * cache.num_kv_heads)  # one head's slot in one layer
        held, side = round(cache.held_slots() * per_slot), round(cache.side_slots() * per_slot)
        if origin != "auto":
            self.check_quota(tenant, held, replacing=cid)
        rec = ContextRecord(
            id=cid, model=model, fingerprint=cache.model_fingerprint, method=cache.method,
            num_tokens=cache.num_tokens, num_slots=cache.num_slots, ratio=cache.served_ratio,
            kv_bytes_full=cache.num_tokens * kv_bytes_per_token, kv_bytes_compacted=held, kv_bytes_side=side,
            compaction_seconds=compaction_seconds,
            created=int(time.time()), source=source, origin=origin, tenant=tenant,
            beta_nonzero=any(bool((b != 0).any()) for b in cache.beta), fit=cache.info.get("fit", {}))
        self.blobs.put(f"{cid}.kvc", cache.to_bytes())
        self.blobs.put(f"{cid}.json", json.dumps(asdict(rec)).encode())
        with self._lock:
            self._records[cid] = rec
        return rec

    def get(self, context_id: str, tenant: str | None = None) -> ContextRecord | None:
        with self._lock:
            rec = self._records.get(context_id)
        if rec is None:
            rec = self._discover(context_id)  # written by another replica since this one started
        elif not self.blobs.exists(f"{context_id}.json"):  # deleted by another replica
            with self._lock:
                self._records.pop(context_id, None)
            rec = None
        return rec if rec is not None and (tenant is None or rec.tenant == tenant) else None

    def _discover(self, context_id: str) -> ContextRecord | None:
        """A context another replica stored: its record, once its cache file is there too (the file is written
        first). Its checksum is verified when the engine loads it."""
        if not self.valid_id(context_id) or not self.blobs.exists(f"{context_id}.json"):
            return None
        try:
            rec = ContextRecord.from_json(self.blobs.get(f"{context_id}.json").decode())
        except (OSError, ValueError, TypeError, UnicodeDecodeError) as exc:
            log.warning("unreadable record of context %s (%s): not served", context_id, exc)
            return None
        if rec.id != context_id or (self.fingerprint is not None and rec.fingerprint != self.fingerprint):
            self._foreign.add(context_id)  # another model's: never served here, not read again
            return None
        if not self.blobs.exists(f"{context_id}.kvc"):
            return None
        with self._lock:
            self._records[context_id] = rec
        return rec

    def sync(self) -> None:
        """See the other replicas' writes and deletes: one listing of the store."""
        ids = {n[:-5] for n in self.blobs.names() if n.startswith("ctx-") and n.endswith(".json")}
        with self._lock:
            gone = [cid for cid in self._records if cid not in ids]
            for cid in gone:
                del self._records[cid]
            new = ids - set(self._records) - self._foreign
        for cid in new:
            self._discover(cid)

    def list(self, tenant: str | None = None) -> list[ContextRecord]:
        self.sync()
        with self._lock:
            recs = [r for r in self._records.values() if tenant is None or r.tenant == tenant]
        return sorted(recs, key=lambda r: (r.created, r.id))

    def delete(self, context_id: str, keep_file: bool = False) -> ContextRecord | None:
        """Forget a context; `keep_file` leaves its cache file for requests still in flight (then call
        `remove_file`)."""
        with self._lock:
            rec = self._records.pop(context_id, None)
        if rec is not None:
            self.blobs.delete(f"{context_id}.json")
            if not keep_file:
                self.remove_file(context_id)
        return rec

    def remove_file(self, context_id: str) -> None:
        self.blobs.delete(f"{context_id}.kvc")
