"""RMSNorm and Mamba-2's gated, grouped RMSNorm (mamba_ssm `rms_norm_ref`), computed in float32.

Axis letters: d features (the last axis), g groups of d // g contiguous features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix_jax.ops import _checks as ck


def rms_norm(x, weight=None, *, eps: float = 1e-5, bias=None):
    """y = x * rsqrt(mean(x^2) + eps) * weight (+ bias), statistics and scaling in float32, cast to x.dtype.

    This is mamba_ssm's order (scale in float32, then cast); transformers' Mamba RMSNorm casts before scaling,
    which differs only by the final rounding in low precision."""
    return rms_norm_gated(x, weight, eps=eps, bias=bias)


def rms_norm_gated(x, weight=None, z=None, *, eps: float = 1e-5, group_size: int | None = None,
                   norm_before_gate: bool = False, bias=None):
    """Gated RMSNorm with per-group statistics (Mamba-2's `RMSNormGated`).

    Args:
      x: (..., d).
      weight, bias: optional (d,).
      z: optional gate (..., d): norm_before_gate=False gives RMSNorm(x * silu(z)) (released Mamba-2 models);
        True gives RMSNorm(x) * silu(z).
      group_size: statistics over contiguous groups of this many features (default: all d). Must divide d.
    """
    ck.check_float("x", x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least one axis, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    for name, a in (("weight", weight), ("bias", bias)):
        if a is not None:
            ck.check_shape(name, a, (d,), "(d,)")
    if z is not None:
        ck.check_shape("z", z, tuple(x.shape), "like x")
    group_size = d if group_size is None else group_size
    ck.check_divides("group_size", group_size, "d", d)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    y = x.astype(jnp.float32)
    if z is not None and not norm_before_gate:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    yg = y.reshape(*y.shape[:-1], d // group_size, group_size)
    yg = yg * jax.lax.rsqrt(jnp.mean(jnp.square(yg), axis=-1, keepdims=True) + eps)
    y = yg.reshape(y.shape)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if z is not None and norm_before_gate:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(x.dtype)


rms_norm_reference = rms_norm
rms_norm_gated_reference = rms_norm_gated
