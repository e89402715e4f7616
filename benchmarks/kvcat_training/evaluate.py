"""Steps 2 and 4 of `kvcat bench kvcat`: every checkpoint evaluated on one split, the best KV-CAT checkpoint
chosen on the tune split, and the chosen one served."""

from __future__ import annotations

import time
from pathlib import Path

from kvcat.bench import mean_or_none
from kvcat.bench_process import logger
from kvcat.eval.metrics import mean_ppl, ppl_gap, window_nll

REGISTRY = {"truncation": "recent"}  # the benchmark's method names that the registry spells otherwise
MAX_NEW_TOKENS = 48  # as benchmarks/retrieval.py: a passage answer comes after the echoed question

log = logger("bench kvcat")


def evaluate(label: str, path, policy: str, split: str, windows, cases, cells: list[tuple[str, int]]) -> list[dict]:
    """One checkpoint on one split: the full-cache row, then one row per (method, ratio) in `cells`, each with
    its per-window PPL gaps and per-case retrieval hits."""
    from kvcat.compaction import get_method
    from kvcat.compaction.queries import clear_memo
    from kvcat.eval.harness import full_prefix_nll
    from kvcat.eval.metrics import retrieved
    from kvcat.inference import CacheSession, continuation_nll, full_cache, prefill
    from kvcat.models import load_model
    from kvcat.prompts import context_and_question

    lm = load_model(path, dtype="float32")
    tok = lm.tokenizer
    t0 = time.perf_counter()
    full = [window_nll(full_prefix_nll(lm, w)) for w in windows]  # the reference of every gap, as `kvcat eval`'s
    prompts = [context_and_question(tok, ex.document, ex.question) for ex in cases]

    def hit(cache, prompt, ex) -> float:
        out = CacheSession(lm, cache).generate(prompt.question_ids, max_new_tokens=MAX_NEW_TOKENS)
        return retrieved(tok.decode(out, skip_special_tokens=True), ex.answers)

    methods = {m: get_method(REGISTRY.get(m, m)) for m in dict.fromkeys(m for m, _ in cells)}
    nll: dict = {c: [] for c in cells}
    hits: dict = {c: [] for c in cells}
    full_hits = []
    # Context-major: every (method, ratio) of one context in a row, so the memoized prefill and reference
    # queries of that context (kvcat.compaction.queries) serve them all.
    for w in windows:
        clear_memo()
        for m, r in cells:
            nll[(m, r)].append(window_nll(continuation_nll(lm, methods[m].compact(lm, list(w.prefix_ids), ratio=r),
                                                           list(w.continuation_ids))))
    for prompt, ex in zip(prompts, cases):
        clear_memo()
        full_hits.append(hit(full_cache(prefill(lm, prompt.context_ids), lm.spec.fingerprint), prompt, ex))
        for m, r in cells:
            hits[(m, r)].append(hit(methods[m].compact(lm, prompt.context_ids, ratio=r), prompt, ex))
    clear_memo()
    base = {"checkpoint": label, "policy": policy, "split": split, "base_ppl": round(mean_ppl(full), 4),
            "base_ppls": [round(mean_ppl([f]), 4) for f in full]}
    rows = [{**base, "method": "full", "ratio": 1, "ppl_gap": 0.0, "ppl_gaps": [0.0] * len(full),
             "retrieval_acc": mean_or_none(full_hits), "hits": full_hits}]
    for m, r in cells:
        gaps = [round(ppl_gap([c], [f]), 4) for c, f in zip(nll[(m, r)], full)]
        rows.append({**base, "method": m, "ratio": r, "ppl_gap": round(ppl_gap(nll[(m, r)], full), 4),
                     "ppl_gaps": gaps, "retrieval_acc": mean_or_none(hits[(m, r)]), "hits": hits[(m, r)]})
    log(f"{label} ({split}): {len(cells)} method x ratio over {len(windows)} windows and {len(cases)} cases "
        f"({time.perf_counter() - t0:.0f} s); " + ", ".join(
            f"{r['method']} {r['ratio']}x gap {r['ppl_gap']:.3f} acc {r['retrieval_acc']}" for r in rows[1:]))
    return rows


def choose(tune_rows: list[dict], method: str, ratio: int) -> str:
    """The KV-CAT checkpoint (never the base or the control) with the best tune-split retrieval at `ratio`
    under `method`, ties broken by the smaller PPL gap."""
    cands = [r for r in tune_rows if r["method"] == method and r["ratio"] == ratio
             and r["policy"] not in ("none", "ntp")]
    if not cands:
        raise ValueError("no KV-CAT checkpoint to choose from: train at least one policy besides ntp")
    best = max(cands, key=lambda r: (r["retrieval_acc"] or 0.0, -r["ppl_gap"]))
    return best["checkpoint"]


def served_check(path: Path, doc: str, question: str) -> dict:
    """`kvcat serve` on the checkpoint folder as it is: /v1/compact a document, then one chat over it."""
    import httpx

    from kvcat.server.launch import ServerProcess

    with ServerProcess(str(path), dtype="float32", kv_cache_gib=2) as srv:
        r = httpx.post(srv.base + "/v1/compact", json={"text": doc, "ratio": 4}, timeout=600)
        r.raise_for_status()
        ctx = r.json()
        client = srv.openai(timeout=600)
        model = client.models.list().data[0].id
        resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                              max_tokens=24, temperature=0, extra_body={"kv_context": ctx["id"]})
        return {"served": True, "model_id": model, "compacted_tokens": ctx["compacted_tokens"],
                "answer": resp.choices[0].message.content}

