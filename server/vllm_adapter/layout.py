"""The CPU paged KV layout of the pinned vLLM: writing slots with the engine's own op, reading them back.

Each layer's KV tensor is `[num_blocks, num_kv_heads, block_size, 2 * head_dim]`, but the CPU backend
reinterprets each (block, head) region: keys are stored transposed ([head_dim, block_size]) for the `vec`
ISA, and the AMX ISA packs bf16 pairs differently. Rather than hard-coding either, `PagedLayout.calibrate`
writes known values through `cpu_attn_reshape_and_cache` into a scratch block and learns where every
(slot, dim) element lands: reading is then one gather, for any ISA whose layout is a permutation inside a
(block, head) region. `self_test` writes random K/V and checks the gather returns them bit for bit; it is
run when the worker registers its KV caches and raises if the pinned vLLM's internals changed.
"""

from __future__ import annotations

import torch


class LayoutError(RuntimeError):
    """vLLM's paged KV layout is not what kvcat expects (a vLLM upgrade changed its internals)."""


def split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (key_cache, value_cache) views the CPU backend passes to its ops."""
    num_blocks, heads, block_size, _ = kv_cache.shape
    return kv_cache.view(num_blocks, heads, block_size * 2, -1).chunk(2, dim=2)


def write_slots(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
                isa: str) -> None:
    """Write key/value [n, num_kv_heads, head_dim] into slot indices [n] (block_id * block_size + offset)."""
    from vllm._custom_ops import cpu_attn_reshape_and_cache

    key_cache, value_cache = split_cache(kv_cache)
    cpu_attn_reshape_and_cache(key.to(kv_cache.dtype).contiguous(), value.to(kv_cache.dtype).contiguous(),
                               key_cache, value_cache, slots.to(torch.long), isa)


class PagedLayout:
    """Where each (slot, dim) of a block's K and V lives in the raw (block, head) region."""

    def __init__(self, block_size: int, head_dim: int, k_index: torch.Tensor, v_index: torch.Tensor):
        self.block_size, self.head_dim = block_size, head_dim
        self.k_index, self.v_index = k_index, v_index  # [block_size * head_dim] raw offsets

    @classmethod
    def calibrate(cls, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype,
                  isa: str) -> "PagedLayout":
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
            write_slots(scratch, pattern + 1, pattern + 1, slots, isa)  # +1: tell written from untouched
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

    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int, start: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [num_kv_heads, num_tokens - start, head_dim] of slots start..num_tokens-1 of a block table."""
        first, nb = start // self.block_size, -(-num_tokens // self.block_size)
        if nb <= first:
            empty = kv_cache.new_empty(kv_cache.shape[1], 0, self.head_dim)
            return empty, empty
        blocks = kv_cache[block_ids[first:nb].to(torch.long)]  # [nb', H, bs, 2D]
        count = nb - first
        flat = blocks.reshape(count, blocks.shape[1], -1)
        heads = flat.shape[1]
        lo, hi = start - first * self.block_size, num_tokens - first * self.block_size

        def pick(index):
            x = flat[..., index].view(count, heads, self.block_size, self.head_dim)
            return x.permute(1, 0, 2, 3).reshape(heads, count * self.block_size, self.head_dim)[:, lo:hi]

        return pick(self.k_index), pick(self.v_index)

    def self_test(self, num_kv_heads: int, dtype: torch.dtype, isa: str) -> None:
        """Write random K/V at a non-zero start across two blocks and read it back exactly."""
        gen = torch.Generator().manual_seed(0)
        bs, d = self.block_size, self.head_dim
        cache = torch.zeros(3, num_kv_heads, bs, 2 * d, dtype=dtype)
        n, start = bs + bs // 2, bs // 4
        k = torch.randn(n, num_kv_heads, d, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, d, generator=gen).to(dtype)
        table = torch.tensor([2, 0, 1])
        pos = torch.arange(start, start + n)
        write_slots(cache, k, v, table[pos // bs] * bs + pos % bs, isa)
        gk, gv = self.gather(cache, table, start + n)
        if not (torch.equal(gk[:, start:], k.transpose(0, 1)) and torch.equal(gv[:, start:], v.transpose(0, 1))
                and not gk[:, :start].any()):
            raise LayoutError("kvcat self-test failed: K/V written through cpu_attn_reshape_and_cache did not "
                              "read back; the pinned vLLM's paged layout changed")
