"""deploy/prometheus: the config and rules pass promtool (checks and unit tests), every alert the issue asks
for has a case where it fires, the PrometheusRule carries the same groups, and the dashboard and the rules
use only series that kvcat's server and the pinned vLLM export. Fast: no server, no network."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy_files import K8S, PROM, dashboard, generate, rule_groups, rules


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

