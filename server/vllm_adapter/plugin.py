"""The `vllm.general_plugins` entry point (see pyproject.toml): light to import, safe in every process."""

from __future__ import annotations

import os

ADAPTER = "kvcat.server.vllm_adapter"
# the backends whose impl gets kvcat's beta path, per platform (vLLM's AttentionBackendEnum names)
BACKENDS = {
    "cpu": {"CPU_ATTN": f"{ADAPTER}.attention.KvcatCPUAttentionBackend"},
    "cuda": {"FLASH_ATTN": f"{ADAPTER}.attention_cuda.KvcatFlashAttentionBackend",
             "TRITON_ATTN": f"{ADAPTER}.attention_cuda.KvcatTritonAttentionBackend"},
}
_registered = False


def platform_key() -> str | None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu"
    return "cuda" if current_platform.is_cuda() else None


def register() -> None:
    """Route the platform's attention backends to kvcat's beta-aware subclasses (idempotent; a no-op on other
    platforms or with KVCAT_BETA_BACKEND=0, the beta-free mode that keeps vLLM's stock kernels)."""
    global _registered
    if _registered or os.environ.get("KVCAT_BETA_BACKEND", "1") == "0":
        return
    backends = BACKENDS.get(platform_key())
    if not backends:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    for name, path in backends.items():
        register_backend(AttentionBackendEnum[name], path)
    _registered = True
