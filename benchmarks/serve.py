"""Serving benchmark: chat over a compacted context against the same document sent in full, one engine.

    kvcat bench serve                                    # 3 held-out 8k-token documents, ratios 10 and 32
    kvcat bench serve --docs 1 --doc-tokens 2000         # minutes

One `kvcat serve` (vLLM CPU engine, bf16 by default) on loopback. For each held-out document:
- full-cold: the whole document + question as plain chat, first time (nothing of it cached);
- full-warm: the same request again (vLLM's prefix cache holds the document's blocks);
- compacted-cold (per ratio): the document POSTed to /v1/compact once, then a question with kv_context
  (the KV connector writes the t compacted slots; only the question is prefilled);
- compacted-warm: a second question over the same context (its blocks hit the prefix cache);
- no-context: the question alone, as plain chat (what a compacted context's TTFT is held against);
- plain-same-length (per ratio): plain chat of the document's first t tokens (t = the compacted context's
  bytes over one token's: its slots, plus a hybrid's side slots) and the question: as many KV bytes as the
  compacted request, so its decode speed is the reference for the compacted rows' (beta, side slots and the
  injected blocks are the only difference).
Measured from the client (official openai client, streaming): ttft_s (request to first token) and
decode_tok_s (tokens after the first / time after the first; min_tokens fixes the count), with
ttft_vs_no_context and decode_vs_plain (decode over decode of plain-same-length at the same ratio). kv_bytes:
the paged KV a context holds (whole blocks of the engine's block size; for full chat the document's blocks)
plus a hybrid's side slots (`--method am-hak-fast:whole_share=0.5`: a variant's parameters go to /v1/compact),
and contexts_in_budget: how many such contexts fit the fixed KV budget (--budget-gib).
Writes benchmarks/results/serve.json and serve.png. `kvcat bench peers` calls `measure(plain_vllm=True)`
to put vLLM's own OpenAI server, serving the full document, beside these rows.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from kvcat.bench import EngineConfig, result_file
from kvcat.bench_process import logger
from kvcat.console import option
from kvcat.defaults import DEFAULT_METHOD

QUESTIONS = ("Who is speaking, and to whom?", "Name one topic the text discusses.")


@dataclass
class ServeConfig(EngineConfig):
    """The settings of `kvcat bench serve`, one command-line option each (`measure` takes them too)."""

    out: Path = result_file("serve")
    doc_tokens: int = option(8000, help="document length in tokens")
    ratios: tuple[float, ...] = option((10.0, 32.0), help="compaction ratios")
    method: str = option(DEFAULT_METHOD, help="compaction method, a name or name:key=value:... (a variant)")
    docs: int = option(3, help="held-out documents")
    decode_tokens: int = option(32, help="tokens generated per request (min_tokens fixes the count)")
    budget_gib: float = option(1.0, help="the fixed KV budget for contexts_in_budget")


log = logger("bench serve")


def _stream(client, model: str, content: str, context: str | None, tokens: int) -> dict:
    start = time.perf_counter()
    first = last = None
    n = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=tokens, temperature=0.0,
        stream=True, stream_options={"include_usage": True},
        extra_body={"min_tokens": tokens, **({"kv_context": context} if context else {})})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    if first is None:
        raise RuntimeError("the server streamed no content")
    decode = (n - 1) / (last - first) if n > 1 and last > first else float("nan")
    return {"ttft_s": first - start, "decode_tok_s": decode}


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _cache_block_size(srv) -> int | None:
    """vLLM's block size from its `vllm:cache_config_info` metric (plain vLLM does not list it elsewhere)."""
    import re

    import httpx

    text = httpx.get(srv.url("/metrics"), timeout=30).text
    found = re.search(r'vllm:cache_config_info\{[^}]*block_size="(\d+)"', text)
    return int(found.group(1)) if found else None


def measure(config: ServeConfig, docs: list[tuple[str, int]], plain_vllm: bool = False) -> tuple[list[dict], dict]:
    """The rows of one serving comparison over `docs` ((text, token count) pairs; config.docs and doc_tokens
    are not read). With `plain_vllm`, vLLM's own OpenAI server (no kvcat connector or plugin, same engine
    settings) first answers the full documents as the "vllm" system; it is then the reference of the ratio
    columns."""
    import httpx

    from kvcat.compaction.registry import parse_spec
    from kvcat.server.launch import ServerProcess, StockVLLMProcess

    model, decode_tokens, budget_gib = config.model, config.decode_tokens, config.budget_gib
    engine_dtype = config.engine_dtype()  # resolved once: plain vLLM and kvcat compute alike
    dtype = engine_dtype["dtype"]

    samples: dict[tuple[str, str, float], list[dict]] = {}
    slots: dict[tuple[str, float], list[int]] = {("full-cold", 1.0): [n for _, n in docs],
                                                  ("full-warm", 1.0): [n for _, n in docs], ("no-context", 1.0): [0]}
    side: dict[tuple[str, float], list[int]] = {}  # a hybrid's side-slot bytes, beside the paged blocks
    method, params = parse_spec(config.method)
    # CPU: room for the model's full context; on a GPU vLLM sizes its KV memory from gpu_memory_utilization
    kv_gib = None if _on_gpu() else max(2, math.ceil(budget_gib))
    info: dict = {"engine_dtype": engine_dtype}
    compaction_s: dict[float, list[float]] = {}  # /v1/compact's own seconds per ratio, one per document

    def full_chat(system: str, client, served: str, text: str) -> None:
        for mode in ("full-cold", "full-warm"):
            samples.setdefault((system, mode, 1.0), []).append(
                _stream(client, served, f"{text}\n\n{QUESTIONS[0]}", None, decode_tokens))

    if plain_vllm:
        with StockVLLMProcess(model, dtype=dtype, kv_cache_gib=kv_gib) as srv:
            info["vllm_block_size"] = _cache_block_size(srv)
            log(f"plain vLLM up in {srv.startup_s:.0f} s (block size {info['vllm_block_size']})")
            client = srv.openai()
            served = client.models.list().data[0].id
            _stream(client, served, "Hello!", None, 4)  # warm-up
            for text, _ in docs:
                full_chat("vllm", client, served, text)
    with ServerProcess(model, dtype=dtype, kv_cache_gib=kv_gib) as srv:
        client = srv.openai()
        listed = client.models.list().data[0]
        served = listed.id
        info.update(kv_block_size=int(listed.model_extra["kv_block_size"]),
                    kv_bytes_per_token=int(listed.model_extra["kv_bytes_per_token"]))
        log(f"kvcat server up in {srv.startup_s:.0f} s: {model} {dtype}, block {info['kv_block_size']}, "
            f"{info['kv_bytes_per_token']} KV bytes/token")
        _stream(client, served, "Hello!", None, 4)  # warm-up
        for i, (text, _) in enumerate(docs):
            full_chat("kvcat", client, served, text)
            samples.setdefault(("kvcat", "no-context", 1.0), []).append(
                _stream(client, served, QUESTIONS[0], None, decode_tokens))
            ids = httpx.post(srv.url("/tokenize"), json={"prompt": text}, timeout=60).json()["tokens"]
            for r in config.ratios:
                resp = httpx.post(srv.url("/v1/compact"), timeout=3600,
                                  json={"text": text, "ratio": r, "method": method, "params": params})
                resp.raise_for_status()
                ctx = resp.json()
                compaction_s.setdefault(r, []).append(ctx["compaction_seconds"])
                for mode, q in (("compacted-cold", QUESTIONS[0]), ("compacted-warm", QUESTIONS[1])):
                    samples.setdefault(("kvcat", mode, r), []).append(_stream(client, served, q, ctx["id"],
                                                                              decode_tokens))
                    slots.setdefault((mode, r), []).append(ctx["compacted_tokens"])
                    side.setdefault((mode, r), []).append(ctx["kv_bytes_side"])
                same = round(ctx["kv_bytes_compacted"] / info["kv_bytes_per_token"])  # tokens of the same bytes
                head = httpx.post(srv.url("/detokenize"), json={"tokens": ids[:same]}, timeout=60).json()["prompt"]
                samples.setdefault(("kvcat", "plain-same-length", r), []).append(
                    _stream(client, served, f"{head}\n\n{QUESTIONS[0]}", None, decode_tokens))
                slots.setdefault(("plain-same-length", r), []).append(same)
                httpx.delete(srv.url(f"/v1/contexts/{ctx['id']}"), timeout=60)
                log(f"doc {i + 1}/{len(docs)} ratio {r:g}: {ctx['original_tokens']} -> {ctx['compacted_tokens']} "
                    f"slots, compaction {ctx['compaction_seconds']:.1f} s")
    if plain_vllm and info["vllm_block_size"] not in (None, info["kv_block_size"]):
        raise RuntimeError(f"plain vLLM pages KV in blocks of {info['vllm_block_size']}, kvcat's engine in "
                           f"{info['kv_block_size']}: the KV-bytes columns would not compare")
    rows = summarise(samples, slots, side, compaction_s, info["kv_block_size"], info["kv_bytes_per_token"],
                     int(budget_gib * 2**30))
    info["reference"] = f"{rows[0]['system']} full-cold"
    return rows, info


def summarise(samples: dict, slots: dict, side: dict, compaction_s: dict, block: int, per_token: int,
              budget: int) -> list[dict]:
    """One row per (system, mode, ratio) from the streamed samples: means, KV bytes in whole blocks (plus side
    slots), contexts per
    `budget` bytes, and ratios against the first row (full-cold); the compacted-cold rows also carry
    /v1/compact's seconds against the kvcat server's own cold prefill."""
    rows = []
    for (system, mode, r), ss in samples.items():
        kb = int(statistics.mean(max(1, math.ceil(n / block)) * block * per_token for n in slots[(mode, r)])
                 + statistics.mean(side.get((mode, r), [0])))
        rows.append({"system": system, "mode": mode, "ratio": r,
                     "ttft_s": round(statistics.mean(s["ttft_s"] for s in ss), 4),
                     "ttft_s_all": [round(s["ttft_s"], 4) for s in ss],
                     "decode_tok_s": round(statistics.mean(s["decode_tok_s"] for s in ss), 2),
                     "kv_bytes": kb, "contexts_in_budget": budget // kb})
    ref = rows[0]  # full-cold of plain vLLM when it ran, else of kvcat
    cell = {(r["system"], r["mode"], r["ratio"]): r for r in rows}
    for r in rows:
        r["ttft_speedup_vs_full_cold"] = round(ref["ttft_s"] / r["ttft_s"], 2)
        if r["mode"].startswith("compacted"):
            bare, plain = cell[(r["system"], "no-context", 1.0)], cell[(r["system"], "plain-same-length", r["ratio"])]
            r["ttft_vs_no_context"] = round(r["ttft_s"] / bare["ttft_s"], 2)
            r["decode_vs_plain"] = round(r["decode_tok_s"] / plain["decode_tok_s"], 3)
        if r["mode"] == "compacted-cold" and r["system"] == "kvcat":  # the server's own cold prefill is the bar
            seconds = compaction_s[r["ratio"]]
            r["compaction_s"] = round(statistics.mean(seconds), 3)
            r["compaction_s_all"] = [round(x, 3) for x in seconds]
            r["compaction_vs_full_cold"] = round(r["compaction_s"] / cell[("kvcat", "full-cold", 1.0)]["ttft_s"], 2)
        r["kv_bytes_vs_full"] = round(r["kv_bytes"] / ref["kv_bytes"], 4)
        r["contexts_vs_full"] = round(r["contexts_in_budget"] / max(ref["contexts_in_budget"], 1), 2)
    return rows


def run(config: ServeConfig) -> dict:
    """TTFT, decode speed, KV bytes and contexts per KV budget: compacted vs full-context chat."""
    from kvcat.bench import config_record, provenance, publish

    rows, info = measure(config, heldout_docs(config.model, config.doc_tokens, config.docs))
    result = {"model": config.model, **provenance(),
              "config": {**config_record(config), "split": "heldout", **info}, "rows": rows}
    publish(result, config.out, table, plot, log)
    return result


def heldout_docs(model: str, doc_tokens: int, docs: int) -> list[tuple[str, int]]:
    """`docs` held-out State-of-the-Union windows of `doc_tokens` tokens: (text, token count) pairs."""
    from transformers import AutoTokenizer

    from kvcat import data
    from kvcat.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve(model)[1])
    windows = data.token_windows(tok, doc_tokens, 2, docs, split="heldout", corpora=("sotu",))
    return [(tok.decode(w.prefix_ids), len(w.prefix_ids)) for w in windows]


def table(result: dict) -> str:
    """One row per (system, mode, ratio); the system column appears when plain vLLM ran too."""
    systems = len({r.get("system", "kvcat") for r in result["rows"]}) > 1
    lines = [("| system " if systems else "") + "| mode | ratio | TTFT s | TTFT speed-up vs full cold | TTFT / no "
             "context | decode tok/s | decode / plain same length | KV bytes / context | vs full | contexts in budget "
             "| vs full |",
             ("|---" if systems else "") + "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratio = lambda r, key, f: f.format(r[key]) if key in r else "-"  # noqa: E731
    for r in result["rows"]:
        lines.append((f"| {r.get('system', 'kvcat')} " if systems else "")
                     + f"| {r['mode']} | {r['ratio']:g} | {r['ttft_s']:.3f} | {r['ttft_speedup_vs_full_cold']:.1f}x | "
                     f"{ratio(r, 'ttft_vs_no_context', '{:.2f}x')} | {r['decode_tok_s']:.1f} | "
                     f"{ratio(r, 'decode_vs_plain', '{:.2f}x')} | {r['kv_bytes']:,} | {r['kv_bytes_vs_full']:.3f} | "
                     f"{r['contexts_in_budget']} | {r['contexts_vs_full']:.1f}x |")
    compactions = [f"{r['ratio']:g}x {r['compaction_s']:.1f} s ({r['compaction_vs_full_cold']:.1f}x the cold prefill)"
                   for r in result["rows"] if "compaction_s" in r]
    if compactions:
        lines += ["", "`/v1/compact`'s own seconds per document, mean: " + "; ".join(compactions) + "."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    from kvcat.bench import save_figure, subplots

    rows = result["rows"]
    labels = [r["mode"].replace("-", "\n") + ("" if r["ratio"] == 1 else f" {r['ratio']:g}x") for r in rows]
    _, fig, axes = subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(axes, ("ttft_s", "decode_tok_s", "contexts_in_budget"),
                              ("time to first token (s, lower is better)", "decode tokens/s",
                               f"contexts in a {result['config']['budget_gib']:g} GiB KV budget")):
        ax.bar(range(len(rows)), [r[key] for r in rows],
               color=["tab:grey" if r["mode"].startswith("full") else "tab:blue" for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        if key != "decode_tok_s":
            ax.set_yscale("log")
    return save_figure(fig, path, f"kvcat serve: {result['model']}, {result['config']['doc_tokens']}-token "
                       f"documents ({result['machine']})")
