"""CompactCache file format: round trip, atomic writes, and refusal of bad or foreign files."""

import pytest
import torch

from kvcat.cache import CacheError, CompactCache


def _cache(layers=2, heads=2, t=5, d=4, n=20):
    g = torch.Generator().manual_seed(0)
    beta = [torch.randn(heads, t, generator=g) for _ in range(layers)]
    beta[0][1, -1] = float("-inf")  # a padded slot: head 1 keeps one slot fewer
    return CompactCache([torch.randn(heads, t, d, generator=g) for _ in range(layers)],
                        [torch.randn(heads, t, d, generator=g) for _ in range(layers)], beta,
                        num_tokens=n, model_fingerprint="abc", method="am-hak", params={"ratio": 4})


def test_round_trip(tmp_path):
    c = _cache()
    path = c.save(tmp_path / "doc.kvc")
    d = CompactCache.load(path, expect_fingerprint="abc")
    assert all(torch.equal(a, b) for a, b in zip(c.keys + c.values + c.beta, d.keys + d.values + d.beta))
    assert d.params == {"ratio": 4} and d.method == "am-hak" and d.num_tokens == 20
    assert d.head_counts().tolist() == [[5, 4], [5, 5]]


def test_other_model_refused(tmp_path):
    path = _cache().save(tmp_path / "doc.kvc")
    with pytest.raises(CacheError, match="made for model abc"):
        CompactCache.load(path, expect_fingerprint="xyz")


def test_truncated_and_corrupt_files_refused(tmp_path):
    path = _cache().save(tmp_path / "doc.kvc")
    data = path.read_bytes()
    (tmp_path / "short.kvc").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="truncated"):
        CompactCache.load(tmp_path / "short.kvc")
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    (tmp_path / "flip.kvc").write_bytes(bytes(flipped))
    with pytest.raises(CacheError, match="checksum"):
        CompactCache.load(tmp_path / "flip.kvc")


def test_nan_refused():
    c = _cache()
    c.keys[1][0, 0, 0] = float("nan")
    with pytest.raises(CacheError, match="NaN"):
        c.validate()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import os

    c = _cache()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        c.save(tmp_path / "doc.kvc")
    assert list(tmp_path.iterdir()) == []
