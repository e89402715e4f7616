"""Moving post-RoPE keys to other positions (vLLM-free; used by the connector and by the tests).

A compacted cache stores keys rotated for positions 0..N-1 of the original context, and new tokens are
expected at N, N+1, ... In vLLM the t slots of a context occupy positions 0..t-1 and new tokens start at t.
RoPE attention only sees relative distances, so rotating every stored key by -(N - t) keeps every
query-key distance exactly as in the reference path. Valid for RoPE variants whose frequencies do not
depend on the position (default, linear, llama3, yarn without dynamic scaling); `inv_freq` refuses the rest.
"""

from __future__ import annotations

import torch

_STATIC_ROPE = {None, "default", "linear", "llama3", "yarn", "longrope"}


def inv_freq(config) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float64, attention scaling) for an HF config (object or dict)."""
    from types import SimpleNamespace

    from transformers import PretrainedConfig

    if isinstance(config, dict):
        from transformers import AutoConfig

        config = AutoConfig.for_model(**config)
    assert isinstance(config, (PretrainedConfig, SimpleNamespace))
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type not in _STATIC_ROPE:
        raise ValueError(f"RoPE type {rope_type!r} depends on the sequence length; compacted keys cannot "
                         "be moved to other positions exactly")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type in (None, "default"):
        theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or getattr(config, "rope_theta",
                                                                                        10000.0)
        freq = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        return freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return freq.double(), float(scale)


def shift_keys(keys: torch.Tensor, delta: int, freq: torch.Tensor) -> torch.Tensor:
    """Rotate post-RoPE keys [..., t, head_dim] (HF/neox half-split layout) by `delta` positions."""
    if delta == 0:
        return keys
    angle = delta * freq  # [head_dim/2], float64 so large deltas stay exact
    cos = torch.cat([angle.cos(), angle.cos()]).to(torch.float32)
    sin = torch.cat([angle.sin(), angle.sin()]).to(torch.float32)
    k = keys.float()
    half = k.shape[-1] // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k * cos + rotated * sin).to(keys.dtype)
