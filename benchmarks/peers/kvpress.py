"""The kvpress side of `kvcat bench peers`: its venv, and its runner (benchmarks/kvpress_runner.py) as a
subprocess in that venv on the token ids kvcat prepared."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from kvcat.bench import BENCHMARKS, REPO, BenchError

PEERS_PYTHON = REPO / ".peers-venv" / "bin" / "python"
RUNNER = BENCHMARKS / "kvpress_runner.py"
VENV_SCRIPT = REPO / "scripts" / "peers_venv.sh"


def make_venv() -> None:
    """Make kvpress's venv .peers-venv/ with scripts/peers_venv.sh (seconds once it is made): kvpress needs a
    transformers older than kvcat's."""
    try:
        proc = subprocess.run(["bash", str(VENV_SCRIPT)], cwd=REPO)
    except OSError as exc:
        raise BenchError(f"could not run {VENV_SCRIPT}: {exc}") from None
    if proc.returncode != 0:
        raise BenchError(f"{VENV_SCRIPT} failed (exit {proc.returncode}): the kvpress venv .peers-venv/ could not "
                         "be made; it needs Python 3.11 and PyPI to install kvpress (see the output above)")


def run_kvpress(job: dict, store: Path) -> dict:
    """The kvpress runner in the peers venv on `job`; returns its result, the job's runs only (raises when it
    cannot run). The runner keeps every run in `store` as it ends and reuses the runs stored there on the
    same data and versions."""
    if not PEERS_PYTHON.is_file():
        raise RuntimeError(f"{PEERS_PYTHON} is missing: make the peers venv first (bash scripts/peers_venv.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        proc = subprocess.run([str(PEERS_PYTHON), str(RUNNER), str(job_file), str(store)], cwd=REPO)
    if proc.returncode != 0 or not store.is_file():
        raise RuntimeError(f"the kvpress runner failed (exit {proc.returncode}); see its output above")
    result = json.loads(store.read_text())
    wanted = {(str(p), float(r)) for p, r in job["runs"]}
    return {**result, "runs": [rec for rec in result["runs"] if (rec["press"], float(rec["ratio"])) in wanted]}

