"""The context store without a server: durable records, verification and quarantine at reload, tenants and
quotas, and the same behaviour on an fsspec store (in-memory filesystem) as on the local disk."""

from __future__ import annotations

import uuid

import pytest
import torch

from kvcat.cache import CompactCache
from kvcat.server.store import ContextStore, FsspecStore, LocalDisk, QuotaExceeded, open_blobs

PER_TOKEN = 1000


def _cache(n: int = 40, t: int = 8, seed: int = 0) -> CompactCache:
    g = torch.Generator().manual_seed(seed)
    return CompactCache(keys=[torch.randn(2, t, 4, generator=g) for _ in range(2)],
                        values=[torch.randn(2, t, 4, generator=g) for _ in range(2)],
                        beta=[torch.zeros(2, t) for _ in range(2)], num_tokens=n, model_fingerprint="fp0",
                        method="am-hak")


@pytest.fixture(params=["local", "fsspec"])
def blobs(request, tmp_path):
    if request.param == "local":
        return lambda: LocalDisk(tmp_path / "store")
    url = f"memory://kvcat-test-{uuid.uuid4().hex[:8]}"
    return lambda: FsspecStore(url, tmp_path / f"mirror-{uuid.uuid4().hex[:4]}")


def _add(store, tenant="a", seed=0, **kw):
    return store.add(_cache(seed=seed), model="m", compaction_seconds=0.1, source={"text": "doc"},
                     kv_bytes_per_token=PER_TOKEN, tenant=tenant, **kw)


def test_records_survive_a_reload_and_stay_per_tenant(blobs):
    store = ContextStore(blobs(), fingerprint="fp0")
    a, b = _add(store, "a", 0), _add(store, "b", 1)
    again = ContextStore(blobs(), fingerprint="fp0")
    assert [r.id for r in again.list("a")] == [a.id] and [r.id for r in again.list("b")] == [b.id]
    assert again.get(a.id, "b") is None and again.get(a.id, "a").num_slots == 8
    loaded = CompactCache.load(again.path(a.id), expect_fingerprint="fp0")
    torch.testing.assert_close(loaded.keys[0], _cache(seed=0).keys[0])
    assert ContextStore(blobs(), fingerprint="another-model").list() == []  # left alone, not served


def test_corrupt_and_orphaned_files_are_quarantined_not_deleted(blobs):
    store = ContextStore(blobs(), fingerprint="fp0")
    good, bad = _add(store, seed=0), _add(store, seed=1)
    raw = bytearray(store.blobs.get(f"{bad.id}.kvc"))
    raw[-5] ^= 0xFF
    store.blobs.put(f"{bad.id}.kvc", bytes(raw))
    store.blobs.put("ctx-0123456789abcdef.kvc", _cache(seed=2).to_bytes())  # a cache without its record
    store.blobs.put(".ctx-half-written.kvc.tmp", b"partial")  # an interrupted write
    assert ContextStore(blobs(), fingerprint="fp0").quarantined == [bad.id]  # young files: maybe in flight
    assert store.blobs.exists("ctx-0123456789abcdef.kvc") and store.blobs.exists(".ctx-half-written.kvc.tmp")
    again = ContextStore(blobs(), fingerprint="fp0", in_flight_s=0)
    assert [r.id for r in again.list()] == [good.id]
    assert again.quarantined == ["ctx-0123456789abcdef"]  # now old enough
    names = again.blobs.names()
    assert not any(n.startswith(".") for n in names) and f"{bad.id}.kvc" not in names
    if isinstance(again.blobs, LocalDisk):
        assert len(list((again.blobs.root / "quarantine").iterdir())) == 3  # record + cache + orphan, all kept


def test_replicas_see_each_others_writes_and_deletes(blobs):
    a, b = ContextStore(blobs(), fingerprint="fp0"), ContextStore(blobs(), fingerprint="fp0", max_contexts_per_tenant=2)
    first = _add(a, "t", 0)
    assert b.get(first.id, "t") == first and [r.id for r in b.list("t")] == [first.id]
    _add(a, "t", 1)
    with pytest.raises(QuotaExceeded, match="holds 2 contexts"):  # counted over the shared store
        _add(b, "t", 2)
    a.delete(first.id)
    assert b.get(first.id, "t") is None and first.id not in {r.id for r in b.list()}
    foreign = ContextStore(blobs(), fingerprint="fp1")
    assert foreign.list() == [] and foreign.get(a.list()[0].id) is None  # another model's contexts


def test_quotas_per_tenant(tmp_path):
    store = ContextStore(tmp_path, fingerprint="fp0", max_contexts_per_tenant=2, max_bytes_per_tenant=20_000)
    first = _add(store, "a", 0)
    _add(store, "a", 1)
    with pytest.raises(QuotaExceeded, match="holds 2 contexts"):
        _add(store, "a", 2)
    _add(store, "b", 3)  # another tenant is not affected
    store.delete(first.id)
    _add(store, "a", 4)
    tight = ContextStore(tmp_path / "tight", fingerprint="fp0", max_bytes_per_tenant=10_000)
    _add(tight, "a", 0)  # 8 slots x 1000 bytes
    with pytest.raises(QuotaExceeded, match="over its quota"):
        _add(tight, "a", 1)


def test_open_blobs_picks_the_backend(tmp_path):
    assert isinstance(open_blobs(tmp_path / "x"), LocalDisk)
    assert isinstance(open_blobs(f"file://{tmp_path}/y"), LocalDisk)
    assert isinstance(open_blobs(f"memory://kvcat-{uuid.uuid4().hex[:6]}", tmp_path / "m"), FsspecStore)
