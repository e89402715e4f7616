"""Serving behaviour over the fake engine (tests/fake_engine.py): the real app, store, compaction (tiny model)
and HTTP server on loopback, with only vLLM replaced. Errors, limits, quotas, the bounded queue, cancellation,
timeouts, on-the-fly decisions, the streaming format and the OpenAPI schema, in seconds; the live-engine tests
(test_server.py, test_reliability.py, test_onthefly.py) keep the real path honest."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from fake_engine import fake_server
from kvcat import data
from kvcat.compaction.base import METHODS, register
from kvcat.compaction.eviction import SnapKV
from kvcat.server.auth import Auth
from kvcat.server.config import Limits
from kvcat.server.onthefly import AutoCompaction
from kvcat.server.protocol import ChatCompletionChunk, ChatCompletionResponse, CompactionJob, KvContext

KEYS = {"alpha": "alpha-key-0123456789", "beta": "beta-key-0123456789", "gamma": "gamma-key-0123456789",
        "delta": "delta-key-0123456789", "epsilon": "epsilon-key-0123456789"}
QUOTA, MAX_DOC, MAX_BODY, MAX_COMPLETION = 8, 3000, 200_000, 64
THRESHOLD, RATIO = 256, 4.0  # on-the-fly compaction
NOTE = ("The lighthouse keeper counted ships every night. On the ninth night a red ship called Aurora arrived, "
        "and the harbour master Ines Varga wrote its cargo of salt and copper in her book. ")
LIMITS = Limits(max_document_tokens=MAX_DOC, max_completion_tokens=MAX_COMPLETION, max_queued_compactions=2,
                request_timeout_s=300)


class SlowSnapKV(SnapKV):
    """SnapKV that takes `seconds` and reports progress often: a compaction long enough to queue and cancel."""

    name = "test-slow"
    defaults = {**SnapKV.defaults, "seconds": 3.0}

    def solve_layers(self, lm, state, budgets, progress):
        steps = 60
        for i in range(steps):
            if progress is not None:
                progress(i, steps)
            time.sleep(self.params["seconds"] / steps)
        return super().solve_layers(lm, state, budgets, progress)


@pytest.fixture(scope="module", autouse=True)
def slow_method():
    register(SlowSnapKV)
    yield
    METHODS.pop(SlowSnapKV.name, None)


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


@pytest.fixture(scope="module")
def api(tiny, tmp_path_factory):
    keys = Auth.load(env=",".join(f"{t}:{k}" for t, k in KEYS.items()), protect_metrics=True)
    with fake_server(tiny, tmp_path_factory.mktemp("fake-store"), auth=keys, limits=LIMITS, quota=QUOTA,
                     max_body_bytes=MAX_BODY, auto=AutoCompaction(THRESHOLD, RATIO, "snapkv")) as srv:
        yield Client(srv)


@pytest.fixture(scope="module")
def docs(tiny):
    """Two held-out texts of about 1.5 THRESHOLD tokens (one paragraph each)."""
    tok = tiny.tokenizer
    windows = data.token_windows(tok, int(THRESHOLD * 1.5), 2, n=2, split="heldout", corpora=("paul_graham",))
    return [" ".join(tok.decode(w.prefix_ids).split()) for w in windows]


def _events(lines) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


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


# ---- chat ------------------------------------------------------------------------------------------------


def test_completion_over_a_context(api):
    ctx = api.compact(NOTE * 3)
    r = api.chat([{"role": "user", "content": "Who wrote the cargo in her book?"}], kv_context=ctx.id,
                 max_tokens=5, logprobs=True, top_logprobs=2)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text
    body = ChatCompletionResponse(**r.json())
    call = api.srv.engine.calls[-1]
    assert call.context.context_id == ctx.id and call.context.num_slots == ctx.compacted_tokens
    assert call.context.num_tokens == ctx.original_tokens and call.params.max_tokens == 5
    assert body.kv_context == ctx.id and body.usage.kv_context_slots == ctx.compacted_tokens
    assert body.usage.prompt_tokens == len(call.token_ids) and body.usage.completion_tokens == 5
    assert body.choices[0].finish_reason == "length"
    assert [len(t.top_logprobs) for t in body.choices[0].logprobs.content] == [2] * 5
    plain = api.chat([{"role": "user", "content": "hi"}]).json()
    assert "kv_context" not in plain and plain["choices"][0]["logprobs"] is None


def test_streaming_format(api):
    ctx = api.compact(NOTE * 2)
    body = {"messages": [{"role": "user", "content": "Where did the ship come from?"}], "max_tokens": 6,
            "kv_context": ctx.id, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
    with httpx.stream("POST", api.base + "/v1/chat/completions", headers=auth("alpha"), json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.iter_lines())
    assert events[-1] == "[DONE]" and all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])
    chunks = [ChatCompletionChunk(**json.loads(e)) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].kv_context == ctx.id
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == api.srv.engine.tokenizer.decode(api.srv.engine.calls[-1].token_ids[:6])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.choices[0].logprobs is not None for c in chunks[1:-1])


def test_every_sampling_field_reaches_the_engine(api):
    r = api.chat([{"role": "user", "content": "Name a colour."}], max_tokens=6, temperature=0.7, top_p=0.9,
                 top_k=20, min_p=0.05, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                 logit_bias={"42": 3.5}, seed=7, stop_token_ids=[2], ignore_eos=True, user="u-1",
                 response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "object"}}})
    assert r.status_code == 200, r.text
    p = api.srv.engine.calls[-1].params
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.7, 0.9, 20, 0.05)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (p.logit_bias, p.seed, p.stop_token_ids, p.ignore_eos) == ({42: 3.5}, 7, [2], True)
    assert p.structured == {"json": {"type": "object"}}
    api.chat([{"role": "user", "content": "hi"}], response_format={"type": "json_object"})
    assert api.srv.engine.calls[-1].params.structured == {"json_object": True}
    api.chat([{"role": "user", "content": "hi"}], max_tokens=None)
    p = api.srv.engine.calls[-1].params  # vLLM's defaults: temperature 1, max_tokens = the server's cap
    assert (p.temperature, p.max_tokens, p.structured) == (1.0, MAX_COMPLETION, None)


def test_n_completions(api):
    r = api.chat([{"role": "user", "content": "alpha beta gamma"}], n=3, max_tokens=4, logprobs=True)
    body = ChatCompletionResponse(**r.json())
    assert [c.index for c in body.choices] == [0, 1, 2] and body.usage.completion_tokens == 12
    assert len({c.message.content for c in body.choices}) == 3 and all(len(c.logprobs.content) == 4
                                                                         for c in body.choices)
    with httpx.stream("POST", api.base + "/v1/chat/completions", headers=auth("alpha"), timeout=60, json={
            "messages": [{"role": "user", "content": "alpha beta gamma"}], "n": 3, "max_tokens": 4,
            "stream": True}) as s:
        chunks = [ChatCompletionChunk(**json.loads(e)) for e in _events(s.iter_lines())[:-1]]
    streamed = ["", "", ""]
    for c in chunks:
        for choice in c.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [c.message.content for c in body.choices]


def test_message_fields_reach_the_chat_template(api):
    r = api.chat([{"role": "user", "content": "hi", "name": "ines"}])
    assert r.status_code == 200, r.text


def test_stop_strings_and_min_tokens(api):
    prompt = [{"role": "user", "content": "alpha beta gamma delta"}]
    full = api.chat(prompt, max_tokens=12, temperature=0).json()["choices"][0]["message"]["content"]
    stop = full.split()[3]
    r = api.chat(prompt, max_tokens=12, stop=[stop]).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["message"]["content"] == full[:full.index(stop)]
    assert api.srv.engine.calls[-1].params.stop == [stop]


def test_engine_error_mid_stream_is_an_error_event(tiny, tmp_path):
    with fake_server(tiny, tmp_path, fail_after=2) as srv:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "stream": True}
        with httpx.stream("POST", srv.base + "/v1/chat/completions", json=body, timeout=60) as r:
            events = _events(r.iter_lines())
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
        r = httpx.post(srv.base + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert not srv.engine.running


def test_prefix_cache_is_split_by_tenant_then_by_client_salt(api):
    prompt = [{"role": "user", "content": NOTE}]
    salts = []
    for tenant, salt in (("alpha", None), ("alpha", None), ("beta", None), ("alpha", "mine")):
        assert api.chat(prompt, tenant, **({"cache_salt": salt} if salt else {})).status_code == 200
        salts.append(api.srv.engine.calls[-1].params.cache_salt)
    assert salts[0] == salts[1] and len({salts[0], salts[2], salts[3]}) == 3


def test_client_disconnect_aborts_the_generation(api):
    api.srv.engine.step_delay_s = 0.2
    try:
        body = {"messages": [{"role": "user", "content": "A long story, please."}], "max_tokens": 60, "stream": True}
        with httpx.stream("POST", api.base + "/v1/chat/completions", headers=auth("alpha"), json=body,
                          timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:
                    break
        request_id = api.srv.engine.calls[-1].request_id
        deadline = time.time() + 10
        while request_id not in api.srv.engine.aborted and time.time() < deadline:
            time.sleep(0.05)
        assert request_id in api.srv.engine.aborted and request_id not in api.srv.engine.running
    finally:
        api.srv.engine.step_delay_s = 0.0


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


# ---- on-the-fly compaction -------------------------------------------------------------------------------


def _auto(api, messages, **body):
    r = api.chat(messages, **body)
    assert r.status_code == 200, r.text
    return r.json().get("kv_compaction"), r.headers


def test_onthefly_decisions(api, docs):
    _, headers = _auto(api, [{"role": "user", "content": "Hello there!"}])
    assert "x-kvcat-compaction" not in headers
    info, _ = _auto(api, [{"role": "user", "content": f"{docs[0]}\n\nWhat is this?"}], kv_compaction="off")
    assert info is None
    convo = [{"role": "system", "content": "You answer questions about the notes."},
             {"role": "user", "content": docs[0]}, {"role": "assistant", "content": "I have read the notes."},
             {"role": "user", "content": "Summarize them in one sentence."}]
    first, headers = _auto(api, convo)
    assert first["outcome"] == "compacted" and headers["x-kvcat-context"] == first["context"]
    assert first["compacted_tokens"] == round(first["original_tokens"] / RATIO)
    assert api.srv.engine.calls[-1].context.context_id == first["context"]
    convo += [{"role": "assistant", "content": "They are an essay."}, {"role": "user", "content": "Anything else?"}]
    second, _ = _auto(api, convo)
    assert (second["outcome"], second["context"]) == ("prefix-hit", first["context"])
    convo += [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": docs[1]},
              {"role": "assistant", "content": "More notes."}, {"role": "user", "content": "And now?"}]
    third, _ = _auto(api, convo)
    assert third["outcome"] == "incremental" and third["context"] != first["context"]
    added = third["compacted_tokens"] - first["compacted_tokens"]
    assert added == pytest.approx((third["original_tokens"] - first["original_tokens"]) / RATIO, abs=1)
    assert api.get(f"/v1/contexts/{third['context']}").json()["origin"] == "auto"
    fourth, _ = _auto(api, convo)
    assert (fourth["outcome"], fourth["cache_hit"], fourth["compaction_seconds"]) == ("hit", True, 0.0)
    edited = [dict(m) for m in convo]
    edited[2]["content"] = "I have read the notes twice."
    fifth, _ = _auto(api, edited)  # an edited earlier turn misses: never a stale cache
    assert fifth["outcome"] == "compacted" and fifth["context"] not in (first["context"], third["context"])
    other, _ = _auto(api, convo, tenant="beta")  # the same prompt from another tenant never hits alpha's context
    assert other["outcome"] == "compacted" and other["context"] != third["context"]
    text = api.get("/metrics").text
    assert 'kvcat_onthefly_requests_total{method="snapkv",model="tiny-random",outcome="hit"}' in text


@pytest.mark.parametrize("options, match", [
    ({"threshold_tokens": 20}, "below this server's minimum"),
    ({"threshold_tokens": 60, "ratio": 10}, "fewer than one KV block"),
    ({"method": "no-such-method"}, "unknown compaction method"),
    ({"ratio": 0.5}, "greater than 1"),
    ({"keep_turns": 0}, "greater than or equal to 1"),
    ({"surprise": 1}, "Extra inputs"),
])
def test_bad_policies_are_refused(api, docs, options, match):
    r = api.chat([{"role": "user", "content": f"{docs[0]}\n\nWhat?"}], kv_compaction=options)
    assert r.status_code == 422 and match in r.json()["error"]["message"], r.text


def test_kv_context_and_kv_compaction_options_are_exclusive(api):
    r = api.chat([{"role": "user", "content": "hi"}], kv_context="ctx-0123456789abcdef", kv_compaction={"ratio": 4})
    assert r.status_code == 422 and "not both" in r.json()["error"]["message"]


# ---- the schema ------------------------------------------------------------------------------------------


def test_openapi_fuzzing_no_5xx_and_schema_conformance(api):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(api.base + "/openapi.json")
    failures, cases = [], 0
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  derandomize=True)
        @given(case=op.as_strategy())
        def run(case):
            nonlocal cases
            cases += 1
            if isinstance(case.body, dict):
                case.body.pop("async", None)  # jobs would outlive the test
            response = case.call(headers=auth("delta"), timeout=120)
            try:
                case.validate_response(response, checks=checks)
            except Exception as exc:  # noqa: BLE001  (collect every failing operation)
                failures.append(f"{op.method.upper()} {op.path}: {str(exc)[:300]}")
                raise

        try:
            run()
        except Exception:  # noqa: BLE001
            pass
    assert cases >= 80
    assert not failures, "\n".join(failures[:10])


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


def test_onthefly_contexts_are_evicted_lru_and_kept_out_of_the_quota(tiny, tmp_path, docs):
    auto = AutoCompaction(THRESHOLD, RATIO, "snapkv", max_contexts=2)
    with fake_server(tiny, tmp_path, auto=auto, quota=1) as srv:
        assert httpx.post(srv.base + "/v1/compact", json={"text": NOTE, "ratio": 4, "method": "snapkv"},
                          timeout=60).status_code == 200  # the tenant's quota is now full

        def ask(i):
            r = httpx.post(srv.base + "/v1/chat/completions", timeout=60, json={"max_tokens": 2, "messages": [
                {"role": "user", "content": f"Note {i}. {docs[i % 2]}\n\nWhat is this?"}]})
            assert r.status_code == 200, r.text
            return r.json()["kv_compaction"]

        first, second = ask(0), ask(1)
        assert first["outcome"] == second["outcome"] == "compacted"
        assert ask(0)["outcome"] == "hit"  # the first is now the most recently used
        third = ask(2)
        autos = {c["id"] for c in httpx.get(srv.base + "/v1/contexts").json()["data"] if c["origin"] == "auto"}
        assert autos == {first["context"], third["context"]}  # the second, least recently used, evicted
        assert ask(1)["outcome"] == "compacted"
        assert "kvcat_onthefly_evictions_total" in httpx.get(srv.base + "/metrics").text


def test_tokenize_detokenize_and_version(api):
    r = api.post("/tokenize", json={"prompt": "Hello there"})
    body = r.json()
    assert r.status_code == 200 and body["count"] == len(body["tokens"]) > 0, r.text
    assert api.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"].endswith("Hello there")
    chat = api.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > body["count"] and chat["max_model_len"] == api.srv.serving.model.max_positions
    assert api.post("/detokenize", json={"tokens": [10**9]}).status_code == 422
    assert api.post("/tokenize", json={"prompt": "x", "messages": []}).status_code == 422
    assert httpx.get(api.base + "/version").json()["vllm_version"] == "0.32.0"


def test_text_completions(api):
    from kvcat.server.protocol import CompletionResponse

    r = api.post("/v1/completions", json={"prompt": "The lighthouse keeper counted", "logprobs": 2})
    body = CompletionResponse(**r.json())
    call = api.srv.engine.calls[-1]
    assert r.status_code == 200 and r.json()["object"] == "text_completion" and call.params.max_tokens == 16
    assert call.token_ids == api.srv.engine.tokenizer("The lighthouse keeper counted")["input_ids"]
    logprobs = body.choices[0].logprobs
    assert body.choices[0].text == "".join(logprobs.tokens) and len(logprobs.tokens) == body.usage.completion_tokens
    assert len(logprobs.top_logprobs[0]) == 2 and body.usage.prompt_tokens == len(call.token_ids)
    ctx = api.compact(NOTE * 2)
    r = api.post("/v1/completions", json={"prompt": [11, 12, 13], "kv_context": ctx.id, "max_tokens": 3, "n": 2})
    body = CompletionResponse(**r.json())
    call = api.srv.engine.calls[-1]
    assert call.token_ids == [11, 12, 13] and call.context.context_id == ctx.id and body.kv_context == ctx.id
    assert [c.index for c in body.choices] == [0, 1] and body.usage.kv_context_slots == ctx.compacted_tokens
    with httpx.stream("POST", api.base + "/v1/completions", headers=auth("alpha"), timeout=60, json={
            "prompt": "alpha beta", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}) as s:
        events = _events(s.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [CompletionResponse(**json.loads(e)) for e in events[:-1]]
    assert "".join(c.choices[0].text for c in chunks if c.choices) and chunks[-1].usage.completion_tokens == 3
    for body, status in (({"prompt": "x", "echo": True}, 400), ({"prompt": [10**9]}, 422), ({"prompt": ""}, 422),
                         ({"prompt": "x", "kv_context": "ctx-00000000deadbeef"}, 404)):
        assert api.post("/v1/completions", json=body).status_code == status, body


def test_onthefly_text_completions(api, docs):
    """A long completion prompt is compacted in whole KV blocks, all but its last `keep_tokens`; the same
    prompt hits, a grown one reuses the stored blocks (prefix hit, then incremental), an edited one misses, and
    a chat cannot continue a context made of bare prompt tokens."""
    tok, block, keep = api.srv.engine.tokenizer, api.srv.engine.block_size, 64
    first_ids, more = tok(docs[0])["input_ids"], tok(docs[1])["input_ids"]

    def complete(ids, **body):
        r = api.post("/v1/completions", json={"prompt": ids, "max_tokens": 2,
                                              "kv_compaction": {"keep_tokens": keep}, **body})
        assert r.status_code == 200, r.text
        return r.json().get("kv_compaction"), r.headers, api.srv.engine.calls[-1]

    info, headers, _ = complete(first_ids[:200])  # under the threshold: as it is
    assert info is None and "x-kvcat-compaction" not in headers
    first, headers, call = complete(first_ids)
    cut = (len(first_ids) - keep) // block * block
    assert first["outcome"] == "compacted" and headers["x-kvcat-compaction"] == "compacted"
    assert (first["original_tokens"], first["compacted_tokens"]) == (cut, round(cut / RATIO))
    assert call.context.context_id == first["context"] and call.token_ids == first_ids[cut:]
    assert first["uncompressed_tokens"] == len(first_ids) - cut >= keep
    again, _, _ = complete(first_ids)
    assert (again["outcome"], again["context"]) == ("hit", first["context"])
    grown = first_ids + more[:40]
    second, _, call = complete(grown)
    assert (second["outcome"], second["context"]) == ("prefix-hit", first["context"])
    assert call.token_ids == grown[cut:]
    longer = first_ids + more
    third, _, call = complete(longer)
    cut3 = (len(longer) - keep) // block * block
    assert third["outcome"] == "incremental" and third["original_tokens"] == cut3
    assert third["compacted_tokens"] == pytest.approx(first["compacted_tokens"] + (cut3 - cut) / RATIO, abs=1)
    assert call.token_ids == longer[cut3:]
    edited, _, _ = complete([first_ids[0] + 1] + first_ids[1:])  # an edited first token misses: never stale
    assert edited["outcome"] == "compacted" and edited["context"] != first["context"]
    off, _, call = complete(first_ids, kv_compaction="off")
    assert off is None and call.context is None and call.token_ids == first_ids
    r = api.chat([{"role": "user", "content": "What was that?"}], kv_context=first["context"])
    assert r.status_code == 422 and "/v1/completions" in r.json()["error"]["message"]
    r = api.post("/v1/completions", json={"prompt": "x", "kv_context": first["context"], "kv_compaction": {"ratio": 4}})
    assert r.status_code == 422 and "not both" in r.json()["error"]["message"]


def test_a_compacted_context_is_warmed_in_the_engine(api):
    """/v1/compact runs one short request over the new context before it answers (the worker loads it and the
    prefix cache keeps its blocks), so that the first question does not pay for loading it."""
    ctx = api.compact(NOTE * 2)
    warm = [c for c in api.srv.engine.calls if c.request_id.startswith("warm-")][-1]
    assert warm.context.context_id == ctx.id and warm.params.max_tokens == 1 and len(warm.token_ids) == 1
    job = api.post("/v1/compact", json={"text": NOTE * 3, "ratio": 4, "method": "snapkv", "async": True}).json()
    deadline = time.time() + 60
    while (got := api.get(f"/v1/compact/jobs/{job['id']}").json())["status"] != "succeeded" and time.time() < deadline:
        time.sleep(0.05)
    warmed = {c.context.context_id for c in api.srv.engine.calls if c.request_id.startswith("warm-")}
    assert got["context"]["id"] in warmed
