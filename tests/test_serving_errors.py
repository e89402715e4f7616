"""Serving errors, limits and isolation over the fake engine: bad input of every kind, tenants, quotas, the bounded
compaction queue, cancellation and timeouts, engine and context-file failures, a dead engine, replicas sharing a
store. The live-engine tests (test_server.py, test_reliability.py) keep the real path honest."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

import httpx
import pytest

from fake_api import MAX_BODY, MAX_DOC, NOTE, QUOTA, auth, fake_api, sse_data
from fake_engine import fake_server
from kvcat.compaction import METHODS, register
from kvcat.compaction.eviction import SnapKV
from kvcat.server.config import Limits
from kvcat.server.responses import CompactionJob, KvContext


@dataclass
class SlowSnapKV(SnapKV):
    """SnapKV that takes `seconds` and reports progress often: a compaction long enough to queue and cancel."""

    name: ClassVar[str] = "test-slow"
    seconds: float = 3.0

    def solve_layers(self, lm, state, budgets, progress):
        steps = 60
        for i in range(steps):
            if progress is not None:
                progress(i, steps)
            time.sleep(self.seconds / steps)
        return super().solve_layers(lm, state, budgets, progress)


@pytest.fixture(scope="module", autouse=True)
def slow_method():
    register(SlowSnapKV)
    yield
    METHODS.pop(SlowSnapKV.name, None)


@pytest.fixture(scope="module")
def api(tiny, tmp_path_factory):
    with fake_api(tiny, tmp_path_factory.mktemp("fake-store")) as client:
        yield client


# ---- bad input -------------------------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = [  # (name, method, path, body: dict | bytes | None, tenant or None, status)
    ("malformed json", "POST", "/v1/compact", b'{"text": "x", ratio: 4', "alpha", 422),
    ("wrong type", "POST", "/v1/compact", {"text": 5, "ratio": 4}, "alpha", 422),
    ("negative ratio", "POST", "/v1/compact", {"text": "a b c d", "ratio": -3}, "alpha", 422),
    ("ratio 1", "POST", "/v1/compact", {"text": "a b c d", "ratio": 1}, "alpha", 422),
    ("infinite ratio", "POST", "/v1/compact", b'{"text": "a b c d e f", "ratio": Infinity}', "alpha", 422),
    ("huge target", "POST", "/v1/compact", {"text": "a b c d", "target_tokens": 10**12}, "alpha", 422),
    ("unknown field", "POST", "/v1/compact", {"text": "a b", "ratio": 4, "color": "red"}, "alpha", 400),
    ("unknown method", "POST", "/v1/compact", {"text": "a b c d", "ratio": 2, "method": "zip"}, "alpha", 422),
    ("bad method parameter", "POST", "/v1/compact", {"text": NOTE, "ratio": 2, "params": {"nope": 1}}, "alpha", 422),
    ("unknown query mode", "POST", "/v1/compact", {"text": NOTE, "ratio": 2, "query_mode": "psychic"}, "alpha", 422),
    ("text and messages", "POST", "/v1/compact",
     {"text": NOTE, "messages": [{"role": "user", "content": "x"}], "ratio": 2}, "alpha", 422),
    ("empty document", "POST", "/v1/compact", {"text": "   ", "ratio": 4}, "alpha", 422),
    ("lone surrogate", "POST", "/v1/compact", b'{"text": "\\ud800 broken", "ratio": 2}', "alpha", 422),
    ("document too long", "POST", "/v1/compact", {"text": "word " * (MAX_DOC + 500), "ratio": 4}, "alpha", 413),
    ("body too large", "POST", "/v1/compact", {"text": "a" * (MAX_BODY + 10), "ratio": 4}, "alpha", 413),
    ("no messages", "POST", "/v1/chat/completions", {**CHAT, "messages": []}, "alpha", 422),
    ("unknown role", "POST", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "alpha", 422),
    ("huge max_tokens", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 10**12}, "alpha", 422),
    ("above the server's max_tokens", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 65}, "alpha", 422),
    ("min_tokens over max_tokens", "POST", "/v1/chat/completions", {**CHAT, "min_tokens": 3}, "alpha", 422),
    ("negative max_tokens", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": -1}, "alpha", 422),
    ("content part text not a string", "POST", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"text": 5}]}]}, "alpha", 422),
    ("image content part", "POST", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "alpha", 422),
    ("prompt of no tokens", "POST", "/v1/completions", {"prompt": "\x04", "max_tokens": 2}, "alpha", 422),
    ("temperature as text", "POST", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, "alpha", 422),
    ("five stops", "POST", "/v1/chat/completions", {**CHAT, "stop": list("abcde")}, "alpha", 422),
    ("n = 17", "POST", "/v1/chat/completions", {**CHAT, "n": 17}, "alpha", 422),
    ("tools", "POST", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "alpha", 400),
    ("unknown chat field", "POST", "/v1/chat/completions", {**CHAT, "best_of": 2}, "alpha", 400),
    ("logit_bias beyond the vocabulary", "POST", "/v1/chat/completions", {**CHAT, "logit_bias": {"999999": 5}},
     "alpha", 422),
    ("logit_bias by word", "POST", "/v1/chat/completions", {**CHAT, "logit_bias": {"hello": 5}}, "alpha", 422),
    ("json_schema without a schema", "POST", "/v1/chat/completions",
     {**CHAT, "response_format": {"type": "json_schema"}}, "alpha", 422),
    ("unknown context", "POST", "/v1/chat/completions", {**CHAT, "kv_context": "ctx-00000000deadbeef"}, "alpha", 404),
    ("unknown model", "POST", "/v1/chat/completions", {**CHAT, "model": "gpt-9"}, "alpha", 404),
    ("odd unicode is fine", "POST", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "\u202e\u200b\U0001f999 e\u0301 \u4e2d\u6587"}]}, "alpha", 200),
    ("unknown context id", "GET", "/v1/contexts/ctx-00000000deadbeef", None, "alpha", 404),
    ("malformed context id", "DELETE", "/v1/contexts/..%2Fetc%2Fpasswd", None, "alpha", 404),
    ("unknown job", "GET", "/v1/compact/jobs/job-nope", None, "alpha", 404),
    ("missing key", "GET", "/v1/models", None, None, 401),
]


@pytest.mark.parametrize("name, method, path, body, tenant, status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_table(api, name, method, path, body, tenant, status):
    before = api.srv.store.list()
    headers = auth(tenant) if tenant else {}
    if isinstance(body, bytes):
        kw = {"content": body, "headers": {**headers, "content-type": "application/json"}}
    else:
        kw = {"headers": headers, **({} if body is None else {"json": body})}
    r = httpx.request(method, api.base + path, timeout=120, **kw)
    assert r.status_code == status, (name, r.status_code, r.text[:400])
    if status >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"], r.text
        assert api.srv.store.list() == before, "a refused request changed the store"


def test_tenants_see_only_their_own_contexts(api):
    cid = api.compact(NOTE * 3).id
    assert cid in {c["id"] for c in api.get("/v1/contexts").json()["data"]}
    assert cid not in {c["id"] for c in api.get("/v1/contexts", "beta").json()["data"]}
    assert api.get(f"/v1/contexts/{cid}", "beta").status_code == 404
    r = api.chat([{"role": "user", "content": "hi"}], "beta", kv_context=cid)
    assert r.status_code == 404 and r.json()["error"]["code"] == "context_not_found"
    assert api.delete(f"/v1/contexts/{cid}", "beta").status_code == 404
    assert api.get(f"/v1/contexts/{cid}").status_code == 200
    assert httpx.get(api.base + "/metrics").status_code == 401
    assert "kvcat_contexts_stored" in api.get("/metrics").text


# ---- limits ----------------------------------------------------------------------------------------------


def test_quota_per_tenant(api):
    made = []
    for i in range(QUOTA + 1):
        r = api.post("/v1/compact", "gamma", json={"text": f"Note {i}. " + NOTE, "ratio": 4, "method": "snapkv"})
        if r.status_code != 200:
            break
        made.append(r.json()["id"])
    assert len(made) == QUOTA and r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    assert api.delete(f"/v1/contexts/{made[0]}", "gamma").status_code == 200
    assert api.post("/v1/compact", "gamma", json={"text": NOTE, "ratio": 4, "method": "snapkv"}).status_code == 200


def test_bounded_queue_answers_429_with_retry_after_and_jobs_finish(api):
    codes, jobs = [], []
    for i in range(3):
        r = api.post("/v1/compact", "beta", json={"text": f"{i} {NOTE}", "ratio": 4, "method": "test-slow",
                                                  "params": {"seconds": 1.0}, "async": True})
        codes.append(r.status_code)
        if r.status_code == 202:
            assert r.json()["object"] == "compaction.job"
            job = CompactionJob(**r.json())
            assert r.headers["location"] == f"/v1/compact/jobs/{job.id}" and job.status in ("queued", "running")
            jobs.append(job.id)
        else:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "compaction_queue_full"
    assert codes == [202, 202, 429], codes
    deadline = time.time() + 60
    while time.time() < deadline:
        states = [CompactionJob(**api.get(f"/v1/compact/jobs/{j}", "beta").json()) for j in jobs]
        if all(s.status in ("succeeded", "failed") for s in states):
            break
        time.sleep(0.2)
    assert [s.status for s in states] == ["succeeded", "succeeded"]
    assert all(s.progress == 1.0 and s.context is not None for s in states)
    assert api.get(f"/v1/compact/jobs/{jobs[0]}", "gamma").status_code == 404  # another tenant's job


def test_client_disconnect_cancels_a_compaction_and_stores_nothing(api):
    before = {c["id"] for c in api.get("/v1/contexts", "beta").json()["data"]}
    with pytest.raises(httpx.ReadTimeout):
        api.post("/v1/compact", "beta", json={"text": NOTE * 4, "ratio": 4, "method": "test-slow"}, timeout=0.8)
    deadline = time.time() + 30
    while time.time() < deadline:
        if 'kvcat_errors_total{type="compaction_cancelled"}' in api.get("/metrics").text:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the compaction was not cancelled when its client went away")
    assert {c["id"] for c in api.get("/v1/contexts", "beta").json()["data"]} == before


def test_timeouts_answer_504_and_free_the_engine(tiny, tmp_path):
    limits = Limits(request_timeout_s=0.5, compaction_timeout_s=0.5)
    with fake_server(tiny, tmp_path, limits=limits, step_delay_s=0.1) as srv:
        r = httpx.post(srv.base + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 30})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_cancelled", r.text
        assert srv.engine.aborted == [srv.engine.calls[-1].request_id] and not srv.engine.running
        srv.engine.step_delay_s, srv.engine.queue_delay_s = 0.0, 30.0  # stuck in the engine's queue
        start = time.monotonic()
        r = httpx.post(srv.base + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 3, "stream": True})
        assert time.monotonic() - start < 5 and "request_cancelled" in r.text, r.text
        assert srv.engine.aborted[-1] == srv.engine.calls[-1].request_id and not srv.engine.running
        r = httpx.post(srv.base + "/v1/compact", timeout=30, json={"text": NOTE, "ratio": 4, "method": "test-slow"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "compaction_cancelled", r.text
        assert srv.store.list() == []


# ---- failures --------------------------------------------------------------------------------------------


def test_engine_error_mid_stream_is_an_error_event(tiny, tmp_path):
    with fake_server(tiny, tmp_path, fail_after=2) as srv:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "stream": True}
        with httpx.stream("POST", srv.base + "/v1/chat/completions", json=body, timeout=60) as r:
            events = sse_data(r.iter_lines())
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
        r = httpx.post(srv.base + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert not srv.engine.running


def test_a_context_file_that_cannot_load_fails_only_its_own_requests(api):
    gone, truncated, fine = (api.compact(f"{i} {NOTE * 2}", "epsilon") for i in range(3))
    api.srv.store.path(gone.id).unlink()  # as another replica's delete or a lost disk would
    r = api.chat([{"role": "user", "content": "Who?"}], "epsilon", kv_context=gone.id)
    assert r.status_code == 404 and r.json()["error"]["code"] == "context_gone", r.text
    path = api.srv.store.path(truncated.id)
    path.write_bytes(path.read_bytes()[:100])
    r = api.chat([{"role": "user", "content": "Who?"}], "epsilon", kv_context=truncated.id)
    assert r.status_code == 500 and r.json()["error"]["code"] == "context_unreadable", r.text
    api.srv.engine.queue_delay_s = 0.5  # deleted while the request waits in the engine's queue
    try:
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", api.chat(
            [{"role": "user", "content": "Who?"}], "epsilon", kv_context=fine.id, stream=True)))
        thread.start()
        while not api.srv.engine.running:
            time.sleep(0.01)
        api.srv.store.path(fine.id).unlink()
        thread.join(30)
    finally:
        api.srv.engine.queue_delay_s = 0.0
    assert "context_gone" in result["r"].text and result["r"].text.endswith("data: [DONE]\n\n")
    assert api.chat([{"role": "user", "content": "hi"}]).status_code == 200  # everyone else is served
    assert httpx.get(api.base + "/ready").status_code == 200


def test_a_context_deleted_while_answering_keeps_its_file_until_the_answer_ends(api):
    ctx = api.compact(NOTE * 2)
    path = api.srv.store.path(ctx.id)
    api.srv.engine.step_delay_s = 0.1
    try:
        done = {}
        thread = threading.Thread(target=lambda: done.setdefault("r", api.chat(
            [{"role": "user", "content": "Who?"}], kv_context=ctx.id, max_tokens=20)))
        thread.start()
        while not api.srv.engine.running:
            time.sleep(0.01)
        assert api.delete(f"/v1/contexts/{ctx.id}").json() == {"id": ctx.id, "object": "kv_context.deleted",
                                                                "deleted": True}
        assert api.get(f"/v1/contexts/{ctx.id}").status_code == 404 and path.exists()
        thread.join(30)
        assert done["r"].status_code == 200 and not path.exists()
    finally:
        api.srv.engine.step_delay_s = 0.0


def test_a_dead_engine_fails_health_and_readiness(tiny, tmp_path):
    with fake_server(tiny, tmp_path) as srv:
        assert httpx.get(srv.base + "/health").json() == {"status": "ok"}
        assert httpx.get(srv.base + "/ready").status_code == 200
        srv.engine.dead = True
        deadline = time.time() + 10
        while httpx.get(srv.base + "/ready").status_code == 200 and time.time() < deadline:
            time.sleep(0.1)  # the watchdog notices within health_check_s
        r = httpx.get(srv.base + "/ready")
        assert r.status_code == 503 and "EngineDeadError" in r.json()["error"]
        assert httpx.get(srv.base + "/health").status_code == 503
        r = httpx.post(srv.base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


def test_two_replicas_share_one_store(tiny, tmp_path):
    with fake_server(tiny, tmp_path) as a, fake_server(tiny, tmp_path) as b:
        ctx = KvContext(**httpx.post(a.base + "/v1/compact", timeout=60,
                                     json={"text": NOTE * 2, "ratio": 4, "method": "snapkv"}).json())
        chat = {"messages": [{"role": "user", "content": "Who?"}], "kv_context": ctx.id, "max_tokens": 3}
        r = httpx.post(b.base + "/v1/chat/completions", json=chat)
        assert r.status_code == 200 and b.engine.calls[-1].context.context_id == ctx.id, r.text
        assert [c["id"] for c in httpx.get(b.base + "/v1/contexts").json()["data"]] == [ctx.id]
        assert httpx.delete(a.base + f"/v1/contexts/{ctx.id}").status_code == 200
        r = httpx.post(b.base + "/v1/chat/completions", json=chat)
        assert r.status_code == 404 and r.json()["error"]["code"] == "context_not_found", r.text
        assert httpx.get(b.base + "/v1/contexts").json()["data"] == []
        assert httpx.post(b.base + "/v1/chat/completions", json={**chat, "kv_context": None}).status_code == 200
