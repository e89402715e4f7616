"""Tensor parallelism on CPU: `kvcat serve --tensor-parallel-size 3` (the 6-layer SmolLM2 has 3 KV heads, one per
rank) serves a compacted context with beta, each rank writing its own head's slots and beta; its greedy tokens
equal the transformers reference on the same cache file, as the single-process server's do (tests/test_server.py).
A layout the connector cannot serve (layers split over pipeline stages) is refused at start, never served."""

from __future__ import annotations

import httpx
import pytest

from conftest import kvcat_server_process
from kvcat.server.launch import ServerProcess, ServerStartError

pytestmark = pytest.mark.vllm

MODEL = "smollm2-135m-6l"
TP = 3
BIND = "0|1|0"  # one core list per rank (VLLM_CPU_OMP_THREADS_BIND); this machine has two cores
DOC = ("Harbour log, third week. The ferry Patient Heron left Saltcombe at dawn with forty crates of pears. The "
       "harbour master, Linnea Fairbairn, wrote the storeroom code 7291 on the chalkboard and painted the door teal. "
       "By evening the fog had closed the channel and the pilots played cards until the bell rang twice. ")
QUESTION = "What is the storeroom code?"


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    srv = kvcat_server_process(root, MODEL, max_model_len=2048, args=["--tensor-parallel-size", str(TP)],
                               env={"VLLM_CPU_OMP_THREADS_BIND": BIND})
    yield srv
    srv.stop()


def test_tensor_parallel_greedy_tokens_over_a_compacted_context_match_the_reference(tp_server, small):
    import torch

    from kvcat.cache import CompactCache
    from kvcat.inference import CacheSession
    from kvcat.server import prompting

    r = httpx.post(tp_server.url("/v1/compact"), timeout=600,
                   json={"text": DOC * 4, "ratio": 4, "method": "am-hak", "query_mode": "context"})
    assert r.status_code == 200, r.text
    ctx = r.json()
    cache = CompactCache.load(tp_server.store_dir / f"{ctx['id']}.kvc", expect_fingerprint=small.spec.fingerprint)
    assert cache.num_kv_heads == TP  # one head per rank
    assert any(bool((b[torch.isfinite(b)] != 0).any()) for b in cache.beta)  # beta is served, not zero
    # the bytes held are counted over every rank, not one rank's heads
    model = httpx.get(tp_server.url("/v1/models"), timeout=30).json()["data"][0]
    assert model["kv_bytes_per_token"] == 2 * 6 * 3 * 64 * 4

    tok = small.tokenizer
    q = prompting.question_ids(tok, {"text": DOC * 4}, [{"role": "user", "content": QUESTION}])
    reference = tok.decode(CacheSession(small, cache).generate(q, max_new_tokens=12))
    resp = tp_server.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0,
        extra_body={"kv_context": ctx["id"]})
    assert resp.choices[0].message.content == reference


def test_pipeline_parallel_is_refused_at_start(tmp_path):
    srv = ServerProcess(MODEL, dtype="float32", max_model_len=2048, store_dir=tmp_path / "store",
                        log_path=tmp_path / "server.log", args=["--engine-arg", "pipeline_parallel_size=2"],
                        ready_timeout=300)
    with pytest.raises(ServerStartError, match="tensor parallelism only"):
        srv.start()
    srv.stop()
