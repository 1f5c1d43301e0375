"""The Mamba-2 SSD recurrence as plain jnp: the definition the kernels are tested against.

Axis letters: b batch, l sequence, h heads, p head dim, n state, g groups of B/C (head i reads group
i // (h / g)). Per head, with delta = clamp(softplus(dt + dt_bias)), a_t = delta_t A and state S (p, n):

    S_t = exp(a_t) S_{t-1} + delta_t x_t B_t^T          (S_{-1} = initial_state, 0 by default)
    y_t = S_t C_t + D x_t,     y_t *= silu(z_t)          (when z is given)

and the state restarts from 0 where `segment_ids` changes (packed sequences). Everything in float32.

The kernels compute the same function chunk by chunk (Mamba-2 paper, section 6): for a chunk of Q steps with
cum = inclusive cumsum of a inside the chunk and last = cum[Q - 1],

    L[i, j] = exp(cum_i - cum_j) for j <= i in the same segment, else 0      (the 1-semiseparable mask)
    y       = (C B^T o L) xbar + (exp(cum) C) S_prev^T                      (xbar = delta x)
    S_next  = exp(last) S_prev + xbar^T (exp(last - cum) B)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def ssd_reference(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=True, dt_limit=None,
                  initial_state=None, return_final_state=False, segment_ids=None):
    """Sequential `lax.scan` over l in float32: x (b, l, h, p), dt (b, l, h), A (h,), B, C (b, l, g, n).

    Returns y (b, l, h, p) in x.dtype, or (y, final_state (b, h, p, n) float32)."""
    f32 = lambda t: jnp.asarray(t, jnp.float32)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    delta = f32(dt) + (0.0 if dt_bias is None else f32(dt_bias))
    if dt_softplus:
        delta = jax.nn.softplus(delta)
    if dt_limit is not None:
        delta = jnp.clip(delta, dt_limit[0], dt_limit[1])
    heads_group = jnp.arange(h) // (h // g)  # head -> the group whose B, C it reads
    Bh, Ch = f32(B)[:, :, heads_group], f32(C)[:, :, heads_group]  # (b, l, h, n)
    decay = jnp.exp(delta * f32(A))  # (b, l, h)
    if segment_ids is not None:  # a new segment starts from the zero state
        starts = jnp.concatenate([jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        decay = jnp.where(starts[:, :, None], 0.0, decay)
    S0 = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else f32(initial_state)

    def step(S, inp):
        dA, d, xt, Bt, Ct = inp  # (b, h), (b, h), (b, h, p), (b, h, n), (b, h, n)
        S = dA[..., None, None] * S + (d[..., None] * xt)[..., None] * Bt[:, :, None, :]
        return S, jnp.einsum("bhpn,bhn->bhp", S, Ct, precision=lax.Precision.HIGHEST)

    seq = tuple(jnp.moveaxis(t, 1, 0) for t in (decay, delta, f32(x), Bh, Ch))
    S, y = lax.scan(step, S0, seq)
    y = jnp.moveaxis(y, 0, 1)
    if D is not None:
        Df = f32(D)
        y = y + f32(x) * (Df[:, None] if Df.ndim == 1 else Df)
    if z is not None:
        y = y * jax.nn.silu(f32(z))
    y = y.astype(x.dtype)
    return (y, S) if return_final_state else y
