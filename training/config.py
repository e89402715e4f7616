"""The typed configuration of a KV-CAT training run, and its checks (all made before any compute is spent).

A run is identified by its `run_key()`: every field that changes what the trained weights mean. Two
invocations with the same key on the same output folder are the same run (the second one resumes); a folder
holding a run with another key is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from kvcat.defaults import DEFAULT_MODEL


MIN_CONVERSATION_PREFIX = 192  # a chat template head and up to five facts with some document around them


class TrainConfigError(ValueError):
    """A training option is invalid; the message says which and how to fix it."""


@dataclass
class TrainConfig:
    # ---- what to train
    model: str = DEFAULT_MODEL  # zoo name or a local HF folder
    policy: str = "served"  # train-time KV sparsification: ntp (the control: no KL), rand, attn, am, served, router
    retention: float = 0.125  # fraction of prefix KV slots a continuation query may see, per layer and KV head
    corpora: tuple[str, ...] = ("paul_graham", "sotu", "moby_dick", "kjv")  # TRAIN split only
    max_docs: int | None = None  # use only the first N training documents (after a seeded shuffle)
    planted_frac: float = 0.25  # fraction of sequences that are training conversations (training/facts.py)

    # ---- sequences: each is a prefix (to be compressed) followed by a continuation
    seq_len: int = 1024
    prefix_frac: float = 0.75  # prefix length = round(prefix_frac * seq_len)
    observation_window: int = 32  # ATTN: the last prefix queries that score the prefix (SnapKV-style)
    am_queries: int = 64  # AM: prefix query rows (evenly spread) that score the prefix keys

    # ---- optimisation
    steps: int = 1000
    batch_size: int = 4  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per step per process; global batch = batch * accum * world
    lr: float = 2e-5
    router_lr: float = 1e-3
    train_params: str = "all"  # all, or attention (the q/k/v/o projections only)
    freeze_embeddings: bool = True  # the (tied) token embeddings stay the base's
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_frac: float = 0.1  # cosine decay down to lr * min_lr_frac
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16
    seed: int = 0

    # ---- loss = w_kl * KL(teacher || masked) on the continuation + w_anchor * KL(base || full) on every position
    #             + w_answer * CE(planted answers | masked) + w_ntp * NTP(full) + w_budget * budget
    teacher: str = "base"  # base: the frozen base model's full-cache outputs; self: the trained model's own
    base_dtype: str = "auto"  # the frozen base's dtype: auto = bf16 on CUDA or a CPU with bf16 units, else fp32
    w_kl: float = 1.0
    w_anchor: float = 1.0
    w_answer: float = 1.0
    w_ntp: float = 0.1
    w_budget: float = 10.0
    kl_temperature: float = 1.0

    # ---- router
    router_hidden: int = 32
    router_tau: float = 1.0  # Gumbel-sigmoid temperature
    router_noise: bool = True  # sample keep decisions (Gumbel); False: deterministic threshold at 0.5

    # ---- bookkeeping (not part of the run identity)
    save_every: int = 200
    log_every: int = 1
    max_epochs: float = 50.0  # refuse runs that would cycle the training data more often than this

    _RUN_FIELDS_EXCLUDED = ("steps", "save_every", "log_every", "max_epochs")

    # ----------------------------------------------------------------------------------------------
    @property
    def prefix_len(self) -> int:
        return int(round(self.prefix_frac * self.seq_len))

    @property
    def continuation_len(self) -> int:
        return self.seq_len - self.prefix_len

    @property
    def masked_pass(self) -> bool:
        """Whether a step runs the pass over the policy's slots (the control never does)."""
        return self.w_kl > 0 or self.w_answer > 0

    @property
    def needs_base(self) -> bool:
        """Whether a step runs the frozen base model (the base teacher, or the anchor to the base)."""
        return self.w_anchor > 0 or (self.teacher == "base" and self.w_kl > 0)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["corpora"] = list(self.corpora)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "corpora" in kwargs:
            kwargs["corpora"] = tuple(kwargs["corpora"])
        return cls(**kwargs)

    def run_key(self) -> str:
        """Hash of the fields that define the run (steps may grow on resume; logging may change)."""
        data = {k: v for k, v in self.to_dict().items() if k not in self._RUN_FIELDS_EXCLUDED}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self, max_positions: int | None = None) -> None:
        """Raise TrainConfigError for any option that cannot work (model limits checked when given)."""
        from kvcat.training.policies import POLICIES

        if self.policy not in POLICIES:
            raise TrainConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.policy == "ntp" and (self.w_kl or self.w_answer or self.w_anchor):
            raise TrainConfigError(f"the ntp control trains with NTP alone: set w-kl, w-answer and w-anchor to 0 "
                                   f"(got {self.w_kl}, {self.w_answer}, {self.w_anchor})")
        if self.teacher not in ("base", "self"):
            raise TrainConfigError(f"teacher must be base or self, got {self.teacher!r}")
        if self.base_dtype not in ("auto", "fp32", "bf16"):
            raise TrainConfigError(f"base-dtype must be auto, fp32 or bf16, got {self.base_dtype!r}")
        if self.train_params not in ("all", "attention"):
            raise TrainConfigError(f"train-params must be all or attention, got {self.train_params!r}")
        if not 0.0 <= self.planted_frac < 1.0:
            raise TrainConfigError(f"planted-frac must be in [0, 1), got {self.planted_frac}")
        if self.planted_frac > 0 and self.prefix_len < MIN_CONVERSATION_PREFIX:
            raise TrainConfigError(f"training conversations need a prefix of at least {MIN_CONVERSATION_PREFIX} "
                                   f"tokens (seq-len x prefix-frac = {self.prefix_len}): raise seq-len or set "
                                   "planted-frac 0")
        if not 0.0 < self.retention <= 1.0:
            raise TrainConfigError(f"retention must be in (0, 1], got {self.retention}")
        if self.seq_len < 8:
            raise TrainConfigError(f"seq-len must be at least 8 tokens, got {self.seq_len}")
        if max_positions is not None and self.seq_len > max_positions:
            raise TrainConfigError(f"seq-len {self.seq_len} exceeds the model's {max_positions} positions")
        if not 0.0 < self.prefix_frac < 1.0 or not 1 <= self.prefix_len < self.seq_len:
            raise TrainConfigError(f"prefix-frac must leave a non-empty prefix and continuation, got "
                                   f"{self.prefix_frac} of {self.seq_len} tokens")
        for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every", "observation_window",
                     "am_queries", "router_hidden"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_docs is not None and self.max_docs < 1:
            raise TrainConfigError(f"docs must be at least 1, got {self.max_docs}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise TrainConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if min(self.w_kl, self.w_ntp, self.w_budget, self.w_anchor, self.w_answer) < 0 or \
                self.w_kl + self.w_ntp + self.w_anchor + self.w_answer == 0:
            raise TrainConfigError("loss weights must be non-negative, and one of w-kl, w-ntp, w-anchor, w-answer "
                                   "positive")
        if self.lr <= 0 or self.router_lr <= 0 or self.router_tau <= 0 or self.kl_temperature <= 0:
            raise TrainConfigError("lr, router-lr, router-tau and kl-temperature must be positive")
        if not self.corpora:
            raise TrainConfigError("name at least one training corpus")
