"""CompactCache: the one compacted-KV type and file format shared by the CLI, evaluation, server and store.

For every layer and KV head a compacted cache holds t slots (C_k, beta, C_v): what a paged engine stores, t
slots for every head. Keys are post-RoPE at the positions of the original N-token context, so new tokens
continue at positions N, N+1, ... Heads may keep different numbers of slots (non-uniform budgets): tensors are
padded to the largest count with beta = -inf, which removes a slot from attention exactly.

A hybrid cache adds `side`: for a few heads (retrieval heads kept whole), the slots beyond the t paged ones
(`SideHeads`). A head attends over its t slots and its side slots together; the server keeps the side slots
outside vLLM's paged blocks. Its bytes are counted: `held_slots` and `served_ratio` are what memory it takes.

On disk: one safetensors file (tensors `k.{layer}`, `v.{layer}`, `beta.{layer}`, and for a hybrid
`side.heads.{layer}`, `side.k.{layer}`, `side.v.{layer}`, `side.beta.{layer}`) whose header carries the
metadata as JSON, including a sha256 of the tensor bytes so truncation and corruption are detected. Format 2
added the side tensors; format 1 files (none) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)


class CacheError(ValueError):
    """A compacted cache is malformed, corrupt, or belongs to another model."""


@dataclass
class SideHeads:
    """One layer's side slots: for the KV heads `heads` [k] (long, ascending), keys, values [k, s, head_dim] and
    beta [k, s] (-inf pads a head with fewer side slots), attended together with those heads' paged slots."""

    heads: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    beta: torch.Tensor

    def to(self, device=None, dtype=None) -> "SideHeads":
        return SideHeads(self.heads.to(device=device), *(x.to(device=device, dtype=dtype)
                                                         for x in (self.keys, self.values, self.beta)))


@dataclass
class CompactCache:
    keys: list[torch.Tensor]  # per layer [num_kv_heads, t, head_dim], post-RoPE
    values: list[torch.Tensor]  # per layer [num_kv_heads, t, head_dim]
    beta: list[torch.Tensor]  # per layer [num_kv_heads, t]; -inf marks padding
    num_tokens: int  # N, the original context length
    model_fingerprint: str
    method: str
    params: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # free-form provenance (document id, timings, ...)
    side: list[SideHeads | None] = field(default_factory=list)  # per layer, or empty: no side slots

    def __post_init__(self) -> None:
        self.validate()

    # ---- shape facts -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_slots(self) -> int:
        """t: slots per head as stored (the largest head budget)."""
        return self.keys[0].shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys[0].shape[0]

    @property
    def is_hybrid(self) -> bool:
        return any(s is not None for s in self.side)

    def head_counts(self) -> torch.Tensor:
        """[num_layers, num_kv_heads] number of live (beta > -inf) slots of each head, side slots included."""
        counts = torch.stack([torch.isfinite(b).sum(-1) for b in self.beta])
        for i, s in enumerate(self.side):
            if s is not None:
                counts[i, s.heads.to(counts.device)] += torch.isfinite(s.beta).sum(-1).to(counts.device)
        return counts

    @property
    def ratio(self) -> float:
        """Compaction ratio N / (mean live slots per head)."""
        return self.num_tokens / max(self.head_counts().float().mean().item(), 1e-9)

    def side_slots(self) -> int:
        """Slots held beside the paged ones (per head and layer, padding included)."""
        return sum(s.beta.numel() for s in self.side if s is not None)

    def held_slots(self) -> int:
        """Slots a server holds for this cache, over all layers and heads: t paged slots for every head (padded
        ones too: a paged block stores every head of a slot) plus the side slots."""
        return self.num_layers * self.num_kv_heads * self.num_slots + self.side_slots()

    @property
    def served_ratio(self) -> float:
        """The full context's KV bytes over the bytes a server holds for this cache (`held_slots`)."""
        return self.num_layers * self.num_kv_heads * self.num_tokens / self.held_slots()

    def kv_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of K and V this cache occupies once stored as `dtype` (padded and side slots included)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.held_slots() * self.keys[0].shape[2] * elem

    def side_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """One layer's side slots for every head: keys, values [H, s, d] and beta [H, s], heads without side slots
        padded with beta = -inf; None where the layer has none."""
        side = self.side[layer] if self.side else None
        if side is None:
            return None
        k, v, b = self.keys[layer], self.values[layer], self.beta[layer]
        heads, s = side.heads.to(k.device), side.beta.shape[1]
        sk, sv = k.new_zeros(k.shape[0], s, k.shape[2]), v.new_zeros(v.shape[0], s, v.shape[2])
        sb = b.new_full((b.shape[0], s), float("-inf"))
        sk[heads], sv[heads], sb[heads] = side.keys.to(k), side.values.to(v), side.beta.to(b)
        return sk, sv, sb

    def layer_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer's keys, values [H, t + s, d] and beta [H, t + s]: the paged slots followed by the side slots
        (`side_view`), what attention over this cache reads."""
        paged = self.keys[layer], self.values[layer], self.beta[layer]
        side = self.side_view(layer)
        return paged if side is None else tuple(torch.cat([x, y], 1) for x, y in zip(paged, side))

    def to(self, device=None, dtype=None) -> "CompactCache":
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return CompactCache([move(k) for k in self.keys], [move(v) for v in self.values],
                            [b.to(device=device, dtype=dtype) for b in self.beta], self.num_tokens,
                            self.model_fingerprint, self.method, dict(self.params), dict(self.info),
                            [s.to(device, dtype) if s is not None else None for s in self.side])

    def concat(self, block: "CompactCache") -> "CompactCache":
        """This cache followed by `block`, the compacted form of the tokens that came after it (its keys
        at positions num_tokens..): one cache of both, the kind incremental compaction builds."""
        block.check_model(self.model_fingerprint)
        if self.is_hybrid or block.is_hybrid:
            raise CacheError("a hybrid cache (heads with side slots) cannot be extended block by block")
        if block.num_layers != self.num_layers or block.keys[0].shape[0] != self.keys[0].shape[0]:
            raise CacheError("the blocks have different numbers of layers or KV heads")
        cat = lambda a, b: [torch.cat([x, y.to(x.device, x.dtype)], dim=1) for x, y in zip(a, b)]  # noqa: E731
        blocks = self.info.get("blocks") or [{"tokens": self.num_tokens, "slots": self.num_slots,
                                              "method": self.method}]
        info = {**self.info, "blocks": [*blocks, {"tokens": block.num_tokens, "slots": block.num_slots,
                                                  "method": block.method}]}
        return CompactCache(cat(self.keys, block.keys), cat(self.values, block.values), cat(self.beta, block.beta),
                            self.num_tokens + block.num_tokens, self.model_fingerprint, self.method,
                            dict(self.params), info)

    # ---- checks ------------------------------------------------------------------------------------
    def validate(self) -> None:
        if not self.keys or not (len(self.keys) == len(self.values) == len(self.beta)):
            raise CacheError("keys, values and beta need one entry per layer, and at least one layer")
        if self.num_tokens < 1:
            raise CacheError(f"num_tokens must be positive, got {self.num_tokens}")
        for i, (k, v, b) in enumerate(zip(self.keys, self.values, self.beta)):
            if k.dim() != 3 or v.shape != k.shape or b.shape != k.shape[:2]:
                raise CacheError(f"layer {i}: keys {tuple(k.shape)}, values {tuple(v.shape)} and beta "
                                 f"{tuple(b.shape)} do not agree ([heads, t, d], [heads, t, d], [heads, t])")
            if k.shape != self.keys[0].shape:
                raise CacheError(f"layer {i}: shape {tuple(k.shape)} differs from layer 0 "
                                 f"{tuple(self.keys[0].shape)}")
            _check_values(f"layer {i}: ", k, v, b)
            if not torch.isfinite(b).any(-1).all():
                raise CacheError(f"layer {i}: a head has no live slot (all beta = -inf)")
        if self.num_slots > self.num_tokens:
            raise CacheError(f"{self.num_slots} slots for a {self.num_tokens}-token context")
        if self.side:
            self._validate_side()

    def _validate_side(self) -> None:
        if len(self.side) != self.num_layers:
            raise CacheError(f"side slots need one entry per layer ({self.num_layers}), got {len(self.side)}")
        heads, dim = self.num_kv_heads, self.keys[0].shape[2]
        for i, s in enumerate(self.side):
            if s is None:
                continue
            k = s.heads.numel()
            if s.heads.dim() != 1 or k == 0 or s.heads.dtype != torch.long:
                raise CacheError(f"layer {i}: side heads must be a non-empty 1-D long tensor")
            if int(s.heads.min()) < 0 or int(s.heads.max()) >= heads or not bool((s.heads.diff() > 0).all()):
                raise CacheError(f"layer {i}: side heads {s.heads.tolist()} must be ascending KV heads of "
                                 f"the model's {heads}")
            if s.keys.dim() != 3 or s.keys.shape[0] != k or s.keys.shape[2] != dim or s.values.shape != s.keys.shape \
                    or s.beta.shape != s.keys.shape[:2]:
                raise CacheError(f"layer {i}: side keys {tuple(s.keys.shape)}, values {tuple(s.values.shape)} and "
                                 f"beta {tuple(s.beta.shape)} do not agree ([k, s, {dim}], [k, s, {dim}], [k, s])")
            _check_values(f"layer {i}: side ", s.keys, s.values, s.beta)
        if int(self.head_counts().max()) > self.num_tokens:
            raise CacheError(f"a head holds more slots than the {self.num_tokens}-token context has")

    def check_model(self, fingerprint: str) -> None:
        if fingerprint != self.model_fingerprint:
            raise CacheError(f"this cache was made for model {self.model_fingerprint}, not for the loaded "
                             f"model {fingerprint}; compact the document again with this model")

    # ---- file format -------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (k, v, b) in enumerate(zip(self.keys, self.values, self.beta)):
            out[f"k.{i}"], out[f"v.{i}"], out[f"beta.{i}"] = (x.detach().contiguous().cpu() for x in (k, v, b))
        for i, s in enumerate(self.side):
            if s is not None:
                for name, x in (("heads", s.heads), ("k", s.keys), ("v", s.values), ("beta", s.beta)):
                    out[f"side.{name}.{i}"] = x.detach().contiguous().cpu()
        return out

    def metadata(self) -> dict:
        meta = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("keys", "values", "beta", "side")}
        return {"format": FORMAT_VERSION, **meta, "num_slots": self.num_slots}

    def to_bytes(self) -> bytes:
        """The file's content: safetensors with the metadata (and a sha256 of the tensors) in its header."""
        from safetensors.torch import save

        tensors = self._tensors()
        meta = self.metadata()
        meta["sha256"] = _digest(tensors)
        return save(tensors, metadata={"kvcat": json.dumps(meta)})

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically and durably: a crash mid-write never leaves a partial file under `path`."""
        path = Path(path)
        atomic_write(path, self.to_bytes())
        return path

    @classmethod
    def from_bytes(cls, data: bytes, expect_fingerprint: str | None = None, device: str | torch.device = "cpu",
                   where: str = "cache") -> "CompactCache":
        """Parse and verify (format, checksum, shapes; model with `expect_fingerprint`) a cache file's content."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + header_len])
            meta = json.loads(header["__metadata__"]["kvcat"])
        except (SafetensorError, KeyError, ValueError, TypeError) as exc:
            raise CacheError(f"{where}: not a kvcat cache file, or truncated ({exc})") from None
        if meta.get("format") not in READABLE_FORMATS:
            raise CacheError(f"{where}: format {meta.get('format')} is not supported (this kvcat reads "
                             f"{', '.join(map(str, READABLE_FORMATS))})")
        if meta.get("sha256") != _digest(tensors):
            raise CacheError(f"{where}: checksum mismatch, the file is corrupt")
        n = sum(1 for name in tensors if name.startswith("k."))
        try:
            side = [SideHeads(*(tensors[f"side.{part}.{i}"].to(device) for part in ("heads", "k", "v", "beta")))
                    if f"side.heads.{i}" in tensors else None for i in range(n)]
            cache = cls(keys=[tensors[f"k.{i}"].to(device) for i in range(n)],
                        values=[tensors[f"v.{i}"].to(device) for i in range(n)],
                        beta=[tensors[f"beta.{i}"].to(device) for i in range(n)],
                        num_tokens=meta["num_tokens"], model_fingerprint=meta["model_fingerprint"],
                        method=meta["method"], params=meta.get("params", {}), info=meta.get("info", {}),
                        side=side if any(x is not None for x in side) else [])
        except KeyError as exc:
            raise CacheError(f"{where}: missing {exc}") from None
        if expect_fingerprint is not None:
            cache.check_model(expect_fingerprint)
        return cache

    @classmethod
    def load(cls, path: str | os.PathLike, expect_fingerprint: str | None = None,
             device: str | torch.device = "cpu") -> "CompactCache":
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CacheError(f"{path}: no such cache file") from None
        return cls.from_bytes(data, expect_fingerprint, device, where=str(path))


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling, fsync it, rename it over `path`, fsync the folder: readers see the
    old file or the whole new one, and the new one survives a power cut once this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_values(where: str, keys: torch.Tensor, values: torch.Tensor, beta: torch.Tensor) -> None:
    """Finite keys and values; beta finite or -inf (a padded slot)."""
    if not (torch.isfinite(keys).all() and torch.isfinite(values).all()):
        raise CacheError(f"{where}keys or values contain NaN or Inf")
    if torch.isnan(beta).any() or (beta == float("inf")).any():
        raise CacheError(f"{where}beta contains NaN or +Inf")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
