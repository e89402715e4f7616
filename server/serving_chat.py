"""Chat completions over a stored context, an on-the-fly compacted prompt, or the plain prompt: OpenAI's chat
response and streaming formats (the generation itself is `serving_generation`'s)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator

from kvcat.server import prompting
from kvcat.server.engine_api import Chunk
from kvcat.server.errors import invalid
from kvcat.server.protocol import ChatCompletionRequest
from kvcat.server.responses import (AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionResponse,
                                    ChoiceLogprobs, ChunkChoice, Delta, TokenLogprob, TopLogprob)
from kvcat.server.serving_generation import GenerationServing, Turn
from kvcat.server.store import ContextRecord


class ChatServing(GenerationServing):
    id_prefix = "chatcmpl"

    async def chat(self, req: ChatCompletionRequest, tenant: str, cancel: threading.Event | None = None
                   ) -> tuple[ChatCompletionResponse | AsyncIterator[str], dict[str, str]]:
        """(the response, or an SSE stream of it; extra response headers). `cancel` (the client went away) and
        the request timeout stop the generation and free its engine slot."""
        start = time.perf_counter()
        cancel = cancel or threading.Event()
        self.model.check(req.model)
        messages = [m.for_template() for m in req.messages]
        found = None if req.kv_context is not None else await self.onthefly.resolve(req, messages, tenant, cancel)
        rec = self._context(req, tenant, found)
        turn = self._turn(req, self._prompt_ids(rec, found.rest if found else messages), rec, tenant)
        headers = self._on_the_fly(turn, found) if found is not None else {}
        chunks = self._generate(turn, start, cancel)
        if req.stream:
            return self._sse(turn, chunks), headers
        return await self._complete(turn, chunks, cancel), headers

    def _prompt_ids(self, rec: ContextRecord | None, messages: list[dict]) -> list[int]:
        """The chat-templated prompt: the messages after the context's document, or on their own."""
        try:
            if rec is None:
                return prompting.plain_ids(self.model.tokenizer, messages)
            return prompting.question_ids(self.model.tokenizer, rec.source, messages)
        except prompting.PromptError as exc:
            raise invalid(str(exc), "messages") from None

    async def _complete(self, turn: Turn, chunks: AsyncIterator[Chunk], cancel: threading.Event
                        ) -> ChatCompletionResponse:
        got = await self._collect(turn, chunks, cancel)
        def logprobs(i: int) -> ChoiceLogprobs | None:
            if not turn.req.logprobs:
                return None
            return ChoiceLogprobs(content=[e for c in got.chunks[i] for e in self._logprobs(turn, c)])

        choices = [ChatChoice(index=i, message=AssistantMessage(content=got.texts[i]),
                              finish_reason=got.finish[i] or "stop", logprobs=logprobs(i))
                   for i in range(turn.params.n)]
        return ChatCompletionResponse(id=turn.id, created=turn.created, model=self.model.name, choices=choices,
                                      usage=self._usage(turn, got.last, got.count),
                                      system_fingerprint=self.model.fingerprint, **turn.extra_fields())

    def _sse(self, turn: Turn, chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
        def event(**fields) -> str:
            body = ChatCompletionChunk(id=turn.id, created=turn.created, model=self.model.name,
                                       system_fingerprint=self.model.fingerprint, **fields)
            return f"data: {body.model_dump_json(exclude_unset=True)}\n\n"

        def chunk_event(chunk: Chunk) -> str | None:
            logprobs = ChoiceLogprobs(content=self._logprobs(turn, chunk)) if turn.req.logprobs else None
            if chunk.text or chunk.finish_reason or logprobs:
                return event(choices=[ChunkChoice(index=chunk.index, delta=Delta(content=chunk.text),
                                                  logprobs=logprobs, finish_reason=chunk.finish_reason)])
            return None

        opening = event(choices=[ChunkChoice(index=i, delta=Delta(role="assistant", content=""), logprobs=None,
                                             finish_reason=None) for i in range(turn.params.n)], **turn.extra_fields())
        return self._stream(turn, chunks, [opening], chunk_event, lambda usage: event(choices=[], usage=usage))

    def _logprobs(self, turn: Turn, chunk: Chunk) -> list[TokenLogprob]:
        if not turn.req.logprobs:
            return []
        top, decode, out = turn.req.top_logprobs or 0, self.model.tokenizer.decode, []

        def entry(token_id: int, logprob: float) -> dict:
            text = decode([token_id])
            return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}

        for token_id, step in zip(chunk.token_ids, chunk.logprobs or []):
            best = sorted(step.items(), key=lambda kv: -kv[1])[:top]
            out.append(TokenLogprob(**entry(token_id, step.get(token_id, -math.inf)),
                                    top_logprobs=[TopLogprob(**entry(t, lp)) for t, lp in best]))
        return out

