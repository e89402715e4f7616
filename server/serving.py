"""Everything behind the routes, wired once: the served model, the stored contexts, compaction jobs, on-the-fly
compaction and chat. Nothing here imports vLLM: the engine comes in as an `engine_api.EngineClient`."""

from __future__ import annotations

from kvcat.models import LoadedModel
from kvcat.server.config import Limits
from kvcat.server.engine_api import EngineClient
from kvcat.server.onthefly import AutoCompaction
from kvcat.server.responses import ModelCard
from kvcat.server.serving_chat import ChatServing
from kvcat.server.serving_compaction import CompactionServing
from kvcat.server.serving_completion import CompletionServing
from kvcat.server.serving_contexts import ContextRegistry
from kvcat.server.serving_models import ServedModel
from kvcat.server.serving_onthefly import OnTheFlyServing
from kvcat.server.serving_warm import ContextWarmer
from kvcat.server.store import ContextStore


class Serving:
    def __init__(self, engine: EngineClient, lm: LoadedModel, store: ContextStore, model_name: str, *,
                 beta: bool = True, auto: AutoCompaction | None = None, limits: Limits | None = None):
        self.engine, self.beta, self.limits = engine, beta, limits or Limits()
        self.model = ServedModel(model_name, lm)
        self.contexts = ContextRegistry(store, engine.kv_bytes_per_token(), beta=beta)
        warmer = ContextWarmer(engine, self.model, self.contexts)
        self.compaction = CompactionServing(self.model, self.contexts, warmer, beta=beta, limits=self.limits)
        self.onthefly = OnTheFlyServing(self.model, self.contexts, self.compaction, auto or AutoCompaction(),
                                        block_size=engine.block_size, beta=beta)
        self.chat = ChatServing(self.model, engine, self.contexts, self.onthefly, limits=self.limits)
        self.completion = CompletionServing(self.model, engine, self.contexts, self.onthefly, limits=self.limits)
        self.onthefly.check()
        self.ready = False  # set once the start-up self-test passed

    @property
    def closing(self) -> bool:
        return self.compaction.closing

    def model_cards(self, created: int, dtype: str | None = None) -> list[ModelCard]:
        return [ModelCard(id=self.model.name, created=created, max_model_len=self.model.max_positions,
                          kv_block_size=self.engine.block_size, kv_bytes_per_token=self.contexts.kv_bytes_per_token,
                          dtype=dtype)]

    async def drain(self, timeout: float = 30.0) -> None:
        """Shutdown: wait for running compaction jobs; later requests get 503."""
        await self.compaction.drain(timeout)
