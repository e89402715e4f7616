"""A small `kvcat bench load`: plain vLLM's own server and both kvcat modes, real engines on loopback, a KV budget
of one conversation, then a compaction burst past the queue limit. Nothing may fail: every question of every user
is answered, refused compactions (429) are retried after Retry-After and all succeed, and the result files are
written. Speed is the benchmark's business (benchmarks/README.md), not this test's. The run takes about three
minutes (three engines start), so it is marked slow (`make test-all`)."""

from __future__ import annotations

import json

import pytest

from kvcat.bench import load_script

from conftest import _prepared


@pytest.fixture(scope="module")
def load_run(tmp_path_factory):
    _prepared("smollm2-135m-6l")
    load = load_script("load")
    out = tmp_path_factory.mktemp("load") / "load.json"
    config = load.LoadConfig(model="smollm2-135m-6l", out=out, users=(2,), questions=2, doc_tokens=1024,
                             min_answer_tokens=4, max_answer_tokens=8, budget_docs=1, spacing_s=0.5, ratio=4.0,
                             threshold=600, burst=3, burst_chatters=1, queue=1, idle_s=3.0, think_s=0.2,
                             burst_nice=(10,))
    return load.run(config), out


@pytest.mark.slow
def test_every_system_answers_every_question(load_run):
    result, out = load_run
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"vllm", "kvcat-compact", "kvcat-onthefly"}
    for r in rows.values():
        assert r["errors"] == 0, r["error_samples"]
        assert r["requests"] == 4 and r["output_tok_s"] > 0
        assert 0 <= r["peak_kv_blocks"] <= r["kv_blocks"]  # sampled: a two-second run can fall between samples
        assert r["ttft_s"]["p50"] <= r["ttft_s"]["p95"] <= r["ttft_s"]["p99"]
    assert rows["kvcat-compact"]["compact_wait_s"]["p50"] > 0
    # the compacted mode prefills only questions in the engine; plain vLLM the documents
    assert rows["kvcat-compact"]["computed_tokens"] < rows["vllm"]["computed_tokens"]
    assert rows["kvcat-compact"]["injected_tokens"] > 0 and rows["kvcat-compact"]["peak_kv_blocks"] > 0
    assert rows["vllm"]["requests_per_min_vs_vllm"] == 1.0
    assert json.loads(out.read_text())["rows"] and out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_a_burst_past_the_queue_is_retried_and_served(load_run):
    (burst,) = load_run[0]["bursts"]
    assert burst["compaction_nice"] == 10
    assert burst["compactions_failed"] == 0
    assert burst["compact_refused"] > 0  # queue of 1, three at once: 429s, retried after Retry-After
    assert burst["chats_idle"] > 0 and burst["chats_burst"] > 0


def test_bad_settings_are_refused():
    load = load_script("load")
    with pytest.raises(ValueError, match="unknown system"):
        load.LoadConfig(systems=("vllm", "sglang"))
    with pytest.raises(ValueError, match="fewer slots than one KV block"):
        load.LoadConfig(threshold=512, ratio=10.0)
    with pytest.raises(ValueError, match="compaction-nice"):
        load.LoadConfig(burst_nice=(0, 20))
    with pytest.raises(ValueError, match="arrival"):
        load.LoadConfig(arrival="bursty")
