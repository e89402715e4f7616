"""What the harness evaluates: a `Compressor` turns a context (token ids) into a CompactCache.

Built-ins: "full" (the identity: every key, beta = 0) and "none" (no context at all: returns None, and the
harness then asks the question with an empty document). Every other name resolves lazily through the
compaction registry: `kvcat.compaction.get_method(name).compressor(ratio)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvcat.cache import CompactCache
from kvcat.inference import full_cache, prefill
from kvcat.models import LoadedModel

Compressor = Callable[[LoadedModel, list[int]], CompactCache | None]
BUILTINS = ("full", "none")


class EvalError(ValueError):
    """Bad evaluation input (unknown method or task, missing ratio, ...); the message says what to do."""


def full_compressor(lm: LoadedModel, context_ids) -> CompactCache:
    """The identity "compression": the prefill's K/V as they are."""
    return full_cache(prefill(lm, list(context_ids)), lm.spec.fingerprint)


def no_context(lm: LoadedModel, context_ids) -> None:
    """No context at all: the lower bound every method should beat."""
    return None


@dataclass(frozen=True)
class NamedCompressor:
    name: str  # method name ("full", "none", "am-hak", ...)
    ratio: float | None
    fn: Compressor

    @property
    def label(self) -> str:
        return self.name if self.ratio is None else f"{self.name}@{self.ratio:g}x"


def resolve(name: str, ratio: float | None = None) -> NamedCompressor:
    """A built-in or registered compaction method, at `ratio` (required for registered methods)."""
    if name == "full":
        return NamedCompressor("full", None, full_compressor)
    if name == "none":
        return NamedCompressor("none", None, no_context)
    if ratio is None:
        raise EvalError(f"method {name!r} needs a compression ratio (--ratio), e.g. --ratio 8")
    if not ratio > 1:
        raise EvalError(f"the compression ratio must be greater than 1, got {ratio:g}")
    from kvcat.compaction import get_method

    try:
        method = get_method(name)
    except (KeyError, ValueError) as exc:  # the registry's CompactionError is a ValueError
        raise EvalError(f"{exc}; built-in: {', '.join(BUILTINS)}") from None
    return NamedCompressor(name, float(ratio), method.compressor(ratio))


def resolve_all(methods: list[str], ratios: list[float] | None = None,
                baselines: bool = True) -> list[NamedCompressor]:
    """Every method at every ratio (built-ins once), with the full/none baselines first when asked."""
    names = (["full", "none"] if baselines else []) + [m for m in methods if not (baselines and m in BUILTINS)]
    out: list[NamedCompressor] = []
    for name in dict.fromkeys(names):
        if name in BUILTINS:
            out.append(resolve(name))
        else:
            for ratio in ratios or [None]:
                out.append(resolve(name, ratio))
    return out
