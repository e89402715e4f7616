"""KvcatConnector: an out-of-tree vLLM KV connector that writes compacted contexts into paged blocks.

Loaded by module path through `kv_transfer_config` (`kv_connector="KvcatConnector"`,
`kv_connector_module_path="kvcat.server.vllm_adapter.connector"`).

How a request over a compacted context reaches the engine:
- The prompt is t placeholder tokens followed by the real new tokens (chat-templated question), with
  `cache_salt` naming the context (and the beta mode), and `kv_transfer_params={"kvcat": {...}}` in the
  sampling params' extra_args: the context id, the path of its CompactCache file in the server's store,
  t, and the position shift N - t.
- Scheduler side: `get_num_new_matched_tokens` claims the placeholders not already covered by a local
  prefix-cache hit (a second question over the same context hits vLLM's prefix cache for the full
  blocks, and only the tail of the last partial block is written again). `update_state_after_alloc`
  records the request's block ids; `build_connector_meta` ships the loads of this step plus, for beta,
  the contexts of every running kvcat request keyed by the id of its first block (unique to that context
  within a step; requests sharing it share the context).
- Worker side: `start_load_kv` loads the CompactCache file (kept in a small LRU per worker), rotates the
  keys by -(N - t), and writes slots through vLLM's own `cpu_attn_reshape_and_cache`. The K/V therefore
  travel between processes as files, written atomically by the API process (`CompactCache.save`): nothing
  large goes through vLLM's IPC, and any number of workers (tensor parallel ranks) can read them.
  With tensor parallelism each rank writes its own slice of KV heads.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)
PARAMS_KEY = "kvcat"
_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def layer_index(name: str) -> int:
    m = _LAYER_RE.search(name)
    if m is None:
        raise ValueError(f"cannot find a layer index in {name!r}")
    return int(m.group(1))


def request_params(request: "Request") -> dict | None:
    params = getattr(request, "kv_transfer_params", None) or {}
    return params.get(PARAMS_KEY)


@dataclass
class LoadSpec:
    path: str
    key: str  # the request's cache salt: context id, version and beta mode
    block_ids: list[int]
    start: int  # first slot to write (the local prefix-cache hit)
    end: int  # t
    shift: int  # N - t


@dataclass
class ContextRef:
    path: str
    key: str
    slots: int
    shift: int


@dataclass
class KvcatConnectorMetadata(KVConnectorMetadata):
    loads: dict[str, LoadSpec] = field(default_factory=dict)
    # first block id of a running request -> the context whose beta applies to it
    beta: dict[int, ContextRef] = field(default_factory=dict)


def file_stamp(path: str) -> tuple[int, int]:
    """(mtime in ns, size) of a context file: what changes when it is rewritten or damaged on disk."""
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


class LoadedContext:
    """A context as the worker injects it: keys rotated, heads sliced for TP, rounded to the cache dtype (what
    the paged blocks hold) but kept in float32, the dtype the beta attention path computes in every step."""

    def __init__(self, path: str, shift: int, dtype: torch.dtype, freq: torch.Tensor,
                 heads: slice):
        from kvcat.cache import CompactCache
        from kvcat.server.rope import shift_keys

        self.stamp = file_stamp(path)  # read before the file: a later change is seen as one
        cache = CompactCache.load(path)
        self.keys = [shift_keys(k[heads].float(), -shift, freq).to(dtype).float() for k in cache.keys]
        self.values = [v[heads].to(dtype).float() for v in cache.values]
        self.beta = [b[heads].float() for b in cache.beta]
        self.num_slots = cache.num_slots
        self.layer_has_bias = [bool((b != 0).any()) for b in self.beta]
        self.has_bias = any(self.layer_has_bias)


class ContextCache:
    """LRU of LoadedContext per worker process, keyed by (path, key, shift): a context rewritten under the same
    id (a new version) is a new entry. Entries are float32: for SmolLM2-135M a 4,096-token document at 10x is
    about 19 MB, so the default 32 entries stay under about 0.6 GB."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, int], LoadedContext] = OrderedDict()
        self._lock = threading.Lock()
        self.dtype: torch.dtype = torch.float32
        self.freq: torch.Tensor | None = None
        self.heads = slice(None)
        self.layout = None  # PagedLayout, set by the worker connector after its self-test

    def get(self, path: str, version: str, shift: int, fresh: bool = True) -> LoadedContext:
        """The context at `path`, loaded once. With `fresh` (loading slots into blocks), a copy whose file has
        changed on disk since (size or mtime: replaced or damaged behind the store's back) is loaded again, so
        a bad file fails its requests instead of being served from memory; a file that is gone leaves the copy
        in use (the API refuses new requests for it). Without `fresh` (the beta path, every step) any copy
        serves."""
        key = (path, version, shift)
        try:
            stamp = file_stamp(path) if fresh else None
        except OSError:
            stamp = None
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and (stamp is None or hit.stamp == stamp):
                self._items.move_to_end(key)
                return hit
        ctx = LoadedContext(path, shift, self.dtype, self.freq, self.heads)
        with self._lock:
            self._items[key] = ctx
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return ctx


# One per worker process: the attention backend reads beta from here.
WORKER_CONTEXTS = ContextCache()


class KvcatConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self.beta_enabled = bool(extra.get("beta", True))
        self.block_size = vllm_config.cache_config.block_size
        # scheduler state
        self._local_hit: dict[str, int] = {}
        self._pending: dict[str, LoadSpec] = {}
        self._running: dict[str, tuple[int, ContextRef]] = {}
        # worker state
        self.kv_caches: dict[str, torch.Tensor] = {}
        self._load_errors: set[int] = set()  # blocks of this step whose context could not be loaded
        self.layout = None
        self.isa = None
        if role == KVConnectorRole.WORKER:
            self._init_worker(vllm_config)

    # ---- worker side --------------------------------------------------------------------------------
    def _init_worker(self, vllm_config) -> None:
        from kvcat.server.rope import inv_freq

        model_config = vllm_config.model_config
        WORKER_CONTEXTS.dtype = model_config.dtype
        WORKER_CONTEXTS.freq, _ = inv_freq(model_config.hf_config)
        tp = vllm_config.parallel_config.tensor_parallel_size
        total = model_config.get_total_num_kv_heads()
        if tp > 1:
            from vllm.distributed import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
            per = max(1, total // tp)
            first = (rank * per) % total if total >= tp else rank * total // tp
            WORKER_CONTEXTS.heads = slice(first, first + per)
        self.cache_dtype = vllm_config.cache_config.cache_dtype

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        from kvcat.server.vllm_adapter.layout import LayoutError, PagedLayout

        self.kv_caches = kv_caches
        sample = next(iter(kv_caches.values()))
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or sample.device.type != "cpu":
            raise LayoutError(f"kvcat expects CPU paged KV tensors [blocks, heads, block, 2*dim]; got "
                              f"{type(sample).__name__} {getattr(sample, 'shape', '')}")
        if sample.dtype == torch.uint8:
            raise LayoutError("kvcat does not inject into fp8 KV caches; use --kv-cache-dtype auto")
        _, heads, block_size, two_d = sample.shape
        self.isa = _get_attn_isa(sample.dtype, block_size, two_d // 2, self.cache_dtype)
        self.layout = PagedLayout.calibrate(heads, block_size, two_d // 2, sample.dtype, self.isa)
        WORKER_CONTEXTS.layout = self.layout
        self.layout.self_test(heads, sample.dtype, self.isa)
        self.layer_ids = {name: layer_index(name) for name in kv_caches}
        logger.info("kvcat connector: %d layers, block %d, isa %s, layout self-test passed",
                    len(kv_caches), block_size, self.isa)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        from kvcat.server.vllm_adapter.layout import write_slots

        meta = self._get_connector_metadata()
        if not isinstance(meta, KvcatConnectorMetadata) or not meta.loads:
            return
        for req_id, load in meta.loads.items():
            try:
                ctx = WORKER_CONTEXTS.get(load.path, load.key, load.shift)
                if ctx.num_slots != load.end:
                    raise ValueError(f"it has {ctx.num_slots} slots where the request expects {load.end}")
            except Exception as exc:  # noqa: BLE001  (one bad file must fail its own requests only)
                # vLLM's KV-load failure path: these blocks are reported invalid and, under the default
                # kv_load_failure_policy "fail", the request ends with finish_reason "error"; the engine goes on
                logger.warning("kvcat: cannot load context %s for request %s: %s", load.path, req_id, exc)
                first, last = load.start // self.block_size, (load.end - 1) // self.block_size
                self._load_errors.update(load.block_ids[first:last + 1])
                continue
            pos = torch.arange(load.start, load.end)
            table = torch.tensor(load.block_ids, dtype=torch.long)
            slots = table[pos // self.block_size] * self.block_size + pos % self.block_size
            for name, kv in self.kv_caches.items():
                i = self.layer_ids[name]
                k = ctx.keys[i][:, load.start:load.end].transpose(0, 1)
                v = ctx.values[i][:, load.start:load.end].transpose(0, 1)
                write_slots(kv, k, v, slots, self.isa)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._load_errors = self._load_errors, set()
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    # ---- scheduler side -----------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        p = request_params(request)
        if p is None:
            return 0, False
        self._local_hit[request.request_id] = num_computed_tokens
        t = int(p["slots"])
        if num_computed_tokens >= t:
            return 0, False
        return t - num_computed_tokens, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        p = request_params(request)
        if p is None:
            return
        block_ids = list(blocks.get_block_ids()[0])
        if not block_ids:
            return
        ref = ContextRef(path=p["path"], key=p["key"], slots=int(p["slots"]), shift=int(p["shift"]))
        if num_external_tokens > 0:
            start = self._local_hit.get(request.request_id, 0)
            self._pending[request.request_id] = LoadSpec(ref.path, ref.key, block_ids, start,
                                                         start + num_external_tokens, ref.shift)
        if self.beta_enabled and p.get("beta", True):
            self._running[request.request_id] = (block_ids[0], ref)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KvcatConnectorMetadata(loads=dict(self._pending),
                                      beta={first: ref for first, ref in self._running.values()})
        self._pending.clear()
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        self._local_hit.pop(request.request_id, None)
        self._running.pop(request.request_id, None)
        self._pending.pop(request.request_id, None)
        return False, None
