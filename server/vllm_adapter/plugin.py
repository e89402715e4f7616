"""The `vllm.general_plugins` entry point (see pyproject.toml): light to import, safe in every process."""

from __future__ import annotations

import os

BACKEND_PATH = "kvcat.server.vllm_adapter.attention.KvcatCPUAttentionBackend"
_registered = False


def register() -> None:
    """Route CPU_ATTN to kvcat's beta-aware subclass (idempotent; a no-op off CPU or with
    KVCAT_BETA_BACKEND=0, the beta-free mode that keeps vLLM's stock kernels)."""
    global _registered
    if _registered or os.environ.get("KVCAT_BETA_BACKEND", "1") == "0":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
    _registered = True

