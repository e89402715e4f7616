"""The engine interface the serving classes are written against, with no vLLM import.

`kvcat.server.vllm_adapter.engine.Engine` implements it over vLLM's AsyncLLM; the tests' fake engine implements
it in a few lines, so errors, limits, cancellation and the streaming format are tested without starting vLLM.

A request reaches the engine as token ids, a `SamplingParams` and, over a stored compacted context, a
`ContextTransfer`: the one object that travels on to vLLM's scheduler and workers (the KV connector and the beta
attention path), as a plain dict in `kv_transfer_params` only across vLLM's boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Protocol


class TransferParamsError(ValueError):
    """`kv_transfer_params` that do not describe a context (a client, or a kvcat of another version, sent them)."""


@dataclass(frozen=True)
class ContextTransfer:
    """A stored compacted context as one request carries it to the engine's workers: the workers load the file
    at `path`, write its `num_slots` slots (keys rotated back by `shift`) into the request's first blocks, and the
    beta attention path adds the context's beta. `salt` is the request's prefix-cache salt: it covers everything
    that determines the injected K/V (context, version, beta mode), so it also keys the workers' loaded copies."""

    PARAMS_KEY: ClassVar[str] = "kvcat"  # its key in vLLM's `kv_transfer_params`

    context_id: str
    path: str  # CompactCache file in the server's store
    num_slots: int  # t: the placeholder tokens the connector fills
    num_tokens: int  # N: the document's length, for the position shift
    salt: str

    @property
    def shift(self) -> int:
        return self.num_tokens - self.num_slots

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "ContextTransfer":
        """The context a request's `kv_transfer_params[PARAMS_KEY]` names; TransferParamsError says what is wrong."""
        if not isinstance(data, dict):
            raise TransferParamsError(f"kv_transfer_params[{cls.PARAMS_KEY!r}] is {type(data).__name__}, not a dict")
        expected = {f.name: f.type for f in fields(cls)}
        missing, unknown = expected.keys() - data.keys(), data.keys() - expected.keys()
        if missing or unknown:
            raise TransferParamsError(f"kv_transfer_params[{cls.PARAMS_KEY!r}] lacks {sorted(missing)} or has unknown "
                                      f"{sorted(unknown)}; expected the fields {list(expected)}")
        for name, kind in expected.items():
            value = data[name]
            if type(value) is not {"str": str, "int": int}[kind]:
                raise TransferParamsError(f"kv_transfer_params[{cls.PARAMS_KEY!r}][{name!r}] is {value!r}, not {kind}")
        if not 0 < data["num_slots"] <= data["num_tokens"]:
            raise TransferParamsError(f"a context of {data['num_tokens']} tokens cannot fill {data['num_slots']} slots")
        return cls(**data)


@dataclass
class SamplingParams:
    """vLLM's SamplingParams, the fields kvcat passes on, under vLLM's names and with vLLM's defaults; the one
    list of them (`SamplingRequest.to_sampling_params` fills it, the engine adapter copies it field by field).
    Two fields are converted by the adapter instead (`ADAPTED`)."""

    ADAPTED: ClassVar[tuple[str, ...]] = ("structured", "cache_salt")

    max_tokens: int = 16
    min_tokens: int = 0
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # alternatives per generated token to report
    structured: dict | None = None  # vLLM StructuredOutputsParams fields: {"json": schema} or {"json_object": True}
    cache_salt: str | None = None  # plain requests: their prefix-cache namespace (tenant and client salt)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def engine_fields(self) -> dict[str, Any]:
        """The fields that vLLM's SamplingParams takes as they are."""
        return {name: getattr(self, name) for name in self.names() if name not in self.ADAPTED}


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

    def generate(self, token_ids: list[int], params: SamplingParams, context: ContextTransfer | None = None,
                 request_id: str | None = None) -> AsyncIterator[Chunk]: ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Raise when the engine can no longer serve (its core process died)."""

    def shutdown(self) -> None: ...
