"""Every kvcat_* Prometheus metric, defined once (imported where observed).

They live in prometheus-client's default registry, beside vLLM's own `vllm:*` metrics, so `/metrics`
serves both. Labels: model and method; request metrics add mode = "compacted" | "full".
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

CONTEXTS_STORED = Gauge("kvcat_contexts_stored", "Compacted contexts held by the server", ["model", "method"])
ORIGINAL_TOKENS = Gauge("kvcat_context_original_tokens", "Tokens of the stored contexts before compaction",
                        ["model", "method"])
COMPACTED_TOKENS = Gauge("kvcat_context_compacted_tokens", "Slots per head of the stored contexts",
                         ["model", "method"])
KV_BYTES_FULL = Gauge("kvcat_kv_full_bytes", "KV bytes the stored contexts would hold uncompacted",
                      ["model", "method"])
KV_BYTES_COMPACTED = Gauge("kvcat_kv_compacted_bytes", "KV bytes the stored contexts hold compacted",
                           ["model", "method"])
KV_BYTES_SIDE = Gauge("kvcat_kv_side_bytes", "Of the compacted bytes, those of retrieval heads kept whole beside the "
                      "paged blocks (hybrid caches)", ["model", "method"])
KV_BYTES_SAVED = Gauge("kvcat_kv_saved_bytes", "KV bytes saved by the stored contexts vs full caches",
                       ["model", "method"])
COMPACTION_FACTOR = Histogram("kvcat_compaction_factor", "How many times smaller a compaction makes a context "
                             "(N / t; named factor, not ratio, because it is above 1)", ["model", "method"],
                             buckets=(2, 4, 8, 10, 16, 32, 64, 128))
COMPACTION_SECONDS = Histogram("kvcat_compaction_seconds", "Wall time of one compaction", ["model", "method"],
                               buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
TTFT_SECONDS = Histogram("kvcat_time_to_first_token_seconds", "Time to first token of chat completions",
                         ["model", "method", "mode"], buckets=_LATENCY)
E2E_SECONDS = Histogram("kvcat_e2e_request_latency_seconds", "End-to-end latency of chat completions",
                        ["model", "method", "mode"], buckets=_LATENCY)
ONTHEFLY_REQUESTS = Counter("kvcat_onthefly_requests", "Chat requests served over an on-the-fly compacted "
                            "prefix, by outcome (hit, prefix-hit, compacted, incremental)",
                            ["model", "method", "outcome"])
ONTHEFLY_COMPACTIONS = Counter("kvcat_onthefly_compactions", "On-the-fly compactions, from scratch or joined to a "
                               "stored prefix (incremental)", ["model", "method", "kind"])
ONTHEFLY_BYTES_SAVED = Counter("kvcat_onthefly_kv_saved_bytes", "KV bytes not held by requests served over "
                               "on-the-fly compacted prefixes (full minus compacted, summed over requests)",
                               ["model", "method"])
ONTHEFLY_EVICTIONS = Counter("kvcat_onthefly_evictions", "On-the-fly contexts evicted (least recently used) to "
                             "keep a tenant under the on-the-fly context bound", ["model", "method"])
COMPACTIONS_QUEUED = Gauge("kvcat_compactions_queued", "Compactions waiting for the compaction thread")
COMPACTIONS_RUNNING = Gauge("kvcat_compactions_running", "Compactions running now (at most one per server)")
CHATS_IN_FLIGHT = Gauge("kvcat_chats_in_flight", "Chat completions being generated now", ["model", "mode"])
REQUESTS = Counter("kvcat_chat_requests", "Chat completions served", ["model", "method", "mode"])
QUARANTINED = Counter("kvcat_store_quarantined", "Context files found corrupt or orphaned at start and moved "
                      "to the store's quarantine folder")
ERRORS = Counter("kvcat_errors", "Errors returned, by type", ["type"])
for _type in ("compaction_failed", "engine_error", "internal"):  # exported at 0, so rates and alerts have data
    ERRORS.labels(_type)


BEFORE_SCRAPE: list = []  # callables run before each scrape (the store gauges read the shared store then)


def render() -> tuple[bytes, str]:
    for refresh in BEFORE_SCRAPE:
        refresh()
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
