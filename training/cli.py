"""`kvcat train`: KV-CAT continued pretraining."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from kvcat.training.config import TrainConfig

_DEFAULTS = TrainConfig()


def register(app) -> None:
    app.command("train")(train_command)


def train_command(
    model: str = typer.Option(_DEFAULTS.model, help="zoo name or local HF folder"),
    policy: str = typer.Option(_DEFAULTS.policy, help="train-time KV sparsification: ntp (the control, with "
                                                             "--w-kl 0 --w-anchor 0 --w-answer 0), rand, attn, am, "
                                                             "served (what the served default keeps), router"),
    retention: float = typer.Option(_DEFAULTS.retention, help="fraction of prefix KV slots kept, in (0, 1]"),
    steps: int = typer.Option(_DEFAULTS.steps, help="optimisation steps (a larger value extends a finished run)"),
    seq_len: int = typer.Option(_DEFAULTS.seq_len, help="tokens per training sequence (prefix + continuation)"),
    out: Path = typer.Option(..., help="output folder: an HF model folder plus resume state"),
    prefix_frac: float = typer.Option(_DEFAULTS.prefix_frac, help="fraction of each sequence that is prefix"),
    batch_size: int = typer.Option(_DEFAULTS.batch_size, help="sequences per micro-batch per process"),
    grad_accum: int = typer.Option(_DEFAULTS.grad_accum, help="micro-batches per step per process"),
    lr: float = typer.Option(_DEFAULTS.lr, help="peak learning rate of the model"),
    router_lr: float = typer.Option(_DEFAULTS.router_lr, help="peak learning rate of the router"),
    warmup_steps: int = typer.Option(_DEFAULTS.warmup_steps),
    teacher: str = typer.Option(_DEFAULTS.teacher, help="base: the frozen base model's full-cache outputs are the "
                                                        "masked pass's target; self: the trained model's own"),
    w_kl: float = typer.Option(_DEFAULTS.w_kl, help="weight of the KL from the teacher to the masked pass"),
    w_anchor: float = typer.Option(_DEFAULTS.w_anchor, help="weight of the KL from the base to the full pass, "
                                                            "every position"),
    w_answer: float = typer.Option(_DEFAULTS.w_answer, help="weight of the planted answers' cross-entropy under "
                                                            "the masked pass"),
    w_ntp: float = typer.Option(_DEFAULTS.w_ntp, help="weight of NTP on the full pass"),
    train_params: str = typer.Option(_DEFAULTS.train_params, help="all, or attention (q/k/v/o projections only)"),
    freeze_embeddings: bool = typer.Option(_DEFAULTS.freeze_embeddings, help="keep the token embeddings the base's"),
    w_budget: float = typer.Option(_DEFAULTS.w_budget, help="weight of the router's budget loss"),
    corpora: str = typer.Option(",".join(_DEFAULTS.corpora), help="comma-separated corpora (TRAIN split)"),
    docs: Optional[int] = typer.Option(_DEFAULTS.max_docs, help="use only this many training documents (seeded "
                                                                "sample)"),
    planted_frac: float = typer.Option(_DEFAULTS.planted_frac, help="fraction of sequences with a planted fact "
                                                                     "asked about in the continuation"),
    save_every: int = typer.Option(_DEFAULTS.save_every, help="checkpoint every N steps (and at the end)"),
    seed: int = typer.Option(_DEFAULTS.seed),
    precision: str = typer.Option(_DEFAULTS.precision, help="auto (bf16 autocast on CUDA), fp32, bf16"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: KVCAT_DEVICE, else CUDA if any)"),
    progress: bool = typer.Option(True, help="show the progress bar"),
) -> None:
    """Continue-pretrain a model so its KV cache compresses well (KV-CAT). Re-running the same command on the
    same --out resumes after an interruption. Under `torchrun --nproc-per-node N -m kvcat.cli train ...`
    it trains data-parallel (gloo on CPU, NCCL on GPU)."""
    from kvcat.console import fail
    from kvcat.data.records import DataError
    from kvcat.models import ModelError
    from kvcat.training.checkpoint import OutputFolderError
    from kvcat.training.config import TrainConfigError
    from kvcat.training.data import DataTooSmallError
    from kvcat.training.trainer import Trainer

    cfg = TrainConfig(model=model, policy=policy, retention=retention, steps=steps, seq_len=seq_len,
                      prefix_frac=prefix_frac, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                      router_lr=router_lr, warmup_steps=warmup_steps, teacher=teacher, w_kl=w_kl, w_anchor=w_anchor,
                      w_answer=w_answer, w_ntp=w_ntp, w_budget=w_budget, train_params=train_params,
                      freeze_embeddings=freeze_embeddings,
                      corpora=tuple(c.strip() for c in corpora.split(",") if c.strip()), max_docs=docs,
                      planted_frac=planted_frac,
                      save_every=save_every, seed=seed, precision=precision)
    try:
        trainer = Trainer(cfg, out, device=device, log=typer.echo, progress=progress)
    except (TrainConfigError, OutputFolderError, DataTooSmallError, ModelError, DataError) as exc:
        fail(str(exc))
    summary = trainer.run()
    if trainer.d.main:
        typer.echo(json.dumps(summary))
    if trainer.d.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
