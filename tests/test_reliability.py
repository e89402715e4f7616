"""Reliability and security of the live served path (real vLLM engine), on a server with API keys, limits and
a store of its own: tenant isolation with keys kept out of the log, a 2-minute loopback load test, and kill -9
crash tests with restarts over the same store. Bad input, quotas, the bounded queue and cancellation run over the
fake engine in tests/test_serving_errors.py, the schema fuzzing in tests/test_serving_schema.py."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

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


def test_the_prefix_cache_is_not_shared_between_tenants(secure):
    prompt = {"max_tokens": 2, "messages": [{"role": "user", "content": "Confidential. " + NOTE * 6}]}

    def cached(tenant):
        r = secure.post("/v1/chat/completions", tenant, json=prompt)
        assert r.status_code == 200, r.text
        return (r.json()["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)

    cached("alpha")
    assert cached("alpha") > 0  # the same tenant hits its own prefix cache
    assert cached("beta") == 0  # another tenant learns nothing from it


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


def test_a_context_that_cannot_load_fails_only_its_own_requests(secure):
    gone, truncated, replaced, fine = (secure.compact(f"Report {i}. " + NOTE * (2 + i), "delta")["id"]
                                       for i in range(4))
    store = secure.srv.store_dir
    (store / f"{gone}.kvc").unlink()
    data = (store / f"{truncated}.kvc").read_bytes()
    (store / f"{truncated}.kvc").write_bytes(data[: len(data) // 2])
    (store / f"{replaced}.kvc").write_bytes((store / f"{fine}.kvc").read_bytes())  # another context's slots
    for cid, status, code in ((gone, 404, "context_gone"), (truncated, 500, "context_unreadable"),
                              (replaced, 500, "context_unreadable")):
        r = secure.post("/v1/chat/completions", "delta", json={
            "max_tokens": 4, "kv_context": cid, "messages": [{"role": "user", "content": "Who?"}]})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert secure.answer(fine, "delta")  # other contexts and plain chats are still served
    r = secure.post("/v1/chat/completions", json={"max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    assert httpx.get(secure.base + "/ready").status_code == 200


def _engine_core_pids(server_pid: int) -> list[int]:
    """vLLM's engine core processes in the server's process group (it runs in a session of its own)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) == server_pid and b"EngineCore" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
    return found


def test_engine_death_fails_health_and_the_server_exits_to_be_restarted(secure):
    """Runs last in the module: it leaves the secure server dead."""
    assert secure.get("/health").status_code == 200
    cores = _engine_core_pids(secure.srv.proc.pid)
    assert cores, "no engine core process found under the server"
    for pid in cores:
        os.kill(pid, signal.SIGKILL)
    seen = set()
    deadline = time.time() + 120
    while secure.srv.proc.poll() is None and time.time() < deadline:
        try:
            seen.add((secure.get("/health").status_code, httpx.get(secure.base + "/ready").status_code))
        except httpx.HTTPError:
            pass  # shutting down
        time.sleep(0.2)
    assert secure.srv.proc.poll() == 3, (secure.srv.proc.returncode, secure.srv.log_tail())
    assert (503, 503) in seen, seen  # for DEATH_GRACE_S before the server stops
    assert "the engine died" in secure.srv.log_tail()
