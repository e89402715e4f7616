"""The KV-CAT losses. Every loss reads only the positions a sequence scores (`Batch.scored`: padding never)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_rows(scored: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the logits rows that predict a scored token (row j predicts token j+1; the last row, whose
    next token is not in the sequence, counts where its own token is scored)."""
    return torch.cat([scored[:, 1:], scored[:, -1:]], dim=1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def ntp_loss(logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the full pass over its scored targets: logits [B, L, V], ids/scored [B, L]."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return _masked_mean(ce, scored[:, 1:].flatten())


def distill_kl(teacher: torch.Tensor, student: torch.Tensor, rows: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """Mean KL(teacher || student) per row over `rows` [B, N] (teacher [B, N, V] without gradient). Scaled by
    temperature^2 so its gradient size does not depend on the temperature."""
    t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return _masked_mean(kl, rows) * temperature**2


def answer_loss(masked: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Cross-entropy of the planted answers under the masked pass (logits [B, C, V] of positions prefix_len..L-1):
    the answer has to come from the slots the policy kept. Zero for a batch without answers."""
    targets, where = ids[:, prefix_len + 1:], answer[:, prefix_len + 1:]
    if not bool(where.any()):
        return masked.sum() * 0.0
    ce = F.cross_entropy(masked[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return _masked_mean(ce, where.flatten())


def continuation_bias(slot_bias: list[torch.Tensor], continuation_len: int) -> list[torch.Tensor]:
    """Per-layer slot biases [B, KVH, P] as the attention's row-specific form [B, KVH, C, P] (a view)."""
    return [b[:, :, None, :].expand(b.shape[0], b.shape[1], continuation_len, b.shape[2]) for b in slot_bias]
