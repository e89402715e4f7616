"""Response models of the HTTP API (pydantic), OpenAI's shapes where OpenAI has one.

The routes declare them, so the OpenAPI schema describes every successful body too (the schema fuzzing test
checks responses against it). Optional fields that a response leaves unset are left out of it.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")

class Typed(BaseModel):
    """A response whose `object` field is always written, even where the route leaves out unset fields."""

    def model_post_init(self, context: Any) -> None:
        self.__pydantic_fields_set__.add("object")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class Version(BaseModel):
    version: str = Field(description="kvcat's version")
    vllm_version: str = Field(description="the vLLM version kvcat is pinned to")
    dtypes: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="what the engine and compaction compute in: dtype, what was asked, why")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error format: every 4xx and 5xx of this server."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvcat"
    max_model_len: int
    kv_block_size: int = Field(description="tokens per paged KV block")
    kv_bytes_per_token: int = Field(description="paged KV bytes one token takes in the engine")
    dtype: str | None = Field(None, description="the engine's dtype (see /version for why)")


class FitStats(BaseModel):
    """How many KV heads of the compacted context carry a fit (the rest hold plain kept keys and values)."""

    heads: int
    beta_fitted: int = Field(description="heads with a non-zero beta (attention mass fitted per slot)")
    values_refit: int = Field(description="heads whose values are a least-squares fit, not the kept tokens' own")
    underdetermined: int = Field(description="heads whose fits were skipped: too few reference queries per slot")
    per_layer: dict[str, list[int]] = Field(description="the same three counts for each layer")


class KvContext(BaseModel):
    """A stored compacted context (POST /v1/compact, or on-the-fly compaction in chat)."""

    id: str
    object: Literal["kv_context"] = "kv_context"
    model: str
    method: str
    original_tokens: int
    compacted_tokens: int = Field(description="slots per head the context takes in the engine's paged blocks")
    ratio: float = Field(description="kv_bytes_full / kv_bytes_compacted")
    kv_bytes_full: int
    kv_bytes_compacted: int = Field(description="the paged slots plus the side slots")
    kv_bytes_side: int = Field(0, description="bytes of the retrieval heads' side slots (a hybrid cache), held by "
                                              "kvcat beside vLLM's paged blocks")
    kv_bytes_saved: int
    compaction_seconds: float
    created: int
    origin: Literal["compact", "auto"]
    fit: FitStats | None = Field(None, description="absent for contexts stored before kvcat recorded it")


class ObjectList(BaseModel, Generic[T]):
    """OpenAI's list envelope."""

    object: Literal["list"] = "list"
    data: list[T]


ModelList = ObjectList[ModelCard]
KvContextList = ObjectList[KvContext]


class KvContextDeleted(BaseModel):
    id: str
    object: Literal["kv_context.deleted"] = "kv_context.deleted"
    deleted: bool = True


class CompactionJob(Typed):
    """An asynchronous compaction (POST /v1/compact with "async": true)."""

    id: str
    object: Literal["compaction.job"] = "compaction.job"
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: float = Field(ge=0, le=1)
    created: int
    context: KvContext | None = None
    error: ErrorDetail | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    kv_context_slots: int | None = Field(None, description="slots of the compacted context the answer used")
    prompt_tokens_details: PromptTokensDetails | None = None


class KvCompactionInfo(BaseModel):
    """What on-the-fly compaction did for this request."""

    outcome: Literal["hit", "prefix-hit", "incremental", "compacted"]
    cache_hit: bool
    context: str
    original_tokens: int
    compacted_tokens: int
    compaction_seconds: float
    uncompressed_tokens: int


class Completion(Typed):
    """A chat or text completion, or a streamed chunk of one: OpenAI's fields, then kvcat's. Each kind narrows
    `object` and `choices`."""

    id: str
    object: str
    created: int
    model: str
    choices: list
    usage: Usage | None = None
    system_fingerprint: str
    kv_context: str | None = Field(None, description="the compacted context the answer was generated over")
    kv_compaction: KvCompactionInfo | None = None


class ChatCompletionResponse(Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(Completion):
    """One server-sent event of a streamed chat completion."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]


class CompletionResponse(Completion):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    kv_context: str | None = Field(None, description="the compacted context the prompt continued")


class Ready(BaseModel):
    status: Literal["ready"]
    model: str
    beta: bool


def error_body(message: str, type_: str, code: int | str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
