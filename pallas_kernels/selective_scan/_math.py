"""The elementwise math that the GPU and TPU kernel bodies share, on (T, block_d) tiles of one chunk (any shapes
that broadcast: the GPU variant passes 1-D per-channel vectors as [None, :], the TPU variant (1, block_d) rows).

Paper's names: v = dt + dt_bias, delta = softplus(v), the output gate y silu(z) = y z sigmoid(z).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.selective_scan._plan import Plan


def softplus(v):
    """log(1 + e^v) in the overflow-free form jax.nn.softplus uses."""
    return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))


def sigmoid(v):
    return 1.0 / (1.0 + jnp.exp(-v))


def unpack(refs, names):
    """Kernel refs in `names` order; a name that is None (flag off) has no ref and maps to None."""
    it = iter(refs)
    return [None if nm is None else next(it) for nm in names]


def zero_padded_steps(p: Plan, c, tile):
    """The (T, ...) tile of chunk c with its rows past the sequence length l set to 0."""
    if not p.padded_steps:
        return tile
    return jnp.where(c * p.T + lax.broadcasted_iota(jnp.int32, tile.shape, 0) < p.l, tile, 0.0)


def delta_of(p: Plan, c, v):
    """delta = softplus(v) (or v), 0 on padded steps: a = exp(0 A) = 1 and delta x = 0 leave the state alone."""
    return zero_padded_steps(p, c, softplus(v) if p.softplus else v)


def ddt_of(p: Plan, c, ddelta, v):
    """d dt from d delta through softplus (softplus' = sigmoid); 0 on padded steps, where delta is the constant 0."""
    return zero_padded_steps(p, c, ddelta * sigmoid(v) if p.softplus else ddelta)


def silu_gate(y, z):
    """y silu(z)."""
    return y * z * sigmoid(z)


def dz_of(dy, y, z):
    """d z of y silu(z): dy y sigmoid(z) (1 + z (1 - sigmoid(z)))."""
    sig = sigmoid(z)
    return dy * y * sig * (1.0 + z * (1.0 - sig))
