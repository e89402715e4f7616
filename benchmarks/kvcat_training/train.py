"""Steps 1 and 3 of `kvcat bench kvcat`: one checkpoint per policy, trained alike; the step time against NTP."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kvcat.bench_process import logger
from kvcat.training.config import TrainConfig

if TYPE_CHECKING:
    from . import KVCatTrainingConfig

log = logger("bench kvcat")


def train_config(bc: KVCatTrainingConfig, policy: str, **over):
    """The TrainConfig of one policy: everything but the policy (and the control's KL weight 0) is shared."""
    fields = dict(model=bc.model, policy=policy, retention=bc.retention, steps=bc.steps, seq_len=bc.seq_len,
                  batch_size=bc.batch_size, grad_accum=bc.grad_accum, lr=bc.lr, corpora=tuple(bc.corpora),
                  max_docs=bc.docs, planted_frac=bc.planted_frac, warmup_steps=max(1, min(20, bc.steps // 10)),
                  save_every=max(1, bc.steps // 8), w_kl=0.0 if policy == "ntp" else TrainConfig.w_kl)
    return TrainConfig(**(fields | over))


def train_all(bc: KVCatTrainingConfig, work: Path) -> dict[str, Path]:
    from kvcat.training.trainer import Trainer

    paths = {}
    for policy in bc.policies:
        out = work / policy
        trainer = Trainer(train_config(bc, policy), out, log=log, progress=sys.stderr.isatty())
        if trainer.step < bc.steps:
            log(f"training {policy}: {bc.steps} steps x {trainer.global_batch()} x {bc.seq_len} tokens -> {out}")
        trainer.run()
        paths[policy] = out
        del trainer
    return paths


def training_curves(paths: dict[str, Path]) -> dict[str, list[dict]]:
    from kvcat.training.checkpoint import read_log

    return {p: read_log(path) for p, path in paths.items()}


def step_time_ratio(bc: KVCatTrainingConfig, policy: str) -> dict:
    """Median step time of KV-CAT (`policy`) over the NTP control, same batch, length and machine."""
    from kvcat.training.trainer import Trainer

    times = {}
    for label, pol in (("ntp", "ntp"), ("kvcat", policy)):
        trainer = Trainer(train_config(bc, pol, steps=bc.timing_steps + 1), None, log=log, progress=False)
        trainer.train_step()  # warm-up
        times[label] = statistics.median(trainer.train_step()["seconds"] for _ in range(bc.timing_steps))
        del trainer
    return {"policy": policy, "ntp_step_s": round(times["ntp"], 4), "kvcat_step_s": round(times["kvcat"], 4),
            "ratio": round(times["kvcat"] / times["ntp"], 3), "steps_timed": bc.timing_steps,
            "batch": bc.batch_size * bc.grad_accum, "seq_len": bc.seq_len}

