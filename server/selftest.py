"""The start-up self-test: a context injected through the KV connector must answer as the engine's own
prefill of the same tokens does, or the server refuses to start (vLLM's internals may have moved)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from kvcat.inference import full_cache, prefill
from kvcat.server import prompting
from kvcat.server.engine_api import ContextTransfer, SamplingParams
from kvcat.server.serving import Serving

SELF_TEST_TEXT = ("Mira keeps bees on the roof of the old library. Every spring she counts the hives, "
                  "and this year there were seven.")


async def self_test(serving: Serving, tolerance: float | None = None) -> dict:
    """End to end through the connector: an identity context (every token kept, beta 0) must give the
    same first token and logprob as the same prompt prefilled by the engine. Also warms the engine up."""
    tok, lm, engine = serving.model.tokenizer, serving.model.lm, serving.engine
    source = {"text": SELF_TEST_TEXT}
    ctx = prompting.context_ids(tok, source)
    q = prompting.question_ids(tok, source, [{"role": "user", "content": "How many hives?"}])
    cache = await asyncio.to_thread(lambda: full_cache(prefill(lm, ctx), lm.spec.fingerprint))
    path = Path(serving.contexts.store.root) / f".selftest-{uuid.uuid4().hex}.kvc"  # unique across replicas
    cache.save(path)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=1)
    try:
        async def first(ids, context):
            async for chunk in engine.generate(ids, params, context):
                if chunk.token_ids:
                    t = chunk.token_ids[0]
                    return t, chunk.logprobs[0][t]
            raise RuntimeError("no token generated")

        plain = await first(ctx + q, None)
        context = ContextTransfer("selftest", str(path), cache.num_slots, cache.num_tokens,
                                  f"kvcat-selftest-{time.time_ns()}")
        injected = await first(q, context)
    finally:
        path.unlink(missing_ok=True)
    tol = tolerance if tolerance is not None else (1e-3 if engine.dtype == "float32" else 0.15)
    diff = abs(plain[1] - injected[1])
    if plain[0] != injected[0] or diff > tol:
        raise RuntimeError(f"kvcat start-up self-test failed: a context injected through the KV connector "
                           f"gave token {injected[0]} (logprob {injected[1]:.5f}) where the engine's own prefill "
                           f"gave {plain[0]} ({plain[1]:.5f}); vLLM's internals may have changed")
    return {"token": plain[0], "logprob_diff": diff}
