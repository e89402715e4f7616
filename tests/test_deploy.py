"""deploy/: the generated dashboard is fresh, Prometheus config and rules pass promtool (checks and unit
tests), the Kubernetes manifests match their schemas, and compose/Dockerfiles/provisioning agree with each
other and with the server's metrics and CLI. Fast: no server, no network."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kvcat.bench import deploy_tools

dashboard, generate, preview = (deploy_tools(m) for m in ("dashboard", "generate", "preview"))  # deploy/tools/

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROM = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: it comes with Debian's `prometheus` package, which `make setup` installs "
                    "(scripts/setup.sh: apt-get install prometheus); install it by hand where apt is unavailable")
    return path


def run_promtool(*args: str) -> str:
    proc = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


rule_groups = generate.rule_groups


def rules(kind: str) -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"] if kind in r]


# ---- Grafana ------------------------------------------------------------------------------------------

def test_generated_files_match_a_fresh_build():
    assert generate.stale() == [], "generated deploy files are stale: run `kvcat dashboard build` and commit"


def test_dashboard_json_structure():
    board = json.loads(generate.DASHBOARD_JSON.read_text())
    assert board["uid"] == dashboard.UID and board["title"]
    names = [v["name"] for v in board["templating"]["list"]]
    assert {"datasource", "model", "method"} <= set(names)
    for var in board["templating"]["list"]:
        if var["name"] in ("model", "method"):
            assert var["query"].startswith("label_values(") and var["includeAll"] and var["allValue"] == ".*"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) == len(dashboard.PANELS)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["fieldConfig"]["defaults"]["unit"]
        for t in p["targets"]:
            assert t["refId"] and t["expr"]
    # the builder lays rows out on Grafana's 24-column grid without overlap
    for p in board["panels"]:
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
    # every query of the Python definition is in the JSON, and nothing else
    defined = sorted((p.title, q.expr) for p in dashboard.PANELS for q in p.queries)
    assert sorted(dashboard.dashboard_queries(board)) == defined


def test_dashboard_covers_the_issue_panels():
    exprs = " ".join(q.expr for p in dashboard.PANELS for q in p.queries)
    for needle in ("kvcat_kv_full_bytes", "kvcat_kv_compacted_bytes", "kvcat_kv_saved_bytes", "kvcat_contexts_stored",
                   "kvcat_compaction_factor_bucket", "kvcat_compaction_seconds_bucket",
                   "kvcat_time_to_first_token_seconds_bucket", "kvcat_e2e_request_latency_seconds_bucket",
                   "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
                   "kvcat_chat_requests_total", "kvcat_errors_total", "$model", "$method"):
        assert needle in exprs, needle


def test_promql_substitution():
    expr = 'rate(x{model=~"$model", method=~"$method"}[$__rate_interval]) + increase(y[$__range])'
    assert dashboard.promql(expr, rate_interval="2m", range_="10m", model="a|b") == \
        'rate(x{model=~"a|b", method=~".*"}[2m]) + increase(y[10m])'
    for p in dashboard.PANELS:
        for q in p.queries:
            assert "$" not in dashboard.promql(q.expr), q.expr


def test_grafana_provisioning_matches_compose_mounts():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/kvcat.yml").read_text())
    (provider,) = prov["providers"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# ---- metric names: the dashboard and the rules only use series the server and vLLM export ---------------

def _used_series() -> set[str]:
    text = " ".join(q.expr for p in dashboard.PANELS for q in p.queries)
    text += " " + " ".join(r["expr"] for g in rule_groups() for r in g["rules"])
    return set(re.findall(r"\b(?:kvcat_[a-z0-9_]+|vllm:[a-z0-9_]+)", text))


def test_kvcat_series_are_registered_by_the_server():
    from prometheus_client.metrics import MetricWrapperBase

    from kvcat.server import metrics

    exported = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            name, kind = obj._name, obj._type
            exported |= {"counter": {f"{name}_total"}, "gauge": {name},
                         "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"}}.get(kind, {name})
    used = {s for s in _used_series() if s.startswith("kvcat_")}
    assert used, "no kvcat_* series found in the dashboard and rules"
    missing = sorted(used - exported)
    assert not missing, f"used by deploy/ but not exported by kvcat.server.metrics: {missing}"


def test_vllm_series_exist_in_the_pinned_vllm():
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.fail("vllm is not installed; run `make setup`")
    root = Path(spec.origin).parent
    source = "\n".join(p.read_text(errors="ignore") for p in (root / "v1" / "metrics").rglob("*.py"))
    for series in sorted(s for s in _used_series() if s.startswith("vllm:")):
        base = re.sub(r"_total$", "", series)
        assert f'"{base}' in source, f"{series} is not defined by the installed vLLM (v1/metrics)"


# ---- Prometheus ---------------------------------------------------------------------------------------

def test_promtool_check_config(tmp_path):
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["rule_files"] = [str(f) for f in generate.RULE_FILES]  # the container path, pointed at the repo
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_promtool("check", "config", str(path))
    assert "SUCCESS" in out and "rules found" in out
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["kvcat"]["static_configs"][0]["targets"] == ["kvcat:8000"]


def test_promtool_check_rules():
    out = run_promtool("check", "rules", *map(str, generate.RULE_FILES))
    assert out.count("SUCCESS") == len(generate.RULE_FILES)


def test_promtool_rule_unit_tests():
    out = run_promtool("test", "rules", str(PROM / "tests" / "kvcat-rules.test.yml"))
    assert "SUCCESS" in out


def test_promtool_rejects_a_broken_rule(tmp_path):
    """The check is not vacuous: a typo in PromQL fails it."""
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "a:b", "expr": "sum(rate(x[5m])"}]}]}))
    proc = subprocess.run([promtool(), "check", "rules", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0


def test_alerts_required_by_the_issue_are_unit_tested():
    alerts = {r["alert"]: r for r in rules("alert")}
    assert set(alerts) == {"KvcatServerDown", "KvcatCompactionErrors", "KvcatKVCacheUsageHigh", "KvcatTTFTP95High"}
    unit = yaml.safe_load((PROM / "tests" / "kvcat-rules.test.yml").read_text())
    tested = {t["alertname"] for case in unit["tests"] for t in case.get("alert_rule_test", [])
              if t.get("exp_alerts")}
    assert tested == set(alerts), "each alert needs a promtool case where it fires"
    for name, rule in alerts.items():
        assert generate.ALERT_FORM.match(rule["expr"].strip()), f"{name}: not `<signal> <op> <threshold>`"
        assert rule["labels"]["severity"] in ("critical", "warning") and rule["annotations"]["summary"]
    recorded = {r["record"] for r in rules("record")}
    tested_records = {t["expr"] for case in unit["tests"] for t in case.get("promql_expr_test", [])}
    assert len(tested_records & recorded) >= 5


def test_prometheusrule_has_the_same_groups_as_the_rule_files():
    crd = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())
    assert crd["spec"]["groups"] == rule_groups()


# ---- Kubernetes ---------------------------------------------------------------------------------------

# prometheus-operator's CRDs are not in kubernetes-validate's schemas. These are strict subsets of the
# openAPIV3Schema of monitoring.coreos.com/v1 ServiceMonitor and PrometheusRule (same field names, types,
# required fields and duration pattern as the operator's CRDs), limited to the fields these manifests use
# and closed to any other field, so a typo or a misplaced field fails rather than being ignored.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {"type": "object", "required": ["name"],
         "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                        "namespace": {"type": "string"}, "labels": _STRMAP, "annotations": _STRMAP},
         "additionalProperties": False}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
            "metadata": _META,
            "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                     "properties": {
                         "jobLabel": {"type": "string"},
                         "selector": {"type": "object", "additionalProperties": False,
                                      "properties": {"matchLabels": _STRMAP, "matchExpressions": {"type": "array"}}},
                         "namespaceSelector": {"type": "object", "additionalProperties": False,
                                               "properties": {"any": {"type": "boolean"},
                                                              "matchNames": {"type": "array",
                                                                             "items": {"type": "string"}}}},
                         "endpoints": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "additionalProperties": False,
                             "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                                            "scheme": {"enum": ["http", "https"]},
                                            "interval": {"type": "string", "pattern": _DURATION},
                                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                                            "honorLabels": {"type": "boolean"}}}}}}},
        "additionalProperties": False},
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
            "metadata": _META,
            "spec": {"type": "object", "additionalProperties": False, "properties": {"groups": {
                "type": "array", "items": {
                    "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                    "properties": {"name": {"type": "string", "minLength": 1},
                                   "interval": {"type": "string", "pattern": _DURATION},
                                   "rules": {"type": "array", "items": {
                                       "type": "object", "required": ["expr"], "additionalProperties": False,
                                       "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                                       "properties": {"record": {"type": "string"}, "alert": {"type": "string"},
                                                      "expr": {"type": "string", "minLength": 1},
                                                      "for": {"type": "string", "pattern": _DURATION},
                                                      "labels": _STRMAP, "annotations": _STRMAP}}}}}}}}},
        "additionalProperties": False},
}


def k8s_documents() -> list[tuple[Path, dict]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [(K8S / name, doc) for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def validate_k8s(doc: dict) -> None:
    """Raise if `doc` does not match its schema (kubernetes-validate, strict; the subsets above for CRDs)."""
    import jsonschema
    import kubernetes_validate

    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        jsonschema.validate(doc, CRD_SCHEMAS[key])
    else:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_k8s_manifest_is_valid(name):
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    assert docs
    for doc in docs:
        validate_k8s(doc)


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"]["template"]["spec"]["containers"][0].update(livenesProbe={}),  # typo
    lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="8000"),
    lambda d: d["spec"].update(replicas="two"),
])
def test_k8s_validation_rejects_broken_deployments(mutate):
    import kubernetes_validate

    doc = copy.deepcopy(yaml.safe_load((K8S / "deployment.yaml").read_text()))
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(doc)


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"]["endpoints"][0].update(interval="15 seconds"),
    lambda d: d["spec"]["endpoints"][0].update(prot="http"),
    lambda d: d["spec"].pop("selector"),
])
def test_crd_validation_rejects_broken_servicemonitors(mutate):
    import jsonschema

    doc = copy.deepcopy(yaml.safe_load((K8S / "servicemonitor.yaml").read_text()))
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(doc)


def test_deployment_serves_the_verified_cpu_path_with_probes_and_the_shared_store():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_documents()}
    dep = docs[("Deployment", "kvcat")]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "kvcat:cpu" and "nvidia.com/gpu" not in str(dep)  # CUDA is unverified (README: GPU status)
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["args"][0] == "serve"
    port = c["ports"][0]
    claim = {v["name"]: v for v in pod["volumes"]}["contexts"]["persistentVolumeClaim"]["claimName"]
    pvc = docs[("PersistentVolumeClaim", claim)]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "replicas share the context store"
    mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["contexts"]
    assert mount in c["args"], "the server's store folder is the mounted volume"
    svc = docs[("Service", "kvcat")]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]
    mon = docs[("ServiceMonitor", "kvcat")]
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert mon["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"
    cm = docs[("ConfigMap", "kvcat-config")]
    assert {e["configMapRef"]["name"] for e in c["envFrom"]} == {cm["metadata"]["name"]}
    # the ServiceMonitor's job label gives job="kvcat", which KvcatServerDown selects
    job = dep["metadata"]["labels"][mon["spec"]["jobLabel"]]
    assert 'job="kvcat"' in {r["alert"]: r for r in rules("alert")}["KvcatServerDown"]["expr"] and job == "kvcat"


# ---- containers ---------------------------------------------------------------------------------------

def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile(name):
    steps = dockerfile(DEPLOY / "docker" / name)
    known = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK",
             "ENTRYPOINT", "CMD", "LABEL"}
    assert steps[0][0] == "FROM" and "python:3.11" in steps[0][1]
    assert {s for s, _ in steps} <= known
    for instr, args in steps:
        if instr == "COPY":
            *sources, _ = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
    cmd = json.loads(dict(steps)["CMD"])
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["kvcat"] and cmd[0] == "serve"
    assert dict(steps)["EXPOSE"] == cmd[cmd.index("--port") + 1]
    assert "/health" in dict(steps)["HEALTHCHECK"]
    # every package source folder of pyproject.toml is copied in
    import tomllib

    dirs = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = {a.split()[0] for i, a in steps if i == "COPY"}
    assert dirs <= copied, f"{name} misses {dirs - copied}"
    if name.endswith("cuda"):
        assert "vllm==" in dict((i, a) for i, a in steps if i == "RUN" and "vllm" in a)["RUN"]


def test_compose_file_is_valid_and_consistent():
    from compose_spec import PyCompose

    text = (DEPLOY / "docker-compose.yml").read_text()
    compose = PyCompose.from_yaml(text)
    assert {"kvcat", "prometheus", "grafana"} <= set(compose.service_names())
    doc = yaml.safe_load(text)
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
        if "build" in svc:
            assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    target = {j["job_name"]: j for j in prom["scrape_configs"]}["kvcat"]["static_configs"][0]["targets"][0]
    host, port = target.split(":")
    server = doc["services"][host]
    assert server["command"][server["command"].index("--port") + 1] == port
    assert any(d["capabilities"] == ["gpu"]
               for d in doc["services"]["kvcat-cuda"]["deploy"]["resources"]["reservations"]["devices"])


def test_compose_validation_is_not_vacuous():
    from compose_spec import PyCompose

    text = (DEPLOY / "docker-compose.yml").read_text().replace("    ports:\n", "    portz:\n", 1)
    with pytest.raises(Exception):
        PyCompose.from_yaml(text)


def test_deploy_commands_match_the_server_cli():
    """The flags the containers pass to `kvcat serve` exist."""
    from typer.testing import CliRunner

    from kvcat import cli

    cli._register_packages()
    out = CliRunner().invoke(cli.app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    used = set()
    for svc in compose["services"].values():
        if svc.get("command", [""])[0] == "serve":
            used |= {a for a in svc["command"] if a.startswith("--")}
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        used |= {a for a in json.loads(dict(dockerfile(DEPLOY / "docker" / name))["CMD"]) if a.startswith("--")}
    dep = yaml.safe_load((K8S / "deployment.yaml").read_text())
    used |= {a for a in dep["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--")}
    missing = sorted(f for f in used if f not in out)
    assert not missing, f"`kvcat serve` has no {missing}:\n{out}"


# ---- preview: bad addresses give clear errors --------------------------------------------------------

def test_preview_rejects_a_missing_or_wrong_prometheus(tmp_path):
    from typer.testing import CliRunner

    from kvcat import cli

    cli._register_packages()
    runner = CliRunner()
    res = runner.invoke(cli.app, ["dashboard", "preview", "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "--prometheus" in res.output
    res = runner.invoke(cli.app, ["dashboard", "preview", "--prometheus", "localhost:9090",
                                  "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "not an http(s) URL" in res.output
    res = runner.invoke(cli.app, ["dashboard", "preview", "--prometheus", "http://127.0.0.1:9",
                                  "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "cannot reach Prometheus at http://127.0.0.1:9" in res.output
    assert not (tmp_path / "x.png").exists()


def test_dashboard_commands_outside_a_source_checkout_say_so(tmp_path, monkeypatch):
    """deploy/tools/ is not installed with kvcat: without a checkout the commands fail in one line."""
    from typer.testing import CliRunner

    from kvcat import bench, cli

    monkeypatch.setattr(bench, "DEPLOY_TOOLS", tmp_path / "deploy" / "tools")
    res = CliRunner().invoke(cli.app, ["dashboard", "check"])
    assert res.exit_code == 2 and "runs from a source checkout" in res.output and "Traceback" not in res.output


def test_preview_rejects_a_server_that_is_not_prometheus(tmp_path):
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(preview.PrometheusError, match="is it a Prometheus server"):
            preview.preview(f"http://127.0.0.1:{srv.server_port}", tmp_path / "x.png")
    finally:
        srv.shutdown()
