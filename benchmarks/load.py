"""Load benchmark: many users, each with a long document of their own, on one engine with a small KV budget.

    kvcat bench load                                      # 4, 8 and 16 users, 4k-token documents, 4 questions
    kvcat bench load --users 2 --doc-tokens 1024 --questions 2 --burst 2   # minutes

Every user arrives (fixed spacing or Poisson) with a held-out document holding `questions` planted facts of
mixed forms (`kvcat.data.facts`) and asks about them one by one in one conversation (answers of
min..max answer tokens, the previous turns kept in the history). The engine's paged KV memory holds `budget_docs`
full conversations (vLLM's num_gpu_blocks_override, the same for every system), so plain vLLM must evict,
preempt and prefill again while compacted contexts fit many times over. Systems, one after another, same engine
settings, same documents:
- vllm: vLLM's own OpenAI server, the full document in every turn, prefix caching on (as users run it);
- kvcat-compact: `kvcat serve`; each user POSTs the document to /v1/compact once (429 honoured: the client waits
  Retry-After), then chats over `kv_context`;
- kvcat-onthefly: `kvcat serve --auto-compact-threshold`; users send the long conversation as plain chat.
Per system and user count: chat requests completed per minute and output tokens/s over the run's wall time
(compactions included), TTFT and end-to-end latency p50/p95/p99 (client side, streaming), /v1/compact's wait,
preemptions and prompt tokens the engine computed (vLLM's own counters), peak KV blocks in use (sampled),
errors, and answers: exact hits, and of the questions the full document (vllm) answers, how many this system
answers too. Then the burst: `burst` users compact at once on the kvcat server while compacted users chat; their
TTFT p95 during the burst against the same chats on the idle server.
Writes benchmarks/results/load.json and load.png.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from kvcat.bench import EngineConfig, result_file
from kvcat.bench_process import logger
from kvcat.console import option
from kvcat.defaults import DEFAULT_METHOD

SYSTEMS = ("vllm", "kvcat-compact", "kvcat-onthefly")
BLOCK_SIZE = 128  # set on both servers, so that the budget in blocks is the same KV bytes
TURN_TOKENS = 40  # a question and the chat template's turn markers, at most
TEMPLATE_TOKENS = 64  # the chat template's system prompt
MAX_RETRY_AFTER_S = 60.0  # the client waits what the server says, but never longer than this per try

log = logger("bench load")


@dataclass
class LoadConfig(EngineConfig):
    """The settings of `kvcat bench load`, one command-line option each."""

    out: Path = result_file("load")
    users: tuple[int, ...] = option((4, 8, 16), help="simulated users, one run per count (the last is the headline)")
    questions: int = option(4, help="questions per user, one conversation")
    doc_tokens: int = option(4000, help="document length per user (tokens)")
    min_answer_tokens: int = option(32, help="shortest answer (min_tokens)")
    max_answer_tokens: int = option(64, help="longest answer (max_tokens)")
    budget_docs: int = option(4, help="the engine's KV memory holds this many full conversations")
    arrival: str = option("fixed", help="user arrivals: fixed (spacing) or poisson (mean spacing)")
    spacing_s: float = option(2.0, help="seconds between user arrivals (the mean, for poisson)")
    systems: tuple[str, ...] = option(SYSTEMS, help="systems to run: vllm, kvcat-compact, kvcat-onthefly")
    ratio: float = option(10.0, help="compaction ratio (both kvcat modes)")
    method: str = option(DEFAULT_METHOD, help="compaction method (both kvcat modes)")
    threshold: int = option(2048, help="kvcat-onthefly: compact prompts longer than this many tokens")
    burst: int = option(8, help="users compacting at once in the burst phase (0: no burst phase)")
    queue: int = option(8, help="kvcat servers' --max-queued-compactions (more at once get 429 and retry)")
    burst_chatters: int = option(4, help="compacted users chatting through the burst")
    think_s: float = option(1.0, help="burst: seconds a chatting user reads an answer before the next question")
    burst_nice: tuple[int, ...] = option((0, 10), help="burst: one run per kvcat serve --compaction-nice (0 = "
                                                        "compaction and chats share the cores equally)")
    idle_s: float = option(30.0, help="seconds of chats on the idle server before the burst")
    seed: int = option(0, help="seed of the documents and the arrivals")

    def __post_init__(self):
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown:
            raise ValueError(f"unknown system(s) {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
        if self.arrival not in ("fixed", "poisson"):
            raise ValueError(f"--arrival is fixed or poisson, not {self.arrival!r}")
        if not self.users or min(self.users) < 1 or self.questions < 1 or self.budget_docs < 1:
            raise ValueError("--users, --questions and --budget-docs must be at least 1")
        if not 1 <= self.min_answer_tokens <= self.max_answer_tokens:
            raise ValueError("need 1 <= --min-answer-tokens <= --max-answer-tokens")
        if "kvcat-onthefly" in self.systems and self.threshold / self.ratio < BLOCK_SIZE:
            raise ValueError(f"--threshold {self.threshold} at --ratio {self.ratio:g} compacts to fewer slots than one "
                             f"KV block ({BLOCK_SIZE}); raise the threshold or lower the ratio")
        if any(not 0 <= n <= 19 for n in self.burst_nice):
            raise ValueError(f"--burst-nice values are kvcat serve --compaction-nice values, 0 to 19, not "
                             f"{self.burst_nice}")
        if self.burst and self.burst_chatters < 1:
            raise ValueError("the burst phase needs at least one chatting user (--burst-chatters)")

    def conversation_tokens(self) -> int:
        """Positions one user's conversation holds at its last turn."""
        return self.doc_tokens + TEMPLATE_TOKENS + self.questions * (TURN_TOKENS + self.max_answer_tokens)

    def kv_blocks(self) -> int:
        return self.budget_docs * math.ceil(self.conversation_tokens() / BLOCK_SIZE)


# --------------------------------------------------------------------------------------------------
# users and their documents


@dataclass(frozen=True)
class User:
    index: int
    document: str
    questions: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]
    arrives_s: float


def make_users(tokenizer, config: LoadConfig, count: int, first: int) -> list[User]:
    """`count` users with held-out documents `first`..: facts of mixed forms, several corpora, seeded arrivals."""
    from kvcat.data.facts import facts_examples
    from kvcat.data.suite import HAYSTACK_CORPORA

    rng = random.Random(f"kvcat-load:{config.seed}:{first}")
    users, at = [], 0.0
    for i in range(count):
        k = first + i
        examples = facts_examples(tokenizer, config.doc_tokens, config.questions, split="heldout", seed=config.seed,
                                  index=k, corpus=HAYSTACK_CORPORA[k % len(HAYSTACK_CORPORA)])
        users.append(User(k, examples[0].document, tuple(e.question for e in examples),
                          tuple(tuple(e.answers) for e in examples), round(at, 3)))
        at += rng.expovariate(1 / config.spacing_s) if config.arrival == "poisson" else config.spacing_s
    return users


# --------------------------------------------------------------------------------------------------
# the client


async def stream_chat(client, model: str, messages: list[dict], config: LoadConfig, context: str | None) -> dict:
    """One streamed chat completion: TTFT, end-to-end seconds, tokens and text (official openai client). A 429
    (on-the-fly compaction's queue is full) is retried after its Retry-After; the wait counts in TTFT."""
    import openai

    start, refused = time.perf_counter(), 0
    first, text, tokens = None, [], 0
    extra = {"min_tokens": config.min_answer_tokens, **({"kv_context": context} if context else {})}
    while True:
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=config.max_answer_tokens, temperature=0.0, stream=True,
                stream_options={"include_usage": True}, extra_body=extra)
            break
        except openai.RateLimitError as exc:
            refused += 1
            await asyncio.sleep(retry_after(exc.response.headers))
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"ttft_s": (first if first is not None else end) - start, "e2e_s": end - start, "tokens": tokens,
            "answer": "".join(text), "refused": refused}


def retry_after(headers) -> float:
    """Seconds a 429 asks the client to wait (its Retry-After), capped at MAX_RETRY_AFTER_S."""
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(headers.get("Retry-After", "1"))))
    except ValueError:
        return 1.0


async def compact(http, model: str, text: str, config: LoadConfig) -> dict:
    """POST /v1/compact until accepted: a 429 is retried after the Retry-After it carries (the wait is counted)."""
    start, refused = time.perf_counter(), 0
    while True:
        r = await http.post("/v1/compact", json={"model": model, "text": text, "ratio": config.ratio,
                                                  "method": config.method}, timeout=3600)
        if r.status_code != 429:
            r.raise_for_status()
            return {"id": r.json()["id"], "wait_s": time.perf_counter() - start, "refused": refused}
        refused += 1
        await asyncio.sleep(retry_after(r.headers))


async def run_user(user: User, system: str, base: str, model: str, config: LoadConfig, t0: float) -> dict:
    """One user's session: arrive, (compact,) ask every question in one conversation. Errors are recorded,
    never raised: the run goes on and counts them."""
    import httpx
    import openai

    from kvcat.eval.metrics import retrieved

    await asyncio.sleep(max(0.0, t0 + user.arrives_s - time.perf_counter()))
    record = {"user": user.index, "turns": [], "errors": []}
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=3600)
    try:
        async with httpx.AsyncClient(base_url=base) as http:
            context = None
            if system == "kvcat-compact":
                done = await compact(http, model, user.document, config)
                context = done["id"]
                record.update(compact_wait_s=round(done["wait_s"], 3), compact_refused=done["refused"])
            history: list[dict] = []
            for q, (question, answers) in enumerate(zip(user.questions, user.answers)):
                content = question if context or q else f"{user.document}\n\n{question}"
                history.append({"role": "user", "content": content})
                turn = await stream_chat(client, model, history, config, context)
                history.append({"role": "assistant", "content": turn["answer"]})
                record["turns"].append({**{k: round(v, 4) if isinstance(v, float) else v for k, v in turn.items()},
                                        "hit": retrieved(turn["answer"], answers)})
    except (httpx.HTTPError, openai.OpenAIError) as exc:
        record["errors"].append(f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        await client.close()
    record["done_s"] = round(time.perf_counter() - t0, 3)
    return record


# --------------------------------------------------------------------------------------------------
# the engine's own counters


def scrape(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples (matching `labels`) in a /metrics page; 0 if absent."""
    total = 0.0
    for found in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.eE+-]+|NaN)$", text, re.M):
        tags = found.group(1) or ""
        if all(f'{k}="{v}"' in tags for k, v in labels.items()) and found.group(2) != "NaN":
            total += float(found.group(2))
    return total


def engine_counters(text: str) -> dict:
    return {"preemptions": scrape(text, "vllm:num_preemptions_total"),
            "computed_tokens": scrape(text, "vllm:prompt_tokens_by_source_total", source="local_compute"),
            "cached_tokens": scrape(text, "vllm:prompt_tokens_by_source_total", source="local_cache_hit"),
            "injected_tokens": scrape(text, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")}


class KvSampler:
    """Peak KV blocks in use: vLLM's kv_cache_usage_perc gauge, sampled every `every` seconds, times the blocks (a
    peak shorter than that can be missed)."""

    def __init__(self, base: str, blocks: int, every: float = 0.1):
        self.base, self.blocks, self.every, self.peak = base, blocks, every, 0.0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        import httpx

        async with httpx.AsyncClient(base_url=self.base, timeout=30) as http:
            while True:
                try:
                    usage = scrape((await http.get("/metrics")).text, "vllm:kv_cache_usage_perc")
                    self.peak = max(self.peak, usage)
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(self.every)

    def __enter__(self) -> "KvSampler":
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc) -> None:
        self._task.cancel()

    @property
    def peak_blocks(self) -> int:
        return round(self.peak * self.blocks)


# --------------------------------------------------------------------------------------------------
# one run, one system


def quantiles(values: list[float]) -> dict:
    """p50 / p95 / p99 (nearest rank) of the values, 4 decimals; None where there are none."""
    s = sorted(values)
    q = lambda p: round(s[min(len(s) - 1, math.ceil(p * len(s)) - 1)], 4) if s else None  # noqa: E731
    return {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99)}


async def run_system(system: str, base: str, model: str, users: list[User], config: LoadConfig) -> dict:
    """Every user of one run against one server; the row of (system, users)."""
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        before = engine_counters((await http.get("/metrics")).text)
        with KvSampler(base, config.kv_blocks()) as kv:
            t0 = time.perf_counter()
            records = await asyncio.gather(*(run_user(u, system, base, model, config, t0) for u in users))
            wall = time.perf_counter() - t0
        after = engine_counters((await http.get("/metrics")).text)
    turns = [t for r in records for t in r["turns"]]
    waits = [r["compact_wait_s"] for r in records if "compact_wait_s" in r]
    row = {"system": system, "users": len(users), "wall_s": round(wall, 2), "requests": len(turns),
           "errors": sum(len(r["errors"]) for r in records) + sum(len(u.questions) for u in users) - len(turns),
           "requests_per_min": round(len(turns) / wall * 60, 2),
           "output_tok_s": round(sum(t["tokens"] for t in turns) / wall, 2),
           "ttft_s": quantiles([t["ttft_s"] for t in turns]), "e2e_s": quantiles([t["e2e_s"] for t in turns]),
           "compact_wait_s": quantiles(waits) if waits else None,
           "refused": sum(r.get("compact_refused", 0) for r in records) + sum(t["refused"] for t in turns),
           **{k: int(after[k] - before[k]) for k in after}, "peak_kv_blocks": kv.peak_blocks,
           "kv_blocks": config.kv_blocks(), "hits": int(sum(t["hit"] for t in turns)),
           "error_samples": [e for r in records for e in r["errors"]][:5],
           "answers": {f"{r['user']}/{i}": t["hit"] for r in records for i, t in enumerate(r["turns"])}}
    log(f"{system}, {len(users)} users: {row['requests']} requests in {wall:.0f} s ({row['requests_per_min']}/min), "
        f"TTFT p95 {row['ttft_s']['p95']} s, {row['errors']} errors, {row['preemptions']} preemptions, "
        f"peak {row['peak_kv_blocks']}/{row['kv_blocks']} blocks")
    return row


# --------------------------------------------------------------------------------------------------
# the compaction burst


async def burst_phase(base: str, model: str, residents: list[User], arrivals: list[User], config: LoadConfig) -> dict:
    """Compacted `residents` chat in a loop: first `idle_s` on the idle server, then while every one of `arrivals`
    compacts at once (429s honoured). Their TTFT in each phase, and how long the arrivals waited."""
    import httpx
    import openai

    async with httpx.AsyncClient(base_url=base) as http:
        contexts = [(await compact(http, model, u.document, config))["id"] for u in residents]
    phase = {"name": "idle"}
    ttft: dict[str, list[float]] = {"idle": [], "burst": []}
    stop = asyncio.Event()
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=3600)

    async def chatter(user: User, context: str) -> None:
        k = 0
        while not stop.is_set():
            question = user.questions[k % len(user.questions)]
            turn = await stream_chat(client, model, [{"role": "user", "content": question}], config, context)
            ttft[phase["name"]].append(turn["ttft_s"])
            k += 1
            await asyncio.sleep(config.think_s)

    chatters = [asyncio.ensure_future(chatter(u, c)) for u, c in zip(residents, contexts)]
    await asyncio.sleep(config.idle_s)
    phase["name"] = "burst"
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base) as http:
        done = await asyncio.gather(*(compact(http, model, u.document, config) for u in arrivals),
                                    return_exceptions=True)
    burst_s = time.perf_counter() - start
    stop.set()
    await asyncio.gather(*chatters, return_exceptions=True)
    await client.close()
    ok = [d for d in done if isinstance(d, dict)]
    idle, busy = quantiles(ttft["idle"]), quantiles(ttft["burst"])
    row = {"burst": len(arrivals), "chatters": len(residents), "think_s": config.think_s, "burst_s": round(burst_s, 2),
           "compactions_failed": len(done) - len(ok), "compact_wait_s": quantiles([d["wait_s"] for d in ok]),
           "compact_wait_max_s": round(max((d["wait_s"] for d in ok), default=0.0), 3),
           "compact_refused": sum(d["refused"] for d in ok), "chats_idle": len(ttft["idle"]),
           "chats_burst": len(ttft["burst"]), "chat_ttft_idle_s": idle, "chat_ttft_burst_s": busy,
           "chat_p95_burst_vs_idle": round(busy["p95"] / idle["p95"], 2) if idle["p95"] and busy["p95"] else None}
    log(f"burst of {len(arrivals)} compactions in {burst_s:.0f} s: chat TTFT p95 {idle['p95']} s idle, "
        f"{busy['p95']} s during the burst ({row['chat_p95_burst_vs_idle']}x)")
    return row


# --------------------------------------------------------------------------------------------------
# the run


def server_for(system: str, config: LoadConfig, dtype: str, nice: int | None = None):
    from kvcat.server.launch import ServerProcess, StockVLLMProcess

    # vLLM keeps one block aside (its null block): one more than the budget
    engine = {"block_size": BLOCK_SIZE, "num_gpu_blocks_override": config.kv_blocks() + 1}
    max_len = math.ceil(config.conversation_tokens() / BLOCK_SIZE) * BLOCK_SIZE  # what one user's blocks hold
    if system == "vllm":
        return StockVLLMProcess(config.model, dtype=dtype, max_model_len=max_len, args=[
            a for k, v in engine.items() for a in (f"--{k.replace('_', '-')}", str(v))])
    args = [a for k, v in engine.items() for a in ("--engine-arg", f"{k}={v}")]
    args += ["--max-queued-compactions", str(config.queue)]
    if nice is not None:
        args += ["--compaction-nice", str(nice)]
    if system == "kvcat-onthefly":
        args += ["--auto-compact-threshold", str(config.threshold), "--auto-compact-ratio", str(config.ratio),
                 "--auto-compact-method", config.method, "--auto-compact-max-contexts",
                 str(4 * max(config.users))]
    return ServerProcess(config.model, dtype=dtype, max_model_len=max_len, args=args)


def measure(config: LoadConfig) -> tuple[list[dict], list[dict], dict]:
    """The rows of every (system, users) run, the burst rows (one kvcat server per compaction niceness), and the
    engine facts."""
    from transformers import AutoTokenizer

    from kvcat.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(config.model)[1])
    dtype = config.engine_dtype()
    firsts = [sum(config.users[:i]) for i in range(len(config.users))]  # each run its own documents
    runs = [make_users(tokenizer, config, n, first) for n, first in zip(config.users, firsts)]
    rows, bursts = [], []
    info = {"engine_dtype": dtype, "kv_blocks": config.kv_blocks(), "block_size": BLOCK_SIZE}
    for system in config.systems:
        with server_for(system, config, dtype["dtype"]) as srv:
            model = srv.openai().models.list().data[0].id
            log(f"{system} up in {srv.startup_s:.0f} s ({config.kv_blocks()} KV blocks of {BLOCK_SIZE})")
            for users in runs:
                rows.append(asyncio.run(run_system(system, srv.base, model, users, config)))
    first = sum(config.users)
    residents = make_users(tokenizer, config, config.burst_chatters, first)
    arrivals = make_users(tokenizer, config, config.burst, first + config.burst_chatters)
    for nice in config.burst_nice if config.burst else ():
        with server_for("kvcat-compact", config, dtype["dtype"], nice) as srv:
            model = srv.openai().models.list().data[0].id
            bursts.append({"compaction_nice": nice,
                           **asyncio.run(burst_phase(srv.base, model, residents, arrivals, config))})
    compare(rows)
    return rows, bursts, info


def compare(rows: list[dict]) -> None:
    """Ratios against plain vLLM at the same user count, and answers kept of those the full document gives."""
    plain = {r["users"]: r for r in rows if r["system"] == "vllm"}
    for r in rows:
        ref = plain.get(r["users"])
        if ref is None:
            continue
        r["requests_per_min_vs_vllm"] = round(r["requests_per_min"] / ref["requests_per_min"], 2)
        if r["ttft_s"]["p95"] and ref["ttft_s"]["p95"]:
            r["ttft_p95_vs_vllm"] = round(r["ttft_s"]["p95"] / ref["ttft_s"]["p95"], 3)
        full = [k for k, hit in ref["answers"].items() if hit]
        r["full_hits"] = len(full)
        r["kept_of_full"] = int(sum(r["answers"].get(k, 0) for k in full))


def run(config: LoadConfig) -> dict:
    """Many users with their own long documents on one engine with a small KV budget: plain vLLM against kvcat."""
    from kvcat.bench import config_record, provenance, publish

    rows, bursts, info = measure(config)
    result = {"model": config.model, **provenance(), "config": {**config_record(config), "split": "heldout", **info},
              "rows": rows, "bursts": bursts}
    publish(result, config.out, table, plot, log)
    return result


def table(result: dict) -> str:
    c = result["config"]
    lines = [f"{c['budget_docs']} full conversations of KV ({c['kv_blocks']} blocks of {c['block_size']}), "
             f"{c['doc_tokens']}-token held-out documents, {c['questions']} questions per user, ratio {c['ratio']:g}, "
             f"{c['engine_dtype']['dtype']} engine.", "",
             "| system | users | requests/min | vs vLLM | output tok/s | TTFT p50 / p95 / p99 s | p95 vs vLLM | "
             "e2e p95 s | /v1/compact wait p95 s | preemptions | prompt tokens computed | peak KV blocks | "
             "429s retried | errors | hits | of full's kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cell = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    for r in result["rows"]:
        t = r["ttft_s"]
        lines.append(
            f"| {r['system']} | {r['users']} | {r['requests_per_min']:.1f} | "
            f"{cell(r.get('requests_per_min_vs_vllm'), '{:.2f}x')} | "
            f"{r['output_tok_s']:.1f} | {t['p50']:.2f} / {t['p95']:.2f} / {t['p99']:.2f} | "
            f"{cell(r.get('ttft_p95_vs_vllm'), '{:.3f}x')} | {r['e2e_s']['p95']:.2f} | "
            f"{cell((r['compact_wait_s'] or {}).get('p95'), '{:.1f}')} | {r['preemptions']} | "
            f"{r['computed_tokens']:,} | "
            f"{r['peak_kv_blocks']} / {r['kv_blocks']} | {r['refused']} | {r['errors']} | "
            f"{r['hits']}/{r['requests']} | "
            f"{cell(r.get('kept_of_full'), '{}')}{cell(r.get('full_hits'), '/{}')} |")
    bursts = result.get("bursts") or []
    if bursts:
        b = bursts[0]
        lines += ["", f"**Compaction burst**: {b['burst']} users POST /v1/compact at once while {b['chatters']} "
                  f"compacted users chat ({b['think_s']:g} s between questions), one `kvcat serve` per "
                  "`--compaction-nice`; "
                  "chat TTFT on the idle server first, then during the burst.", "",
                  "| --compaction-nice | chat TTFT p95 idle s | during burst s | burst / idle | chats idle / burst | "
                  "burst s | /v1/compact wait p50 / p95 / max s | 429s retried | failed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for b in bursts:
            w = b["compact_wait_s"]
            lines.append(f"| {b['compaction_nice']} | {b['chat_ttft_idle_s']['p95']:.3f} | "
                         f"{b['chat_ttft_burst_s']['p95']:.3f} | {cell(b['chat_p95_burst_vs_idle'], '{:.2f}x')} | "
                         f"{b['chats_idle']} / {b['chats_burst']} | {b['burst_s']:.0f} | "
                         f"{w['p50']:.1f} / {w['p95']:.1f} / {b['compact_wait_max_s']:.1f} | {b['compact_refused']} | "
                         f"{b['compactions_failed']} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    from kvcat.bench import save_figure, subplots

    _, fig, axes = subplots(1, 2, figsize=(11, 4.2))
    for system in dict.fromkeys(r["system"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["system"] == system]
        users = [r["users"] for r in rows]
        axes[0].plot(users, [r["requests_per_min"] for r in rows], marker="o", label=system)
        axes[1].plot(users, [r["ttft_s"]["p95"] for r in rows], marker="o", label=system)
    axes[0].set_title("chat requests completed per minute (higher is better)", fontsize=9)
    axes[1].set_title("TTFT p95, s (lower is better)", fontsize=9)
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("users")
        ax.legend(fontsize=8)
    c = result["config"]
    return save_figure(fig, path, f"kvcat bench load: {result['model']}, KV for {c['budget_docs']} full "
                       f"conversations, {c['doc_tokens']}-token documents ({result['machine']})")
