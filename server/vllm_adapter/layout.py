"""The paged KV layouts of the pinned vLLM: writing slots with the engine's own op, reading them back.

In vLLM 0.32 every attention backend hands the KV connector one tensor per layer whose logical shape is
`[num_blocks, num_kv_heads, block_size, 2 * head_dim]`; what differs is what lives inside it:

Both write through the attention layer's own cache-write op, `layer.impl.do_kv_cache_update` (a public method
of vLLM's attention impls: the op, the views and the ISA its backend uses); what differs is the reading:

- `CpuPagedLayout` (CPU_ATTN): each (block, head) region is reinterpreted as a K half-page and a V half-page,
  and `cpu_attn_reshape_and_cache` stores them in an ISA-dependent order (keys transposed for `vec`, bf16
  pairs interleaved for AMX). Rather than hard-coding either, `calibrate` writes known values through the op
  into a scratch block and learns where every (slot, dim) element lands: reading is then one gather.
- `FlashPagedLayout` (FLASH_ATTN, FLASHINFER, TRITON_ATTN on CUDA): each token's row holds `[K | V]`, and the
  physical strides follow whichever `KVCacheLayout` vLLM resolved (NHD, HND, block-outermost...). Indexing
  the logical views is right for all of them, so nothing about strides is hard-coded (the op is
  `reshape_and_cache_flash` or its Triton twin).

Both have `write`, `gather` and `self_test`: the worker runs the self-test when it registers its KV caches
(random K/V written with the engine's op must read back bit for bit) and refuses to start if it fails.
"""

from __future__ import annotations

import torch


class LayoutError(RuntimeError):
    """vLLM's paged KV layout is not what kvcat expects (a vLLM upgrade changed its internals)."""


class _PagedLayout:
    """What both layouts share: the write through the layer's op, the gather of a request's slots through its
    block table, the self-test."""

    block_size: int
    head_dim: int

    @staticmethod
    def write(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, layer) -> None:
        """Write key/value [n, num_kv_heads, head_dim] into slots [n] (block_id * block_size + offset) with the
        attention layer's own cache-write op."""
        layer.impl.do_kv_cache_update(layer, key.to(kv_cache.dtype).contiguous(),
                                      value.to(kv_cache.dtype).contiguous(), kv_cache,
                                      slots.to(device=kv_cache.device, dtype=torch.long))

    def blocks(self, kv_cache: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [num_kv_heads, len(ids), block_size, head_dim] of blocks `ids`."""
        raise NotImplementedError

    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int, start: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [num_kv_heads, num_tokens - start, head_dim] of slots start..num_tokens-1 of a block table."""
        first, nb = start // self.block_size, -(-num_tokens // self.block_size)
        if nb <= first:
            empty = kv_cache.new_empty(kv_cache.shape[1], 0, self.head_dim)
            return empty, empty
        lo, hi = start - first * self.block_size, num_tokens - first * self.block_size
        ids = block_ids[first:nb].to(device=kv_cache.device, dtype=torch.long)
        return tuple(x.reshape(x.shape[0], -1, self.head_dim)[:, lo:hi] for x in self.blocks(kv_cache, ids))

    def self_test(self, num_kv_heads: int, dtype: torch.dtype, layer, like: torch.Tensor | None = None) -> None:
        """Random K/V written with the engine's op at a non-zero start across two blocks of a 3-block scratch
        cache (with `like`'s device and axis order in memory: NHD, HND, ...) must read back bit for bit."""
        device = like.device if like is not None else "cpu"
        bs, d = self.block_size, self.head_dim
        shape = (3, num_kv_heads, bs, 2 * d)
        order = sorted(range(4), key=lambda i: -like.stride(i)) if like is not None else list(range(4))
        cache = torch.zeros([shape[i] for i in order], dtype=dtype, device=device).permute(
            *[order.index(i) for i in range(4)])
        gen = torch.Generator().manual_seed(0)
        n, start = bs + bs // 2, bs // 4
        k = torch.randn(n, num_kv_heads, d, generator=gen).to(dtype).to(device)
        v = torch.randn(n, num_kv_heads, d, generator=gen).to(dtype).to(device)
        table = torch.tensor([2, 0, 1], device=device)
        pos = torch.arange(start, start + n, device=device)
        self.write(cache, k, v, table[pos // bs] * bs + pos % bs, layer)
        gk, gv = self.gather(cache, table, start + n)
        if not (torch.equal(gk[:, start:], k.transpose(0, 1)) and torch.equal(gv[:, start:], v.transpose(0, 1))
                and not gk[:, :start].any()):
            raise LayoutError("kvcat self-test failed: K/V written through the attention layer's do_kv_cache_update "
                              "did not read back; the pinned vLLM's paged layout changed")


class CpuPagedLayout(_PagedLayout):
    """CPU_ATTN: where each (slot, dim) of a block's K and V lives in the raw (block, head) region."""

    def __init__(self, block_size: int, head_dim: int, k_index: torch.Tensor, v_index: torch.Tensor):
        self.block_size, self.head_dim = block_size, head_dim
        self.k_index, self.v_index = k_index, v_index  # [block_size * head_dim] raw offsets

    @classmethod
    def calibrate(cls, layer, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype
                  ) -> "CpuPagedLayout":
        """Learn the layout from `layer`'s op (the op stores it as its ISA wants)."""
        if block_size > 256 or head_dim > 256:
            raise LayoutError(f"block size {block_size} / head dim {head_dim} too large to calibrate")
        scratch = torch.zeros(1, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
        slots = torch.arange(block_size)
        tok = torch.arange(block_size, dtype=torch.float32)[:, None, None].expand(block_size, num_kv_heads,
                                                                                  head_dim)
        dim = torch.arange(head_dim, dtype=torch.float32)[None, None, :].expand_as(tok)
        raw = []
        for pattern in (tok, dim):
            scratch.zero_()
            cls.write(scratch, pattern + 1, pattern + 1, slots, layer)  # +1: tell written from untouched
            raw.append(scratch[0, 0].reshape(-1).float() - 1)
        region = block_size * head_dim
        indices = []
        for half in (slice(0, region), slice(region, 2 * region)):
            t, d = raw[0][half].round().long(), raw[1][half].round().long()
            if (t < 0).any() or (d < 0).any():
                raise LayoutError("cpu_attn_reshape_and_cache left part of a block unwritten")
            flat = t * head_dim + d
            if not torch.equal(torch.sort(flat).values, torch.arange(region)):
                raise LayoutError("the paged block layout is not a permutation of (slot, dim)")
            index = torch.empty(region, dtype=torch.long)
            index[flat] = torch.arange(region) + half.start
            indices.append(index)
        return cls(block_size, head_dim, indices[0], indices[1])

    def blocks(self, kv_cache: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = kv_cache[ids].reshape(len(ids), kv_cache.shape[1], -1)  # [count, H, bs * 2D]
        return tuple(flat[..., index].view(len(ids), -1, self.block_size, self.head_dim).transpose(0, 1)
                     for index in (self.k_index, self.v_index))


class FlashPagedLayout(_PagedLayout):
    """FLASH_ATTN / FLASHINFER / TRITON_ATTN: slot s of a layer is row s % block_size of block s // block_size,
    holding `[K | V]` for every head, under whatever physical strides vLLM chose for the tensor."""

    def __init__(self, block_size: int, head_dim: int):
        self.block_size, self.head_dim = block_size, head_dim

    def views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(key_cache, value_cache) [num_blocks, block_size, num_kv_heads, head_dim]: the backends' own split."""
        return kv_cache.transpose(1, 2).split(self.head_dim, dim=-1)

    def blocks(self, kv_cache: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(cache[ids].permute(2, 0, 1, 3) for cache in self.views(kv_cache))  # [n, bs, H, D] -> [H, n, bs, D]
