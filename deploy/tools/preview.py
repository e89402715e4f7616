"""The dashboard's panels drawn from a live Prometheus into one PNG (matplotlib, no Grafana server), and the
small Prometheus HTTP client it (and the monitoring test) queries with.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from .dashboard import PANELS, promql


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
