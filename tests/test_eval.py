"""The evaluation harness: identity compression costs nothing, no context is worse on every metric,
reports serialize and plot, and bad input fails clearly."""

from __future__ import annotations

import json
import math

import pytest

from kvcat import data
from kvcat.eval import harness, metrics
from kvcat.eval.compressors import EvalError, NamedCompressor, resolve, resolve_all
from kvcat.eval.runner import EvalSettings, expand_tasks, run_eval
from kvcat.inference import ContextTooLongError

FULL, NONE = resolve("full"), resolve("none")


def test_metrics():
    assert metrics.exact_match("The Eiffel Tower.\nmore", ["eiffel tower"]) == 1.0
    assert metrics.f1("in Paris France", ["Paris"]) == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))
    assert metrics.contains("It was built in 1889 by Eiffel", ["1889"]) == 1.0
    assert metrics.contains("It was built in 18890", ["1889"]) == 0.0
    assert metrics.retrieved("The number is 4829113.", ["4829113"]) == 1.0
    assert metrics.recalled("The number is 4829113.", ["4829113"]) == 1.0
    assert metrics.recalled("it is 2556991b-0000", ["2556991b-e5f7"]) == pytest.approx(9 / 13)
    # the PPL gap is the mean of per-window gaps, not pooled over tokens (pooled: 4.04 here)
    assert metrics.ppl_gap([(math.log(2), 1), (2 * math.log(8), 2)], [(0.0, 1), (0.0, 2)]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="same windows"):
        metrics.ppl_gap([(1.0, 1)], [])


def test_eval_and_the_compaction_benchmark_report_the_same_ppl_gap(tiny):
    """`kvcat eval` (the harness) and `kvcat bench compaction` (its aggregate) both report metrics.ppl_gap: on
    the same windows, the mean of each window's compacted-minus-full-prefix perplexity."""
    from kvcat.bench import load_script
    from kvcat.inference import continuation_nll

    windows = data.token_windows(tiny.tokenizer, 64, 16, n=3, split="heldout")
    recent = resolve("recent", 4.0)
    (res,) = harness.ppl_gap(tiny, [recent], windows, progress=False)
    full = [metrics.window_nll(harness.full_prefix_nll(tiny, w)) for w in windows]
    comp = [metrics.window_nll(continuation_nll(tiny, recent.fn(tiny, list(w.prefix_ids)), list(w.continuation_ids)))
            for w in windows]
    by_hand = sum(math.exp(c / n) - math.exp(f / m) for (c, n), (f, m) in zip(comp, full)) / len(windows)
    assert metrics.ppl_gap(comp, full) == pytest.approx(by_hand)
    assert res.gap == pytest.approx(by_hand, rel=1e-5)
    assert res.gap == pytest.approx(res.compressed_ppl - res.full_ppl)
    docs = [{"full_nll": f, "prefill_s": 1.0, "rows": {"recent|4": {"nll": c, "compact_s": 1.0, "vs_prefill": 1.0,
                                                                  "rss": 0.0, "extra": 0.0}}}
            for f, c in zip(full, comp)]
    rows = load_script("compaction").aggregate(docs, [], ["recent"], [4.0], 256)
    assert rows[1]["method"] == "recent" and rows[1]["ppl_gap"] == pytest.approx(res.gap, abs=1e-4)
    assert rows[0]["ppl"] == pytest.approx(res.full_ppl, abs=1e-4)


def test_identity_compression_has_zero_gap(small):
    windows = data.token_windows(small.tokenizer, 300, 48, n=2, split="heldout")
    (res_full,) = harness.ppl_gap(small, [FULL], windows, progress=False)
    assert res_full.gap == pytest.approx(0.0, abs=1e-3 * res_full.full_ppl)
    assert res_full.compressed_ppl == pytest.approx(res_full.full_ppl, rel=1e-4)
    assert res_full.achieved_ratio == pytest.approx(1.0)


@pytest.fixture(scope="module")
def smol_results(smollm2):
    """Full vs no context on every task, on short held-out examples where SmolLM2-135M is reliable."""
    tok = smollm2.tokenizer
    out = {}
    windows = data.token_windows(tok, 512, 64, n=2, split="heldout")
    out["ppl"] = harness.ppl_gap(smollm2, [FULL, NONE], windows, progress=False)
    out["needle"] = harness.retrieval(smollm2, [FULL, NONE], data.needle(tok, n=2, length=600, depths=(0.3, 0.7)),
                                      progress=False)
    out["kv"] = harness.retrieval(smollm2, [FULL, NONE], data.kv_retrieval(2, num_pairs=6), progress=False)
    out["squad"] = harness.qa(smollm2, [FULL, NONE], data.squad(n=3, seed=0), progress=False)
    return out


def test_no_context_is_worse_than_full_on_every_metric(smol_results):
    full, none = smol_results["ppl"]
    assert full.gap == pytest.approx(0.0, abs=1e-3 * full.full_ppl)
    assert none.compressed_ppl > full.compressed_ppl and none.no_context_ppl > none.full_ppl
    assert none.gap > 0
    f, z = smol_results["needle"]
    assert f.accuracy > z.accuracy and f.recall > z.recall, (f.examples, z.examples)
    # SmolLM2-135M cannot copy a whole UUID value (exact hits are 0 either way) but reproduces part of it
    f, z = smol_results["kv"]
    assert f.accuracy >= z.accuracy and f.recall > z.recall, (f.examples, z.examples)
    # It answers in sentences, so exact match stays at 0 with or without the context; F1 and containment do not
    f, z = smol_results["squad"]
    assert f.exact_match >= z.exact_match
    for metric in ("f1", "contains"):
        assert getattr(f, metric) > getattr(z, metric), (metric, f.examples, z.examples)


def test_report_json_and_plot(smollm2, smol_results, tmp_path):
    from kvcat.eval.runner import EvalReport

    report = EvalReport(model="smollm2-135m", fingerprint=smollm2.spec.fingerprint, methods=["full", "none"],
                        settings=EvalSettings(tasks=["ppl", "needle", "kv", "squad"]),
                        results=[r for rs in smol_results.values() for r in rs])
    path = report.save_json(tmp_path / "r.json")
    loaded = json.loads(path.read_text())
    assert {r["task"] for r in loaded["results"]} == {"ppl", "needle", "kv", "squad"}
    assert all(r["examples"] for r in loaded["results"])
    png = report.plot(tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report.summary_rows()) == len(report.results)


def test_run_eval_end_to_end(tiny):
    settings = EvalSettings(tasks=["ppl", "base_ppl", "kv"], n=1, prefix_tokens=64, continuation_tokens=16,
                            kv_pairs=2, base_ppl_tokens=64, max_new_tokens=2)
    report = run_eval(tiny, [FULL, NONE], settings, progress=False)
    kinds = [(r.task, r.method) for r in report.results]
    assert kinds == [("ppl", "full"), ("ppl", "none"), ("base_ppl", "uncompressed"), ("kv", "full"), ("kv", "none")]
    assert report.results[2].ppl > 1


def test_custom_compressor_is_used(tiny):
    calls = []

    def spy(lm, ids):
        calls.append(len(ids))
        return FULL.fn(lm, ids)

    windows = data.token_windows(tiny.tokenizer, 40, 8, n=1)
    (res,) = harness.ppl_gap(tiny, [NamedCompressor("spy", 2.0, spy)], windows, progress=False)
    assert calls == [40] and res.method == "spy@2x" and res.gap == pytest.approx(0, abs=1e-3 * res.full_ppl)


def test_document_longer_than_the_model_is_refused(tiny):
    long = data.Example(id="x", task="squad", document="word " * 9000, question="Why?", answers=("a",),
                        split="heldout")
    with pytest.raises(ContextTooLongError, match=r"has \d+ tokens but the model's context holds 8192"):
        harness.qa(tiny, [FULL], [long], progress=False)
    window = data.TokenWindow("x", 0, tuple([1] * 8190), tuple([1] * 10))
    with pytest.raises(ContextTooLongError, match="8200 tokens but the model's context holds 8192"):
        harness.ppl_gap(tiny, [FULL], [window], progress=False)


def test_bad_methods_and_tasks():
    with pytest.raises(EvalError, match="needs a compression ratio"):
        resolve("am-hak")
    with pytest.raises(EvalError, match="greater than 1"):
        resolve("am-hak", 0.5)
    with pytest.raises(EvalError, match="unknown task"):
        expand_tasks(["nope"])
    assert expand_tasks(["retrieval", "ppl"]) == ["needle", "kv", "ppl"]
    assert [c.label for c in resolve_all(["full"], None)] == ["full", "none"]
    try:
        resolve("no-such-method", 8)
    except EvalError as exc:  # either the registry's list of methods or "compaction unavailable"
        assert "no-such-method" in str(exc) or "unavailable" in str(exc)
    else:
        pytest.fail("an unknown method must be refused")
