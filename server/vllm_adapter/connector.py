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
  keys by -(N - t), and writes slots through vLLM's own cache-write op for the engine's layout (`layout.py`:
  `cpu_attn_reshape_and_cache` on CPU; on CUDA the attention layer's `do_kv_cache_update`, fed layer by
  layer from pinned host memory on the current stream; it runs before the forward and outside any
  captured CUDA graph, so graphs only ever read the blocks it wrote). The K/V therefore
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
    the paged blocks hold). `keys`/`values`/`beta` are float32 [H, t, D] on the engine's device, the dtype the
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
        self.layer_has_bias = [bool((b[heads] != 0).any()) for b in cache.beta]
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
        self.device = "cpu"
        self.layout = None  # CpuPagedLayout or FlashPagedLayout, set by the worker connector after its self-test

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
        ctx = LoadedContext(path, shift, self.dtype, self.freq, self.heads, self.device)
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
        self.layers: dict = {}  # CUDA: layer name -> vLLM attention layer (whose backend writes its cache)
        if role == KVConnectorRole.WORKER:
            self._init_worker(vllm_config)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """With beta, attention must run eagerly (the beta path is Python over per-step rows): vLLM then keeps
        CUDA graphs for everything between attention layers (PIECEWISE) instead of capturing whole steps."""
        return bool((extra_config or {}).get("beta", True))

    # ---- worker side --------------------------------------------------------------------------------
    def _init_worker(self, vllm_config) -> None:
        from kvcat.server.rope import inv_freq

        model_config = vllm_config.model_config
        self.vllm_config = vllm_config
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
        from kvcat.server.vllm_adapter.layout import CpuPagedLayout, FlashPagedLayout, LayoutError

        self.kv_caches = kv_caches
        sample = next(iter(kv_caches.values()))
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or sample.device.type not in ("cpu", "cuda"):
            raise LayoutError(f"kvcat expects paged KV tensors [blocks, heads, block, 2*dim] on CPU or CUDA; got "
                              f"{type(sample).__name__} {getattr(sample, 'shape', '')} {getattr(sample, 'device', '')}")
        if sample.dtype == torch.uint8:
            raise LayoutError("kvcat does not inject into fp8 KV caches; use --kv-cache-dtype auto")
        _, heads, block_size, two_d = sample.shape
        if block_size != self.block_size:
            raise LayoutError(f"the attention kernel's block size {block_size} differs from the scheduler's "
                              f"{self.block_size}; kvcat's slot arithmetic needs them equal (set --block-size)")
        self.layer_ids = {name: layer_index(name) for name in kv_caches}
        if sample.device.type == "cpu":
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            self.isa = _get_attn_isa(sample.dtype, block_size, two_d // 2, self.cache_dtype)
            self.layout = CpuPagedLayout.calibrate(heads, block_size, two_d // 2, sample.dtype, self.isa)
            self.layout.self_test(heads, sample.dtype)
        else:
            self.layers = self._attention_layers(kv_caches)
            self.layout = FlashPagedLayout(block_size, two_d // 2)
            name = next(iter(kv_caches))
            self.layout.self_test(heads, sample.dtype, self.layers[name], like=sample)
            WORKER_CONTEXTS.device = str(sample.device)
        WORKER_CONTEXTS.layout = self.layout
        logger.info("kvcat connector: %d layers, block %d, %s, layout self-test passed", len(kv_caches),
                    block_size, f"isa {self.isa}" if self.isa else f"{type(self.layout).__name__} on {sample.device}")

    def _attention_layers(self, kv_caches: dict[str, torch.Tensor]) -> dict:
        """The attention layer of each KV tensor: its backend's `do_kv_cache_update` writes the slots, and with
        beta its impl must be kvcat's beta-aware subclass (registered for FLASH_ATTN and TRITON_ATTN)."""
        from kvcat.server.vllm_adapter.attention import BetaAttentionMixin
        from kvcat.server.vllm_adapter.layout import LayoutError

        context = self.vllm_config.compilation_config.static_forward_context
        layers = {}
        for name in kv_caches:
            layer = context.get(name)
            if layer is None or not hasattr(getattr(layer, "impl", None), "do_kv_cache_update"):
                raise LayoutError(f"no attention layer named {name!r} with a do_kv_cache_update in vLLM's forward "
                                  "context; the pinned vLLM's internals changed")
            if self.beta_enabled and not isinstance(layer.impl, BetaAttentionMixin):
                raise LayoutError(f"beta needs kvcat's attention backend, but layer {name} runs "
                                  f"{type(layer.impl).__name__}: serve with FLASH_ATTN or TRITON_ATTN "
                                  "(--engine-arg attention_backend=FLASH_ATTN), or with --no-beta")
            layers[name] = layer
        return layers

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
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
            slots = slots.to(next(iter(self.kv_caches.values())).device)
            for name, kv in self.kv_caches.items():
                k, v = ctx.slot_kv(self.layer_ids[name], load.start, load.end, kv.device)
                self.layout.write(kv, k, v, slots, self.layers.get(name))

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
