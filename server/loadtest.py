"""A bounded loopback load driver: N concurrent chat clients over stored contexts for a fixed time.

Used by the reliability test (tests/test_reliability.py): every request's latency and status are recorded,
and the server's resident memory (its whole process tree: API process, engine core, workers) is sampled, so
that a leak shows as RSS growing under steady load. It stops by itself after `seconds`.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class LoadReport:
    requests: int
    errors: int
    seconds: float
    p50_s: float
    p95_s: float
    max_s: float
    throughput_rps: float
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MB)
    statuses: dict[int, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)

    def rss_growth(self) -> float:
        """Relative RSS change from the second third to the last third of the run (steady state)."""
        n = len(self.rss_mb)
        if n < 6:
            return 0.0
        mid = statistics.mean(m for _, m in self.rss_mb[n // 3: 2 * n // 3])
        end = statistics.mean(m for _, m in self.rss_mb[2 * n // 3:])
        return end / mid - 1.0


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            pass
        stack.extend(children.get(p, []))
    return total


async def _drive(base: str, headers: dict, contexts: list[str], model: str, concurrency: int, seconds: float,
                 max_tokens: int, pid: int | None, sample_s: float) -> LoadReport:
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    samples: list[str] = []
    rss: list[tuple[float, float]] = []
    start = time.monotonic()
    stop = start + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        k = 0
        while time.monotonic() < stop:
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Question {k} from client {i}: what is it about?"}],
                    "kv_context": contexts[(i + k) % len(contexts)]}
            t0 = time.monotonic()
            try:
                r = await http.post("/v1/chat/completions", json=body, headers=headers)
                code = r.status_code
                if code != 200 and len(samples) < 5:
                    samples.append(r.text[:300])
            except httpx.HTTPError as exc:
                code = -1
                if len(samples) < 5:
                    samples.append(repr(exc))
            latencies.append(time.monotonic() - t0)
            statuses[code] = statuses.get(code, 0) + 1
            k += 1

    async def sampler() -> None:
        while time.monotonic() < stop:
            if pid is not None:
                rss.append((round(time.monotonic() - start, 1), round(tree_rss_mb(pid), 1)))
            await asyncio.sleep(sample_s)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
        await asyncio.gather(sampler(), *(client(i, http) for i in range(concurrency)))
    elapsed = time.monotonic() - start
    ordered = sorted(latencies)
    q = lambda p: ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")  # noqa: E731
    return LoadReport(requests=len(latencies), errors=sum(v for k, v in statuses.items() if k != 200),
                      seconds=round(elapsed, 1), p50_s=round(q(0.5), 3), p95_s=round(q(0.95), 3),
                      max_s=round(ordered[-1], 3) if ordered else float("nan"),
                      throughput_rps=round(len(latencies) / elapsed, 2), rss_mb=rss, statuses=statuses,
                      error_samples=samples)


def run_load(base: str, contexts: list[str], model: str, *, headers: dict | None = None, concurrency: int = 50,
             seconds: float = 120.0, max_tokens: int = 8, pid: int | None = None,
             sample_s: float = 5.0) -> LoadReport:
    """Drive the server at `base` with `concurrency` clients for `seconds`; bounded in time, loopback only."""
    return asyncio.run(_drive(base, headers or {}, contexts, model, concurrency, seconds, max_tokens, pid, sample_s))
