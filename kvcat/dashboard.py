"""The kvcat Grafana dashboard, defined once as code, and a PNG preview of it from a live Prometheus.

`PANELS` is the single definition: `build()` turns it into Grafana JSON through grafana-foundation-sdk,
the monitoring tests evaluate every query of it on a real Prometheus, and `preview()` draws it with
matplotlib (no Grafana server is needed to look at it).

Queries are written as Grafana sees them (`$model`, `$method`, `$__rate_interval`, `$__range`);
`promql()` substitutes those for plain Prometheus.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD_JSON = DEPLOY / "grafana" / "dashboards" / "kvcat.json"
RULE_FILES = (DEPLOY / "prometheus" / "rules" / "kvcat-recording.yml",
              DEPLOY / "prometheus" / "rules" / "kvcat-alerts.yml")
K8S_DASHBOARD = DEPLOY / "k8s" / "grafana-dashboard.yaml"
K8S_RULES = DEPLOY / "k8s" / "prometheusrule.yaml"
UID = "kvcat-overview"
DATASOURCE_UID = "${datasource}"

# Label filters. kvcat_* series carry model and method (request series add mode = compacted | full);
# vLLM's own series carry model_name, which is the same served model name.
KV = 'model=~"$model", method=~"$method"'
MODEL = 'model=~"$model"'
VLLM = 'model_name=~"$model"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False  # evaluated at one time (bar gauges), not as a range


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # "timeseries" | "stat" | "histogram" (a bar gauge of a Prometheus histogram's buckets)
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    width: int = 8


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _quantiles(metric: str, by: str, sel: str, qs=(0.5, 0.95)) -> tuple[Query, ...]:
    return tuple(
        Query(f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{sel}}}[$__rate_interval])))",
              f"p{round(q * 100)} {{{{{by}}}}}")
        for q in qs)


ROWS: tuple[Row, ...] = (
    Row("KV memory", (
        Panel("KV cache bytes: full vs compacted", "timeseries", "bytes", (
            Query(f"sum(kvcat_kv_bytes_full{{{KV}}})", "full context"),
            Query(f"sum(kvcat_kv_bytes_compacted{{{KV}}})", "compacted"),
        ), "KV bytes the stored contexts take compacted, against what they would take in full."),
        Panel("Share of KV memory saved", "stat", "percentunit", (
            Query(f"1 - sum(kvcat_kv_bytes_compacted{{{KV}}}) / sum(kvcat_kv_bytes_full{{{KV}}})", "saved"),
        ), "1 - compacted / full over all stored contexts.", width=4),
        Panel("KV bytes saved", "stat", "bytes", (
            Query(f"sum(kvcat_kv_bytes_saved{{{KV}}})", "saved"),
        ), width=4),
        Panel("Contexts stored", "timeseries", "short", (
            Query(f"sum by (model, method) (kvcat_contexts_stored{{{KV}}})", "{{model}} {{method}}"),
        ), "Compacted contexts held by the server."),
    )),
    Row("Compaction", (
        Panel("Compaction ratio distribution", "histogram", "short", (
            Query(f"sum by (le) (increase(kvcat_compaction_ratio_bucket{{{KV}}}[$__range]))", "{{le}}",
                  instant=True),
        ), "Compactions in the time range by ratio N/t (upper bucket bound)."),
        Panel("Mean compaction ratio of stored contexts", "stat", "short", (
            Query(f"sum(kvcat_context_original_tokens{{{KV}}}) / sum(kvcat_context_compacted_tokens{{{KV}}})",
                  "original / compacted tokens"),
        ), width=4),
        Panel("Compactions per second", "stat", "reqps", (
            Query(f"sum(rate(kvcat_compaction_seconds_count{{{KV}}}[$__rate_interval]))", "compactions/s"),
        ), width=4),
        Panel("Compaction latency p50 / p95", "timeseries", "s",
              _quantiles("kvcat_compaction_seconds", "method", KV)),
    )),
    Row("Serving latency: compacted context vs full context", (
        Panel("Time to first token p50 / p95", "timeseries", "s",
              _quantiles("kvcat_time_to_first_token_seconds", "mode", MODEL), width=12),
        Panel("End-to-end latency p50 / p95", "timeseries", "s",
              _quantiles("kvcat_e2e_request_latency_seconds", "mode", MODEL), width=12),
    )),
    Row("vLLM engine", (
        Panel("vLLM KV cache usage", "timeseries", "percentunit", (
            Query(f"max by (model_name) (vllm:kv_cache_usage_perc{{{VLLM}}})", "{{model_name}}"),
        ), "Share of vLLM's paged KV blocks in use.", width=12),
        Panel("vLLM prefix-cache hit rate", "timeseries", "percentunit", (
            Query(f"sum(rate(vllm:prefix_cache_hits_total{{{VLLM}}}[$__rate_interval])) / "
                  f"sum(rate(vllm:prefix_cache_queries_total{{{VLLM}}}[$__rate_interval]))", "local prefix cache"),
            Query(f"sum(rate(vllm:external_prefix_cache_hits_total{{{VLLM}}}[$__rate_interval])) / "
                  f"sum(rate(vllm:external_prefix_cache_queries_total{{{VLLM}}}[$__rate_interval]))",
                  "compacted contexts (KV connector)"),
        ), "Prompt tokens found in vLLM's prefix cache, and tokens loaded from compacted contexts through "
           "kvcat's KV connector, as a share of prompt tokens looked up.", width=12),
    )),
    Row("Traffic", (
        Panel("Chat requests per second", "timeseries", "reqps", (
            Query(f"sum by (mode) (rate(kvcat_chat_requests_total{{{MODEL}}}[$__rate_interval]))", "{{mode}}"),
        ), "Chat completions over a compacted context and with the full context.", width=12),
        Panel("Errors per second", "timeseries", "reqps", (
            Query("sum by (type) (rate(kvcat_errors_total[$__rate_interval]))", "{{type}}"),
        ), "Errors returned by the server, by type.", width=12),
    )),
)

PANELS: tuple[Panel, ...] = tuple(p for row in ROWS for p in row.panels)


def promql(expr: str, *, rate_interval: str = "1m", range_: str = "1h", model: str = ".*",
           method: str = ".*") -> str:
    """A dashboard query as plain PromQL: Grafana's variables replaced by the given values."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    return out.replace("$model", model).replace("$method", method)


# Every alert expression is `<signal> <comparison> <threshold>`: the signal is what the monitoring test
# evaluates on a live server (an alert that does not fire returns nothing).
ALERT_FORM = re.compile(r"^(?P<signal>.+?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>-?[0-9.]+(e-?[0-9]+)?)\s*$", re.S)


def rule_groups() -> list[dict]:
    """The groups of deploy/prometheus/rules/*.yml, in file order."""
    import yaml

    return [g for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]]


def alert_signal(expr: str) -> str:
    match = ALERT_FORM.match(expr.strip())
    if match is None:
        raise ValueError(f"alert expression is not `<signal> <op> <threshold>`: {expr!r}")
    return match["signal"]


# ---------------------------------------------------------------------------------------------------
# Grafana JSON through grafana-foundation-sdk


def build() -> dict:
    """The dashboard as Grafana JSON (a plain dict, deterministic)."""
    from grafana_foundation_sdk.builders import bargauge, dashboard as gd, prometheus, stat, timeseries
    from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.common import (BarGaugeDisplayMode, BigValueGraphMode,
                                                      LegendDisplayMode, LegendPlacement)
    from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat

    ds = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)

    def label_variable(name: str, label: str, query: str):
        return (gd.QueryVariable(name).label(label).datasource(ds).query(query)
                .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
                .multi(True).include_all(True).all_value(".*"))

    board = (gd.Dashboard("kvcat: KV-cache compaction").uid(UID)
             .description("Memory saved by compacted KV caches, compaction cost, and serving latency of "
                          "compacted vs full-context requests on vLLM.")
             .tags(["kvcat", "vllm", "kv-cache"]).time("now-1h", "now").refresh("30s").timezone("utc")
             .editable()
             .with_variable(gd.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
             .with_variable(label_variable("model", "model", "label_values(kvcat_contexts_stored, model)"))
             .with_variable(label_variable("method", "method", "label_values(kvcat_contexts_stored, method)")))

    legend = (VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM)
              .show_legend(True))
    last = ReduceDataOptions().calcs(["lastNotNull"]).values(False)
    panel_id = 0
    for row in ROWS:
        panel_id += 1
        board = board.with_row(gd.Row(row.title).id(panel_id))
        for spec in row.panels:
            panel_id += 1
            if spec.kind == "timeseries":
                p = timeseries.Panel().legend(legend).line_width(2).fill_opacity(10)
            elif spec.kind == "stat":
                p = stat.Panel().reduce_options(last).graph_mode(BigValueGraphMode.AREA)
            elif spec.kind == "histogram":
                p = bargauge.Panel().reduce_options(last).display_mode(BarGaugeDisplayMode.GRADIENT)
            else:
                raise ValueError(f"unknown panel kind {spec.kind!r}")
            p = (p.id(panel_id).title(spec.title).description(spec.description).datasource(ds).unit(spec.unit)
                 .span(spec.width).height(8))
            for ref, q in zip("ABCDEFGH", spec.queries):
                target = prometheus.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(ref).datasource(ds)
                if q.instant:
                    target = target.instant().format(PromQueryFormat.HEATMAP)
                else:
                    target = target.range()
                p = p.with_target(target)
            board = board.with_panel(p)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render_json() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


_K8S_LABELS = {"app.kubernetes.io/name": "kvcat", "app.kubernetes.io/part-of": "kvcat"}
_GENERATED = "# Generated by `kvcat dashboard build` from {src}; do not edit.\n"


def _yaml(obj) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump(obj, Dumper=Dumper, sort_keys=False, width=120, allow_unicode=True)


def render_k8s_dashboard() -> str:
    """The dashboard as a ConfigMap for Grafana's dashboard sidecar (label grafana_dashboard=1)."""
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": "kvcat-grafana-dashboard", "labels": {**_K8S_LABELS, "grafana_dashboard": "1"}},
          "data": {"kvcat.json": render_json()}}
    return _GENERATED.format(src="kvcat/dashboard.py") + _yaml(cm)


def render_k8s_rules() -> str:
    """deploy/prometheus/rules/*.yml as one PrometheusRule for prometheus-operator."""

    groups = rule_groups()
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "kvcat", "labels": {**_K8S_LABELS, "release": "prometheus"}},
            "spec": {"groups": groups}}
    return _GENERATED.format(src="deploy/prometheus/rules/") + _yaml(rule)


def generated() -> dict[Path, str]:
    """Every file `kvcat dashboard build` writes, with its content."""
    return {DASHBOARD_JSON: render_json(), K8S_DASHBOARD: render_k8s_dashboard(), K8S_RULES: render_k8s_rules()}


def stale() -> list[Path]:
    """Generated files whose committed content differs from a fresh build."""
    return [p for p, text in generated().items() if not p.exists() or p.read_text() != text]


def write() -> list[Path]:
    out = []
    for path, text in generated().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        out.append(path)
    return out


def dashboard_queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query in a Grafana dashboard JSON."""
    out = []
    for panel in board.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []) or []:
                if target.get("expr"):
                    out.append((inner["title"], target["expr"]))
    return out


# ---------------------------------------------------------------------------------------------------
# Preview: the panels drawn from a live Prometheus


class PrometheusError(RuntimeError):
    """Prometheus could not be reached, or answered something that is not Prometheus's API."""


class Prometheus:
    """A tiny client of Prometheus's HTTP API (query and query_range)."""

    def __init__(self, url: str, timeout: float = 10.0):
        import httpx

        url = url.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", url):
            raise PrometheusError(f"not an http(s) URL: {url!r} (expected e.g. http://127.0.0.1:9090)")
        self.url = url
        self._client = httpx.Client(base_url=url, timeout=timeout)

    def _get(self, path: str, params: dict) -> dict:
        import httpx

        try:
            resp = self._client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise PrometheusError(f"cannot reach Prometheus at {self.url}: {exc.__class__.__name__}: {exc}") \
                from None
        try:
            body = resp.json()
        except ValueError:
            raise PrometheusError(f"{self.url} answered HTTP {resp.status_code} with no JSON: is it a Prometheus "
                                  f"server? (GET {path})") from None
        if not isinstance(body, dict) or "status" not in body:
            raise PrometheusError(f"{self.url} does not speak Prometheus's HTTP API (GET {path})")
        if body["status"] != "success":
            raise PrometheusError(f"Prometheus rejected the query: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def check(self) -> None:
        self._get("/api/v1/status/buildinfo", {})

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._get("/api/v1/query", params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        return self._get("/api/v1/query_range", params)["result"]


def legend_text(template: str, labels: dict) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()
    return text or ", ".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"


def _format(value: float, unit: str) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "bytes":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or suffix == "TiB":
                return f"{value:.3g} {suffix}"
            value /= 1024
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "reqps":
        return f"{value:.3g}/s"
    return f"{value:.3g}"


def preview(url: str, out: Path, *, minutes: float = 30.0, model: str = ".*", method: str = ".*",
            end: float | None = None) -> Path:
    """Render every panel of the dashboard from Prometheus at `url` into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.dates import DateFormatter
    from datetime import datetime, timezone

    prom = Prometheus(url)
    prom.check()
    end = end if end is not None else time.time()
    start = end - minutes * 60
    step = max(1.0, round(minutes * 60 / 240))
    window = f"{max(int(minutes * 60), 60)}s"
    rate_interval = f"{max(int(4 * step), 30)}s"

    cols = 3
    rows = math.ceil(len(PANELS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.4 * rows), squeeze=False)
    fig.suptitle(f"kvcat dashboard preview — {url} — last {minutes:g} min "
                 f"(model={model}, method={method})", fontsize=13)
    for ax, spec in zip(axes.flat, PANELS):
        ax.set_title(spec.title, fontsize=10)
        drawn = False
        for q in spec.queries:
            expr = promql(q.expr, rate_interval=rate_interval, range_=window, model=model, method=method)
            if q.instant:
                result = prom.query(expr, at=end)
                buckets = sorted(((float(r["metric"].get("le", "inf")), float(r["value"][1])) for r in result))
                if buckets:
                    counts = [c - (buckets[i - 1][1] if i else 0.0) for i, (_, c) in enumerate(buckets)]
                    labels = ["+Inf" if math.isinf(le) else f"≤{le:g}" for le, _ in buckets]
                    ax.bar(labels, counts, color="tab:blue")
                    ax.set_ylabel("compactions")
                    ax.tick_params(axis="x", labelsize=8)
                    drawn = True
                continue
            result = prom.query_range(expr, start, end, step)
            for series in result:
                ts = [datetime.fromtimestamp(float(t), tz=timezone.utc) for t, _ in series["values"]]
                vs = [float(v) for _, v in series["values"]]
                if spec.unit == "percentunit":
                    vs = [v * 100 for v in vs]
                ax.plot(ts, vs, label=legend_text(q.legend, series["metric"]), linewidth=1.6)
                drawn = True
                if spec.kind == "stat" and vs:
                    last = next((v for v in reversed(vs) if not math.isnan(v)), float("nan"))
                    shown = last / 100 if spec.unit == "percentunit" else last
                    ax.text(0.5, 0.5, _format(shown, spec.unit), transform=ax.transAxes, ha="center",
                            va="center", fontsize=26, fontweight="bold", color="tab:green", alpha=0.85)
        if not drawn:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        elif spec.kind != "histogram":
            ax.xaxis.set_major_formatter(DateFormatter("%H:%M"))
            ax.tick_params(axis="x", labelsize=8)
            unit = {"percentunit": "%", "bytes": "bytes", "s": "seconds", "reqps": "per second"}.get(spec.unit)
            if unit:
                ax.set_ylabel(unit, fontsize=8)
            if spec.kind != "stat":
                ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------
# CLI: `kvcat dashboard build|check|preview`


def register(app, bench) -> None:
    import typer

    from kvcat.console import console, fail

    dash = typer.Typer(no_args_is_help=True, help="Grafana dashboard: build the JSON, check it, preview it.")
    app.add_typer(dash, name="dashboard")

    @dash.command("build")
    def build_cmd() -> None:
        """Generate the Grafana dashboard JSON (grafana-foundation-sdk) and its Kubernetes ConfigMap, and the
        PrometheusRule from deploy/prometheus/rules/."""
        for path in write():
            console.print(f"wrote {path.relative_to(REPO)}")
        console.print(f"{len(PANELS)} panels, {sum(len(p.queries) for p in PANELS)} queries")

    @dash.command("check")
    def check_cmd() -> None:
        """Exit non-zero if a committed generated file differs from a fresh build."""
        if old := stale():
            fail(f"stale: {', '.join(str(p.relative_to(REPO)) for p in old)}; run `kvcat dashboard build`", code=1)
        console.print("generated deploy files are up to date")

    @dash.command("preview")
    def preview_cmd(prometheus: str = typer.Option(..., "--prometheus", help="Prometheus URL, e.g. "
                                                   "http://127.0.0.1:9090"),
                    out: Path = typer.Option(Path("dashboard.png"), "--out", help="PNG to write"),
                    minutes: float = typer.Option(30.0, help="time range, minutes back from now"),
                    model: str = typer.Option(".*", help="model filter (regex)"),
                    method: str = typer.Option(".*", help="method filter (regex)")) -> None:
        """Render the dashboard's panels from a live Prometheus into one PNG (no Grafana needed)."""
        if minutes <= 0:
            fail("--minutes must be positive")
        try:
            path = preview(prometheus, out, minutes=minutes, model=model, method=method)
        except PrometheusError as exc:
            fail(str(exc))
        console.print(f"wrote {path}")
