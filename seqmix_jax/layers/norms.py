"""Normalization layers: RMSNorm (both epsilon placements found in the reference checkpoints) and LayerNorm.

Axis letters: d features (the last axis). Statistics are always computed in float32; the output is cast to the
compute dtype (`dtype`, or the input's dtype when `dtype` is None).

    RMSNorm, eps inside the sqrt  (mamba_ssm, transformers Llama, flash-attn rms_norm, StripedHyena-7B):
        y = x * rsqrt(mean_d(x^2) + eps) * scale
    RMSNorm, eps outside the sqrt (StripedHyena's non-flash path, used by Evo 1 and Evo 2):
        y = scale * x / (||x||_2 * d^(-1/2) + eps)
    LayerNorm:
        y = (x - mean_d(x)) * rsqrt(var_d(x) + eps) * scale + bias

Differences from the official code: StripedHyena's non-flash RMSNorm computes in the tensor's dtype; here the
statistics are float32 in every case (identical in float32, more accurate in bf16). Transformers' Llama RMSNorm
casts the normalized value to the input dtype before multiplying by the weight; here the weight is applied in
float32 and the product cast once (mamba_ssm's order) — the two differ only by a final rounding in low precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from seqmix_jax.layers._init import check_dims, param


def _ones(key, shape, dtype=jnp.float32):
    del key
    return jnp.ones(shape, dtype)


def _zeros(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype)


def _check_eps(eps) -> float:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return float(eps)


def _check_input(x, d: int, cls: str) -> None:
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(f"{cls} expects x of shape (..., d={d}), got {tuple(x.shape)}")


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis: (..., d) -> (..., d).

    Args:
      d: number of features.
      eps: epsilon (1e-5).
      eps_inside_sqrt: True: x * rsqrt(mean(x^2) + eps) * scale. False: StripedHyena's non-flash variant
        scale * x / (||x||_2 / sqrt(d) + eps).
      axis_name: logical axis name of `scale` ("embed").
      dtype: compute/output dtype (None: the input's dtype).
      param_dtype: storage dtype of `scale` (float32).
      rngs: nnx.Rngs (keyword only; unused by the ones init but kept for a uniform constructor).
    """

    def __init__(self, d: int, *, eps: float = 1e-5, eps_inside_sqrt: bool = True, axis_name: str = "embed",
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_dims(d=d)
        self.d, self.eps, self.eps_inside_sqrt, self.dtype = d, _check_eps(eps), bool(eps_inside_sqrt), dtype
        self.scale = param(_ones, (d,), (axis_name,), param_dtype, rngs)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        _check_input(x, self.d, "RMSNorm")
        out_dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        if self.eps_inside_sqrt:
            y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        else:
            rms = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True)) * self.d ** -0.5
            y = xf / (rms + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(out_dtype)


class LayerNorm(nnx.Module):
    """Layer norm over the last axis with float32 statistics: (..., d) -> (..., d).

    Args:
      d: number of features.
      eps: epsilon inside the sqrt (1e-5, PyTorch's default).
      use_bias: learn a `bias` (True).
      axis_name: logical axis name of `scale` and `bias` ("embed").
      dtype: compute/output dtype (None: the input's dtype).
      param_dtype: storage dtype (float32).
      rngs: nnx.Rngs (keyword only).
    """

    def __init__(self, d: int, *, eps: float = 1e-5, use_bias: bool = True, axis_name: str = "embed", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_dims(d=d)
        self.d, self.eps, self.dtype = d, _check_eps(eps), dtype
        self.scale = param(_ones, (d,), (axis_name,), param_dtype, rngs)
        self.bias = param(_zeros, (d,), (axis_name,), param_dtype, rngs) if use_bias else None

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        _check_input(x, self.d, "LayerNorm")
        out_dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)  # biased, as torch.nn.LayerNorm
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(out_dtype)
