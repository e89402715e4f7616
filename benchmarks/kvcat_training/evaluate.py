"""Evaluation in `kvcat bench kvcat`: one checkpoint on one split (PPL windows and the retrieval suite, at full
cache and after each post-hoc method at each ratio), the choice on the tune split, and the chosen one served."""

from __future__ import annotations

import time
from pathlib import Path

from kvcat.bench import mean_or_none
from kvcat.bench_process import logger
from kvcat.eval.metrics import mean_ppl, ppl_gap, window_nll

REGISTRY = {"truncation": "recent"}  # the benchmark's method names that the registry spells otherwise
MAX_NEW_TOKENS = 48  # as benchmarks/retrieval.py: small models echo the question before the answer

log = logger("bench kvcat")


def evaluate(label: str, path, policy: str, split: str, windows, cases, cells: list[tuple[str, int]],
             progress: bool = False) -> list[dict]:
    """One checkpoint on one split: the full-cache row, then one row per (method, ratio) in `cells`, each with
    its per-window PPL gaps and per-case hits (in `cases` order, scored as the suite scores: `answered`).
    Documents with several questions are compacted once per cell."""
    from tqdm import tqdm

    from kvcat.compaction import get_method
    from kvcat.compaction.queries import clear_memo
    from kvcat.data.suite import by_document, suite_kind
    from kvcat.eval.harness import full_prefix_nll
    from kvcat.eval.metrics import answered
    from kvcat.inference import CacheSession, continuation_nll, full_cache, prefill
    from kvcat.models import load_model
    from kvcat.prompts import context_and_question

    lm = load_model(path, dtype="float32")
    tok = lm.tokenizer
    t0 = time.perf_counter()
    methods = {m: get_method(REGISTRY.get(m, m)) for m in dict.fromkeys(m for m, _ in cells)}
    full = [window_nll(full_prefix_nll(lm, w)) for w in windows]  # the reference of every gap, as `kvcat eval`'s
    nll: dict = {c: [] for c in cells}
    # Context-major: every cell of one context in a row, so its memoized prefill and queries serve them all.
    for w in tqdm(windows, desc=f"{label} {split} windows", disable=not progress, leave=False):
        clear_memo()
        for m, r in cells:
            cache = methods[m].compact(lm, list(w.prefix_ids), ratio=r)
            nll[(m, r)].append(window_nll(continuation_nll(lm, cache, list(w.continuation_ids))))
    hits: dict = {c: {} for c in [("full", 1), *cells]}
    for group in tqdm(list(by_document(cases).values()), desc=f"{label} {split} documents", disable=not progress,
                      leave=False):
        clear_memo()
        prompts = [context_and_question(tok, ex.document, ex.question) for ex in group]
        context = prompts[0].context_ids
        caches = {("full", 1): full_cache(prefill(lm, context), lm.spec.fingerprint)}
        caches.update({(m, r): methods[m].compact(lm, context, ratio=r) for m, r in cells})
        for cell, cache in caches.items():
            for ex, prompt in zip(group, prompts):
                out = CacheSession(lm, cache).generate(prompt.question_ids, max_new_tokens=MAX_NEW_TOKENS)
                hits[cell][ex.id] = answered(tok.decode(out, skip_special_tokens=True), ex.answers)
    clear_memo()
    kinds = [suite_kind(ex) for ex in cases]
    base = {"checkpoint": label, "policy": policy, "split": split, "base_ppl": round(mean_ppl(full), 4),
            "base_ppls": [round(mean_ppl([f]), 4) for f in full]}

    def retrieval(cell) -> dict:
        got = [int(hits[cell][ex.id]) for ex in cases]
        per_kind = {k: mean_or_none([h for h, kk in zip(got, kinds) if kk == k]) for k in dict.fromkeys(kinds)}
        return {"retrieval_acc": mean_or_none(got), "hits": got, "kinds": per_kind}

    rows = [{**base, "method": "full", "ratio": 1, "ppl_gap": 0.0, "ppl_gaps": [0.0] * len(full),
             **retrieval(("full", 1))}]
    for m, r in cells:
        gaps = [round(ppl_gap([c], [f]), 4) for c, f in zip(nll[(m, r)], full)]
        rows.append({**base, "method": m, "ratio": r, "ppl_gap": round(ppl_gap(nll[(m, r)], full), 4),
                     "ppl_gaps": gaps, **retrieval((m, r))})
    log(f"{label} ({split}): {len(cells)} method x ratio over {len(windows)} windows and {len(cases)} cases "
        f"({time.perf_counter() - t0:.0f} s); full acc {rows[0]['retrieval_acc']}, " + ", ".join(
            f"{r['method']} {r['ratio']}x gap {r['ppl_gap']:.3f} acc {r['retrieval_acc']}" for r in rows[1:]))
    return rows


def choose(tune_rows: list[dict], labels: list[str], method: str, ratio: int) -> str:
    """The variant (of `labels`) with the best tune-split retrieval at `ratio` under `method`, ties broken by
    the smaller PPL gap."""
    cands = [r for r in tune_rows if r["checkpoint"] in labels and r["method"] == method and r["ratio"] == ratio]
    if not cands:
        raise ValueError("no KV-CAT variant to choose from: name at least one with --variants")
    return max(cands, key=lambda r: (r["retrieval_acc"] or 0.0, -r["ppl_gap"]))["checkpoint"]


def served_check(path: Path, doc: str, question: str) -> dict:
    """`kvcat serve` on the checkpoint folder as it is: /v1/compact a document, then one chat over it."""
    import httpx

    from kvcat.server.launch import ServerProcess

    with ServerProcess(str(path), dtype="float32", kv_cache_gib=2) as srv:
        r = httpx.post(srv.base + "/v1/compact", json={"text": doc, "ratio": 8}, timeout=600)
        r.raise_for_status()
        ctx = r.json()
        client = srv.openai(timeout=600)
        model = client.models.list().data[0].id
        resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                              max_tokens=24, temperature=0, extra_body={"kv_context": ctx["id"]})
        return {"served": True, "model_id": model, "compacted_tokens": ctx["compacted_tokens"],
                "answer": resp.choices[0].message.content}
