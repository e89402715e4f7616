"""Training in `kvcat bench kvcat`: the variants compared on the tune split, the control, the step time."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvcat.bench_process import logger
from kvcat.training.config import TrainConfig

if TYPE_CHECKING:
    from . import KVCatTrainingConfig

log = logger("bench kvcat")


class SessionEnd(Exception):
    """--stop-after passed: the run stopped at a checkpoint; `--resume` continues it."""


@dataclass(frozen=True)
class Variant:
    """One way to train: the teacher ("base" or "self"; "ntp" for the control), which weights, the peak rate."""

    teacher: str
    params: str
    lr: float

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """"TEACHER/PARAMS@LR", e.g. "base/attention@1e-4"."""
        try:
            head, lr = spec.split("@")
            teacher, params = head.split("/")
            out = cls(teacher.strip(), params.strip(), float(lr))
        except ValueError:
            raise ValueError(f"a variant is TEACHER/PARAMS@LR (e.g. base/attention@1e-4), not {spec!r}") from None
        if out.teacher not in ("base", "self") or out.params not in ("all", "attention") or out.lr <= 0:
            raise ValueError(f"variant {spec!r}: teacher base or self, params all or attention, a positive rate")
        return out

    @property
    def label(self) -> str:
        return f"kvcat-{self.teacher}-{self.params}-{self.lr:g}"

    def control(self) -> "Variant":
        """The NTP control with this variant's optimisation (same data, steps, weights trained and rate)."""
        return Variant("ntp", self.params, self.lr)


def train_config(bc: KVCatTrainingConfig, variant: Variant, **over) -> TrainConfig:
    """The TrainConfig of one variant: data, steps, lengths and batch are shared by every variant and the control."""
    ntp = variant.teacher == "ntp"
    fields = dict(model=bc.model, policy="ntp" if ntp else bc.policy, retention=bc.retention, steps=bc.steps,
                  seq_len=bc.seq_len, batch_size=bc.batch_size, grad_accum=bc.grad_accum, lr=variant.lr,
                  train_params=variant.params, corpora=tuple(bc.corpora), max_docs=bc.docs,
                  planted_frac=bc.planted_frac, warmup_steps=max(1, min(20, bc.steps // 10)),
                  save_every=max(1, bc.steps // 8), teacher="self" if ntp else variant.teacher)
    if ntp:
        fields.update(w_kl=0.0, w_anchor=0.0, w_answer=0.0, w_ntp=1.0)
    return TrainConfig(**(fields | over))


def train(bc: KVCatTrainingConfig, variant: Variant, work: Path, deadline: float | None) -> Path:
    """Train (or resume, or find finished) one variant under work/; SessionEnd when the deadline stops it."""
    from kvcat.training.trainer import Trainer

    out = work / variant.label
    trainer = Trainer(train_config(bc, variant), out, log=log, progress=sys.stderr.isatty())
    if trainer.step < bc.steps:
        log(f"training {variant.label}: {bc.steps} steps x {trainer.global_batch()} x {bc.seq_len} tokens -> {out}")
    trainer.run(deadline=deadline)
    done = trainer.step >= bc.steps
    del trainer
    if not done:
        raise SessionEnd(f"{variant.label} saved at its last checkpoint")
    return out


def training_curves(paths: dict[str, Path]) -> dict[str, list[dict]]:
    from kvcat.training.checkpoint import read_log

    return {label: read_log(path) for label, path in paths.items()}


def step_time_ratio(bc: KVCatTrainingConfig, chosen: Variant) -> dict:
    """Median step time of the chosen variant (its base pass included) over its NTP control's, same batch,
    length and machine, one after the other."""
    from kvcat.training.trainer import Trainer

    times = {}
    for label, variant in (("ntp", chosen.control()), ("kvcat", chosen)):
        trainer = Trainer(train_config(bc, variant, steps=bc.timing_steps + 1), None, log=log, progress=False)
        trainer.train_step()  # warm-up
        times[label] = statistics.median(trainer.train_step()["seconds"] for _ in range(bc.timing_steps))
        del trainer
    return {"variant": chosen.label, "ntp_step_s": round(times["ntp"], 4), "kvcat_step_s": round(times["kvcat"], 4),
            "ratio": round(times["kvcat"] / times["ntp"], 3), "steps_timed": bc.timing_steps,
            "batch": bc.batch_size * bc.grad_accum, "seq_len": bc.seq_len,
            "timed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
