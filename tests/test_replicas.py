"""Two live servers (real vLLM engines, 1 GiB of KV each) on one context store, as replicas behind a load
balancer would be (about two minutes on 2 cores)."""

from __future__ import annotations

import threading

import httpx
import pytest

from conftest import kvcat_server_process

pytestmark = pytest.mark.vllm

NOTE = ("The lighthouse keeper counted ships every night. On the ninth night a red ship called Aurora arrived, "
        "and the harbour master Ines Varga wrote its cargo of salt and copper in her book. ")


def _compact(base, text, **body):
    r = httpx.post(base + "/v1/compact", timeout=600, json={"text": text, "ratio": 4, "method": "snapkv", **body})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _ask(base, cid):
    r = httpx.post(base + "/v1/chat/completions", timeout=600, json={
        "max_tokens": 8, "temperature": 0, "kv_context": cid,
        "messages": [{"role": "user", "content": "Who wrote the cargo in her book?"}]})
    return r


def test_two_live_replicas_share_one_store(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a = kvcat_server_process(tmp_path / "a", kv_cache_gib=1, store_dir=tmp_path / "store")
    b = kvcat_server_process(tmp_path / "b", kv_cache_gib=1, store_dir=tmp_path / "store")
    try:
        cid = _compact(a.base, NOTE * 3)
        answers = {}
        threads = [threading.Thread(target=lambda s=s: answers.setdefault(s.base, _ask(s.base, cid)))
                   for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert [r.status_code for r in answers.values()] == [200, 200]
        assert len({r.json()["choices"][0]["message"]["content"] for r in answers.values()}) == 1  # same answer
        assert httpx.delete(a.base + f"/v1/contexts/{cid}", timeout=60).status_code == 200
        r = _ask(b.base, cid)
        assert r.status_code == 404 and r.json()["error"]["code"] == "context_not_found", r.text
        # restart A while B compacts: B's context arrives intact and A serves it after its start-up clean-up
        job = httpx.post(b.base + "/v1/compact", timeout=60, json={"text": NOTE * 40, "ratio": 4, "async": True})
        assert job.status_code == 202, job.text
        a.kill()
        a = kvcat_server_process(tmp_path / "a", kv_cache_gib=1, store_dir=tmp_path / "store")
        status = httpx.get(b.base + job.headers["location"], timeout=60).json()
        while status["status"] in ("queued", "running"):
            status = httpx.get(b.base + job.headers["location"], timeout=60).json()
        assert status["status"] == "succeeded", status
        new = status["context"]["id"]
        assert _ask(a.base, new).status_code == 200 and _ask(b.base, new).status_code == 200
        assert httpx.get(b.base + "/ready").status_code == 200
    finally:
        a.stop()
        b.stop()
