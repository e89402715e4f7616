"""Reliability and security of the served path, on a server with API keys, limits and a store of its own:
tenant isolation, a table of bad inputs, quotas, the bounded queue, cancellation, schemathesis over the
OpenAPI schema, a 2-minute loopback load test, and kill -9 crash tests with restarts over the same store."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import kvcat_server_process

pytestmark = pytest.mark.vllm

httpx = pytest.importorskip("httpx")

MODEL = "smollm2-135m"
KEYS = {"alpha": "alpha-key-0123456789", "beta": "beta-key-0123456789", "gamma": "gamma-key-0123456789",
        "delta": "delta-key-0123456789"}
QUOTA = 8
MAX_DOC, MAX_BODY, MAX_COMPLETION = 3000, 200_000, 64
ARGS = ["--protect-metrics", "--max-completion-tokens", str(MAX_COMPLETION), "--max-document-tokens", str(MAX_DOC),
        "--max-queued-compactions", "2", "--max-contexts-per-tenant", str(QUOTA), "--max-body-bytes", str(MAX_BODY),
        "--request-timeout", "300"]
NOTE = ("The lighthouse keeper counted ships every night. On the ninth night a red ship called Aurora arrived, "
        "and the harbour master Ines Varga wrote its cargo of salt and copper in her book. ")


def auth(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


class Secure:
    """The module's server, restartable over the same store (crash tests)."""

    def __init__(self, root):
        self.root = root
        self.env = {"KVCAT_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items())}
        self.srv = None
        self.start()

    def start(self):
        self.srv = kvcat_server_process(self.root, MODEL, args=ARGS, env=self.env)
        self.base = self.srv.base
        return self

    def post(self, path, tenant="alpha", **kw):
        return httpx.post(self.base + path, headers=auth(tenant), timeout=kw.pop("timeout", 600), **kw)

    def get(self, path, tenant="alpha"):
        return httpx.get(self.base + path, headers=auth(tenant), timeout=60)

    def compact(self, text, tenant="alpha", **body):
        r = self.post("/v1/compact", tenant, json={"text": text, "ratio": 4, "method": "snapkv", **body})
        assert r.status_code == 200, r.text
        return r.json()

    def answer(self, context_id, tenant="alpha"):
        r = self.post("/v1/chat/completions", tenant, json={
            "model": MODEL, "max_tokens": 12, "temperature": 0, "kv_context": context_id,
            "messages": [{"role": "user", "content": "Who wrote the cargo in her book?"}]})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    s = Secure(tmp_path_factory.mktemp("secure"))
    yield s
    s.srv.stop()


@pytest.fixture(scope="module")
def alpha_context(secure):
    return secure.compact(NOTE * 3)


# ---- auth and tenants ------------------------------------------------------------------------------------


def test_keys_tenants_and_protected_metrics(secure, alpha_context):
    cid = alpha_context["id"]
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": KEYS["alpha"]}):
        r = httpx.get(secure.base + "/v1/contexts", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert cid in {c["id"] for c in secure.get("/v1/contexts").json()["data"]}
    assert cid not in {c["id"] for c in secure.get("/v1/contexts", "beta").json()["data"]}
    assert secure.get(f"/v1/contexts/{cid}", "beta").status_code == 404
    r = secure.post("/v1/chat/completions", "beta", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "kv_context": cid, "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "context_not_found"
    assert httpx.delete(secure.base + f"/v1/contexts/{cid}", headers=auth("beta")).status_code == 404
    assert secure.get(f"/v1/contexts/{cid}").status_code == 200  # still there for its owner
    assert httpx.get(secure.base + "/metrics").status_code == 401
    assert "kvcat_contexts_stored" in secure.get("/metrics").text
    assert httpx.get(secure.base + "/health").status_code == 200
    log = secure.srv.log_path.read_text()
    assert not any(key in log for key in KEYS.values()), "an API key reached the log"


def test_without_keys_only_loopback_is_served():
    from kvcat.server.auth import Auth, bind_host

    host, why = bind_host("0.0.0.0", Auth())
    assert host == "127.0.0.1" and "127.0.0.1 only" in why
    assert bind_host("0.0.0.0", Auth.load(env="t:0123456789abcdef0")) == ("0.0.0.0", None)
    assert bind_host("127.0.0.1", Auth()) == ("127.0.0.1", None)


@pytest.mark.parametrize("env, match", [("nokey", "not 'tenant:key'"), ("a:short", "shorter than 16"),
                                        ("a:0123456789abcdef0,b:0123456789abcdef0", "two tenants")])
def test_bad_key_configuration_is_refused(env, match):
    from kvcat.server.auth import Auth, AuthConfigError

    with pytest.raises(AuthConfigError, match=match):
        Auth.load(env=env)


# ---- bad input -------------------------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = [  # (name, method, path, body: dict | bytes | None, headers tenant or None, status)
    ("malformed json", "POST", "/v1/compact", b'{"text": "x", ratio: 4', "alpha", 422),
    ("wrong type", "POST", "/v1/compact", {"text": 5, "ratio": 4}, "alpha", 422),
    ("negative ratio", "POST", "/v1/compact", {"text": "a b c d", "ratio": -3}, "alpha", 422),
    ("ratio 1", "POST", "/v1/compact", {"text": "a b c d", "ratio": 1}, "alpha", 422),
    ("infinite ratio", "POST", "/v1/compact", b'{"text": "a b c d e f", "ratio": Infinity}', "alpha", 422),
    ("huge target", "POST", "/v1/compact", {"text": "a b c d", "target_tokens": 10**12}, "alpha", 422),
    ("unknown field", "POST", "/v1/compact", {"text": "a b", "ratio": 4, "color": "red"}, "alpha", 422),
    ("unknown method", "POST", "/v1/compact", {"text": "a b c d", "ratio": 2, "method": "zip"}, "alpha", 422),
    ("empty document", "POST", "/v1/compact", {"text": "   ", "ratio": 4}, "alpha", 422),
    ("lone surrogate", "POST", "/v1/compact", b'{"text": "\\ud800 broken", "ratio": 2}', "alpha", 422),
    ("document too long", "POST", "/v1/compact", {"text": "word " * (MAX_DOC + 500), "ratio": 4}, "alpha", 413),
    ("body too large", "POST", "/v1/compact", {"text": "a" * (MAX_BODY + 10), "ratio": 4}, "alpha", 413),
    ("no messages", "POST", "/v1/chat/completions", {**CHAT, "messages": []}, "alpha", 422),
    ("unknown role", "POST", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "alpha", 422),
    ("huge max_tokens", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 10**12}, "alpha", 422),
    ("negative max_tokens", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": -1}, "alpha", 422),
    ("temperature as text", "POST", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, "alpha", 422),
    ("five stops", "POST", "/v1/chat/completions", {**CHAT, "stop": list("abcde")}, "alpha", 422),
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
def test_bad_input_table(secure, name, method, path, body, tenant, status):
    headers = auth(tenant) if tenant else {}
    if isinstance(body, bytes):
        kw = {"content": body, "headers": {**headers, "content-type": "application/json"}}
    else:
        kw = {"headers": headers, **({} if body is None else {"json": body})}
    r = httpx.request(method, secure.base + path, timeout=120, **kw)
    assert r.status_code == status, (name, r.status_code, r.text[:400])
    if status >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"], r.text


# ---- limits ----------------------------------------------------------------------------------------------


def test_quota_per_tenant(secure):
    made = []
    for i in range(QUOTA + 1):
        r = secure.post("/v1/compact", "gamma", json={"text": f"Note {i}. " + NOTE, "ratio": 4, "method": "snapkv"})
        if r.status_code != 200:
            break
        made.append(r.json()["id"])
    assert len(made) == QUOTA and r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    assert httpx.delete(secure.base + f"/v1/contexts/{made[0]}", headers=auth("gamma")).status_code == 200
    assert secure.post("/v1/compact", "gamma", json={"text": NOTE, "ratio": 4, "method": "snapkv"}).status_code == 200


def test_bounded_queue_answers_429_with_retry_after(secure):
    text = "The survey team measured the glacier every morning and wrote the numbers down. " * 120
    codes, jobs = [], []
    for _ in range(3):
        r = secure.post("/v1/compact", "beta", json={"text": text, "ratio": 4, "async": True})
        codes.append(r.status_code)
        if r.status_code == 202:
            jobs.append(r.json()["id"])
        else:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "compaction_queue_full"
    assert codes == [202, 202, 429], codes
    deadline = time.time() + 600
    while time.time() < deadline:
        states = [secure.get(f"/v1/compact/jobs/{j}", "beta").json()["status"] for j in jobs]
        if all(s in ("succeeded", "failed") for s in states):
            break
        time.sleep(1)
    assert states == ["succeeded", "succeeded"], states


def test_client_disconnect_cancels_a_compaction(secure):
    before = {c["id"] for c in secure.get("/v1/contexts", "beta").json()["data"]}
    text = "A long report on the harbour, its ships, its cargo and its keepers, year after year. " * 140
    with pytest.raises(httpx.ReadTimeout):
        secure.post("/v1/compact", "beta", json={"text": text, "ratio": 4, "method": "am-hak"}, timeout=1.5)
    deadline = time.time() + 120
    while time.time() < deadline:
        if 'kvcat_errors_total{type="compaction_cancelled"}' in secure.get("/metrics").text:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the compaction was not cancelled when its client went away")
    assert {c["id"] for c in secure.get("/v1/contexts", "beta").json()["data"]} == before


# ---- schemathesis ----------------------------------------------------------------------------------------


def test_openapi_fuzzing_no_5xx_and_schema_conformance(secure):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

    schema = schemathesis.openapi.from_url(secure.base + "/openapi.json")
    failures, cases = [], 0
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=12, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=op.as_strategy())
        def run(case):
            nonlocal cases
            cases += 1
            if case.body is not None and isinstance(case.body, dict):
                case.body.pop("async", None)  # jobs would outlive the test
            response = case.call(headers=auth("delta"), timeout=300)
            try:
                case.validate_response(response, checks=CHECKS)
            except Exception as exc:  # noqa: BLE001  (collect every failing operation)
                failures.append(f"{op.method.upper()} {op.path}: {str(exc)[:300]}")
                raise

        try:
            run()
        except Exception:  # noqa: BLE001
            pass
    assert cases >= 40
    assert not failures, "\n".join(failures[:10])


# ---- load ------------------------------------------------------------------------------------------------


def test_load_50_concurrent_chats_over_5_contexts(secure):
    from kvcat.server.loadtest import run_load

    contexts = [secure.compact(f"Document {i}. " + NOTE * 4, method="am-hak")["id"] for i in range(5)]
    report = run_load(secure.base, contexts, MODEL, headers=auth("alpha"), concurrency=50, seconds=120,
                      max_tokens=8, pid=secure.srv.proc.pid)
    print(f"\nload: {report.requests} requests in {report.seconds} s ({report.throughput_rps} req/s), "
          f"errors {report.errors}, p50 {report.p50_s} s, p95 {report.p95_s} s, max {report.max_s} s, "
          f"RSS {report.rss_mb[0][1] if report.rss_mb else '?'} -> {report.rss_mb[-1][1] if report.rss_mb else '?'}"
          f" MB (steady-state growth {100 * report.rss_growth():.1f}%)")
    assert report.errors == 0, (report.statuses, report.error_samples)
    assert report.requests >= 100
    assert abs(report.rss_growth()) < 0.10, report.rss_mb


# ---- crashes ---------------------------------------------------------------------------------------------


def _acknowledged(secure, tenant="alpha"):
    return sorted(c["id"] for c in secure.get("/v1/contexts", tenant).json()["data"])


def test_kill_9_during_compaction_and_chat_then_restart(secure, alpha_context):
    ids = _acknowledged(secure)
    answers = {cid: secure.answer(cid) for cid in ids[:2]}
    # 1. kill -9 while a compaction runs: the acknowledged contexts survive, the half-done one never appears
    text = "Minutes of the harbour board, item after item, with names, dates and sums of money. " * 120
    job = secure.post("/v1/compact", json={"text": text, "ratio": 4, "method": "am-hak", "async": True}).json()
    deadline = time.time() + 120
    while secure.get(f"/v1/compact/jobs/{job['id']}").json()["status"] != "running" and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    secure.srv.kill()
    secure.start()
    assert _acknowledged(secure) == ids
    assert {cid: secure.answer(cid) for cid in answers} == answers
    assert not [p.name for p in secure.srv.store_dir.iterdir() if p.name.startswith(".")]
    # 2. kill -9 in the middle of a streamed chat
    got = []

    def stream():
        try:
            with httpx.stream("POST", secure.base + "/v1/chat/completions", headers=auth("alpha"), timeout=300,
                              json={"model": MODEL, "max_tokens": MAX_COMPLETION, "min_tokens": MAX_COMPLETION,
                                    "stream": True, "kv_context": ids[0],
                                    "messages": [{"role": "user", "content": "Tell the whole story."}]}) as r:
                for line in r.iter_lines():
                    got.append(line)
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.time() + 120
    while len(got) < 3 and time.time() < deadline:
        time.sleep(0.05)
    secure.srv.kill()
    t.join(30)
    assert 3 <= len(got) and "[DONE]" not in "".join(got)
    # 3. a file corrupted while the server is down is quarantined at start, never served
    victim = ids[-1]
    path = secure.srv.store_dir / f"{victim}.kvc"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    secure.start()
    assert _acknowledged(secure) == [cid for cid in ids if cid != victim]
    assert secure.get(f"/v1/contexts/{victim}").status_code == 404
    assert any(victim in p.name for p in (secure.srv.store_dir / "quarantine").iterdir())
    assert "kvcat_store_quarantined_total 1.0" in secure.get("/metrics").text
    assert {cid: secure.answer(cid) for cid in answers if cid != victim} == \
        {cid: a for cid, a in answers.items() if cid != victim}
