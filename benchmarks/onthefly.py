"""On-the-fly compaction benchmark: a multi-turn chat session, and incremental vs from-scratch quality.

    kvcat bench onthefly                                  # 8 turns over a 6k-token held-out document
    kvcat bench onthefly --turns 4 --doc-tokens 2000 --windows 2

1. Quality (transformers reference path, held-out data): a prefix compacted from scratch at the ratio, against
   the same prefix compacted incrementally (its first half, then the second half joined to it, as a growing
   conversation is): continuation PPL gap over the full prefix, and needle accuracy (needles in either half).
2. Session (one `kvcat serve`, bf16): turn k sends the document, the previous questions and answers, and
   question k, as an ordinary chat. Modes, the same engine and the same history (the full-context answers):
   - full-warm: plain chat, vLLM's prefix cache on (what a plain vLLM deployment does);
   - full-cold: plain chat with a fresh cache_salt each turn (the whole prompt prefilled every turn);
   - onthefly: plain chat with the server's on-the-fly compaction (no client-side change);
   - compact: the document POSTed to /v1/compact once, then kv_context with the history uncompressed.
   Per turn: TTFT (client side, streaming) and the answer; per mode: total time, KV bytes held at the end
   (whole blocks), and how often the answer agrees with the full-context answer (exact, and token F1).
Writes benchmarks/results/onthefly.json and onthefly.png.
"""

from __future__ import annotations

import math
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kvcat.bench import EngineConfig, result_file
from kvcat.bench_process import logger
from kvcat.console import option
from kvcat.defaults import DEFAULT_METHOD
from kvcat.eval.metrics import ppl_gap, window_nll

QUESTIONS = (
    "Who is speaking, and to whom?", "What is the main topic of the text?", "Name one country mentioned.",
    "What does the speaker ask Congress to do?", "Name one number mentioned in the text.",
    "What problem does the speaker describe first?", "Is the tone hopeful or worried?",
    "Name one law or program mentioned.", "What does the speaker say about the economy?",
    "What does the speaker say about the army or navy?", "Name one group of people the speaker thanks.",
    "What does the speaker promise?", "What year might this be?", "Name a place mentioned in the text.",
    "What does the speaker say about taxes?", "What is said about trade?", "What is said about peace?",
    "Summarize the text in one sentence.", "What is the last point the speaker makes?",
    "What would you ask the speaker?",
)

log = logger("bench onthefly")

MAX_MODEL_LEN = 8192  # the session's engine context
TURN_TOKENS = 40  # a question and the chat template's turn markers, at most (the QUESTIONS below)


@dataclass
class OnTheFlyConfig(EngineConfig):
    """The settings of `kvcat bench onthefly`, one command-line option each."""

    out: Path = result_file("onthefly")
    ratio: float = option(10.0, help="compaction ratio")
    method: str = option(DEFAULT_METHOD, help="compaction method")
    doc_tokens: int = option(6000, help="document length of the session")
    turns: int = option(8, help="turns of the session")
    threshold: int = option(2048, help="on-the-fly compaction threshold (tokens)")
    answer_tokens: int = option(24, help="answer length per turn (tokens)")
    quality_tokens: int = option(4096, help="prefix length of the quality comparison")
    windows: int = option(4, help="held-out windows of the quality comparison")
    needles: int = option(4, help="needles of the quality comparison")

    def __post_init__(self):
        need = self.doc_tokens + self.turns * (self.answer_tokens + TURN_TOKENS)
        if need > MAX_MODEL_LEN:
            raise ValueError(f"--doc-tokens {self.doc_tokens} and --turns {self.turns} need about {need} positions "
                             f"by the last turn, more than the session's {MAX_MODEL_LEN}")


# --------------------------------------------------------------------------------------------------
# 1. incremental vs from-scratch quality


def quality(config: OnTheFlyConfig) -> list[dict]:
    from kvcat import data
    from kvcat.compaction import get_method
    from kvcat.compaction.incremental import extend
    from kvcat.eval.harness import MAX_NEW_TOKENS, full_prefix_nll
    from kvcat.eval.metrics import retrieved
    from kvcat.inference import CacheSession, continuation_nll
    from kvcat.models import load_model
    from kvcat.prompts import context_and_question

    c = config
    ratio = c.ratio
    lm = load_model(c.model, dtype="float32")
    meth = get_method(c.method, budgets="uniform")  # as the server compacts

    def both(ids: list[int]):
        half = len(ids) // 2
        scratch = meth.compact(lm, ids, ratio=ratio)
        joined = extend(lm, meth.compact(lm, ids[:half], ratio=ratio), ids[half:], meth, ratio=ratio)
        return {"scratch": scratch, "incremental": joined}

    full: list[tuple[float, int]] = []  # (sum NLL, tokens) per window, for metrics.ppl_gap
    nlls: dict[str, list[tuple[float, int]]] = {"scratch": [], "incremental": []}
    for i, w in enumerate(data.token_windows(lm.tokenizer, c.quality_tokens, 256, c.windows, split="heldout")):
        full.append(window_nll(full_prefix_nll(lm, w)))
        for mode, cache in both(list(w.prefix_ids)).items():
            nlls[mode].append(window_nll(continuation_nll(lm, cache, list(w.continuation_ids))))
        log(f"quality window {i + 1}/{c.windows}: gaps "
            f"{({k: round(ppl_gap(v[-1:], full[-1:]), 3) for k, v in nlls.items()})}")
    hits: dict[str, list[float]] = {"scratch": [], "incremental": []}
    examples = data.needle(lm.tokenizer, n=c.needles, length=c.quality_tokens, depths=(0.25, 0.75), split="heldout")
    for ex in examples:
        prompt = context_and_question(lm.tokenizer, ex.document, ex.question)
        for mode, cache in both(prompt.context_ids).items():
            out = CacheSession(lm, cache).generate(prompt.question_ids, max_new_tokens=MAX_NEW_TOKENS["needle"])
            hits[mode].append(retrieved(lm.tokenizer.decode(out, skip_special_tokens=True), ex.answers))
    mean = lambda xs: round(statistics.mean(xs), 4) if xs else None  # noqa: E731
    return [{"mode": mode, "ratio": ratio, "method": c.method, "segments": 1 if mode == "scratch" else 2,
             "prefix_tokens": c.quality_tokens, "ppl_gap": round(ppl_gap(nlls[mode], full), 4) if full else None,
             "needle_acc": mean(hits[mode]), "windows": c.windows, "needles": len(examples)} for mode in nlls]


# --------------------------------------------------------------------------------------------------
# 2. the multi-turn session


def _turn(client, served: str, messages: list[dict], tokens: int, **extra) -> dict:
    start = time.perf_counter()
    first, parts = None, []
    for chunk in client.chat.completions.create(model=served, messages=messages, max_tokens=tokens,
                                                temperature=0.0, stream=True, extra_body=extra or None):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
    return {"ttft_s": first if first is not None else float("nan"), "total_s": time.perf_counter() - start,
            "answer": "".join(parts).strip()}


def session(config: OnTheFlyConfig) -> dict:
    import httpx
    from transformers import AutoTokenizer

    from kvcat import data
    from kvcat.eval.metrics import token_f1
    from kvcat.models import resolve
    from kvcat.server.launch import ServerProcess

    c = config
    model, ratio, method, turns, answer_tokens = c.model, c.ratio, c.method, c.turns, c.answer_tokens
    _, path = resolve(model)
    tok = AutoTokenizer.from_pretrained(path)
    (w,) = data.token_windows(tok, c.doc_tokens, 2, 1, split="heldout", corpora=("sotu",))
    document = " ".join(tok.decode(w.prefix_ids).split())  # one paragraph: "document\n\nquestion" splits once
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(turns)]
    modes = ("full-warm", "full-cold", "onthefly", "compact")
    rows: list[dict] = []
    args = ["--auto-compact-threshold", str(c.threshold), "--auto-compact-ratio", str(ratio),
            "--auto-compact-method", method]
    with ServerProcess(model, dtype=c.engine_dtype()["dtype"], max_model_len=MAX_MODEL_LEN, args=args) as srv:
        client = srv.openai()
        served = client.models.list().data[0].id
        info = client.models.list().data[0].model_extra
        block, per_token = int(info["kv_block_size"]), int(info["kv_bytes_per_token"])
        _turn(client, served, [{"role": "user", "content": "Hello!"}], 4)
        start = time.perf_counter()
        ctx = httpx.post(srv.url("/v1/compact"), timeout=3600,
                         json={"text": document, "ratio": ratio, "method": method}).raise_for_status().json()
        compact_s = time.perf_counter() - start
        log(f"/v1/compact: {ctx['original_tokens']} -> {ctx['compacted_tokens']} slots in {compact_s:.1f} s")
        first = {"role": "user", "content": f"{document}\n\n{questions[0]}"}
        history: list[dict] = []  # the turns after the first message, with the full-context answers
        for k, q in enumerate(questions):
            ask = [{"role": "user", "content": q}] if k else []
            messages = [first, *history, *ask]
            tail = [{"role": "user", "content": questions[0]}, *history, *ask]  # after the /v1/compact context
            results = {
                "full-warm": _turn(client, served, messages, answer_tokens, kv_compaction="off"),
                "full-cold": _turn(client, served, messages, answer_tokens, kv_compaction="off",
                                   cache_salt=uuid.uuid4().hex),
                "onthefly": _turn(client, served, messages, answer_tokens),
                "compact": _turn(client, served, tail, answer_tokens, kv_context=ctx["id"], kv_compaction="off"),
            }
            reference = results["full-warm"]["answer"]
            for mode, r in results.items():
                rows.append({"turn": k + 1, "mode": mode, **{key: round(v, 4) if isinstance(v, float) else v
                                                              for key, v in r.items()},
                             "agrees": r["answer"] == reference,
                             "f1_vs_full": round(token_f1(r["answer"], reference), 4)})
            history += [*ask, {"role": "assistant", "content": reference}]
            log(f"turn {k + 1}/{turns}: TTFT " + ", ".join(f"{m} {results[m]['ttft_s']:.3f}s" for m in modes))
        prompt_tokens = len(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"])
        metrics_text = httpx.get(srv.url("/metrics"), timeout=30).text
        auto = [c for c in httpx.get(srv.url("/v1/contexts"), timeout=30).json()["data"] if c["origin"] == "auto"]
    blocks = lambda n: math.ceil(n / block) * block * per_token  # noqa: E731
    last_auto = max(auto, key=lambda c: c["original_tokens"]) if auto else None
    tail_tokens = prompt_tokens - (last_auto["original_tokens"] if last_auto else 0)
    held = {"full-warm": blocks(prompt_tokens), "full-cold": blocks(prompt_tokens),
            "onthefly": blocks(last_auto["compacted_tokens"]) + blocks(tail_tokens) if last_auto else None,
            "compact": blocks(ctx["compacted_tokens"]) + blocks(prompt_tokens - ctx["original_tokens"])}
    summary = []
    for mode in modes:
        rs = [r for r in rows if r["mode"] == mode]
        later = [r["ttft_s"] for r in rs if r["turn"] >= 2]
        summary.append({"mode": mode, "total_s": round(sum(r["total_s"] for r in rs), 2),
                        "ttft_turn1_s": rs[0]["ttft_s"], "ttft_later_mean_s": round(statistics.mean(later), 4)
                        if later else None, "ttft_later_max_s": round(max(later), 4) if later else None,
                        "kv_bytes_held": held[mode],
                        "agreement_exact": round(statistics.mean(r["agrees"] for r in rs), 3),
                        "agreement_f1": round(statistics.mean(r["f1_vs_full"] for r in rs), 3)})
    cold = next(s for s in summary if s["mode"] == "full-cold")
    warm = {r["turn"]: r["ttft_s"] for r in rows if r["mode"] == "full-warm"}
    for s in summary:
        if s["ttft_later_max_s"] and cold["ttft_later_mean_s"]:
            s["ttft_speedup_vs_full_cold"] = round(cold["ttft_later_mean_s"] / s["ttft_later_mean_s"], 2)
        # the goal per turn: at most the TTFT of vLLM's warm prefix cache on the same turn
        later = [r for r in rows if r["mode"] == s["mode"] and r["turn"] >= 2]
        if later:
            s["turns_at_most_full_warm"] = f"{sum(r['ttft_s'] <= warm[r['turn']] for r in later)}/{len(later)}"
            s["ttft_vs_full_warm_max"] = round(max(r["ttft_s"] / warm[r["turn"]] for r in later), 2)
    outcomes = {}
    for line in metrics_text.splitlines():
        if line.startswith("kvcat_onthefly_requests_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            outcomes[outcome] = outcomes.get(outcome, 0) + float(line.rsplit(" ", 1)[1])
    total = sum(outcomes.values())
    return {"turns": rows, "summary": summary, "onthefly_outcomes": outcomes,
            "onthefly_hit_rate": round((outcomes.get("hit", 0) + outcomes.get("prefix-hit", 0)) / total, 3)
            if total else None, "compact_s": round(compact_s, 2), "document_tokens": ctx["original_tokens"],
            "final_prompt_tokens": prompt_tokens, "kv_block_size": block, "kv_bytes_per_token": per_token}


# --------------------------------------------------------------------------------------------------


def run(config: OnTheFlyConfig) -> dict:
    """A multi-turn session with on-the-fly compaction vs full context, and incremental vs from-scratch."""
    from kvcat.bench import config_record, provenance, publish

    result = {"model": config.model, **provenance(),
              "config": {**config_record(config), "engine_dtype": config.engine_dtype()}}
    # the session first: a server that refuses the configuration fails in a minute, not after the quality part
    result["session"] = session(config)
    result["quality"] = quality(config)
    publish(result, config.out, table, plot, log)
    return result


def table(result: dict) -> str:
    s = result["session"]
    lines = ["| mode | total s | TTFT turn 1 s | mean TTFT turns 2+ s | speed-up vs full cold | turns 2+ at most "
             "full-warm's TTFT (worst ratio) | KV bytes held | agrees with full (exact / F1) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in s["summary"]:
        held = f"{r['kv_bytes_held']:,}" if r["kv_bytes_held"] else "-"
        warm = f"{r['turns_at_most_full_warm']} ({r['ttft_vs_full_warm_max']:.2f}x)" if "ttft_vs_full_warm_max" in r \
            else "-"
        lines.append(f"| {r['mode']} | {r['total_s']:.1f} | {r['ttft_turn1_s']:.3f} | {r['ttft_later_mean_s']:.3f} | "
                     f"{r.get('ttft_speedup_vs_full_cold', 0):.1f}x | {warm} | {held} | "
                     f"{r['agreement_exact']:.2f} / {r['agreement_f1']:.2f} |")
    lines += ["", "| compaction | ratio | PPL gap | needle acc |", "|---|---|---|---|"]
    lines += [f"| {q['mode']} ({q['segments']} segment{'s' if q['segments'] > 1 else ''}) | {q['ratio']:g} | "
              f"{q['ppl_gap']:.3f} | {q['needle_acc']:.2f} |" for q in result["quality"]]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    from kvcat.bench import save_figure, subplots

    _, fig, (ax1, ax2) = subplots(1, 2, figsize=(13, 4.5))
    rows = result["session"]["turns"]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == mode]
        ax1.plot([r["turn"] for r in rs], [r["ttft_s"] for r in rs], marker="o", label=mode)
    ax1.set(yscale="log", xlabel="turn", ylabel="time to first token (s)", title="TTFT per turn")
    ax1.legend(fontsize=8)
    summary = result["session"]["summary"]
    ax2.bar([s["mode"] for s in summary], [s["kv_bytes_held"] or 0 for s in summary], color="tab:blue")
    ax2.set(yscale="log", ylabel="KV bytes held at the last turn", title="KV memory of the session")
    return save_figure(fig, path, f"on-the-fly compaction, {result['model']}, {result['config']['doc_tokens']}"
                       f"-token document, ratio {result['config']['ratio']:g} ({result['machine']})")
