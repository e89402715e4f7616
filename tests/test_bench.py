"""The benchmarks' shared plumbing: the checkpoint (an interrupted run resumes only with the same settings and
the same code), peak memory, `kvcat bench`'s commands, and each benchmark's summary and table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvcat.bench import Checkpoint, ResumeError, code_changed_since
from kvcat.bench_process import PeakRSS

REPO = Path(__file__).resolve().parents[1]


def _git(repo, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "start")
    return tmp_path


def test_code_changed_since_ignores_results_and_markdown(repo):
    head = _git(repo, "rev-parse", "--short", "HEAD")
    assert not code_changed_since(head, repo)
    (repo / "benchmarks" / "results" / "x.json").write_text("{}")
    (repo / "NOTES.md").write_text("prose")
    assert not code_changed_since(head, repo)
    (repo / "code.py").write_text("x = 2\n")
    assert code_changed_since(head, repo)
    assert not code_changed_since(head, repo, ("benchmarks",))  # only the code that makes a benchmark's records
    assert code_changed_since(None, repo) and code_changed_since("0" * 40, repo)


def test_checkpoint_resumes_same_settings_and_code_only(repo):
    out = repo / "benchmarks" / "results" / "b.json"
    logs: list[str] = []
    first = Checkpoint(out, {"docs": 2}, log=logs.append, repo=repo)
    first.data["git_commit"] = _git(repo, "rev-parse", "--short", "HEAD")  # as if started on this repo's HEAD
    first.add("docs", {"gap": 0.5})
    partial = repo / "benchmarks" / "results" / "b.partial.json"
    assert json.loads(partial.read_text())["docs"] == [{"gap": 0.5}]

    again = Checkpoint(out, {"docs": 2}, resume=True, log=logs.append, repo=repo)
    assert again["docs"] == [{"gap": 0.5}] and again["questions"] == []
    assert again.provenance()["git_commit"] == first.data["git_commit"]
    with pytest.raises(ResumeError, match="other settings.*docs"):
        Checkpoint(out, {"docs": 3}, resume=True, repo=repo)
    (repo / "code.py").write_text("x = 2\n")
    with pytest.raises(ResumeError, match="code .* differs"):
        Checkpoint(out, {"docs": 2}, resume=True, repo=repo)
    assert json.loads(partial.read_text())["docs"] == [{"gap": 0.5}]  # a refused resume keeps the records

    fresh = Checkpoint(out, {"docs": 2}, log=logs.append, repo=repo)  # without resume: starts over
    assert fresh["docs"] == [] and any("starting over" in m for m in logs)
    fresh.finish()
    assert not partial.exists()


def test_peak_rss_sees_a_short_lived_allocation():
    """A 200 MB buffer touched and freed at once (well under the 5 ms sampling interval on most machines)
    still counts in the peak, and the peak is per block: a second, empty block does not inherit it."""
    with PeakRSS() as mem:
        buf = bytearray(200 * 2**20)  # zero-filled: every page touched
        del buf
    assert mem.peak - PeakRSS.rss() > 150
    with PeakRSS() as quiet:
        pass
    assert quiet.peak < mem.peak - 150


def test_peers_runner_gets_peak_rss_and_the_log_without_kvcat():
    """benchmarks/kvpress_runner.py runs in a venv without kvcat and loads kvcat/bench_process.py by path for
    its PeakRSS and log: that file must import nothing but the standard library (-S: no site-packages)."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('b', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "p = m.PeakRSS(); p.__enter__(); p.__exit__(None, None, None); m.logger('kvpress runner')('hi'); "
            "print(p.peak > 0)")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(REPO / "kvcat" / "bench_process.py")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
    assert out.stderr.startswith("[kvpress runner ") and out.stderr.endswith("] hi\n")


def test_kvcat_bench_is_registered_by_the_benchmarks_with_their_configs_options():
    """`kvcat bench` lists every benchmark (kvcat.bench_cli), each with one option per field of its config,
    which extends the shared BenchConfig; the packages the benchmarks measure know nothing of them."""
    import dataclasses

    import typer
    import typer.main

    from kvcat.bench import BenchConfig, load_script
    from kvcat.bench_cli import BENCHMARKS, register

    bench = typer.Typer()
    register(bench)
    commands = typer.main.get_command(bench).commands
    assert list(commands) == ["readme", "compaction", "retrieval", "peers", "serve", "onthefly", "load", "kvcat"]
    for name, benchmark in BENCHMARKS.items():
        config = getattr(load_script(benchmark.script), benchmark.config)
        assert issubclass(config, BenchConfig)
        fields = [f.name for f in dataclasses.fields(config)]
        assert fields[:2] == ["model", "out"] and config().out == Path(f"benchmarks/results/{name}.json")
        assert [p.name for p in commands[name].params] == fields + [p.name for p in benchmark.options]
    for package in ("compaction", "server", "training"):
        for path in (REPO / package).rglob("*.py"):
            assert "kvcat.bench" not in path.read_text(), path


def test_peers_kvpress_runs_are_reused_on_the_same_data_only(tmp_path):
    """kvpress's stored runs outlive a change to kvcat's methods: reused while the data (token ids, model) and
    versions are the same, whatever the list of runs; a failed run is run again, an unfinished one continued;
    other data replaces them."""
    from kvcat.bench import load_source

    runner = load_source(Path(__file__).resolve().parents[1] / "benchmarks" / "kvpress_runner.py", "kvpress_runner")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"hidden_size": 8}')
    job = {"model": str(tmp_path / "m"), "windows": [{"context": [1, 2], "continuation": [3]}], "documents": [],
           "runs": [["none", 1.0], ["snapkv", 8.0]], "max_new_tokens": 4, "stop_ids": [2]}
    versions = {"kvpress": "0.5.5"}
    ok = {"press": "snapkv", "ratio": 8.0, "error": None}
    not_here = {"press": "kvzap", "ratio": 8.0, "error": "not run: needs a hub download"}
    failed = {"press": "tova", "ratio": 8.0, "error": "RuntimeError: out of memory"}
    store = tmp_path / "peers.kvpress.json"

    def stored(job_, old: dict) -> list[dict]:
        store.write_text(json.dumps(old))
        new = {"versions": versions, "data_sha": runner.data_sha(job_)}
        return runner.stored_runs(store, new, "sha-of-this-job-text")

    same = {"versions": versions, "data_sha": runner.data_sha(job), "runs": [ok, not_here, failed]}
    assert stored({**job, "runs": [["tova", 16.0]]}, same) == [ok, not_here]  # another list of runs: reused
    assert stored(job, {**same, "versions": {"kvpress": "0.6"}}) == []
    assert stored({**job, "windows": [{"context": [1, 5], "continuation": [3]}]}, same) == []
    assert stored({**job, "model": str(tmp_path / "elsewhere" / "m")}, same) == []  # config differs (none there)
    unfinished = {"press": "tova", "ratio": 16.0, "error": None, "partial": True, "kept_per_head": [9.0]}
    assert stored(job, {**same, "runs": [ok, unfinished]}) == [ok, unfinished]  # continued, not run again
    legacy = {"versions": versions, "job_sha": "sha-of-this-job-text", "runs": [ok]}  # the older format
    assert stored(job, legacy) == [ok] and stored(job, {**legacy, "job_sha": "other"}) == []


def test_peers_runner_matches_kvcats_budget_in_kvpress_terms():
    """kvpress removes a fraction (compression_ratio) and keeps int(N x (1 - cr)) entries, ChunkKV int(chunks x
    (1 - cr)) whole chunks: both are set so that kvcat's round(N / r) entries are kept (ChunkKV's within half a
    chunk); ratio 1 is no compression."""
    from kvcat.bench import load_source

    runner = load_source(REPO / "benchmarks" / "kvpress_runner.py", "kvpress_runner")
    for n, r in ((793, 8.0), (2048, 16.0), (4096, 32.0), (1000, 3.0)):
        t = round(n / r)
        assert int(n * (1 - runner.compression_ratio_for(n, r))) == t
        chunks = -(-n // runner.CHUNK)
        kept = int(chunks * (1 - runner.compression_ratio_for(n, r, "chunkkv-snapkv"))) * runner.CHUNK
        assert abs(kept - t) <= runner.CHUNK / 2
    assert runner.compression_ratio_for(793, 1.0) == 0.0


def test_peers_summary_scores_both_systems_per_document_and_reports_served_ratios():
    """kvcat's records (one per case, a document compressed once for its questions) and kvpress's runs (answers in
    the same order) scored alike: accuracy per kind, seconds per document, the served ratio of a press with
    uneven heads (its widest head) beside its mean ratio, AM paired against each press, and the fairness check."""
    from kvcat.bench import load_script

    peers = load_script("peers")
    nll = [10.0, 5]  # (sum, count): PPL e^2
    windows = [{"reference": nll, "full": nll, "prefill_s": 1.0, "prefill_rss": 100.0,
                "rows": {"am-hak-fast|8": {"nll": [11.0, 5], "compact_s": 2.0, "rss": 120.0, "served_ratio": 8.0}}}]

    def case(i, doc, kind, full, am, compact_s):
        return {"id": f"c{i}", "document": doc, "kind": kind, "full": full, "full_answer": "7", "prefill_s": 1.0,
                "prefill_rss": 90.0, "rows": {"am-hak-fast|8": {"correct": am, "compact_s": compact_s, "rss": 110.0,
                                                                "served_ratio": 8.0}}}

    # document d0 (1,600 tokens) holds two facts asked one at a time, d1 (800 tokens) one
    cases = [case(0, "d0", "facts", 1.0, 1.0, 4.0), case(1, "d0", "facts", 1.0, 0.0, 4.0),
             case(2, "d1", "needle", 1.0, 1.0, 1.0)]
    gold = [["7"], ["blue"], ["42"]]

    def run(press, ratio, texts, kept, widest):
        return {"press": press, "ratio": ratio, "windows": [{"nll_sum": 10.0, "count": 5}],
                "prompts": [{"ids": [], "text": t} for t in texts], "compress_s": [1.0, 2.0, 3.0],
                "kept_per_head": kept, "widest_head": widest, "peak_rss_mb": 50.0, "error": None}

    contexts = [1024, 1600, 800]  # the window, then each document
    runs = [run("none", 1.0, ["7", "Blue.", "42"], contexts, contexts),
            run("kvzip", 8.0, ["7", "blue", "no"], [128, 200, 100], [512, 800, 400]),
            run("snapkv", 8.0, ["no", "no", "42"], [128, 200, 100], [128, 200, 100])]
    got = peers.summarize(windows, cases, runs, ["am-hak-fast"], [8.0], load_script("retrieval").sign_test, gold,
                          contexts)
    row = {(r["system"], r["method"], r["ratio"]): r for r in got["rows"]}
    am = row[("kvcat", "am-hak-fast", 8.0)]
    kvzip, snap = row[("kvpress", "kvzip", 8.0)], row[("kvpress", "snapkv", 8.0)]
    assert row[("kvpress", "full", 1.0)]["retrieval_acc"] == 1.0  # case, white space and punctuation folded
    assert am["retrieval_acc"] == pytest.approx(2 / 3, abs=1e-4) and am["acc_facts"] == 0.5 and am["acc_needle"] == 1
    assert am["compress_s"] == pytest.approx((2.0 + 4.0 + 1.0) / 3, abs=1e-4)  # the window, d0 once, d1 once
    assert kvzip["mean_ratio"] == pytest.approx(8.0) and kvzip["served_ratio"] == pytest.approx(2.0)
    assert snap["served_ratio"] == snap["mean_ratio"] == pytest.approx(8.0)
    pairs = {p["other"]: (p["only_am"], p["only_other"]) for p in got["paired"]}
    assert pairs == {"kvzip": (1, 1), "snapkv": (1, 0)}
    assert got["fairness"]["ok"] and got["fairness"]["full_cache_answers_equal"] == "1/3"
    text = peers.table(got)
    assert "**Served ratio**" in text and "| kvpress | kvzip | 2.0 (8.0) |" in text
    assert "| kvpress | snapkv | 8.0 |" in text and "| kvcat | am-hak-fast | 8.0 |" in text


def test_retrieval_summary_pairs_methods_on_the_same_cases(tmp_path):
    """The retrieval benchmark's accuracy, share of the full document's, paired counts and sign test; the
    table and README markers are filled from its Markdown."""
    from kvcat.bench import load_script, update_readme

    retrieval = load_script("retrieval")
    assert retrieval.sign_test(0, 0) == 1.0 and retrieval.sign_test(6, 0) == pytest.approx(2 / 64)
    cases = []
    for i in range(6):
        rows = {"am-hak|8": {"correct": float(i < 5), "answer": "", "compact_s": 2.0, "vs_prefill": 1.2,
                             "served_ratio": 8.0},
                "snapkv|8": {"correct": float(i == 5), "answer": "", "compact_s": 1.0, "vs_prefill": 1.0}}
        cases.append({"kind": ("needle", "passage")[i % 2], "full": True, "none": False, "prefill_s": 1.0,
                      "rows": rows})
    rows = retrieval.aggregate(cases, ["am-hak", "snapkv"], [8.0])
    am = next(r for r in rows if r["method"] == "am-hak")
    assert am["accuracy"] == pytest.approx(5 / 6, abs=1e-4) and am["of_full"] == pytest.approx(5 / 6, abs=1e-4)
    assert am["acc_needle"] == 1.0 and am["acc_passage"] == pytest.approx(2 / 3, abs=1e-4)
    (pair,) = retrieval.paired(cases, ["am-hak", "snapkv"], [8.0])
    assert (pair["only_am"], pair["only_other"]) == (5, 1) and 0 < pair["p_sign"] < 1
    text = retrieval.table({"rows": rows, "paired": [pair], "config": {"split": "heldout"}, "cases": cases})
    assert "| am-hak | 0.83 (0.83) |" in text and "5 / 1" in text and "6 heldout cases" in text
    assert "| passage | 1.00 | 0.00 | 0.67 | 0.33 |" in text  # per kind: full, none, am-hak, snapkv
    assert text.count("| 1.20 | 8.0 |") == 1 and "| 1.00 | - |" in text  # speed; served ratio where known
    (tmp_path / "retrieval.md").write_text("<!-- written by test -->\n" + text)
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- table:retrieval -->\nold\n<!-- /table:retrieval -->\nafter\n")
    assert update_readme(readme, tmp_path) == ["retrieval"]
    assert "*Written by test.*" in readme.read_text() and "old" not in readme.read_text()
    readme.write_text("<!-- table:retrieval headline -->\nold\n<!-- /table:retrieval -->\n")
    assert update_readme(readme, tmp_path) == ["retrieval"]
    headline = readme.read_text()
    assert "| am-hak | 0.83 (0.83) |" in headline and "Per kind" not in headline and "Paired" not in headline
    assert update_readme(readme, tmp_path) == ["retrieval"] and readme.read_text() == headline  # idempotent


def test_serve_summary_puts_the_compaction_seconds_against_the_servers_cold_prefill():
    """`kvcat bench serve`'s rows: means over documents, KV bytes in whole blocks, and /v1/compact's seconds
    over the kvcat server's own cold prefill on the compacted-cold row (in the JSON and under the table)."""
    from kvcat.bench import load_script

    serve = load_script("serve")

    def s(ttft, tok_s=20.0):
        return {"ttft_s": ttft, "decode_tok_s": tok_s}

    samples = {("kvcat", "full-cold", 1.0): [s(4.0), s(6.0)], ("kvcat", "full-warm", 1.0): [s(0.2), s(0.2)],
               ("kvcat", "no-context", 1.0): [s(0.04), s(0.04)],
               ("kvcat", "compacted-cold", 10.0): [s(0.05), s(0.05)],
               ("kvcat", "compacted-warm", 10.0): [s(0.05), s(0.05)],
               ("kvcat", "plain-same-length", 10.0): [s(0.05, 25.0), s(0.05, 25.0)]}
    slots = {("full-cold", 1.0): [1000, 1000], ("full-warm", 1.0): [1000, 1000], ("no-context", 1.0): [0],
             ("compacted-cold", 10.0): [100, 100], ("compacted-warm", 10.0): [100, 100],
             ("plain-same-length", 10.0): [100, 100]}
    side = {("compacted-cold", 10.0): [0, 0], ("compacted-warm", 10.0): [50, 70]}  # a hybrid's side-slot bytes
    rows = serve.summarise(samples, slots, side, {10.0: [30.0, 40.0]}, block=16, per_token=10, budget=160_000)
    cold = next(r for r in rows if r["mode"] == "compacted-cold")
    assert cold["compaction_s"] == 35.0 and cold["compaction_s_all"] == [30.0, 40.0]
    assert cold["compaction_vs_full_cold"] == 7.0  # 35 s over the 5 s mean cold prefill
    assert cold["kv_bytes"] == 112 * 10 and rows[0]["kv_bytes"] == 1008 * 10  # whole 16-token blocks
    assert next(r for r in rows if r["mode"] == "compacted-warm")["kv_bytes"] == 112 * 10 + 60  # + side slots
    assert cold["decode_vs_plain"] == 0.8 and cold["ttft_vs_no_context"] == 1.25
    assert not any("compaction_s" in r for r in rows if r["mode"] != "compacted-cold")
    text = serve.table({"rows": rows})
    assert "10x 35.0 s (7.0x the cold prefill)" in text


def test_kvcat_bench_chooses_a_variant_and_reads_the_goals_against_the_control_and_the_base(tmp_path):
    """`kvcat bench kvcat`'s report: the tune-split choice picks among the variants only; the goals are read at
    8x against the control (retrieval ratio, gap ratio) and the base (retrieval, uncompressed PPL, full-document
    cases), with exact McNemar counts and a paired interval on the gap; bad settings are refused before any
    training."""
    from kvcat.bench import load_script

    kb = load_script("kvcat_training")

    def row(ck, split, method, ratio, gap, hits, ppl=30.0):
        return {"checkpoint": ck, "policy": "x", "split": split, "method": method, "ratio": ratio,
                "ppl_gap": gap, "ppl_gaps": [gap - 0.5, gap + 0.5, gap], "retrieval_acc": sum(hits) / len(hits),
                "hits": hits, "base_ppl": ppl, "base_ppls": [ppl - 1, ppl + 1, ppl]}

    tune = [row("kvcat-base-all-2e-05", "tune", "am-hak-fast", 8, 2.0, [1, 0]),
            row("kvcat-self-all-2e-05", "tune", "am-hak-fast", 8, 1.0, [1, 0]),
            row("kvcat-ntp-all-2e-05", "tune", "am-hak-fast", 8, 0.1, [1, 1])]
    variants = ["kvcat-base-all-2e-05", "kvcat-self-all-2e-05"]
    assert kb.choose(tune, variants, "am-hak-fast", 8) == "kvcat-self-all-2e-05"  # same retrieval, smaller gap
    with pytest.raises(ValueError, match="no KV-CAT variant"):
        kb.choose(tune[2:], variants, "am-hak-fast", 8)

    me, ctl = "kvcat-self-all-2e-05", "kvcat-ntp-all-2e-05"
    held = [row(ctl, "heldout", "full", 1, 0.0, [1, 1, 1, 1], ppl=30.0),
            row(ctl, "heldout", "am-hak-fast", 8, 3.0, [1, 0, 0, 0]),
            row(me, "heldout", "full", 1, 0.0, [1, 1, 1, 0], ppl=30.3),
            row(me, "heldout", "am-hak-fast", 8, 1.8, [1, 1, 0, 0]),
            row("base", "heldout", "full", 1, 0.0, [1, 1, 1, 1], ppl=30.0),
            row("base", "heldout", "am-hak-fast", 8, 2.5, [0, 1, 0, 0])]
    step = {"ntp_step_s": 10.0, "kvcat_step_s": 16.0, "ratio": 1.6, "batch": 4, "seq_len": 1024}
    s = kb.summarise(tune + held, me, ctl, "am-hak-fast", [8], step)
    at8, goals = s["ratios"]["8"], s["goals"]
    assert at8["vs_control"] == {"only_a": 1, "only_b": 0, "p": 1.0} and at8["vs_base"]["only_a"] == 1
    assert at8["gap_difference_ci"]["mean"] == pytest.approx(-1.2)
    assert goals["retrieval_vs_control"] == {"value": 2.0, "met": True}
    assert goals["retrieval_vs_base"]["met"] and goals["gap_vs_control"] == {"value": 0.6, "met": True}
    assert goals["uncompressed_ppl_vs_base_pct"] == {"value": 1.0, "met": True}
    assert goals["full_retrieval_vs_base_cases"] == {"value": -1, "met": True}
    assert goals["step_time_ratio"] == {"value": 1.6, "met": False}
    text = kb.table({"rows": tune + held, "summary": s, "step_time": step, "config": {"eval_corpus": "jane_austen"}})
    assert f"| {me} | 30.300 / 0.75 | 1.800 / 0.50 |" in text
    assert "| 8x | 1 / 0 (p 1.00) | 1 / 0 (p 1.00) | -1.200 [" in text
    assert text.count("| met |") == 5 and text.count("| not met |") == 1

    for bad, message in ((dict(variants=("base/lora@1e-4",)), "params all or attention"),
                         (dict(eval_corpus="kjv"), "is a training corpus"),
                         (dict(retention=1.5), "retention must be in")):
        with pytest.raises(ValueError, match=message):
            kb.run(kb.KVCatTrainingConfig(**bad, work_dir=tmp_path / "w", out=tmp_path / "k.json"))
    assert not (tmp_path / "w").exists() and not (tmp_path / "k.json").exists()


def test_a_benchmark_that_cannot_start_ends_in_one_line(tmp_path, monkeypatch):
    """Bad settings and a peers venv that cannot be made end `kvcat bench` in a one-line error, before any work."""
    import typer
    from typer.testing import CliRunner

    from kvcat.bench import BenchError, load_script
    from kvcat.bench_cli import register

    bench = typer.Typer()
    register(bench)
    res = CliRunner().invoke(bench, ["kvcat", "--variants", "base/all", "--work-dir", str(tmp_path / "w"),
                                     "--out", str(tmp_path / "k.json")])
    assert res.exit_code == 2 and "TEACHER/PARAMS@LR" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "w").exists()

    fails = tmp_path / "peers_venv.sh"
    fails.write_text("exit 3\n")
    kvpress = load_script("peers").kvpress
    monkeypatch.setattr(kvpress, "VENV_SCRIPT", fails)
    with pytest.raises(BenchError, match="exit 3"):
        kvpress.make_venv()
