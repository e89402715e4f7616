"""Request models of the HTTP API (pydantic), OpenAI's shapes where OpenAI has one; the responses are in
`responses`. A field not listed in a request model is refused (400, naming it), never ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvcat.defaults import DEFAULT_METHOD
from kvcat.server.engine_api import SamplingParams


def _utf8(value: str | None) -> str | None:
    """Strings must be encodable (JSON allows lone surrogates like \\ud800; tokenizers do not)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


class TextPart(BaseModel):
    """A part of a message's content in OpenAI's list form. Only text: this server serves text models, so an
    image or audio part is refused (422) rather than dropped."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = "text"
    text: str

    _text = field_validator("text")(classmethod(lambda cls, v: _utf8(v)))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    _content = field_validator("content")(classmethod(lambda cls, v: _utf8(v) if isinstance(v, str) else v))

    def for_template(self) -> dict:
        """The message as the chat template sees it: text content plus any other fields (name, tool_call_id...)."""
        return {**(self.model_extra or {}), "role": self.role, "content": self.text()}

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class CompactRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    model: str | None = None
    text: str | None = Field(None, description="the document, as plain text")
    messages: list[ChatMessage] | None = Field(None, description="or the document as chat messages")
    ratio: float | None = Field(None, gt=1, description="compaction ratio N / t (> 1)")
    target_tokens: int | None = Field(None, ge=1, description="or slots per head")
    method: str = DEFAULT_METHOD
    query_mode: str | None = Field(None, description="reference queries of the method (e.g. repeat)")
    params: dict[str, Any] = Field(default_factory=dict, description="extra method parameters")
    run_async: bool = Field(False, alias="async")

    _text = field_validator("text")(classmethod(lambda cls, v: _utf8(v)))

    @model_validator(mode="after")
    def _one_of(self) -> "CompactRequest":
        if (self.text is None) == (self.messages is None):
            raise ValueError("give exactly one of text and messages")
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty")
        if self.messages is not None and not self.messages:
            raise ValueError("messages is empty")
        if (self.ratio is None) == (self.target_tokens is None):
            raise ValueError("give exactly one of ratio and target_tokens")
        return self


class KvCompactionOptions(BaseModel):
    """Per-request on-the-fly compaction settings (each overrides the server's flag of the same name)."""

    model_config = ConfigDict(extra="forbid")
    threshold_tokens: int | None = Field(None, ge=1, description="compact when the prompt is longer than this")
    ratio: float | None = Field(None, gt=1, description="compaction ratio of the leading part")
    method: str | None = Field(None, description="compaction method")
    keep_turns: int | None = Field(None, ge=1, description="chat: most recent user turns kept uncompressed")
    keep_tokens: int | None = Field(None, ge=1, description="text completions: last prompt tokens kept uncompressed")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the answer follows")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON following a schema (vLLM's structured
    outputs constrain the decoding)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is given with, and only with, type "json_schema"')
        return self

    def structured(self) -> dict | None:
        """vLLM's structured-output parameters for this format (None: free text)."""
        if self.type == "text":
            return None
        return {"json_object": True} if self.type == "json_object" else {"json": self.json_schema.schema_}


class SamplingRequest(BaseModel):
    """The fields chat and text completions share: vLLM's sampling parameters kvcat honours. A field not listed
    in a request model is refused (400, naming it), never ignored."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="default: what the model's context has room for")
    temperature: float | None = Field(None, ge=0, le=2, description="default: the model's generation_config, else 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="vLLM extension: -1 or 0 for all tokens")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM extension")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="vLLM extension")
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias added to its logit (-100..100)")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="vLLM extension")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past the end-of-sequence token")
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16, description="completions per request")
    user: str | None = Field(None, max_length=256, description="the end user, for the client's records (not used)")
    min_tokens: int = Field(0, ge=0, description="vLLM extension: generate at least this many tokens")
    cache_salt: str | None = Field(None, min_length=1, max_length=256,
                                   description="vLLM extension: isolates this request's prefix-cache entries")
    kv_context: str | None = Field(None, description="answer over this compacted context (POST /v1/compact)")
    kv_compaction: Literal["off"] | KvCompactionOptions | None = Field(
        None, description='on-the-fly compaction of a long prompt: "off", or settings overriding the server\'s')

    @model_validator(mode="after")
    def _context_or_compaction(self):
        if self.kv_context is not None and isinstance(self.kv_compaction, KvCompactionOptions):
            raise ValueError("give kv_context (an existing compacted context) or kv_compaction options, not both")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are in -100..100, got {bias}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, str):
            return [v]
        if v is not None and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def to_sampling_params(self, max_tokens: int, defaults: dict[str, Any], cache_salt: str | None
                           ) -> SamplingParams:
        """The engine's sampling parameters, as vLLM's protocol makes them: each SamplingParams field this request
        sets, by the same name; those it leaves out from `defaults` (the model's generation_config, as vLLM reads
        it), then vLLM's own. Derived instead: `logprobs` (each request type's `top_logprobs_k`), `logit_bias` (by
        token id), `structured` (from response_format), and what the server decides: `max_tokens` (the room the
        prompt leaves) and `cache_salt` (the tenant's prefix-cache namespace, split by the client's salt)."""
        given = {name: value for name in SamplingParams.names() if (value := getattr(self, name, None)) is not None}
        derived = {"max_tokens": max_tokens, "logprobs": self.top_logprobs_k, "cache_salt": cache_salt,
                   "logit_bias": {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
                   "structured": self.response_format.structured() if self.response_format else None}
        return SamplingParams(**{**defaults, **given, **derived})


class ChatCompletionRequest(SamplingRequest):
    """OpenAI's chat request (tools, for one, are refused: they need a parser for the model's chat template)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def top_logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    """OpenAI's (legacy) text completion: the prompt continues the compacted context's tokens when `kv_context`
    is given (a document compacted with /v1/compact is continued as it is); a long prompt alone is compacted on
    the fly, as in chat, all but its last `keep_tokens`."""

    prompt: str | list[int] = Field(description="text, or token ids")
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's and vLLM's default for completions: 16")
    logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token to report")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, str):
            _utf8(v)
            if not v:
                raise ValueError("prompt is empty")
        elif not v:
            raise ValueError("prompt is empty")
        return v

    @property
    def top_logprobs_k(self) -> int | None:
        return self.logprobs


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_of(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)
