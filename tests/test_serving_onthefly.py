"""On-the-fly compaction over the fake engine: what a long chat or text-completion prompt gets (compacted, hit,
prefix hit, incremental), per-request policies, eviction of the least recently used contexts. The live engine's
side is test_onthefly.py."""

from __future__ import annotations

import httpx
import pytest

from fake_api import NOTE, RATIO, THRESHOLD, fake_api, held_out_docs
from fake_engine import fake_server
from kvcat.server.onthefly import AutoCompaction


@pytest.fixture(scope="module")
def api(tiny, tmp_path_factory):
    with fake_api(tiny, tmp_path_factory.mktemp("fake-store")) as client:
        yield client


@pytest.fixture(scope="module")
def docs(tiny):
    return held_out_docs(tiny.tokenizer, int(THRESHOLD * 1.5))


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
