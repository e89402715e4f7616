"""On-the-fly compaction of chat and text-completion prompts (the policy and the prompt splitting are in
`onthefly`): find or make the compacted context a long prompt's leading part stands for."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version

from kvcat.server import metrics, onthefly, prompting
from kvcat.server.errors import invalid
from kvcat.server.onthefly import AutoCompaction, AutoCompactionError
from kvcat.server.protocol import ChatCompletionRequest, SamplingRequest
from kvcat.server.serving_compaction import CompactionServing
from kvcat.server.serving_contexts import ContextRegistry
from kvcat.server.serving_models import ServedModel
from kvcat.server.store import ContextRecord


@dataclass
class Resolved:
    """A prompt served over a compacted context: the context, what is sent uncompressed after it (chat messages,
    or a text prompt's token ids), and what on-the-fly compaction did (hit, prefix-hit, incremental or
    compacted)."""

    context: ContextRecord
    rest: list[dict] | list[int]
    outcome: str

    def info(self) -> dict:
        rec, fresh = self.context, self.outcome in ("compacted", "incremental")
        return {"outcome": self.outcome, "cache_hit": self.outcome in ("hit", "prefix-hit"), "context": rec.id,
                "original_tokens": rec.num_tokens, "compacted_tokens": rec.num_slots,
                "compaction_seconds": round(rec.compaction_seconds, 4) if fresh else 0.0}


class OnTheFlyServing:
    def __init__(self, model: ServedModel, contexts: ContextRegistry, compaction: CompactionServing,
                 policy: AutoCompaction, *, block_size: int, beta: bool):
        self.model, self.contexts, self.compaction = model, contexts, compaction  # compaction: its queue and methods
        self.policy, self.block_size, self.beta = policy, block_size, beta
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_used: dict[str, float] = {}  # on-the-fly context id -> when a request last used it here
        tok = self.model.tokenizer
        template = getattr(tok, "chat_template", None) or ""
        self._versions = {"kvcat": version("kvcat"), "vocab": len(tok),
                          "template": hashlib.sha256(str(template).encode()).hexdigest()[:16]}

    def check(self) -> None:
        """Refuse a bad server-wide policy at start-up (raises AutoCompactionError)."""
        from kvcat.compaction import method_names

        self.policy.validate(self.block_size, method_names())

    def policy_for(self, req: SamplingRequest) -> AutoCompaction:
        """The server's policy with the request's `kv_compaction` field applied (422 when that makes it bad)."""
        from kvcat.compaction import method_names

        override = req.kv_compaction
        if override is not None and override != "off":
            override = override.model_dump(exclude_none=True)
        policy = self.policy.merged(override)
        try:
            policy.validate(self.block_size, method_names())
        except AutoCompactionError as exc:
            raise invalid(str(exc), "kv_compaction") from None
        return policy

    async def resolve(self, req: ChatCompletionRequest, messages: list[dict], tenant: str,
                      cancel: threading.Event) -> Resolved | None:
        """The compacted context for a long plain chat, or None to serve the prompt as it is."""
        policy = self.policy_for(req)
        if not policy.enabled:
            return None
        tokenizer = self.model.tokenizer
        try:
            if len(prompting.plain_ids(tokenizer, messages)) <= policy.threshold_tokens:
                return None
        except prompting.PromptError as exc:
            raise invalid(str(exc), "messages") from None
        cut = onthefly.split(messages, policy.keep_turns)
        if cut is None:
            return None
        method = self.compaction.method(policy.method)
        versions = {**self._versions, "params": method.params}

        def key_of(source: dict) -> str:
            return onthefly.context_key(self.model.fingerprint, source, policy, self.beta, tenant,
                                        versions)

        key = key_of(cut.source)
        async with self._exclusive(key):
            return await self._find_or_compact(cut, key, key_of, method, policy, tenant, cancel)

    async def resolve_tokens(self, req: SamplingRequest, ids: list[int], tenant: str,
                             cancel: threading.Event) -> Resolved | None:
        """The compacted context for a long text-completion prompt (`ids`): its leading whole KV blocks, all
        but the last `keep_tokens` or more; None to serve the prompt as it is. A prompt that grows (a transcript)
        reuses the longest stored leading part: as a prefix hit while the tokens after it stay under the
        threshold, else joined to the newly compacted blocks."""
        policy = self.policy_for(req)
        if not policy.enabled or len(ids) <= policy.threshold_tokens:
            return None
        block = self.block_size
        cut = onthefly.token_cut(len(ids), policy.keep_tokens, block)
        if cut / policy.ratio < block:  # too little before the kept tokens to compact
            return None
        method = self.compaction.method(policy.method)
        versions = {**self._versions, "params": method.params}
        sources = onthefly.token_sources(ids, list(range(block, cut + 1, block)))

        def key_of(at: int) -> str:
            return onthefly.context_key(self.model.fingerprint, sources[at], policy, self.beta, tenant,
                                        versions)

        key = key_of(cut)
        async with self._exclusive(key):
            rec = self.contexts.find(key, tenant)
            if rec is not None:
                return self._used(Resolved(rec, ids[cut:], "hit"))
            base, at = None, cut - block
            while at > 0 and (base := self.contexts.find(key_of(at), tenant)) is None:
                at -= block
            if base is not None and len(ids) - at <= policy.threshold_tokens:
                return self._used(Resolved(base, ids[at:], "prefix-hit"))
            self.compaction.check_length(cut, "prompt")
            self._make_room(tenant, key)
            work = self.compaction.work(sources[cut], ids[at:cut] if base else ids[:cut], method, policy.ratio,
                                        None, tenant=tenant, context_id=key, origin="auto", base=base)
            return self._compacted(await self.compaction.run(work, cancel), ids[cut:],
                                   "incremental" if base else "compacted")

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: str):
        """One request at a time per on-the-fly context: concurrent requests for one prefix compact it once."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked():
                self._locks.pop(key, None)

    async def _find_or_compact(self, cut: onthefly.Split, key: str, key_of: Callable[[dict], str], method,
                               policy: AutoCompaction, tenant: str, cancel: threading.Event) -> Resolved | None:
        tokenizer = self.model.tokenizer
        rec = self.contexts.find(key, tenant)
        if rec is not None:
            return self._used(Resolved(rec, cut.rest, "hit"))
        for src, rest in cut.prefixes:  # the longest stored prefix of this conversation
            base = self.contexts.find(key_of(src), tenant)
            if base is None:
                continue
            if len(prompting.question_ids(tokenizer, src, rest)) <= policy.threshold_tokens:
                return self._used(Resolved(base, rest, "prefix-hit"))  # the turns since then still fit as they are
            new = onthefly.new_tokens(tokenizer, src, cut.source)
            if new is not None and len(new) >= 2:
                self._make_room(tenant, key)
                work = self.compaction.work(cut.source, new, method, policy.ratio, None, tenant=tenant,
                                            context_id=key, origin="auto", base=base)
                return self._compacted(await self.compaction.run(work, cancel), cut.rest, "incremental")
            break
        ids = prompting.context_ids(tokenizer, cut.source)
        if len(ids) / policy.ratio < self.block_size:  # too little before the kept turns to compact
            return None
        self.compaction.check_length(len(ids), "messages")
        self._make_room(tenant, key)
        work = self.compaction.work(cut.source, ids, method, policy.ratio, None, tenant=tenant, context_id=key,
                                    origin="auto")
        return self._compacted(await self.compaction.run(work, cancel), cut.rest, "compacted")

    def _compacted(self, rec: ContextRecord, rest: list[dict], outcome: str) -> Resolved:
        mode = "scratch" if outcome == "compacted" else outcome
        metrics.ONTHEFLY_COMPACTIONS.labels(self.model.name, rec.method, mode).inc()
        return self._used(Resolved(rec, rest, outcome))

    def _used(self, found: Resolved) -> Resolved:
        self._last_used[found.context.id] = time.time()
        return found

    def _make_room(self, tenant: str, key: str) -> None:
        """Evict the tenant's least recently used on-the-fly contexts (used on this replica; else the oldest)
        until a new one fits under `max_contexts`; a context still being read keeps its file until it is done."""
        autos = [r for r in self.contexts.store.list(tenant) if r.origin == "auto" and r.id != key]
        autos.sort(key=lambda r: self._last_used.get(r.id, r.created))
        for rec in autos[: max(0, len(autos) + 1 - self.policy.max_contexts)]:
            self.contexts.delete(rec.id, tenant)
            self._last_used.pop(rec.id, None)
            metrics.ONTHEFLY_EVICTIONS.labels(self.model.name, rec.method).inc()
