"""Monitoring end to end on a real Prometheus: a `kvcat serve` on loopback, Debian's Prometheus scraping it
every second with deploy/'s config and rules, traffic (compactions, chats over compacted and full contexts,
errors), then every dashboard query and every rule evaluated through Prometheus's HTTP API, with plausible
values; finally the server is stopped and KvcatServerDown must go pending, and the preview PNG is drawn."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import kvcat_server
from kvcat.bench import deploy_tools
from kvcat.server.launch import free_port

dashboard, generate, preview = (deploy_tools(m) for m in ("dashboard", "generate", "preview"))  # deploy/tools/

pytestmark = pytest.mark.vllm

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

MODEL = os.environ.get("KVCAT_MONITORING_MODEL", "smollm2-135m")
RATIO = 8.0
AUTO_THRESHOLD = 1024  # on-the-fly compaction of the prompts longer than this (DOCS[1] * 8 with its question)
DOCS = [
    ("Field notes, day twelve. The expedition reached the northern glacier at noon. Dr. Okafor measured the "
     "ice at 41 meters thick, and the cook, a man called Teodor, lost the last bag of lentils in a crevasse. "
     "We named the campsite Lentil Point in his honour. The radio code for the supply plane is BLUE HERON. "
     "On day thirteen the wind turned east and the tents held; the team mapped four ridges, counted nine "
     "seals on the ice shelf, and buried a cache of fuel under a cairn of red stones near the old hut. "
     "Dr. Okafor says the glacier moved two meters since the survey of last year, faster than any model "
     "predicted, and that the meltwater channels now reach the moraine. "),
    ("Minutes of the harbour board, third of March. Present: the harbour master Ilse Varga, two pilots and "
     "the treasurer. The dredging of the east basin is delayed until May because the barge Saint Columba needs "
     "a new winch. Mooring fees rise by six percent from April. The lighthouse keeper reported that the fog "
     "horn failed twice in February; a replacement compressor was ordered from Bremen. The board approved a "
     "new slipway for the rowing club, paid from the regatta fund, and agreed to repaint the customs house "
     "in its original blue before the summer festival. The next meeting is on the seventh of April. "),
]
QUESTIONS = ["What is the radio code for the supply plane?", "Who is the harbour master?"]
SCRAPE_S = 1.0


def _wait(what: str, ok, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited ({proc.returncode}); log:\n{log.read_text()[-3000:]}")
        try:
            if ok():
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            pytest.fail(f"{what} not ready after {timeout:.0f} s; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`kvcat serve` on a free loopback port (the same launch as tests/test_server.py)."""
    root = tmp_path_factory.mktemp("kvcat-monitoring")
    with kvcat_server(root, MODEL, args=["--auto-compact-threshold", str(AUTO_THRESHOLD),
                                         "--auto-compact-ratio", str(RATIO)]) as srv:
        yield {"base": srv.base, "port": srv.port, "proc": srv.proc, "log": srv.log_path, "srv": srv,
               "client": srv.openai(timeout=300)}


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Debian's Prometheus with deploy/prometheus/prometheus.yml, pointed at the server, 1 s scrapes."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus server is not installed: `make setup` installs Debian's `prometheus` "
                    "package (apt-get install prometheus); install it by hand where apt is unavailable")
    root = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    cfg = yaml.safe_load((generate.DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval=f"{SCRAPE_S:g}s", evaluation_interval=f"{SCRAPE_S:g}s")
    cfg["rule_files"] = [str(f) for f in generate.RULE_FILES]
    for job in cfg["scrape_configs"]:
        job["scrape_interval"] = f"{SCRAPE_S:g}s"
        host = f"127.0.0.1:{server['port']}" if job["job_name"] == "kvcat" else f"127.0.0.1:{port}"
        job["static_configs"] = [{"targets": [host]}]
    (root / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    log = root / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([binary, f"--config.file={root / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--storage.tsdb.retention.time=1h"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait("prometheus", lambda: httpx.get(url + "/-/ready", timeout=2).status_code == 200, 60, proc, log)
        prom = preview.Prometheus(url)
        _wait("the kvcat scrape target", lambda: [r for r in prom.query('up{job="kvcat"} == 1')], 30, proc, log)
        yield {"url": url, "api": prom, "proc": proc, "started": time.time()}
    finally:
        _stop(proc, 20)


def _pause(scrapes: float = 2.5) -> None:
    """Let Prometheus scrape between two observations, so counters and histograms increase between samples."""
    time.sleep(scrapes * SCRAPE_S)


@pytest.fixture(scope="module")
def traffic(server, prometheus):
    """Compactions, chats over compacted contexts and with the full document, and errors, each at least twice
    with scrapes in between (a series' first sample already holds its first observation)."""
    client = server["client"]
    compacted = []
    for doc in DOCS:
        r = httpx.post(server["base"] + "/v1/compact", json={"text": doc, "ratio": RATIO}, timeout=600)
        assert r.status_code == 200, r.text
        compacted.append(r.json())
        _pause()
    for ctx, question in zip(compacted, QUESTIONS):
        for _ in range(2):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                           max_tokens=8, temperature=0, extra_body={"kv_context": ctx["id"]})
            _pause()
    for _ in range(2):  # the same full document twice: the second is a prefix-cache hit
        client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, extra_body={"kv_compaction": "off"},
                                       messages=[{"role": "user", "content": DOCS[0] + "\n\n" + QUESTIONS[0]}])
        _pause()
    for _ in range(2):  # a long prompt compacted on the fly, then a hit
        client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": DOCS[1] * 8 + "\n\n" + QUESTIONS[1]}])
        _pause()
    for _ in range(2):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           extra_body={"kv_context": "ctx-does-not-exist"})
        _pause()
    _pause(3)  # last scrape, then one more rule evaluation
    stored = httpx.get(server["base"] + "/v1/contexts", timeout=60).json()["data"]  # on-the-fly one included
    assert len(stored) == len(compacted) + 1
    return {"contexts": stored, "window": f"{int(time.time() - prometheus['started']) + 60}s"}


def _values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result]


def _by(result: list[dict], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


def _close(x: float, target: float, rel: float) -> bool:
    return math.isfinite(x) and abs(x - target) <= rel * abs(target)


def _check_panel(title: str, results: list[list[dict]], traffic) -> None:
    """Plausible values for each panel (one result per query of the panel, evaluated now)."""
    full_bytes = sum(c["kv_bytes_full"] for c in traffic["contexts"])
    comp_bytes = sum(c["kv_bytes_compacted"] for c in traffic["contexts"])
    first = _values(results[0])
    if title == "KV cache bytes: full vs compacted":
        assert first == [pytest.approx(full_bytes)] and _values(results[1]) == [pytest.approx(comp_bytes)]
        assert 0 < comp_bytes < full_bytes / (RATIO / 2)
    elif title == "Share of KV memory saved":
        assert _close(first[0], 1 - comp_bytes / full_bytes, 1e-6) and 0.5 < first[0] < 1
    elif title == "KV bytes saved":
        assert first == [pytest.approx(full_bytes - comp_bytes)] and first[0] > 0
    elif title == "Contexts stored":
        assert sum(first) == len(traffic["contexts"])
    elif title == "Compaction ratio distribution":
        buckets = sorted((float(r["metric"]["le"]), float(r["value"][1])) for r in results[0])
        assert buckets[-1][1] > 0, "no compaction in the range"
        for i, (le, cum) in enumerate(buckets):  # every compaction lands in a bucket around RATIO
            lower = buckets[i - 1][0] if i else 0.0
            if cum - (buckets[i - 1][1] if i else 0.0) > 1e-9:
                assert lower < RATIO * 1.1 and le >= RATIO * 0.9, f"compactions in ({lower}, {le}]: {buckets}"
    elif title == "Mean compaction ratio of stored contexts":
        assert _close(first[0], RATIO, 0.1), f"ratio {first[0]} vs requested {RATIO}"
    elif title == "Compactions per second":
        assert first[0] > 0
    elif title == "Compaction latency p50 / p95":
        assert all(0 < v <= 600 for r in results for v in _values(r))
    elif title in ("Time to first token p50 / p95", "End-to-end latency p50 / p95"):
        for r in results:
            modes = _by(r, "mode")
            assert set(modes) == {"compacted", "full"}, modes
            assert all(0 < v <= 120 for v in modes.values()), modes
    elif title == "vLLM KV cache usage":
        assert all(0 <= v <= 1 for v in first)
    elif title == "vLLM prefix-cache hit rate":
        local, external = first[0], _values(results[1])[0]
        assert 0 < local <= 1, "the repeated full-document chat should hit the prefix cache"
        assert 0 < external <= 1, "chats over compacted contexts load their KV through the connector"
    elif title == "On-the-fly requests by outcome":
        assert set(_by(results[0], "outcome")) == {"compacted", "hit"}, results[0]
    elif title == "On-the-fly compactions":
        assert set(_by(results[0], "kind")) == {"scratch"}, results[0]
    elif title == "KV bytes not held by on-the-fly requests":
        assert first[0] > 0
    elif title == "Compactions queued and running":
        assert first == [0] and _values(results[1]) == [0]  # all done by now
    elif title == "Chats in flight":
        assert set(_by(results[0], "mode")) == {"compacted", "full"} and sum(first) == 0
    elif title == "Chat requests per second":
        modes = _by(results[0], "mode")
        assert set(modes) == {"compacted", "full"} and all(v > 0 for v in modes.values()), modes
    elif title == "Errors per second":
        assert _by(results[0], "type").get("context_not_found", 0) > 0, results[0]
    else:
        pytest.fail(f"no plausibility check for panel {title!r}: add one")


def test_every_dashboard_query_returns_plausible_data(prometheus, traffic):
    prom, window = prometheus["api"], traffic["window"]
    now = time.time()
    problems = []
    for panel in dashboard.PANELS:
        try:
            results = []
            for q in panel.queries:
                expr = dashboard.promql(q.expr, rate_interval=window, range_=window)
                result = prom.query(expr, at=now)
                assert result, f"no data for {expr}"
                assert all(math.isfinite(v) for v in _values(result)), f"{expr} -> {result}"
                if not q.instant:  # what Grafana asks for a time-series panel
                    series = prom.query_range(expr, prometheus["started"], now, 2)
                    assert any(math.isfinite(float(v)) for s in series for _, v in s["values"]), \
                        f"query_range of {expr} has no finite point"
                results.append(result)
            _check_panel(panel.title, results, traffic)
        except AssertionError as exc:
            problems.append(f"{panel.title}: {exc}")
    assert not problems, "\n".join(problems)


def test_every_rule_is_loaded_healthy_and_has_data(prometheus, traffic):
    prom = prometheus["api"]
    loaded = {g["name"]: g for g in prom._get("/api/v1/rules", {})["groups"]}
    problems = []
    for group in generate.rule_groups():
        assert group["name"] in loaded, f"rule group {group['name']} not loaded"
        states = {r["name"]: r for r in loaded[group["name"]]["rules"]}
        for rule in group["rules"]:
            name = rule.get("record") or rule["alert"]
            try:
                assert states[name]["health"] == "ok" and not states[name].get("lastError"), states[name]
                if "record" in rule:
                    for expr in (rule["expr"], rule["record"]):  # the expression, and the series recorded
                        result = prom.query(expr)
                        assert result and all(math.isfinite(v) and v >= 0 for v in _values(result)), \
                            f"{expr} -> {result}"
                    if name == "kvcat:compaction_factor:mean":
                        assert _close(_values(prom.query(name))[0], RATIO, 0.1)
                    if name == "kvcat:kv_saved_bytes:ratio":
                        assert 0.5 < _values(prom.query(name))[0] < 1
                else:
                    signal_ = generate.alert_signal(rule["expr"])
                    result = prom.query(signal_)
                    assert result and all(math.isfinite(v) for v in _values(result)), f"{signal_} -> {result}"
                    value = max(_values(result))
                    expected = {"KvcatServerDown": lambda v: v == 1, "KvcatKVCacheUsageHigh": lambda v: 0 <= v <= 1,
                                "KvcatTTFTP95High": lambda v: 0 < v <= 120,
                                "KvcatCompactionErrors": lambda v: v == 0}[name]
                    assert expected(value), f"signal {signal_} = {value}"
            except AssertionError as exc:
                problems.append(f"{name}: {exc}")
    assert not problems, "\n".join(problems)
    firing = {a["labels"]["alertname"] for a in prom._get("/api/v1/alerts", {})["alerts"]}
    assert "KvcatServerDown" not in firing and "KvcatCompactionErrors" not in firing, firing


def test_preview_renders_from_the_live_prometheus(prometheus, traffic, tmp_path):
    out = preview.preview(prometheus["url"], tmp_path / "dashboard.png", minutes=10)
    assert out.stat().st_size > 20_000
    if target := os.environ.get("KVCAT_PREVIEW_OUT"):  # to refresh the README's picture by hand
        shutil.copy(out, target)


def test_server_down_alert_goes_pending_when_the_server_stops(server, prometheus, traffic):
    prom = prometheus["api"]
    server["srv"].stop()
    deadline = time.time() + 30
    while time.time() < deadline:
        alerts = [a for a in prom._get("/api/v1/alerts", {})["alerts"]
                  if a["labels"]["alertname"] == "KvcatServerDown"]
        if alerts:
            assert alerts[0]["state"] in ("pending", "firing") and alerts[0]["labels"]["job"] == "kvcat"
            return
        time.sleep(0.5)
    pytest.fail(f"KvcatServerDown never went pending; up = {prom.query('up')}")
