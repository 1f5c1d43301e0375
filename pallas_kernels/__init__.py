"""Pallas kernels for GPU and TPU, one folder per kernel; imports jax only (never seqmix_jax).

No kernel has landed yet: `seqmix_jax.ops` dispatch reports that and falls back to the xla paths.
"""
