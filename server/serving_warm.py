"""Warming a newly stored context: the last step of POST /v1/compact, before it answers."""

from __future__ import annotations

import asyncio
import logging
import uuid

from kvcat.server.engine_api import EngineClient, SamplingParams
from kvcat.server.serving_contexts import ContextRegistry
from kvcat.server.serving_models import ServedModel
from kvcat.server.store import ContextRecord

log = logging.getLogger("kvcat.server")
WARM_TIMEOUT_S = 30.0


class ContextWarmer:
    def __init__(self, engine: EngineClient, model: ServedModel, contexts: ContextRegistry):
        self.engine, self.model, self.contexts = engine, model, contexts

    async def warm(self, rec: ContextRecord) -> None:
        """Load a newly stored context into the engine (one token generated over it): the worker's copy and the
        context's prefix-cache blocks are then in place, so that its first question is as fast as the later
        ones (about 0.1 s of engine time, against seconds of compaction). A failure only means that the first
        question loads it instead."""
        params = SamplingParams(max_tokens=1, temperature=0.0)
        try:
            async with asyncio.timeout(WARM_TIMEOUT_S):  # a stuck engine never holds the compaction's answer
                async for _ in self.engine.generate([self.model.tokenizer.eos_token_id], params,
                                                    self.contexts.transfer(rec), f"warm-{uuid.uuid4().hex[:24]}"):
                    pass
        except Exception as exc:  # noqa: BLE001  (TimeoutError included)
            log.warning("warming context %s failed: %r", rec.id, exc)
