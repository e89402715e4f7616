"""Chat and text completions over the fake engine: responses, streaming, every sampling field reaching the
engine, n completions, stop strings, prefix-cache salts, disconnects, the warm-up after /v1/compact, tokenize."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from fake_api import MAX_COMPLETION, NOTE, auth, fake_api, sse_data
from kvcat.server.responses import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse


@pytest.fixture(scope="module")
def api(tiny, tmp_path_factory):
    with fake_api(tiny, tmp_path_factory.mktemp("fake-store")) as client:
        yield client


def test_completion_over_a_context(api):
    ctx = api.compact(NOTE * 3)
    r = api.chat([{"role": "user", "content": "Who wrote the cargo in her book?"}], kv_context=ctx.id,
                 max_tokens=5, logprobs=True, top_logprobs=2)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text
    body = ChatCompletionResponse(**r.json())
    call = api.srv.engine.calls[-1]
    assert call.context.context_id == ctx.id and call.context.num_slots == ctx.compacted_tokens
    assert call.context.num_tokens == ctx.original_tokens and call.params.max_tokens == 5
    fit = ctx.fit  # how many heads carry a fit, per layer too (the tiny model: 2 layers x 2 KV heads)
    assert fit.heads == 4 and [sum(fit.per_layer[k]) for k in ("beta_fitted", "values_refit", "underdetermined")] \
        == [fit.beta_fitted, fit.values_refit, fit.underdetermined] and len(fit.per_layer["beta_fitted"]) == 2
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
        events = sse_data(r.iter_lines())
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
        chunks = [ChatCompletionChunk(**json.loads(e)) for e in sse_data(s.iter_lines())[:-1]]
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
        events = sse_data(s.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [CompletionResponse(**json.loads(e)) for e in events[:-1]]
    assert "".join(c.choices[0].text for c in chunks if c.choices) and chunks[-1].usage.completion_tokens == 3
    for body, status in (({"prompt": "x", "echo": True}, 400), ({"prompt": [10**9]}, 422), ({"prompt": ""}, 422),
                         ({"prompt": "x", "kv_context": "ctx-00000000deadbeef"}, 404)):
        assert api.post("/v1/completions", json=body).status_code == status, body
