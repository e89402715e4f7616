"""Request and response models of the HTTP API (pydantic). OpenAI's shapes where OpenAI has one."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvcat.defaults import DEFAULT_METHOD


def _utf8(value: str | None) -> str | None:
    """Strings must be encodable (JSON allows lone surrogates like \\ud800; tokenizers do not)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        for text in ([v] if isinstance(v, str) else [str(p.get("text", "")) for p in v or []]):
            _utf8(text)
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type", "text") == "text")
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
    keep_turns: int | None = Field(None, ge=1, description="most recent user turns kept uncompressed")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int = Field(1, ge=1, le=1)
    min_tokens: int = Field(0, ge=0, description="vLLM extension: generate at least this many tokens")
    cache_salt: str | None = Field(None, min_length=1, max_length=256,
                                   description="vLLM extension: isolates this request's prefix-cache entries")
    kv_context: str | None = Field(None, description="answer over this compacted context (POST /v1/compact)")
    kv_compaction: Literal["off"] | KvCompactionOptions | None = Field(
        None, description='on-the-fly compaction of a long prompt: "off", or settings overriding the server\'s')

    @model_validator(mode="after")
    def _context_or_compaction(self) -> "ChatCompletionRequest":
        if self.kv_context is not None and isinstance(self.kv_compaction, KvCompactionOptions):
            raise ValueError("give kv_context (an existing compacted context) or kv_compaction options, not both")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, str):
            return [v]
        if v is not None and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v


def error_body(message: str, type_: str, code: int | str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
