"""On-the-fly compaction in chat and text completions on the live shared server (flags: threshold
AUTO_THRESHOLD, ratio AUTO_RATIO): long prompts are compacted with no client-side code, the next request hits
the stored prefix and answers as the two-call way does, and streaming needs no client code. The policy's
decisions (prefix hits, incremental compaction, misses, "off", bad policies) are tested over the fake engine in
tests/test_serving_onthefly.py."""

from __future__ import annotations

import json

import pytest

from conftest import AUTO_RATIO, AUTO_THRESHOLD
from fake_api import held_out_docs
from kvcat.defaults import DEFAULT_METHOD

pytestmark = pytest.mark.vllm

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def docs(smollm2):
    return held_out_docs(smollm2.tokenizer, int(AUTO_THRESHOLD * 1.3))


def _chat(server, messages, **body):
    """A non-streamed chat through the official client; returns (text, kv_compaction info, headers)."""
    raw = server["client"].chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, **body)
    completion = raw.parse()
    return completion.choices[0].message.content, completion.model_extra.get("kv_compaction"), raw.headers


def test_long_prompt_is_compacted_then_reused(server, docs):
    question = "What is this text about?"
    messages = [{"role": "user", "content": f"{docs[0]}\n\n{question}"}]
    text, info, headers = _chat(server, messages)
    assert info["outcome"] == "compacted" and headers["x-kvcat-compaction"] == "compacted"
    assert info["original_tokens"] > AUTO_THRESHOLD
    assert info["compacted_tokens"] == round(info["original_tokens"] / AUTO_RATIO)
    assert info["uncompressed_tokens"] < 40 and info["compaction_seconds"] > 0
    again, info2, headers2 = _chat(server, messages)
    assert (info2["outcome"], info2["cache_hit"], info2["context"]) == ("hit", True, info["context"])
    assert info2["compaction_seconds"] == 0 and headers2["x-kvcat-context"] == info["context"]
    assert again == text
    # the same answer as the two-call way: /v1/compact, then kv_context
    r = httpx.post(server["base"] + "/v1/compact", timeout=600,
                   json={"text": docs[0], "ratio": AUTO_RATIO, "method": DEFAULT_METHOD})
    assert r.status_code == 200, r.text
    assert r.json()["compacted_tokens"] == info["compacted_tokens"]
    explicit, none, _ = _chat(server, [{"role": "user", "content": question}],
                              extra_body={"kv_context": r.json()["id"]})
    assert explicit == text and none is None


def test_streaming_needs_no_client_code(server, docs):
    messages = [{"role": "user", "content": f"{docs[1]}\n\nWho wrote this?"}]
    stream = server["client"].chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                      temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", timeout=600,
                      json={"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0,
                            "stream": True}) as r:
        assert r.headers["x-kvcat-compaction"] == "hit"
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["kv_compaction"]["cache_hit"] is True


def test_long_text_completion_is_compacted_on_the_fly(server, docs, smollm2):
    """A long /v1/completions prompt (token ids) through the official client: its leading whole blocks are
    compacted on the live engine, the same prompt hits them, and the answer equals the two-call way over the
    very context it stored."""
    ids = smollm2.tokenizer(docs[0] + " In short, the author argues that")["input_ids"]
    client = server["client"]

    def complete():
        raw = client.completions.with_raw_response.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
        return raw.parse(), raw.headers

    first, headers = complete()
    info = first.model_extra["kv_compaction"]
    assert info["outcome"] == "compacted" and headers["x-kvcat-compaction"] == "compacted"
    assert info["original_tokens"] % 128 == 0 and info["uncompressed_tokens"] == len(ids) - info["original_tokens"]
    assert info["compacted_tokens"] == round(info["original_tokens"] / AUTO_RATIO) and first.choices[0].text
    again, _ = complete()
    assert again.model_extra["kv_compaction"]["outcome"] == "hit" and again.choices[0].text == first.choices[0].text
    explicit = client.completions.create(model=MODEL, prompt=ids[info["original_tokens"]:], max_tokens=8,
                                         temperature=0, extra_body={"kv_context": info["context"]})
    assert explicit.choices[0].text == first.choices[0].text
