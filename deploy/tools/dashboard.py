"""The kvcat Grafana dashboard, defined once as code, and its Grafana JSON (grafana-foundation-sdk).

`ROWS` / `PANELS` is the single definition: `build()` turns it into Grafana JSON, generate.py writes that
under deploy/, the monitoring tests evaluate every query of it on a real Prometheus, and preview.py draws
it with matplotlib (no Grafana server is needed to look at it).

Queries are written as Grafana sees them (`$model`, `$method`, `$__rate_interval`, `$__range`);
`promql()` substitutes those for plain Prometheus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

UID = "kvcat-overview"
DATASOURCE_UID = "${datasource}"

# Label filters. kvcat_* series carry model and method (request series add mode = compacted | full);
# vLLM's own series carry model_name, which is the same served model name.
KV = 'model=~"$model", method=~"$method"'
MODEL = 'model=~"$model"'
VLLM = 'model_name=~"$model"'


def store(series: str) -> str:
    """A store gauge summed over models and methods. Every replica of a shared store reports the whole store,
    so replicas are combined with max, never summed."""
    return f"sum(max by (model, method) ({series}{{{KV}}}))"


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


def rate(series: str, sel: str = "", by: str = "") -> str:
    """The per-second rate of a counter over Grafana's rate interval, summed (per `by` labels if given)."""
    group = f" by ({by}) " if by else ""
    selector = f"{{{sel}}}" if sel else ""
    return f"sum{group}(rate({series}{selector}[$__rate_interval]))"


def _quantiles(metric: str, by: str, sel: str, qs=(0.5, 0.95)) -> tuple[Query, ...]:
    return tuple(
        Query(f"histogram_quantile({q}, {rate(f'{metric}_bucket', sel, f'le, {by}')})",
              f"p{round(q * 100)} {{{{{by}}}}}")
        for q in qs)


ROWS: tuple[Row, ...] = (
    Row("KV memory", (
        Panel("KV cache bytes: full vs compacted", "timeseries", "bytes", (
            Query(store("kvcat_kv_full_bytes"), "full context"),
            Query(store("kvcat_kv_compacted_bytes"), "compacted"),
            Query(store("kvcat_kv_side_bytes"), "of which side slots"),
        ), "KV bytes the stored contexts take compacted (paged slots plus the side slots of retrieval heads kept "
           "whole), against what they would take in full."),
        Panel("Share of KV memory saved", "stat", "percentunit", (
            Query(f"1 - {store('kvcat_kv_compacted_bytes')} / {store('kvcat_kv_full_bytes')}", "saved"),
        ), "1 - compacted / full over all stored contexts.", width=4),
        Panel("KV bytes saved", "stat", "bytes", (
            Query(store("kvcat_kv_saved_bytes"), "saved"),
        ), width=4),
        Panel("Contexts stored", "timeseries", "short", (
            Query(f"max by (model, method) (kvcat_contexts_stored{{{KV}}})", "{{model}} {{method}}"),
        ), "Compacted contexts held by the server."),
    )),
    Row("Compaction", (
        Panel("Compaction ratio distribution", "histogram", "short", (
            Query(f"sum by (le) (increase(kvcat_compaction_factor_bucket{{{KV}}}[$__range]))", "{{le}}",
                  instant=True),
        ), "Compactions in the time range by ratio N/t (upper bucket bound)."),
        Panel("Mean compaction ratio of stored contexts", "stat", "short", (
            Query(f"{store('kvcat_context_original_tokens')} / {store('kvcat_context_compacted_tokens')}",
                  "original / compacted tokens"),
        ), width=4),
        Panel("Compactions per second", "stat", "reqps", (
            Query(rate("kvcat_compaction_seconds_count", KV), "compactions/s"),
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
            Query(f"{rate('vllm:prefix_cache_hits_total', VLLM)} / {rate('vllm:prefix_cache_queries_total', VLLM)}",
                  "local prefix cache"),
            Query(f"{rate('vllm:external_prefix_cache_hits_total', VLLM)} / "
                  f"{rate('vllm:external_prefix_cache_queries_total', VLLM)}", "compacted contexts (KV connector)"),
        ), "Prompt tokens found in vLLM's prefix cache, and tokens loaded from compacted contexts through "
           "kvcat's KV connector, as a share of prompt tokens looked up.", width=12),
    )),
    Row("On-the-fly compaction", (
        Panel("On-the-fly requests by outcome", "timeseries", "reqps", (
            Query(rate("kvcat_onthefly_requests_total", KV, by="outcome"), "{{outcome}}"),
        ), "Long chat prompts served over a compacted prefix: compacted now, a stored hit, a stored prefix, "
           "or compacted incrementally.", width=8),
        Panel("On-the-fly compactions", "timeseries", "short", (
            Query(f"sum by (kind) (increase(kvcat_onthefly_compactions_total{{{KV}}}[$__rate_interval]))",
                  "{{kind}}"),
        ), "Compactions made inside chat requests, from scratch or joined to a stored prefix.", width=8),
        Panel("KV bytes not held by on-the-fly requests", "timeseries", "Bps", (
            Query(rate("kvcat_onthefly_kv_saved_bytes_total", KV), "saved"),
        ), "Full minus compacted KV bytes of the requests served over on-the-fly prefixes, per second.", width=8),
    )),
    Row("Work in progress", (
        Panel("Compactions queued and running", "timeseries", "short", (
            Query("sum(kvcat_compactions_queued)", "queued"),
            Query("sum(kvcat_compactions_running)", "running"),
        ), "Compactions waiting for a server's compaction thread, and running on it.", width=12),
        Panel("Chats in flight", "timeseries", "short", (
            Query(f"sum by (mode) (kvcat_chats_in_flight{{{MODEL}}})", "{{mode}}"),
        ), "Chat completions being generated now.", width=12),
    )),
    Row("Traffic", (
        Panel("Chat requests per second", "timeseries", "reqps", (
            Query(rate("kvcat_chat_requests_total", MODEL, by="mode"), "{{mode}}"),
        ), "Chat completions over a compacted context and with the full context.", width=12),
        Panel("Errors per second", "timeseries", "reqps", (
            Query(rate("kvcat_errors_total", by="type"), "{{type}}"),
        ), "Errors returned by the server, by type.", width=12),
    )),
)

PANELS: tuple[Panel, ...] = tuple(p for row in ROWS for p in row.panels)


def promql(expr: str, *, rate_interval: str = "1m", range_: str = "1h", model: str = ".*",
           method: str = ".*") -> str:
    """A dashboard query as plain PromQL: Grafana's variables replaced by the given values."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    return out.replace("$model", model).replace("$method", method)


# ---------------------------------------------------------------------------------------------------
# Grafana JSON through grafana-foundation-sdk


def build() -> dict:
    """The dashboard as Grafana JSON (a plain dict, deterministic)."""
    try:
        from grafana_foundation_sdk.builders import bargauge, dashboard as gd, prometheus, stat, timeseries
        from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions
        from grafana_foundation_sdk.cog.encoder import JSONEncoder
        from grafana_foundation_sdk.models.common import (BarGaugeDisplayMode, BigValueGraphMode,
                                                          LegendDisplayMode, LegendPlacement)
        from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort
        from grafana_foundation_sdk.models.prometheus import PromQueryFormat
    except ImportError as exc:  # an extra, not a dependency of the kvcat package
        raise ImportError(f"{exc}: the dashboard tooling needs kvcat's deploy extra "
                          "(pip install -e '.[deploy]')") from exc

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
    """`build()` as the committed text: sorted keys, so that a rebuild is byte-identical."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def dashboard_queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query in a Grafana dashboard JSON."""
    out = []
    for panel in board.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []) or []:
                if target.get("expr"):
                    out.append((inner["title"], target["expr"]))
    return out
