"""The serving tests' common ground: the real app over the fake engine (tests/fake_engine.py) with API keys, limits,
quotas and on-the-fly compaction set (`fake_api`), an HTTP client per tenant, held-out documents long enough for
on-the-fly compaction, and the server-sent events' data."""

from __future__ import annotations

from contextlib import contextmanager

import httpx

from fake_engine import fake_server
from kvcat.server.auth import Auth
from kvcat.server.config import Limits
from kvcat.server.onthefly import AutoCompaction
from kvcat.server.responses import KvContext

KEYS = {"alpha": "alpha-key-0123456789", "beta": "beta-key-0123456789", "gamma": "gamma-key-0123456789",
        "delta": "delta-key-0123456789", "epsilon": "epsilon-key-0123456789"}
QUOTA, MAX_DOC, MAX_BODY, MAX_COMPLETION = 8, 3000, 200_000, 64
THRESHOLD, RATIO = 256, 4.0  # on-the-fly compaction
NOTE = ("The lighthouse keeper counted ships every night. On the ninth night a red ship called Aurora arrived, "
        "and the harbour master Ines Varga wrote its cargo of salt and copper in her book. ")
LIMITS = Limits(max_document_tokens=MAX_DOC, max_completion_tokens=MAX_COMPLETION, max_queued_compactions=2,
                request_timeout_s=300)


def auth(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


class Client:
    def __init__(self, srv):
        self.srv, self.base = srv, srv.base

    def post(self, path, tenant="alpha", **kw):
        return httpx.post(self.base + path, headers=auth(tenant), timeout=kw.pop("timeout", 120), **kw)

    def get(self, path, tenant="alpha"):
        return httpx.get(self.base + path, headers=auth(tenant), timeout=60)

    def delete(self, path, tenant="alpha"):
        return httpx.delete(self.base + path, headers=auth(tenant), timeout=60)

    def compact(self, text, tenant="alpha", **body):
        r = self.post("/v1/compact", tenant, json={"text": text, "ratio": 4, "method": "snapkv", **body})
        assert r.status_code == 200, r.text
        return KvContext(**r.json())

    def chat(self, messages, tenant="alpha", **body):
        return self.post("/v1/chat/completions", tenant, json={"messages": messages, "max_tokens": 8, **body})


@contextmanager
def fake_api(lm, root):
    """A Client of the fake-engine server with the test keys, LIMITS, QUOTA, MAX_BODY and on-the-fly compaction."""
    keys = Auth.load(env=",".join(f"{t}:{k}" for t, k in KEYS.items()), protect_metrics=True)
    with fake_server(lm, root, auth=keys, limits=LIMITS, quota=QUOTA, max_body_bytes=MAX_BODY,
                     auto=AutoCompaction(THRESHOLD, RATIO, "snapkv")) as srv:
        yield Client(srv)


def held_out_docs(tokenizer, num_tokens: int) -> list[str]:
    """Two held-out texts of about `num_tokens` tokens, without blank lines (one paragraph each)."""
    from kvcat import data

    windows = data.token_windows(tokenizer, num_tokens, 2, n=2, split="heldout", corpora=("paul_graham",))
    return [" ".join(tokenizer.decode(w.prefix_ids).split()) for w in windows]


def sse_data(lines) -> list[str]:
    """The data of each server-sent event."""
    return [line[6:] for line in lines if line.startswith("data: ")]
