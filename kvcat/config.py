"""Where kvcat keeps prepared models, data and caches, and which device it computes on."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


def bf16_support(flags: set[str] | None = None) -> str:
    """How this CPU computes bf16: "amx" (AMX tiles: several times float32's speed), "avx512" (AVX-512 bf16 dot
    products: measured 1.2x float32 in vLLM's prefill, benchmarks/NOTES.md) or "emulated" (AVX2 only: vLLM's bf16
    runs 2.5-3.8x slower than float32)."""
    flags = cpu_flags() if flags is None else flags
    return "amx" if "amx_bf16" in flags else "avx512" if "avx512_bf16" in flags else "emulated"


DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_CHOICES = ("auto", *DTYPES)
_WHERE = {"amx": "a CPU with AMX", "avx512": "a CPU with AVX-512 bf16 but no AMX",
          "emulated": "a CPU without AMX or AVX-512 bf16"}


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a part of kvcat runs in, and why: printed at start and reported by `/version`."""

    dtype: str  # "float32", "bfloat16" or "float16"
    reason: str
    requested: str = "auto"
    slow: bool = False  # an explicit choice that is much slower than the other on this hardware

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "requested": self.requested, "reason": self.reason}


def choose_dtype(requested: str, purpose: str = "engine", device: torch.device | None = None,
                 flags: set[str] | None = None) -> DtypeChoice:
    """Resolve a `--dtype` / `--compaction-dtype` value. `auto` gives the engine bf16 where it is several times
    faster than float32 (a GPU, a CPU with AMX) and float32 elsewhere: AVX-512 bf16 alone measured only 1.2x, not
    worth bf16's precision, and without it bf16 is emulated. Compaction stays float32 (its least-squares fits
    lose digits in bf16: benchmarks/NOTES.md). An explicit dtype wins; `slow` marks one that costs speed.
    Unknown names and float16 on a CPU (which vLLM's CPU backend cannot run) are ValueErrors."""
    if purpose not in ("engine", "compaction"):
        raise ValueError(f"purpose must be 'engine' or 'compaction', got {purpose!r}")
    device = default_device() if device is None else device
    name = str(requested).strip().lower()
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    gpu = device.type == "cuda"
    support = "gpu" if gpu else bf16_support(flags)
    where = "a GPU" if gpu else _WHERE[support]
    if name == "float16" and not gpu:
        raise ValueError("float16 cannot run on a CPU (vLLM's CPU backend computes in float32 or bfloat16); "
                         "use --dtype auto, float32 or bfloat16")
    if name == "auto":
        if purpose == "compaction":
            return DtypeChoice("float32", "compaction fits in float32 whatever the hardware (bf16 costs digits of "
                                          "the fitted values; choose --compaction-dtype bfloat16 for speed)")
        if support in ("gpu", "amx"):
            return DtypeChoice("bfloat16", f"{where}: bf16 runs natively, several times float32's speed")
        if support == "avx512":
            return DtypeChoice("float32", f"{where}: bf16 measured only 1.2x faster than float32 there, not worth "
                                          "its precision")
        return DtypeChoice("float32", f"{where}: bf16 would be emulated, several times slower than float32")
    slow = name == "bfloat16" and support == "emulated"
    reason = f"asked for {name} on {where}" + ("; bf16 is emulated here, several times slower than float32"
                                               if slow else "")
    return DtypeChoice(name, reason, requested=name, slow=slow)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    canonical = DTYPE_ALIASES.get(name, name)
    if canonical not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted([*DTYPES, *DTYPE_ALIASES])}")
    return getattr(torch, canonical)
