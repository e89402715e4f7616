"""What a vLLM worker process holds of the compacted contexts: the loaded copies, and this engine step's beta map.

The KV connector writes here (the engine's settings once, when it registers the KV caches; each step's beta map
when vLLM binds its metadata; copies when it loads a context) and the beta attention path reads here, so neither
imports the other and neither reads vLLM's internals. No vLLM import.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict

import torch

from kvcat.server.engine_api import ContextTransfer

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def layer_index(name: str) -> int:
    """The layer number in a vLLM attention layer's name (`model.layers.{i}.self_attn.attn`)."""
    m = _LAYER_RE.search(name)
    if m is None:
        raise ValueError(f"cannot find a layer index in {name!r}")
    return int(m.group(1))


def file_stamp(path: str) -> tuple[int, int]:
    """(mtime in ns, size) of a context file: what changes when it is rewritten or damaged on disk."""
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


class LoadedContext:
    """A context as the worker injects it: keys rotated, heads sliced for TP, rounded to the cache dtype (what
    the paged blocks hold). A hybrid's side slots live here too, beside the paged blocks: loaded with the
    context, shared by every request over it, freed when it leaves the LRU. `keys`/`values`/`beta` are float32
    [H, t, D] on the engine's device, the dtype the
    beta attention path computes in every step (on CUDA kept only for contexts with a beta). On CUDA the
    connector writes from `pinned`: per layer [t, H, D] in the cache dtype in page-locked host memory, so
    each layer's copy to the GPU is asynchronous on the stream that runs the forward."""

    def __init__(self, path: str, shift: int, dtype: torch.dtype, freq: torch.Tensor,
                 heads: slice, device: str = "cpu"):
        from kvcat.cache import CompactCache
        from kvcat.server.rope import shift_keys

        self.stamp = file_stamp(path)  # read before the file: a later change is seen as one
        cache = CompactCache.load(path)
        keys = [shift_keys(k[heads].float(), -shift, freq).to(dtype) for k in cache.keys]
        values = [v[heads].to(dtype) for v in cache.values]
        self.num_slots = cache.num_slots
        # a hybrid's side slots, this rank's heads: [H, s, D] in the engine's dtype (the bytes its record counts)
        # and their beta [H, s] in float32 (-inf: a head without side slots); None for a layer without any
        self.side_keys, self.side_values, self.side_beta = [], [], []
        for i in range(cache.num_layers):
            side = cache.side_view(i)
            k, v, b = (x[heads] for x in side) if side is not None else (None, None, None)
            live = b is not None and bool(torch.isfinite(b).any())  # this rank's heads may have none
            self.side_keys.append(shift_keys(k.float(), -shift, freq).to(device, dtype) if live else None)
            self.side_values.append(v.to(device, dtype) if live else None)
            self.side_beta.append(b.float().to(device) if live else None)
        # the layers whose rows the kvcat attention path recomputes: a beta to add or side slots to attend to
        self.layer_has_bias = [bool((b[heads] != 0).any()) or s is not None for b, s in zip(cache.beta, self.side_beta)]
        self.has_bias = any(self.layer_has_bias)
        self.pinned = None
        if torch.device(device).type != "cpu":
            self.pinned = [(k.transpose(0, 1).contiguous().pin_memory(), v.transpose(0, 1).contiguous().pin_memory())
                           for k, v in zip(keys, values)]
            if not self.has_bias:
                keys, values = [], []
        self.keys = [k.float().to(device) for k in keys]
        self.values = [v.float().to(device) for v in values]
        self.beta = [b[heads].float().to(device) for b in cache.beta]

    def slot_kv(self, layer: int, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [end - start, H, D] of slots start..end-1 of one layer, on `device`, for the cache write."""
        if self.pinned is None:
            return self.keys[layer][:, start:end].transpose(0, 1), self.values[layer][:, start:end].transpose(0, 1)
        k, v = self.pinned[layer]
        return k[start:end].to(device, non_blocking=True), v[start:end].to(device, non_blocking=True)


class WorkerContexts:
    """The worker's contexts: an LRU of LoadedContext keyed by (path, salt, shift), so that a context rewritten
    under the same id (a new version, a new salt) is a new entry, plus the beta map of the step vLLM bound.
    Entries are float32: for SmolLM2-135M a 4,096-token document at 10x is about 19 MB, so the default 32
    entries stay under about 0.6 GB."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str, int], LoadedContext] = OrderedDict()
        self._lock = threading.Lock()
        # how copies are made: the engine's dtype, RoPE frequencies, this rank's KV heads and device
        self.dtype: torch.dtype = torch.float32
        self.freq: torch.Tensor | None = None
        self.heads = slice(None)
        self.device = "cpu"
        self.layout = None  # CpuPagedLayout or FlashPagedLayout, set by the worker connector after its self-test
        self.beta: dict[int, ContextTransfer] = {}  # this step's: a running request's first block id -> its context

    def get(self, context: ContextTransfer, fresh: bool = True) -> LoadedContext:
        """The context's copy, loaded once. With `fresh` (loading slots into blocks), a copy whose file has
        changed on disk since (size or mtime: replaced or damaged behind the store's back) is loaded again, so
        a bad file fails its requests instead of being served from memory; a file that is gone leaves the copy
        in use (the API refuses new requests for it). Without `fresh` (the beta path, every step) any copy
        serves."""
        key = (context.path, context.salt, context.shift)
        try:
            stamp = file_stamp(context.path) if fresh else None
        except OSError:
            stamp = None
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and (stamp is None or hit.stamp == stamp):
                self._items.move_to_end(key)
                return hit
        ctx = LoadedContext(context.path, context.shift, self.dtype, self.freq, self.heads, self.device)
        with self._lock:
            self._items[key] = ctx
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return ctx

    def bind_step(self, beta: dict[int, ContextTransfer]) -> None:
        """A new engine step: the contexts whose beta applies to its requests (a new map every step)."""
        self.beta = beta

    def clear_step(self) -> None:
        self.beta = {}


WORKER = WorkerContexts()  # one per worker process
