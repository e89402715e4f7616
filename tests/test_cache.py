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


def _hybrid(layers=2, heads=3, t=5, d=4, n=20):
    """Layer 0 keeps head 1 whole (15 side slots); layer 1 has no side slots."""
    from kvcat.cache import SideHeads

    c = _cache(layers, heads, t, d, n)
    g = torch.Generator().manual_seed(1)
    c.side = [SideHeads(torch.tensor([1]), torch.randn(1, n - t, d, generator=g), torch.randn(1, n - t, d, generator=g),
                        torch.zeros(1, n - t)), None]
    c.validate()
    return c


def test_hybrid_round_trip_and_its_bytes(tmp_path):
    c = _hybrid()
    d = CompactCache.load(c.save(tmp_path / "doc.kvc"))
    assert d.is_hybrid and d.side[1] is None and d.side[0].heads.tolist() == [1]
    assert torch.equal(d.side[0].keys, c.side[0].keys) and torch.equal(d.side[0].values, c.side[0].values)
    assert d.head_counts().tolist() == [[5, 19, 5], [5, 5, 5]]  # head 1 of layer 0: 4 paged (one padded) + 15
    assert d.held_slots() == 2 * 3 * 5 + 15 and d.side_slots() == 15
    assert d.served_ratio == pytest.approx(2 * 3 * 20 / 45)
    assert d.kv_bytes(torch.float32) == 2 * 45 * 4 * 4
    k, v, b = d.layer_view(0)  # the paged slots, then the side slots; heads without any padded with -inf
    assert k.shape == (3, 20, 4) and torch.equal(k[1, 5:], c.side[0].keys[0])
    assert torch.isinf(b[[0, 2], 5:]).all() and (b[1, 5:] == 0).all()
    assert [x.shape[1] for x in d.layer_view(1)[:2]] == [5, 5]


def test_format_1_files_still_load(tmp_path, monkeypatch):
    import kvcat.cache as cache_mod

    monkeypatch.setattr(cache_mod, "FORMAT_VERSION", 1)
    path = _cache().save(tmp_path / "old.kvc")
    monkeypatch.undo()
    assert CompactCache.load(path).head_counts().tolist() == [[5, 4], [5, 5]]


@pytest.mark.parametrize("edit, match", [
    (lambda s: setattr(s, "heads", torch.tensor([3])), "ascending KV heads of the model's 3"),
    (lambda s: setattr(s, "heads", torch.tensor([1, 1])), "ascending KV heads"),
    (lambda s: setattr(s, "keys", s.keys[:, :, :2]), "do not agree"),
    (lambda s: setattr(s, "keys", torch.cat([s.keys, s.keys], 1)), "do not agree"),
    (lambda s: s.values.__setitem__((0, 0, 0), float("nan")), "NaN"),
])
def test_bad_side_slots_refused(edit, match):
    c = _hybrid()
    edit(c.side[0])
    with pytest.raises(CacheError, match=match):
        c.validate()


def test_a_head_cannot_hold_more_than_the_context():
    c = _hybrid()
    c.side[0].keys, c.side[0].values = torch.randn(1, 17, 4), torch.randn(1, 17, 4)
    c.side[0].beta = torch.zeros(1, 17)  # 4 live paged slots + 17
    with pytest.raises(CacheError, match="more slots than the 20-token context"):
        c.validate()


def test_hybrid_caches_are_not_extended_block_by_block():
    with pytest.raises(CacheError, match="hybrid"):
        _hybrid().concat(_cache())
