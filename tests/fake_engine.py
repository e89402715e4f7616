"""A fake engine behind `kvcat.server.engine_api.EngineClient`, and the real app served over it on loopback.

The fake generates a deterministic echo of the prompt's tokens, one token per step with an optional delay, and
records what it was asked, what was aborted and what runs now; compaction is real (on the tiny random model),
the store is real, and the HTTP server is real uvicorn on 127.0.0.1. So errors, limits, quotas, cancellation,
on-the-fly decisions and the streaming format are tested in seconds, without vLLM.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from kvcat.server.engine_api import Chunk, ContextTransfer, SamplingParams


@dataclass
class Call:
    token_ids: list[int]
    params: SamplingParams
    context: ContextTransfer | None
    request_id: str


@dataclass
class FakeEngine:
    tokenizer: object
    step_delay_s: float = 0.0  # seconds per generated token
    queue_delay_s: float = 0.0  # seconds before the first token (a request waiting in the engine's queue)
    block_size: int = 16
    max_model_len: int = 4096
    dtype: str = "float32"
    fail_after: int | None = None  # raise after this many tokens (an engine error mid-stream)
    dead: bool = False  # check_health raises, as vLLM's does once its engine core died
    eos_after: int = 24  # the "model" ends its answer after this many tokens (unless ignore_eos)
    calls: list[Call] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)

    def kv_bytes_per_token(self) -> int:
        return 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head_dim 16, float32: the tiny model's

    async def generate(self, token_ids, params: SamplingParams, context: ContextTransfer | None = None,
                       request_id: str | None = None):
        request_id = request_id or f"fake-{len(self.calls)}"
        self.calls.append(Call(list(token_ids), params, context, request_id))
        self.running.add(request_id)
        try:
            await asyncio.sleep(self.queue_delay_s)
            if context is not None and not _loads(context.path):  # as vLLM's KV-load failure path ends it
                yield Chunk([], "", "error", len(token_ids), 0)
                return
            texts, done = [""] * params.n, [False] * params.n
            for i in range(params.max_tokens):
                if self.step_delay_s:
                    await asyncio.sleep(self.step_delay_s)
                if self.fail_after is not None and i >= self.fail_after:
                    raise RuntimeError("the fake engine failed on purpose")
                for j in range(params.n):  # completion j echoes the prompt from token j on
                    if done[j]:
                        continue
                    tid = token_ids[(i + j) % len(token_ids)]
                    before, piece, finish = len(texts[j]), self.tokenizer.decode([tid]), None
                    texts[j] += piece
                    hits = [texts[j].index(s) for s in params.stop if s in texts[j]]
                    if i + 1 >= params.min_tokens and (hits or tid in params.stop_token_ids):
                        piece, finish = texts[j][before:min(hits)] if hits else piece, "stop"  # as vLLM
                    elif i + 1 >= params.min_tokens and i + 1 == self.eos_after and not params.ignore_eos:
                        finish = "stop"  # the model ends its answer
                    elif i + 1 == params.max_tokens:
                        finish = "length"
                    logprobs = None
                    if params.logprobs is not None:
                        logprobs = [{tid: -0.25, **{t: -1.0 - k for k, t in enumerate((1, 2, 3)[:params.logprobs])
                                                    if t != tid}}]
                    done[j] = finish is not None
                    yield Chunk([tid], piece, finish, len(token_ids), i + 1, logprobs,
                                cached_tokens=0 if i == 0 else None, index=j)
                if all(done):
                    return
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        if self.dead:
            raise RuntimeError("EngineDeadError: the fake engine core died")

    def shutdown(self) -> None:
        pass


def _loads(path: str) -> bool:
    from kvcat.cache import CompactCache

    try:
        CompactCache.load(path)
        return True
    except Exception:  # noqa: BLE001  (missing, truncated, corrupt)
        return False


class FakeServer:
    """The real kvcat app over a FakeEngine, in uvicorn on a loopback port (a thread of the test process)."""

    def __init__(self, lm, root, *, auth=None, limits=None, auto=None, max_body_bytes=None, quota=None,
                 **engine_options):
        import uvicorn

        from kvcat.server.app import create_app
        from kvcat.server.auth import Auth
        from kvcat.server.config import Limits, ServerConfig
        from kvcat.server.launch import free_port
        from kvcat.server.serving import Serving
        from kvcat.server.store import ContextStore

        self.engine = FakeEngine(lm.tokenizer, **engine_options)
        self.store = ContextStore(root, lm.spec.fingerprint, max_contexts_per_tenant=quota)
        self.serving = Serving(self.engine, lm, self.store, lm.spec.name, auto=auto, limits=limits or Limits())
        self.serving.ready = True
        config = ServerConfig(model=lm.spec.name, auth=auth or Auth(), health_check_s=0.2)
        if max_body_bytes is not None:
            config.max_body_bytes = max_body_bytes
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(create_app(config, self.serving), host="127.0.0.1",
                                                     port=self.port, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> "FakeServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake-engine server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)


@contextmanager
def fake_server(lm, root, **options):
    srv = FakeServer(lm, root, **options).start()
    try:
        yield srv
    finally:
        srv.stop()
