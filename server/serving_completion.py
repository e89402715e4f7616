"""Text completions (OpenAI's legacy /v1/completions): a prompt of text or token ids, on its own, continuing
a stored compacted context's tokens as they are (no chat template), or with its leading blocks compacted on the
fly; OpenAI's text_completion format."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator

from kvcat.server.engine_api import Chunk
from kvcat.server.errors import invalid
from kvcat.server.protocol import CompletionRequest
from kvcat.server.responses import CompletionChoice, CompletionLogprobs, CompletionResponse
from kvcat.server.serving_generation import GenerationServing, Turn


class CompletionServing(GenerationServing):
    id_prefix = "cmpl"

    async def complete(self, req: CompletionRequest, tenant: str, cancel: threading.Event | None = None
                       ) -> tuple[CompletionResponse | AsyncIterator[str], dict[str, str]]:
        """(the response, or an SSE stream of it; extra response headers)."""
        start = time.perf_counter()
        cancel = cancel or threading.Event()
        self.model.check(req.model)
        ids = self._prompt_ids(req)
        found = None if req.kv_context is not None else await self.onthefly.resolve_tokens(req, ids, tenant, cancel)
        rec = self._context(req, tenant, found)
        turn = self._turn(req, found.rest if found else ids, rec, tenant)
        headers = self._on_the_fly(turn, found) if found is not None else {}
        chunks = self._generate(turn, start, cancel)
        if req.stream:
            return self._sse(turn, chunks), headers
        got = await self._collect(turn, chunks, cancel)
        choices = [CompletionChoice(index=i, text=got.texts[i], finish_reason=got.finish[i] or "stop",
                                    logprobs=self._logprobs(turn, got.chunks[i])) for i in range(turn.params.n)]
        return CompletionResponse(id=turn.id, created=turn.created, model=self.model.name, choices=choices,
                                  usage=self._usage(turn, got.last, got.count),
                                  system_fingerprint=self.model.fingerprint, **turn.extra_fields()), headers

    def _prompt_ids(self, req: CompletionRequest) -> list[int]:
        if isinstance(req.prompt, str):
            ids = list(self.model.tokenizer(req.prompt)["input_ids"])
            if not ids:  # the tokenizer drops some control characters: nothing left for the engine to continue
                raise invalid("the prompt holds no tokens once tokenized", "prompt")
            return ids
        self.model.check_token_ids(req.prompt, "prompt")
        return list(req.prompt)

    def _sse(self, turn: Turn, chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
        def event(choices, usage=None) -> str:
            body = CompletionResponse(id=turn.id, created=turn.created, model=self.model.name, choices=choices,
                                      system_fingerprint=self.model.fingerprint, **turn.extra_fields())
            if usage is not None:
                body.usage = usage
            return f"data: {body.model_dump_json(exclude_unset=True)}\n\n"

        def chunk_event(chunk: Chunk) -> str | None:
            logprobs = self._logprobs(turn, [chunk])
            if chunk.text or chunk.finish_reason or logprobs:
                return event([CompletionChoice(index=chunk.index, text=chunk.text, logprobs=logprobs,
                                               finish_reason=chunk.finish_reason)])
            return None

        return self._stream(turn, chunks, [], chunk_event, lambda usage: event([], usage))

    def _logprobs(self, turn: Turn, chunks: list[Chunk]) -> CompletionLogprobs | None:
        """The legacy format: the tokens, their logprobs, the top alternatives and each token's text offset."""
        top = turn.req.top_logprobs_k
        if top is None:
            return None
        decode, out, offset = self.model.tokenizer.decode, CompletionLogprobs(
            tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]), 0
        for chunk in chunks:
            for token_id, step in zip(chunk.token_ids, chunk.logprobs or []):
                text = decode([token_id])
                out.tokens.append(text)
                out.token_logprobs.append(max(step.get(token_id, -math.inf), -9999.0))
                best = sorted(step.items(), key=lambda kv: -kv[1])[:top]
                out.top_logprobs.append({decode([t]): max(lp, -9999.0) for t, lp in best})
                out.text_offset.append(offset)
                offset += len(text)
        return out
