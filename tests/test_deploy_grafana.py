"""deploy/grafana and deploy/tools: the generated dashboard is fresh and well formed, its queries are plain
PromQL once Grafana's variables are substituted, provisioning matches the compose mounts, and the preview
and dashboard commands fail with clear messages. Fast: no server, no network."""

from __future__ import annotations

import json

import pytest
import yaml

from deploy_files import DEPLOY, dashboard, generate, preview


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
