"""The engine interface the serving classes are written against, with no vLLM import.

`kvcat.server.vllm_adapter.engine.Engine` implements it over vLLM's AsyncLLM; the tests' fake engine implements
it in a few lines, so errors, limits, cancellation and the streaming format are tested without starting vLLM.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ContextHandle:
    """What a request needs to run over a stored compacted context."""

    context_id: str
    path: str  # CompactCache file the engine's workers load
    num_slots: int  # t
    num_tokens: int  # N
    salt: str  # covers everything that determines the injected K/V

    @property
    def shift(self) -> int:
        return self.num_tokens - self.num_slots


@dataclass
class GenParams:
    """vLLM's SamplingParams, the fields kvcat passes on (defaults: vLLM's)."""

    max_tokens: int = 64
    min_tokens: int = 0
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    structured: dict | None = None  # vLLM StructuredOutputsParams fields: {"json": schema} or {"json_object": True}
    logprobs: int | None = None
    cache_salt: str | None = None  # plain requests: their prefix-cache namespace (tenant and client salt)


@dataclass
class Chunk:
    """One engine step's new tokens of one completion (`index`, when n > 1)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[int, float]] | None = None  # per new token: token id -> logprob (top-k + chosen)
    cached_tokens: int | None = None
    index: int = 0


class EngineClient(Protocol):
    """What serving needs from an engine."""

    block_size: int  # tokens per KV block
    max_model_len: int  # slots + prompt + completion of one request
    dtype: str

    def kv_bytes_per_token(self) -> int: ...

    def generate(self, token_ids: list[int], params: GenParams, context: ContextHandle | None = None,
                 request_id: str | None = None) -> AsyncIterator[Chunk]: ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Raise when the engine can no longer serve (its core process died)."""

    def shutdown(self) -> None: ...
