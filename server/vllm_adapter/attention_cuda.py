"""beta on CUDA: vLLM's FLASH_ATTN and TRITON_ATTN impls with kvcat's `BetaAttentionMixin` in front.

Both backends keep the metadata the mixin reads (`query_start_loc`, `seq_lens`, `block_table`) and the
[blocks, heads, block, K|V] cache that `FlashPagedLayout` reads. FLASHINFER is left stock: its metadata has no
block table per request (its plan lives inside the wrapper), so a server with beta refuses to start on it
(the connector checks every layer's impl) and `--no-beta` serves there. NOT VERIFIED on a GPU: imported and
composed on CPU only (tests/test_cuda_layout.py); `scripts/gpu_check.sh` is the check to run on one.
"""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from kvcat.server.vllm_adapter.attention import BetaAttentionMixin


class KvcatFlashAttentionImpl(BetaAttentionMixin, FlashAttentionImpl):
    pass


class KvcatFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return KvcatFlashAttentionImpl


class KvcatTritonAttentionImpl(BetaAttentionMixin, TritonAttentionImpl):
    pass


class KvcatTritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return KvcatTritonAttentionImpl
