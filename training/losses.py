"""The KV-CAT losses: NTP anchor on the full pass, self-distillation KL on the continuation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ntp_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the full pass: logits [B, L, V] predicting ids [B, L] shifted by one."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distill_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over continuation rows; teacher [B, C, V] without gradient.

    Scaled by temperature^2 so its gradient size does not depend on the temperature."""
    t = F.log_softmax(teacher.detach().flatten(0, 1).float() / temperature, dim=-1)
    s = F.log_softmax(student.flatten(0, 1).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def continuation_bias(slot_bias: list[torch.Tensor], continuation_len: int) -> list[torch.Tensor]:
    """Per-layer slot biases [B, KVH, P] as the attention's row-specific form [B, KVH, C, P] (a view)."""
    return [b[:, :, None, :].expand(b.shape[0], b.shape[1], continuation_len, b.shape[2]) for b in slot_bias]
