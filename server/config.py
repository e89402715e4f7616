"""The server's settings: one dataclass per concern, the single source of every default `kvcat serve` shows."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcat.config import DtypeChoice, choose_dtype
from kvcat.server.auth import Auth
from kvcat.server.onthefly import AutoCompaction


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (past these the server answers 413, 422, 429 or 504, never queues forever), and
    how compaction shares the machine with chats."""

    max_document_tokens: int | None = None  # default: the model's context
    max_completion_tokens: int | None = None  # default: what fits the context
    max_queued_compactions: int = 8  # waiting + running; more get 429 with Retry-After
    request_timeout_s: float | None = 600.0  # a chat completion, generation included
    compaction_timeout_s: float | None = 1800.0  # one synchronous /v1/compact or on-the-fly compaction
    max_jobs: int = 64  # finished async jobs remembered for GET /v1/compact/jobs/{id}
    # niceness of the compaction thread (and the torch threads it starts) on shared CPU cores: 0 = compaction and
    # the engine's chats share them equally; 10 puts chats first, but under steady chat load compactions then wait
    # for idle cores (minutes each: benchmarks/README.md, the load benchmark's burst rows)
    compaction_nice: int = 0


@dataclass
class ServerConfig:
    model: str  # zoo name or HF folder
    dtype: str = "auto"  # the engine's; auto: kvcat.config.choose_dtype picks from the hardware
    # auto is float32: bfloat16 halves the seconds on an AMX CPU but costs a digit of the demo's answer (NOTES.md)
    compaction_dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    beta: bool = True
    kv_cache_gib: int | None = None
    store: str | None = None  # a folder or an fsspec URL; default $KVCAT_HOME/contexts
    self_test: bool = True
    served_name: str | None = None
    auto: AutoCompaction = field(default_factory=AutoCompaction)  # on-the-fly compaction (off by default)
    auth: Auth = field(default_factory=Auth)  # no keys: one tenant, loopback only (see `kvcat serve`)
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = 32 * 2**20
    max_contexts_per_tenant: int | None = None
    max_bytes_per_tenant: int | None = None
    engine_extra: dict = field(default_factory=dict)
    health_check_s: float | None = 5.0  # how often the engine's health is checked (None: never)

    def dtypes(self) -> dict[str, DtypeChoice]:
        """What the engine and compaction compute in, `auto` resolved from the hardware (ValueError if unknown)."""
        return {"engine": choose_dtype(self.dtype, "engine"), "compaction": choose_dtype(self.compaction_dtype,
                                                                                        "compaction")}
