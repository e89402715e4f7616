"""`kvcat train` as a real process: kill -9 and resume, and torchrun data parallel on CPU (gloo)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from kvcat.training.checkpoint import read_log
from kvcat.training.config import TrainConfig
from kvcat.training.trainer import Trainer

TINY = dict(model="tiny-random", seq_len=48, prefix_frac=0.75, warmup_steps=1, corpora=("paul_graham",),
            max_docs=4, seed=0, planted_frac=0.0)
ENV = {**os.environ, "KVCAT_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def cli_args(cfg: TrainConfig, out) -> list[str]:
    return ["train", "--model", cfg.model, "--policy", cfg.policy, "--retention", str(cfg.retention),
            "--seq-len", str(cfg.seq_len), "--prefix-frac", str(cfg.prefix_frac), "--steps", str(cfg.steps),
            "--batch-size", str(cfg.batch_size), "--grad-accum", str(cfg.grad_accum),
            "--warmup-steps", str(cfg.warmup_steps), "--corpora", ",".join(cfg.corpora),
            "--docs", str(cfg.max_docs), "--save-every", str(cfg.save_every), "--seed", str(cfg.seed),
            "--planted-frac", str(cfg.planted_frac),
            "--no-progress", "--out", str(out)]


def reference_losses(cfg: TrainConfig, out=None) -> dict[int, float]:
    trainer = Trainer(cfg, out, device="cpu", progress=False)
    trainer.run()
    return {row["step"]: row["loss"] for row in trainer.history}


def test_kill_9_mid_run_then_resume_gives_the_same_loss_curve(tmp_path):
    cfg = TrainConfig(**TINY, policy="router", retention=0.5, steps=12, batch_size=2, save_every=4)
    expected = reference_losses(cfg)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kvcat.cli", *cli_args(cfg, out)]

    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while True:  # kill once a checkpoint exists (step 4) and the run is past it
        logged = [r["step"] for r in read_log(out)]
        if logged and max(logged) >= 6:
            break
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in read_log(out))
    assert killed_at < cfg.steps

    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stdout + res.stderr
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(1, cfg.steps + 1))  # each step logged exactly once
    for row in rows:
        assert row["loss"] == pytest.approx(expected[row["step"]], rel=1e-4, abs=1e-5), row["step"]


def test_torchrun_two_processes_match_one_process(tmp_path):
    """2 processes x batch 1 (gloo) against 1 process x 2 accumulated micro-batches: same global batch."""
    one = TrainConfig(**TINY, policy="am", retention=0.5, steps=3, batch_size=1, grad_accum=2, save_every=10)
    expected = reference_losses(one, tmp_path / "one")

    two = TrainConfig(**{**TINY, "policy": "am", "retention": 0.5, "steps": 3, "batch_size": 1, "grad_accum": 1,
                         "save_every": 10})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "kvcat.cli", *cli_args(two, tmp_path / "two")]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    rows = read_log(tmp_path / "two")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["loss"] == pytest.approx(expected[row["step"]], rel=1e-4), row["step"]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
