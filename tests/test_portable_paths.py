"""Benchmark results are committed: they must name no absolute folder of the machine that wrote them."""

from __future__ import annotations

import json

from kvcat import bench


def test_results_record_checkout_and_kvcat_home_paths_portably(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KVCAT_HOME", str(home / ".cache" / "kvcat"))
    repo = str(bench.REPO)
    result = {"command": f"kvcat bench kvcat --out {repo}/benchmarks/results/k.json --work-dir '{home}/w x'",
              "config": {"out": f"{repo}/benchmarks/results/k.json", "steps": 3, "root": repo},
              "checkpoints": {"am": f"{home}/.cache/kvcat/bench-kvcat/am"},
              "elsewhere": [f"{repo}2/x", f"/mnt{repo}/y", "/tmp/z"]}
    out = bench.write_result(result, tmp_path / "r.json", table=f"| {home}/.cache/kvcat/m |")
    written = json.loads(out.read_text())
    assert written["command"] == "kvcat bench kvcat --out benchmarks/results/k.json --work-dir '~/w x'"
    assert written["config"] == {"out": "benchmarks/results/k.json", "steps": 3, "root": "."}
    assert written["checkpoints"] == {"am": "$KVCAT_HOME/bench-kvcat/am"}
    assert written["elsewhere"] == result["elsewhere"]  # other folders that merely start alike stay as they are
    assert "| $KVCAT_HOME/m |" in out.with_suffix(".md").read_text()
