"""On-the-fly compaction in chat, on the shared server (flags: threshold AUTO_THRESHOLD, ratio AUTO_RATIO):
long prompts are compacted with no client-side code, the next request hits the stored prefix, a growing
conversation is compacted incrementally, a changed earlier turn misses, and bad policies are refused."""

from __future__ import annotations

import json

import pytest

from conftest import AUTO_RATIO, AUTO_THRESHOLD
from kvcat import data
from kvcat.defaults import DEFAULT_METHOD

pytestmark = pytest.mark.vllm

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def docs(smollm2):
    """Two held-out texts of about 1.3 AUTO_THRESHOLD tokens, without blank lines (one paragraph each)."""
    tok = smollm2.tokenizer
    windows = data.token_windows(tok, int(AUTO_THRESHOLD * 1.3), 2, n=2, split="heldout", corpora=("paul_graham",))
    return [" ".join(tok.decode(w.prefix_ids).split()) for w in windows]


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


def test_growing_conversation_is_compacted_incrementally(server, docs):
    convo = [{"role": "system", "content": "You answer questions about the notes."},
             {"role": "user", "content": docs[0]}, {"role": "assistant", "content": "I have read the notes."},
             {"role": "user", "content": "Summarize them in one sentence."}]
    _, first, _ = _chat(server, convo)
    assert first["outcome"] == "compacted"  # system + document + reply; the last user turn stays as it is
    convo += [{"role": "assistant", "content": "They are an essay."}, {"role": "user", "content": "Anything else?"}]
    _, second, _ = _chat(server, convo)
    assert (second["outcome"], second["context"]) == ("prefix-hit", first["context"])  # new turns still short
    convo += [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": docs[1]},
              {"role": "assistant", "content": "More notes."}, {"role": "user", "content": "And now?"}]
    _, third, _ = _chat(server, convo)
    assert third["outcome"] == "incremental" and third["context"] != first["context"]
    assert third["original_tokens"] > first["original_tokens"] + AUTO_THRESHOLD
    added = third["compacted_tokens"] - first["compacted_tokens"]
    assert added == pytest.approx((third["original_tokens"] - first["original_tokens"]) / AUTO_RATIO, abs=1)
    ctx = httpx.get(server["base"] + f"/v1/contexts/{third['context']}").json()
    assert ctx["origin"] == "auto"
    _, fourth, _ = _chat(server, convo)
    assert (fourth["outcome"], fourth["context"]) == ("hit", third["context"])
    # an edited earlier turn must miss: never a stale cache
    edited = [dict(m) for m in convo]
    edited[2]["content"] = "I have read the notes twice."
    _, fifth, _ = _chat(server, edited)
    assert fifth["outcome"] == "compacted" and fifth["context"] not in (first["context"], third["context"])


def test_short_prompts_and_off_are_served_as_they_are(server, docs):
    _, info, headers = _chat(server, [{"role": "user", "content": "Hello there!"}])
    assert info is None and "x-kvcat-compaction" not in headers
    _, info, _ = _chat(server, [{"role": "user", "content": f"{docs[0]}\n\nWhat is this?"}],
                       extra_body={"kv_compaction": "off"})
    assert info is None
    text = httpx.get(server["base"] + "/metrics").text
    assert f'kvcat_onthefly_requests_total{{method="{DEFAULT_METHOD}",model="smollm2-135m",outcome="hit"}}' in text
    assert "kvcat_onthefly_kv_bytes_saved_total" in text and "kvcat_onthefly_compactions_total" in text


@pytest.mark.parametrize("options, match", [
    ({"threshold_tokens": 100}, "below this server's minimum"),
    ({"threshold_tokens": 600, "ratio": 10}, "fewer than one KV block"),
    ({"method": "no-such-method"}, "unknown compaction method"),
    ({"ratio": 0.5}, "greater than 1"),
    ({"keep_turns": 0}, "greater than or equal to 1"),
    ({"surprise": 1}, "Extra inputs"),
])
def test_bad_policies_are_refused(server, docs, options, match):
    r = httpx.post(server["base"] + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": f"{docs[0]}\n\nWhat?"}],
                         "max_tokens": 4, "kv_compaction": options})
    assert r.status_code == 422 and match in r.json()["error"]["message"], r.text


def test_kv_context_and_kv_compaction_options_are_exclusive(server):
    r = httpx.post(server["base"] + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "kv_context": "ctx-0123456789abcdef",
                         "kv_compaction": {"ratio": 4}})
    assert r.status_code == 422 and "not both" in r.json()["error"]["message"]
