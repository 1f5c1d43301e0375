"""Rotary position embedding (RoPE; Su et al. 2021, "RoFormer").

Axis letters: b batch, l sequence, h heads, k head dim, r rotary dim (r <= k, even).

Channel pairs of each head are rotated by an angle proportional to the position p:

    theta_i = base^(-2i / r)            i = 0 .. r/2 - 1        (`rotary_inv_freq`)
    angle   = (p / position_scale) * theta_i
    (a, b) -> (a cos(angle) - b sin(angle),  b cos(angle) + a sin(angle))

Which channels form pair i:
  * rotate-half (interleaved=False; transformers Llama/Mistral, flash-attn default, StripedHyena, mamba_ssm MHA):
    a = x[i], b = x[i + r/2];
  * interleaved (interleaved=True; flash-attn `interleaved=True`, GPT-J, transformers GLM): a = x[2i], b = x[2i + 1].
Partial rotary (r < k): only the first r channels of each head rotate, channels r..k-1 pass through unchanged
(mamba2attn rotates 64 of 128, GLM half the head).

`position_scale` divides the positions: linearly interpolated RoPE (Evo 1 131k uses 16; stripedhyena
positional_embeddings.py). Angles, sines and cosines are computed in float32, and the rotation itself is done in
float32 and cast back to x.dtype (transformers rounds cos/sin to the activation dtype first; identical in float32).
"""

from __future__ import annotations

import contextlib
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from seqmix_jax.ops import _checks as ck


def rotary_inv_freq(rotary_dim: int, base: float = 10000.0) -> Float[Array, "r2"]:
    """(rotary_dim // 2,) float32 inverse frequencies base^(-2i / rotary_dim)."""
    _check_rotary_dim(rotary_dim, None)
    if not (isinstance(base, numbers.Real) and base > 0):
        raise ValueError(f"base must be a positive number, got {base!r}")
    # Same float32 arithmetic as transformers' default RoPE init, so the frequencies agree to the last bit.
    return 1.0 / (jnp.float32(base) ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / jnp.float32(rotary_dim)))


def apply_rotary(x: Float[Array, "b l h k"], positions: Int[Array, "l"] | Int[Array, "b l"], *,
                 rotary_dim: int | None = None, base: float = 10000.0, interleaved: bool = False,
                 position_scale: float = 1.0, inv_freq: Float[Array, "r2"] | None = None) -> Float[Array, "b l h k"]:
    """Rotate the first `rotary_dim` channels of every head of x by its position.

    Args:
      x: (b, l, h, k) queries or keys.
      positions: (l,) or (b, l) integer positions (a decode step passes its absolute position, i.e. the offset).
      rotary_dim: r, even, <= k (default k; 0 returns x unchanged).
      base: frequency base (10000; StripedHyena-7B uses 500000).
      interleaved: pairs (2i, 2i+1) instead of (i, i + r/2).
      position_scale: positions are divided by it (linear RoPE interpolation), > 0.
      inv_freq: optional (r/2,) frequencies that override `base` (e.g. a checkpoint's `rotary_emb.inv_freq`).

    Returns:
      (b, l, h, k) in x.dtype.
    """
    ck.check_rank("x", x, 4, "(b, l, h, k)")
    ck.check_float("x", x)
    b, l, _, k = x.shape
    r = k if rotary_dim is None else rotary_dim
    _check_rotary_dim(r, k)
    positions_in = positions
    positions = jnp.asarray(positions)
    ck.check_int("positions", positions)
    if positions.shape not in ((l,), (b, l)):
        raise ValueError(f"positions must have shape (l,) = ({l},) or (b, l) = ({b}, {l}), "
                         f"got {tuple(positions.shape)}")
    if not (isinstance(position_scale, numbers.Real) and position_scale > 0):
        raise ValueError(f"position_scale must be a positive number, got {position_scale!r}")
    if r == 0:
        return x
    if inv_freq is not None:
        ck.check_shape("inv_freq", jnp.asarray(inv_freq), (r // 2,), "(rotary_dim // 2,)")
    known = isinstance(positions_in, np.ndarray) and (inv_freq is None or isinstance(inv_freq, np.ndarray))
    # Positions given as numpy (the default arange of a forward or a fresh prefill): the cos / sin tables are
    # computed once, here, and enter the program as constants. Left in the program, XLA fuses them into the rotation
    # and evaluates cos and sin for every element of x, b * h times over (XLA:CPU: 17 of a 215 ms Llama prefill at
    # b=8, l=512, h=4, k=64).
    constant = known and positions.size * r <= MAX_TABLE
    with jax.ensure_compile_time_eval() if constant else contextlib.nullcontext():
        # positions_in is converted again in here: outside, under jit, jnp.asarray stages it into the program
        cos, sin = _tables(jnp.asarray(positions_in), inv_freq, r, base, position_scale)
    cos, sin = (t[None, :, None, :] if positions.ndim == 1 else t[:, :, None, :] for t in (cos, sin))
    xr = x[..., :r].astype(jnp.float32)
    if interleaved:
        a, bb = xr[..., 0::2], xr[..., 1::2]
        rot = jnp.stack([a * cos - bb * sin, bb * cos + a * sin], axis=-1).reshape(xr.shape)
    else:
        a, bb = xr[..., : r // 2], xr[..., r // 2:]
        rot = jnp.concatenate([a * cos - bb * sin, bb * cos + a * sin], axis=-1)
    rot = rot.astype(x.dtype)
    return rot if r == k else jnp.concatenate([rot, x[..., r:]], axis=-1)


apply_rotary_reference = apply_rotary  # elementwise: the definition is already the fast path

MAX_TABLE = 1 << 19  # positions * rotary_dim up to which numpy positions give constant tables (2 x 1 MiB)


def _tables(positions, inv_freq, r, base, position_scale):
    """cos and sin of the angles (p / position_scale) * inv_freq, (l, r/2) or (b, l, r/2) float32."""
    inv_freq = rotary_inv_freq(r, base) if inv_freq is None else jnp.asarray(inv_freq, jnp.float32)
    pos = positions.astype(jnp.float32)
    if position_scale != 1.0:
        pos = pos / jnp.float32(position_scale)
    angle = pos[..., None] * inv_freq
    return jnp.cos(angle), jnp.sin(angle)


def _check_rotary_dim(r, k: int | None) -> None:
    if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 0 or r % 2:
        raise ValueError(f"rotary_dim must be a non-negative even int, got {r!r}")
    if k is not None and r > k:
        raise ValueError(f"rotary_dim={r} must be <= the head dim k={k}")
