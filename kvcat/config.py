"""Where kvcat keeps prepared models, data and caches, and which device it computes on."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def kvcat_home() -> Path:
    """Root of everything kvcat generates (git-ignored): `$KVCAT_HOME`, default `~/.cache/kvcat`."""
    return Path(os.environ.get("KVCAT_HOME", Path.home() / ".cache" / "kvcat")).expanduser()


def models_dir() -> Path:
    return kvcat_home() / "models"


def default_device() -> torch.device:
    """CUDA when present, CPU otherwise; `KVCAT_DEVICE` overrides."""
    if name := os.environ.get("KVCAT_DEVICE"):
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_info(field: str) -> str | None:
    """A field of the first processor in /proc/cpuinfo ("model name", "flags"); None where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == field:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's ISA flags (empty where /proc/cpuinfo cannot be read)."""
    return set((cpu_info("flags") or "").split())


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 matmuls beat float32 here: a GPU, or a CPU with AVX-512 bf16 or AMX (elsewhere torch's and vLLM's
    CPU bf16 is an order of magnitude slower than float32)."""
    return device.type == "cuda" or bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(table)}") from None
