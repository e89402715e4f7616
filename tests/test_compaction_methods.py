"""Every registered compaction method on the tiny model; bad input and parameters; memoized document state; the
CLI."""

import dataclasses
import typing

import pytest
import torch

from kvcat.cache import CacheError, CompactCache
from kvcat.compaction import queries
from kvcat.compaction import METHODS, CompactionError, get_method, method_names
from kvcat.inference import CacheSession, ContextTooLongError, continuation_nll

TEXT = ("The lighthouse keeper counted ships every night. On the ninth night a red ship arrived, "
        "and the keeper wrote its name, Aurora, in the logbook before sunrise. The harbour master, a woman "
        "called Ines Varga, kept a second list of every cargo: salt, timber, copper and wool. ") * 10

FAST = {"optimize": {"steps": 3}, "am-omp": {"max_queries": 256}}


def _ids(lm, n):
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) >= n
    return ids[:n]


@pytest.mark.parametrize("name", method_names())
@pytest.mark.parametrize("budget", [dict(ratio=4), dict(target_tokens=9)])
def test_every_method_returns_a_valid_cache(tiny, name, budget):
    ids = _ids(tiny, 120)
    cache = get_method(name, **FAST.get(name, {})).compact(tiny, ids, **budget)
    assert isinstance(cache, CompactCache)
    cache.validate()
    t = budget.get("target_tokens") or round(120 / budget["ratio"])
    counts = cache.head_counts()
    assert counts.shape == (tiny.spec.num_layers, tiny.spec.num_kv_heads)
    assert counts.min() >= 1 and cache.num_slots < 120
    assert abs(counts.float().mean().item() - t) <= 1.0, counts  # the requested mean budget per head
    assert cache.num_tokens == 120 and cache.method == name
    assert cache.model_fingerprint == tiny.spec.fingerprint
    assert cache.info["compact_s"] >= cache.info["solve_s"] >= 0
    logits = CacheSession(tiny, cache).forward(_ids(tiny, 130)[120:])
    assert torch.isfinite(logits).all()


def test_registry_lists_the_issue_methods():
    want = {"am-hak", "am-omp", "am-omp-fast", "recent", "streaming-llm", "random", "snapkv", "h2o", "kvzip",
            "key-norm", "optimize"}
    assert want <= set(method_names()) and all(METHODS[n].name == n for n in METHODS)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=0.5), "above 1"), (dict(ratio=1), "above 1"), (dict(ratio=float("nan")), "above 1"),
    (dict(target_tokens=120), "does not compact"), (dict(target_tokens=500), "does not compact"),
    (dict(target_tokens=0), "positive"), (dict(), "exactly one"), (dict(ratio=4, target_tokens=3), "exactly one"),
])
def test_bad_budgets_are_refused(tiny, kwargs, match):
    with pytest.raises(CompactionError, match=match):
        get_method("am-hak").compact(tiny, _ids(tiny, 120), **kwargs)


def test_bad_documents_and_names_are_refused(tiny):
    with pytest.raises(CompactionError, match="empty"):
        get_method("am-hak").compact(tiny, [], ratio=4)
    with pytest.raises(ContextTooLongError):
        get_method("am-hak").compact(tiny, [5] * (tiny.spec.max_positions + 1), ratio=4)
    with pytest.raises(CompactionError, match="token ids must lie"):
        get_method("am-hak").compact(tiny, [5, 10 ** 9], ratio=4)
    with pytest.raises(CompactionError, match="unknown compaction method"):
        get_method("am-nope")
    with pytest.raises(CompactionError, match="no parameter"):
        get_method("am-hak", colour="red")


@pytest.mark.parametrize("params, match", [
    (dict(colour="red"), "no parameter.*colour"), (dict(max_queries=0), "'max_queries' .* >= 1"),
    (dict(score="median"), "'score' of 'am-hak' is one of rms, mean, max"), (dict(fit_beta=1), "'fit_beta'"),
    (dict(beta_bounds=[1.0]), "'beta_bounds'"), (dict(ridge=float("nan")), "'ridge'"), (dict(queries=3), "'queries'"),
    (dict(whole_share=1.0), "'whole_share' .* below 1"), (dict(whole_share=-0.5), "'whole_share'"),
    (dict(whole_share=0.5, budgets="global"), "spreads its slots"), (dict(whole_ratio=0.5), "'whole_ratio'"),
])
def test_bad_parameters_are_refused_naming_the_field(params, match):
    with pytest.raises(CompactionError, match=match):
        get_method("am-hak", **params)


def test_methods_are_dataclasses_with_typed_parameters():
    method = get_method("am-hak", max_queries=512, beta_bounds=[-2, 2])  # what JSON gives: lists, ints
    assert method.max_queries == 512 and method.params["beta_bounds"] == [-2, 2]
    for name, cls in METHODS.items():
        assert "__dataclass_fields__" in vars(cls), name  # each method its own dataclass: fields = parameters
        assert list(get_method(name).params) == [f.name for f in dataclasses.fields(cls) if f.init]
    assert set(typing.get_args(queries.QueryMode)) == set(queries.QUERY_MODES)


def test_document_state_is_shared_across_methods_and_ratios(tiny, monkeypatch):
    queries.clear_memo()
    ids = _ids(tiny, 100)
    get_method("am-hak").compact(tiny, ids, ratio=4)
    calls = []
    real = queries.prefill
    monkeypatch.setattr(queries, "prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    get_method("am-hak").compact(tiny, ids, ratio=8)  # same document, same queries: no new prefill
    get_method("snapkv").compact(tiny, ids, ratio=8)
    assert calls == []
    get_method("am-hak", queries="self-study").compact(tiny, ids, ratio=8)  # new query mode: new passes only
    assert calls == []


def test_context_query_sample_only_for_the_methods_that_read_it(tiny):
    """SnapKV keeps the context's last queries only; H2O asks for a sample of all of them, which
    prefills the document again but keeps the reference queries already computed."""
    queries.clear_memo()
    ids = torch.tensor(_ids(tiny, 300))
    get_method("snapkv").compact(tiny, ids, ratio=4)
    state = queries.document_state(tiny, ids)
    assert not state.context_sample and state.prefill.queries[0].shape[1] == queries.LAST_QUERIES
    repeat = queries.get_queries(tiny, state, "repeat")
    get_method("h2o").compact(tiny, ids, ratio=4)
    sampled = queries.document_state(tiny, ids)
    assert sampled.context_sample and sampled.prefill.queries[0].shape[1] == 300
    assert sampled.queries["repeat"] is repeat
    assert queries.document_state(tiny, ids, context_sample=True) is sampled  # a superset serves both
    assert queries.document_state(tiny, ids) is sampled


def test_cache_round_trip_refuses_another_model(tiny, tmp_path):
    cache = get_method("am-hak").compact(tiny, _ids(tiny, 100), ratio=4)
    path = cache.save(tmp_path / "doc.kvc")
    back = CompactCache.load(path, expect_fingerprint=tiny.spec.fingerprint)
    assert torch.equal(back.beta[0], cache.beta[0].cpu())
    with pytest.raises(CacheError, match="made for model"):
        CompactCache.load(path, expect_fingerprint="0" * 16)


def test_cli_compact_and_bad_input(tiny, tmp_path):
    from typer.testing import CliRunner

    from kvcat import cli

    cli._register_packages()
    runner = CliRunner()
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT[:600])
    out = tmp_path / "doc.kvc"
    res = runner.invoke(cli.app, ["compact", str(doc), "--model", "tiny-random", "--ratio", "4",
                                  "--method", "am-hak", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "N = " in res.output and "KV bytes" in res.output and out.is_file()
    CompactCache.load(out, expect_fingerprint=tiny.spec.fingerprint)
    for args, msg in [(["--ratio", "0.5"], "above 1"), (["--method", "nope"], "unknown compaction method"),
                      (["--param", "max_queries=0"], "'max_queries'")]:
        bad = tmp_path / "bad.kvc"
        res = runner.invoke(cli.app, ["compact", str(doc), "--model", "tiny-random", "--out", str(bad),
                                      "--device", "cpu", *args])
        assert res.exit_code == 2 and msg in res.output and not bad.exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    res = runner.invoke(cli.app, ["compact", str(empty), "--model", "tiny-random", "--out", str(tmp_path / "e.kvc")])
    assert res.exit_code == 2 and "empty" in res.output and not (tmp_path / "e.kvc").exists()


# ---- trained attention: SmolLM2-135M, about 1k-token texts ---------------------------------------------------

LONG = None


def _long_ids(lm, n):
    from kvcat import data

    for doc in data.documents("heldout", ["paul_graham"], min_chars=n * 6):
        ids = lm.tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return ids[:n]
    pytest.skip("no held-out essay long enough")


def test_two_questions_over_one_compacted_cache(smollm2):
    ids = _long_ids(smollm2, 600)
    cache = get_method("am-hak", budgets="uniform").compact(smollm2, ids, ratio=4)
    tok = smollm2.tokenizer
    a = CacheSession(smollm2, cache).generate(tok("\nQuestion: What is this text about?\nAnswer:")["input_ids"],
                                              max_new_tokens=6)
    b = CacheSession(smollm2, cache).generate(tok("\nIn one word, the author is")["input_ids"], max_new_tokens=6)
    assert a and b and a != b
    assert cache.num_tokens == 600  # the cache itself is untouched by both sessions


def test_am_beats_random_eviction_at_ratio_4(smollm2):
    ids = _long_ids(smollm2, 1100)
    prefix, cont = ids[:960], ids[960:]
    nll = {}
    for name, params in [("am-hak", {"budgets": "uniform"}), ("random", {})]:
        cache = get_method(name, **params).compact(smollm2, prefix, ratio=4)
        nll[name] = continuation_nll(smollm2, cache, cont).mean().item()
    assert nll["am-hak"] < nll["random"], nll


def test_whole_retrieval_heads_sit_beside_the_paged_slots_at_the_asked_bytes(small):
    """whole_share=0.5 at 4x: floor(0.5 x 18 heads / 4) = 2 retrieval heads (the head profile's best) keep every
    token, t paged and the rest as side slots; the others get fewer slots, so the bytes held are N / 4 per head."""
    from kvcat.compaction import heads
    from kvcat.inference import prefill

    ids = _ids(small, 200)
    cache = get_method("am-hak-fast", whole_share=0.5).compact(small, ids, ratio=4)
    whole = heads.top_heads(small, 2)
    assert cache.is_hybrid and (cache.head_counts() == 200).equal(whole)
    assert cache.served_ratio == pytest.approx(4, rel=0.03) and cache.num_slots < 50
    pre = prefill(small, ids)
    for layer, head in whole.nonzero().tolist():  # a whole head holds the prefill's own keys and values, beta 0
        k, v, b = cache.layer_view(layer)
        assert torch.allclose(k[head], pre.keys[layer][head]) and torch.allclose(v[head], pre.values[layer][head])
        assert (b[head] == 0).all()
    with pytest.raises(ValueError, match="19 retrieval heads .* 18 KV heads"):
        heads.top_heads(small, 19)
    # whole_ratio=2: floor(0.5 x 18 x 2 / 4) = 4 heads of N / 2 slots, compacted by the method themselves
    halves = get_method("am-hak-fast", whole_share=0.5, whole_ratio=2).compact(small, ids, ratio=4)
    assert (halves.head_counts() == 100).equal(heads.top_heads(small, 4))
    assert halves.served_ratio == pytest.approx(4, rel=0.03)


def test_duoattentions_kind_of_cache_is_streaming_llm_with_whole_heads(small):
    ids = _ids(small, 200)
    cache = get_method("streaming-llm", whole_share=0.5).compact(small, ids, ratio=4)
    assert cache.is_hybrid and cache.served_ratio == pytest.approx(4, rel=0.03)
    with pytest.raises(CompactionError, match="spreads its slots"):
        get_method("kvzip", whole_share=0.5)
