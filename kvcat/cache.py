"""CompactCache: the one compacted-KV type and file format shared by the CLI, evaluation, server and store.

For every layer and KV head a compacted cache holds t slots (C_k, beta, C_v). Keys are post-RoPE at the
positions of the original N-token context, so new tokens continue at positions N, N+1, ... Heads may keep
different numbers of slots (non-uniform budgets): tensors are padded to the largest count with beta = -inf,
which removes a slot from attention exactly.

On disk: one safetensors file (tensors `k.{layer}`, `v.{layer}`, `beta.{layer}`) whose header carries the
metadata as JSON, including a sha256 of the tensor bytes so truncation and corruption are detected.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

FORMAT_VERSION = 1


class CacheError(ValueError):
    """A compacted cache is malformed, corrupt, or belongs to another model."""


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

    def head_counts(self) -> torch.Tensor:
        """[num_layers, num_kv_heads] number of live (beta > -inf) slots of each head."""
        return torch.stack([torch.isfinite(b).sum(-1) for b in self.beta])

    @property
    def ratio(self) -> float:
        """Compaction ratio N / (mean live slots per head)."""
        return self.num_tokens / max(self.head_counts().float().mean().item(), 1e-9)

    def kv_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of K and V this cache occupies once stored as `dtype` (padded slots included)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(k.numel() + v.numel() for k, v in zip(self.keys, self.values)) * elem

    def to(self, device=None, dtype=None) -> "CompactCache":
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return CompactCache([move(k) for k in self.keys], [move(v) for v in self.values],
                            [b.to(device=device, dtype=dtype) for b in self.beta], self.num_tokens,
                            self.model_fingerprint, self.method, dict(self.params), dict(self.info))

    def concat(self, block: "CompactCache") -> "CompactCache":
        """This cache followed by `block`, the compacted form of the tokens that came after it (its keys
        at positions num_tokens..): one cache of both, the kind incremental compaction builds."""
        block.check_model(self.model_fingerprint)
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
            if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
                raise CacheError(f"layer {i}: keys or values contain NaN or Inf")
            if torch.isnan(b).any() or (b == float("inf")).any():
                raise CacheError(f"layer {i}: beta contains NaN or +Inf")
            if not torch.isfinite(b).any(-1).all():
                raise CacheError(f"layer {i}: a head has no live slot (all beta = -inf)")
        if self.num_slots > self.num_tokens:
            raise CacheError(f"{self.num_slots} slots for a {self.num_tokens}-token context")

    def check_model(self, fingerprint: str) -> None:
        if fingerprint != self.model_fingerprint:
            raise CacheError(f"this cache was made for model {self.model_fingerprint}, not for the loaded "
                             f"model {fingerprint}; compact the document again with this model")

    # ---- file format -------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (k, v, b) in enumerate(zip(self.keys, self.values, self.beta)):
            out[f"k.{i}"], out[f"v.{i}"], out[f"beta.{i}"] = (x.detach().contiguous().cpu() for x in (k, v, b))
        return out

    def metadata(self) -> dict:
        meta = {k: v for k, v in asdict(self).items() if k not in ("keys", "values", "beta")}
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
        if meta.get("format") != FORMAT_VERSION:
            raise CacheError(f"{where}: format {meta.get('format')} is not supported (want {FORMAT_VERSION})")
        if meta.get("sha256") != _digest(tensors):
            raise CacheError(f"{where}: checksum mismatch, the file is corrupt")
        n = sum(1 for name in tensors if name.startswith("k."))
        try:
            cache = cls(keys=[tensors[f"k.{i}"].to(device) for i in range(n)],
                        values=[tensors[f"v.{i}"].to(device) for i in range(n)],
                        beta=[tensors[f"beta.{i}"].to(device) for i in range(n)],
                        num_tokens=meta["num_tokens"], model_fingerprint=meta["model_fingerprint"],
                        method=meta["method"], params=meta.get("params", {}), info=meta.get("info", {}))
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


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
