"""FlashAttention-2 as Pallas kernels: a Pallas-Triton GPU variant and a Pallas-Mosaic TPU variant, each with a
Pallas backward (dK/dV and dQ kernels) behind `jax.custom_vjp`.

    out = flash_attention(q, k, v, causal=True, segment_ids=None, window=None, softcap=None, scale=None,
                          q_offset=None, block_sizes=BlockSizes(...), variant=None, interpret=None)
    reason = supports(q, k, v, ...)          # None when the kernel can run the call, else why not
    flash_attention_reference(q, k, v, ...)  # the definition, materialized scores

q (b, l, h, k), k / v (b, s, g, k) with g | h (GQA), any l and s, head dim 16..256 (zero-padded inside to a
power of two on GPU, a multiple of 128 on TPU). Softmax statistics are float32 whatever the input dtype.
"""

from pallas_kernels.flash_attention._entry import BlockSizes, flash_attention, supports
from pallas_kernels.flash_attention.reference import flash_attention_reference

__all__ = ["BlockSizes", "flash_attention", "flash_attention_reference", "supports"]
