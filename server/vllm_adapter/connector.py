"""KvcatConnector: an out-of-tree vLLM KV connector that writes compacted contexts into paged blocks.

Loaded by module path through `kv_transfer_config` (`kv_connector="KvcatConnector"`,
`kv_connector_module_path="kvcat.server.vllm_adapter.connector"`).

How a request over a compacted context reaches the engine:
- The prompt is t placeholder tokens followed by the real new tokens (chat-templated question), with
  `cache_salt` naming the context (and the beta mode), and the request's `ContextTransfer` as a dict in
  `kv_transfer_params["kvcat"]` (the sampling params' extra_args): the context id, the path of its
  CompactCache file in the server's store, t, N and the salt. `transfer_of` turns it back into the object.
- Scheduler side: `get_num_new_matched_tokens` claims the placeholders not already covered by a local
  prefix-cache hit (a second question over the same context hits vLLM's prefix cache for the full
  blocks, and only the tail of the last partial block is written again). `update_state_after_alloc`
  records the request's block ids; `build_connector_meta` ships the `SlotLoad`s of this step plus, for beta,
  the contexts of every running kvcat request keyed by the id of its first block (unique to that context
  within a step; requests sharing it share the context).
- Worker side: `bind_connector_metadata` (vLLM calls it before every forward) keeps the step's loads and hands
  its beta map to `worker_contexts.WORKER`, where the beta attention path reads it. `start_load_kv` loads the
  CompactCache file (kept in the worker's small LRU), rotates the keys by -(N - t), and writes slots through
  the attention layer's own cache-write op, `do_kv_cache_update` (`layout.py`; on CUDA fed layer by layer
  from pinned host memory on the current stream; it runs before the forward and outside any captured CUDA
  graph, so graphs only ever read the blocks it wrote). The K/V therefore travel between processes as files,
  written atomically by the API process (`CompactCache.save`): nothing large goes through vLLM's IPC, and any
  number of workers (tensor parallel ranks) can read them. With tensor parallelism each rank writes its own
  slice of KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from kvcat.server.engine_api import ContextTransfer
from kvcat.server.vllm_adapter.worker_contexts import WORKER, layer_index

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)


def transfer_of(request: "Request") -> ContextTransfer | None:
    """The context a request runs over, from its `kv_transfer_params`; None for a plain request."""
    data = (request.kv_transfer_params or {}).get(ContextTransfer.PARAMS_KEY)
    return None if data is None else ContextTransfer.from_dict(data)


@dataclass
class SlotLoad:
    """One request's slot writes in this step: its context's slots start..end-1, into its blocks."""

    context: ContextTransfer
    block_ids: list[int]
    start: int  # first slot to write (after the local prefix-cache hit)
    end: int  # t


@dataclass
class KvcatConnectorMetadata(KVConnectorMetadata):
    """What the scheduler side sends the workers each step."""

    loads: dict[str, SlotLoad] = field(default_factory=dict)  # request id -> its slot writes
    # first block id of a running request -> the context whose beta applies to it
    beta: dict[int, ContextTransfer] = field(default_factory=dict)


class KvcatConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self.beta_enabled = bool(extra.get("beta", True))
        self.block_size = vllm_config.cache_config.block_size
        # scheduler state
        self._local_hit: dict[str, int] = {}
        self._pending: dict[str, SlotLoad] = {}
        self._running: dict[str, tuple[int, ContextTransfer]] = {}
        # worker state
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.step: KvcatConnectorMetadata | None = None  # the metadata vLLM bound for this step
        self._load_errors: set[int] = set()  # blocks of this step whose context could not be loaded
        self.layout = None
        self.layers: dict = {}  # layer name -> vLLM attention layer (whose backend writes its cache)
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
        WORKER.dtype = model_config.dtype
        WORKER.freq, _ = inv_freq(model_config.hf_config)
        tp = vllm_config.parallel_config.tensor_parallel_size
        total = model_config.get_total_num_kv_heads()
        if tp > 1:
            from vllm.distributed import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
            per = max(1, total // tp)
            first = (rank * per) % total if total >= tp else rank * total // tp
            WORKER.heads = slice(first, first + per)

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
        self.layers = self._attention_layers(kv_caches, check_beta=sample.device.type == "cuda")
        layer = self.layers[next(iter(kv_caches))]
        if sample.device.type == "cpu":
            self.layout = CpuPagedLayout.calibrate(layer, heads, block_size, two_d // 2, sample.dtype)
            self.layout.self_test(heads, sample.dtype, layer)
        else:
            self.layout = FlashPagedLayout(block_size, two_d // 2)
            self.layout.self_test(heads, sample.dtype, layer, like=sample)
            WORKER.device = str(sample.device)
        WORKER.layout = self.layout
        logger.info("kvcat connector: %d layers, block %d, %s on %s, layout self-test passed", len(kv_caches),
                    block_size, type(self.layout).__name__, sample.device)

    def _attention_layers(self, kv_caches: dict[str, torch.Tensor], check_beta: bool) -> dict:
        """The attention layer of each KV tensor: its backend's `do_kv_cache_update` writes the slots, and with
        beta on CUDA its impl must be kvcat's beta-aware subclass (registered for FLASH_ATTN and TRITON_ATTN)."""
        from kvcat.server.vllm_adapter.attention import BetaAttentionMixin
        from kvcat.server.vllm_adapter.layout import LayoutError

        context = self.vllm_config.compilation_config.static_forward_context
        layers = {}
        for name in kv_caches:
            layer = context.get(name)
            if layer is None or not hasattr(getattr(layer, "impl", None), "do_kv_cache_update"):
                raise LayoutError(f"no attention layer named {name!r} with a do_kv_cache_update in vLLM's forward "
                                  "context; the pinned vLLM's internals changed")
            if check_beta and self.beta_enabled and not isinstance(layer.impl, BetaAttentionMixin):
                raise LayoutError(f"beta needs kvcat's attention backend, but layer {name} runs "
                                  f"{type(layer.impl).__name__}: serve with FLASH_ATTN or TRITON_ATTN "
                                  "(--engine-arg attention_backend=FLASH_ATTN), or with --no-beta")
            layers[name] = layer
        return layers

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """vLLM binds every step's metadata before the forward: its loads are `start_load_kv`'s, its beta map goes
        to the worker's contexts, where the attention layers read it during the forward."""
        super().bind_connector_metadata(connector_metadata)
        self.step = connector_metadata if isinstance(connector_metadata, KvcatConnectorMetadata) else None
        WORKER.bind_step(self.step.beta if self.step is not None else {})

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self.step = None
        WORKER.clear_step()

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self.step is None:
            return
        for req_id, load in self.step.loads.items():
            try:
                ctx = WORKER.get(load.context)
                if ctx.num_slots != load.end:
                    raise ValueError(f"it has {ctx.num_slots} slots where the request expects {load.end}")
            except Exception as exc:  # noqa: BLE001  (one bad file must fail its own requests only)
                # vLLM's KV-load failure path: these blocks are reported invalid and, under the default
                # kv_load_failure_policy "fail", the request ends with finish_reason "error"; the engine goes on
                logger.warning("kvcat: cannot load context %s for request %s: %s", load.context.path, req_id, exc)
                first, last = load.start // self.block_size, (load.end - 1) // self.block_size
                self._load_errors.update(load.block_ids[first:last + 1])
                continue
            pos = torch.arange(load.start, load.end)
            table = torch.tensor(load.block_ids, dtype=torch.long)
            slots = table[pos // self.block_size] * self.block_size + pos % self.block_size
            slots = slots.to(next(iter(self.kv_caches.values())).device)
            for name, kv in self.kv_caches.items():
                k, v = ctx.slot_kv(self.layer_ids[name], load.start, load.end, kv.device)
                self.layout.write(kv, k, v, slots, self.layers[name])

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
        context = transfer_of(request)
        if context is None:
            return 0, False
        self._local_hit[request.request_id] = num_computed_tokens
        if num_computed_tokens >= context.num_slots:
            return 0, False
        return context.num_slots - num_computed_tokens, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        context = transfer_of(request)
        if context is None:
            return
        block_ids = list(blocks.get_block_ids()[0])
        if not block_ids:
            return
        if num_external_tokens > 0:
            start = self._local_hit.get(request.request_id, 0)
            self._pending[request.request_id] = SlotLoad(context, block_ids, start, start + num_external_tokens)
        if self.beta_enabled:
            self._running[request.request_id] = (block_ids[0], context)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KvcatConnectorMetadata(loads=dict(self._pending),
                                      beta={first: context for first, context in self._running.values()})
        self._pending.clear()
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        self._local_hit.pop(request.request_id, None)
        self._running.pop(request.request_id, None)
        self._pending.pop(request.request_id, None)
        return False, None
