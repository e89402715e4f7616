"""The served path end to end: one vLLM engine behind one `kvcat serve` on loopback for the whole file.

Correctness: for one CompactCache and question, the server's greedy tokens equal the transformers reference
(`kvcat.inference.CacheSession` on the very cache file the server stored), and its first-token logprobs match
within LOGPROB_TOL (fp32 engine), with beta != 0 and with beta = 0. A control checks that the context changes
the answer. Then the HTTP API, its errors, and the metrics.
"""

from __future__ import annotations

import time

import pytest
import torch


pytestmark = pytest.mark.vllm

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

LOGPROB_TOL = 1e-3  # fp32 engine vs fp32 transformers; measured differences are ~1e-5
MODEL = "smollm2-135m"
DOC = ("Field notes, day twelve. The expedition reached the northern glacier at noon. Dr. Okafor measured the "
       "ice at 41 meters thick, and the cook, a man called Teodor, lost the last bag of lentils in a crevasse. "
       "We named the campsite Lentil Point in his honour. The radio code for the supply plane is BLUE HERON. ")
QUESTION = "What is the radio code for the supply plane?"


def test_plain_vllm_baseline_command_parses_under_the_pinned_vllm():
    """The peers benchmark's plain-vLLM server is vLLM's own CLI: its flags must still exist (pin self-test)."""
    from kvcat.server.vllm_adapter.engine import EngineConfig, stock_serve_command

    cmd, env = stock_serve_command(EngineConfig(model="/m", dtype="bfloat16", max_model_len=2048, kv_cache_gib=2,
                                                served_name="m"), "127.0.0.1", 8123)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and env["VLLM_PLUGINS"] == ""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser  # what that module's main parses with
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[3:])
    assert (args.model, args.port, args.dtype, args.max_model_len, args.enable_prefix_caching, args.enforce_eager,
            args.served_model_name) == ("/m", 8123, "bfloat16", 2048, True, True, ["m"])


def _compact(server, **body):
    r = httpx.post(server["base"] + "/v1/compact", json={"text": DOC} | body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def contexts(server):
    """Compactions of DOC at 4x: attention matching with fitted beta, SnapKV (beta = 0), and a hybrid (retrieval
    heads kept whole in side slots beside the paged ones)."""
    return {"beta": _compact(server, ratio=4, method="am-hak", query_mode="context"),
            "nobeta": _compact(server, ratio=4, method="snapkv"),
            "hybrid": _compact(server, ratio=4, method="am-hak-fast", params={"whole_share": 0.5})}


def _ask(server, question, kv_context=None, **kw):
    args = dict(model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0,
                logprobs=True, top_logprobs=5)
    args.update(kw)
    return server["client"].chat.completions.create(
        **args, extra_body={"kv_context": kv_context} if kv_context else None)


@pytest.mark.parametrize("which", ["beta", "nobeta", "hybrid"])
def test_served_tokens_and_logprobs_match_reference(server, contexts, smollm2, which):
    from kvcat.cache import CompactCache
    from kvcat.inference import CacheSession
    from kvcat.server import prompting

    ctx = contexts[which]
    cache = CompactCache.load(server["store"] / f"{ctx['id']}.kvc", expect_fingerprint=smollm2.spec.fingerprint)
    nonzero = any(bool((b[torch.isfinite(b)] != 0).any()) for b in cache.beta)
    if which != "hybrid":
        assert nonzero == (which == "beta") and not cache.is_hybrid and ctx["kv_bytes_side"] == 0
    else:  # the bytes held are the paged slots plus the side slots, and the ratio is counted on both
        assert cache.is_hybrid and 0 < ctx["kv_bytes_side"] < ctx["kv_bytes_compacted"]
        assert ctx["ratio"] == pytest.approx(ctx["kv_bytes_full"] / ctx["kv_bytes_compacted"], rel=1e-3)
        assert ctx["ratio"] == pytest.approx(cache.served_ratio, rel=1e-3) and 3.5 < ctx["ratio"] < 4.5
    assert ctx["compacted_tokens"] == cache.num_slots < cache.num_tokens

    tok = smollm2.tokenizer
    q = prompting.question_ids(tok, {"text": DOC}, [{"role": "user", "content": QUESTION}])
    ref_tokens = CacheSession(smollm2, cache).generate(q, max_new_tokens=12)
    ref_first = torch.log_softmax(CacheSession(smollm2, cache).forward(q)[-1], -1)

    resp = _ask(server, QUESTION, ctx["id"])
    content = resp.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([t]) for t in ref_tokens]
    assert resp.choices[0].message.content == tok.decode(ref_tokens)
    top = content[0].top_logprobs
    assert len(top) == 5
    ref_top = torch.topk(ref_first, 5)
    assert [t.token for t in top] == [tok.decode([int(i)]) for i in ref_top.indices]
    diffs = [abs(t.logprob - float(v)) for t, v in zip(top, ref_top.values)]
    assert max(diffs) < LOGPROB_TOL, diffs


def test_context_changes_the_answer(server, contexts):
    over = _ask(server, QUESTION, contexts["beta"]["id"], max_tokens=16).choices[0].message.content
    plain = _ask(server, QUESTION, max_tokens=16).choices[0].message.content
    assert over != plain


def test_second_question_reuses_the_context_blocks(server, contexts):
    def hits():
        for line in httpx.get(server["base"] + "/metrics").text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                return float(line.split()[-1])
        return 0.0

    # 130 slots: one full 128-slot block that a later request over the same context finds in the prefix cache
    cid = _compact(server, text=DOC * 3, target_tokens=130, method="snapkv")["id"]
    _ask(server, "Who lost the lentils?", cid, max_tokens=2)
    before = hits()
    r = _ask(server, "How thick was the ice?", cid, max_tokens=2)
    assert hits() >= before + 128
    assert r.usage.prompt_tokens < 40  # only the question was prompted; the context came from paged blocks


def test_streaming_stop_usage_and_seed(server, contexts):
    cid = contexts["beta"]["id"]
    stream = server["client"].chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"kv_context": cid})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _ask(server, QUESTION, cid, max_tokens=10).choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    words = text.split()
    if len(words) > 2:
        stopped = _ask(server, QUESTION, cid, max_tokens=10, stop=[words[1]]).choices[0]
        assert words[1] not in stopped.message.content and stopped.finish_reason == "stop"
    sampled = [_ask(server, "Tell me a word.", max_tokens=8, temperature=1.0, seed=7, logprobs=False)
               .choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_context_endpoints(server, contexts):
    base = server["base"]
    listed = {c["id"] for c in httpx.get(base + "/v1/contexts").json()["data"]}
    assert {contexts["beta"]["id"], contexts["nobeta"]["id"]} <= listed
    one = httpx.get(base + f"/v1/contexts/{contexts['beta']['id']}").json()
    assert one["original_tokens"] > one["compacted_tokens"] and one["kv_bytes_saved"] > 0
    assert one["kv_bytes_compacted"] * 3 < one["kv_bytes_full"]
    models = server["client"].models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].model_extra["dtype"] == "float32"
    dtypes = httpx.get(base + "/version").json()["dtypes"]
    assert dtypes["engine"]["dtype"] == dtypes["engine"]["requested"] == "float32"
    assert dtypes["compaction"]["dtype"] == "float32" and dtypes["compaction"]["reason"]

    extra = _compact(server, target_tokens=16, method="snapkv")
    assert extra["compacted_tokens"] == 16
    assert httpx.delete(base + f"/v1/contexts/{extra['id']}").json()["deleted"] is True
    assert httpx.get(base + f"/v1/contexts/{extra['id']}").status_code == 404
    assert not (server["store"] / f"{extra['id']}.kvc").exists()


def test_async_compaction_job(server):
    r = httpx.post(server["base"] + "/v1/compact", json={"text": DOC, "ratio": 8, "method": "snapkv",
                                                         "async": True})
    assert r.status_code == 202
    job = r.json()
    for _ in range(300):
        job = httpx.get(server["base"] + f"/v1/compact/jobs/{job['id']}").json()
        if job["status"] in ("succeeded", "failed"):
            break
        assert 0.0 <= job["progress"] <= 1.0
        time.sleep(0.2)
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert job["context"]["id"].startswith("ctx-")


def test_errors_in_openai_format(server):
    base, client = server["base"], server["client"]
    with pytest.raises(openai.NotFoundError) as err:
        _ask(server, "Hi", "ctx-000000000000")
    assert err.value.body["code"] == "context_not_found"

    long_doc = "word " * 9000
    r = httpx.post(base + "/v1/compact", json={"text": long_doc, "ratio": 10}, timeout=60)
    assert r.status_code == 413 and "8192" in r.json()["error"]["message"]
    for bad, status in (({"ratio": 0.5}, 422), ({"ratio": 4, "target_tokens": 3}, 422), ({"ratio": "lots"}, 422),
                        ({"ratio": 4, "colour": 1}, 400), ({"ratio": 4, "method": "no-such-method"}, 422)):
        r = httpx.post(base + "/v1/compact", json={"text": DOC, **bad}, timeout=60)
        assert r.status_code == status, (bad, r.text)
        assert set(r.json()["error"]) >= {"message", "type", "code"}
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nothing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 5000}])
    assert err.value.status_code == 413

    # a compaction that fails inside the method answers 4xx/5xx and leaves the server up
    r = httpx.post(base + "/v1/compact", json={"text": DOC, "ratio": 4, "method": "snapkv",
                                               "params": {"window": "not-a-number"}}, timeout=60)
    assert r.status_code in (422, 500) and "error" in r.json()
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert _ask(server, "Say hi.", max_tokens=2).choices[0].message.content


def test_metrics_and_probes(server, contexts):
    _ask(server, QUESTION, contexts["beta"]["id"], max_tokens=2)
    _ask(server, QUESTION, max_tokens=2)
    text = httpx.get(server["base"] + "/metrics").text
    for name in ("vllm:time_to_first_token_seconds", "kvcat_contexts_stored", "kvcat_kv_saved_bytes",
                 "kvcat_compaction_factor_bucket", "kvcat_compaction_seconds_bucket",
                 'kvcat_time_to_first_token_seconds_bucket{le="+Inf",method="am-hak",mode="compacted"',
                 'kvcat_e2e_request_latency_seconds_count{method="none",mode="full"', "kvcat_errors_total"):
        assert name in text, name
    assert httpx.get(server["base"] + "/ready").json()["status"] == "ready"


def test_idle_connection_outlives_the_client_pools_keep_alive(server):
    """A keep-alive connection left idle past httpx's pool expiry (5 s) is still served: the server's idle
    timeout (75 s) is above the clients', so it never closes a connection a pool is about to reuse."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server["base"])

    def health(sock: socket.socket) -> bytes:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, f"the server closed the connection; got {data!r}"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += sock.recv(4096)
        return head.split(b"\r\n")[0]

    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        assert b" 200 " in health(sock)
        time.sleep(6)
        assert b" 200 " in health(sock)


def test_vllm_sampling_fields_are_honoured_with_the_openai_client(server, contexts, smollm2):
    import json

    import openai

    client, cid = server["client"], contexts["beta"]["id"]
    messages = [{"role": "user", "content": QUESTION}]
    two = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=6, temperature=1.0, seed=3,
                                         extra_body={"kv_context": cid})
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens <= 12
    token = smollm2.tokenizer.encode(" lentils", add_special_tokens=False)[0]
    forced = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                            logit_bias={str(token): 100}, extra_body={"kv_context": cid})
    assert forced.choices[0].message.content == smollm2.tokenizer.decode([token] * 3)
    long = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                          max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 40
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"],
              "additionalProperties": False}
    named = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Who is the keeper? Answer in JSON."}], max_tokens=60,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "who", "schema": schema}},
        extra_body={"kv_context": cid})
    assert set(json.loads(named.choices[0].message.content)) == {"name"}
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_text_completion_continues_a_compacted_document(server, contexts):
    client, cid = server["client"], contexts["nobeta"]["id"]
    over = client.completions.create(model=MODEL, prompt=" The radio code", max_tokens=6, temperature=0,
                                     extra_body={"kv_context": cid})
    plain = client.completions.create(model=MODEL, prompt=" The radio code", max_tokens=6, temperature=0)
    assert over.object == "text_completion" and over.usage.completion_tokens == 6
    assert over.choices[0].text != plain.choices[0].text  # the compacted document changes the continuation


def _run(client, stream: bool, **kw):
    """One chat completion through the official client, streamed or not, as (texts per choice, finish reasons,
    usage, top-logprob counts of the first choice's tokens)."""
    if not stream:
        r = client.chat.completions.create(model=MODEL, **kw)
        lp = r.choices[0].logprobs
        return ([c.message.content for c in r.choices], [c.finish_reason for c in r.choices], r.usage,
                [len(t.top_logprobs) for t in lp.content] if lp else [])
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                                 **kw))
    n = kw.get("n", 1)
    texts, finish, tops = [""] * n, [None] * n, []
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
            if c.index == 0 and c.logprobs and c.logprobs.content:
                tops += [len(t.top_logprobs) for t in c.logprobs.content]
    return texts, finish, chunks[-1].usage, tops


LONG = {"max_tokens": 30, "extra_body": {"ignore_eos": True}}  # long enough for a penalty to matter
FIELDS = {  # name -> (request fields, check(result, greedy text, greedy token ids, tokenizer, the same request
    #                                                 without the field's effect))
    "max_tokens": ({"max_tokens": 3, "extra_body": {"ignore_eos": True}},
                   lambda r, g, ids, tok: r[2].completion_tokens == 3 and r[1][0] == "length"),
    "temperature": ({"temperature": 0}, lambda r, g, ids, tok: r[0][0] == g),
    "top_p": ({"temperature": 1.0, "top_p": 1e-6}, lambda r, g, ids, tok: r[0][0] == g),
    "top_k": ({"temperature": 1.0, "extra_body": {"top_k": 1}}, lambda r, g, ids, tok: r[0][0] == g),
    "min_p": ({"temperature": 1.0, "extra_body": {"min_p": 1.0}}, lambda r, g, ids, tok: r[0][0] == g),
    "seed": ({"temperature": 1.0, "seed": 11}, None),  # the same seed twice, the same text
    "logit_bias": (lambda ids, tok: {"max_tokens": 3, "logit_bias": {str(ids[1]): 100}},
                   lambda r, g, ids, tok: r[0][0] == tok.decode([ids[1]] * 3)),
    "presence_penalty": ({**LONG, "presence_penalty": 2.0}, "differs"),
    "frequency_penalty": ({**LONG, "frequency_penalty": 2.0}, "differs"),
    "repetition_penalty": ({**LONG, "extra_body": {**LONG["extra_body"], "repetition_penalty": 2.0}}, "differs"),
    "stop": (lambda ids, tok: {"stop": [tok.decode(ids[2:4])]},
             lambda r, g, ids, tok: r[0][0] == g[:g.index(tok.decode(ids[2:4]))] and r[1][0] == "stop"),
    "stop_token_ids": (lambda ids, tok: {"extra_body": {"stop_token_ids": [ids[2]]}},
                       lambda r, g, ids, tok: r[0][0] == tok.decode(ids[:ids.index(ids[2])]) and r[1][0] == "stop"),
    "min_tokens": ({"max_tokens": 20, "extra_body": {"min_tokens": 20}},
                   lambda r, g, ids, tok: r[2].completion_tokens == 20),
    "n": ({"n": 2, "temperature": 1.0, "seed": 5}, lambda r, g, ids, tok: len(r[0]) == 2 and all(r[0])),
    "logprobs": ({"logprobs": True, "top_logprobs": 3}, lambda r, g, ids, tok: r[3] and set(r[3]) == {3}),
    "response_format": ({"response_format": {"type": "json_object"}, "max_tokens": 40},
                        lambda r, g, ids, tok: r[0][0].lstrip().startswith("{")),
}
PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("field", list(FIELDS))
def test_each_sampling_field_with_the_openai_client(server, contexts, smollm2, field, stream):
    """Every honoured field, through the official client over a compacted context, streamed and not, has the
    effect vLLM gives it (docs/chat-fields.md lists them)."""
    client, tok = server["client"], smollm2.tokenizer
    base = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12, "temperature": 0,
            "extra_body": {"kv_context": contexts["beta"]["id"]}}
    greedy = _run(client, False, **base)[0][0]
    ids = tok.encode(greedy, add_special_tokens=False)
    fields, check = FIELDS[field]
    fields = fields(ids, tok) if callable(fields) else fields
    req = {**base, **fields, "extra_body": {**base["extra_body"], **fields.get("extra_body", {})}}
    got = _run(client, stream, **req)
    if field == "seed":
        assert got[0] == _run(client, stream, **req)[0]
    elif check == "differs":  # against the same request without the penalty
        plain = {**req, "extra_body": {k: v for k, v in req["extra_body"].items() if k != field}}
        plain.pop(field, None)
        assert got[0] != _run(client, stream, **plain)[0], field
    else:
        assert check(got, greedy, ids, tok), (field, got, greedy)


@pytest.mark.parametrize("n", [1, 5])
def test_beta_attention_is_causal_sdpa_with_an_additive_bias(n):
    """The served beta path (every step of a request over a context with beta) equals PyTorch's SDPA with
    beta added to the first t key columns and the causal mask, for grouped queries; beta = 0 is plain SDPA."""
    import torch.nn.functional as F

    from kvcat.server.vllm_adapter.attention import beta_attention

    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, t, s = 9, 3, 64, 40, 52
    q = torch.randn(n, heads, dim, generator=gen)
    k, v = torch.randn(kv_heads, s, dim, generator=gen), torch.randn(kv_heads, s, dim, generator=gen)
    beta = torch.randn(kv_heads, t, generator=gen)
    mask = torch.zeros(heads, n, s)
    mask[..., :t] += beta.repeat_interleave(heads // kv_heads, dim=0)[:, None, :]
    mask = mask.masked_fill(torch.arange(s)[None, :] > torch.arange(s - n, s)[:, None], float("-inf"))
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask[None],
                                         scale=dim ** -0.5, enable_gqa=True)[0].transpose(0, 1)
    assert torch.allclose(beta_attention(q, k, v, beta, dim ** -0.5), ref, atol=1e-5)
    plain = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], scale=dim ** -0.5,
                                           attn_mask=mask[None].isfinite(), enable_gqa=True)[0].transpose(0, 1)
    assert torch.allclose(beta_attention(q, k, v, torch.zeros_like(beta), dim ** -0.5), plain, atol=1e-5)


def test_engine_args_from_the_command_line_are_checked_before_the_engine_starts():
    """`kvcat serve --engine-arg KEY=VALUE`: JSON values, dashes allowed; kvcat's own and unknown keys refused."""
    from kvcat.server.cli import parse_engine_args
    from kvcat.server.vllm_adapter.engine import Engine, EngineConfig

    assert parse_engine_args(["gpu-memory-utilization=0.5", "attention_backend=TRITON_ATTN", "x={\"a\": 1}"]) == {
        "gpu_memory_utilization": 0.5, "attention_backend": "TRITON_ATTN", "x": {"a": 1}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_engine_args(["gpu_memory_utilization"])
    for extra, match in (({"enable_prefix_caching": False}, "kvcat's to set"), ({"no_such_arg": 1}, "no_such_arg"),
                         ({"attention_backend": "NO_SUCH"}, "(?i)unknown attention backend: 'NO_SUCH'")):
        with pytest.raises(ValueError, match=match):
            Engine.start(EngineConfig(model="/nonexistent", extra=extra))  # no env side effect


def test_serve_refuses_an_unknown_compaction_dtype_before_loading_anything():
    from typer.testing import CliRunner

    from kvcat import cli

    cli._register_packages()
    res = CliRunner().invoke(cli.app, ["serve", "--model", "smollm2-135m", "--compaction-dtype", "int8"])
    assert res.exit_code != 0
    assert "--compaction-dtype: unknown dtype 'int8'" in res.output
