"""Pallas kernels for GPU and TPU, one folder per kernel; imports jax only (never seqmix_jax).

    flash_attention/   FlashAttention-2: causal / non-causal, GQA, segment ids, sliding window, soft-cap, any l,
                       head dims 16-256 (padded inside); dK/dV and dQ backward kernels
    selective_scan/    Mamba-1: state in registers / VMEM, one saved state per chunk; the backward recomputes a
                       chunk's states and walks it in reverse
    ssd/               Mamba-2 SSD: chunked, the (p, n) state carried across chunks; chunk-quadratic matmuls inside
    causal_conv1d/     depthwise causal conv: forward, backward and the decode update

Each folder has a GPU variant (Pallas lowered through Triton, `_gpu.py`) and a TPU variant (Mosaic, `_tpu.py`), an
entry that validates its inputs before any `pallas_call`, takes a frozen `BlockSizes`, `variant=` and
`interpret=` (interpret mode on CPU), wraps the kernels in a `jax.custom_vjp`, and a `supports(...)` the ops'
dispatcher asks (`seqmix_jax.ops.dispatch`). `reference.py` in each folder restates the math in plain jnp.
"""
