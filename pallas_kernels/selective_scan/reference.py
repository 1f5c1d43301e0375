"""The selective scan restated in plain jnp: a sequential `lax.scan` over l in float32 (for tests and readers).

Axis letters: b batch, l sequence, d channels, n state, g groups of B/C (channel c reads group c // (d / g)).

    delta_t = softplus(dt_t + dt_bias)                        (or dt_t + dt_bias without softplus)
    h_t     = keep_t exp(delta_t A) h_{t-1} + delta_t x_t B_t  (keep_t = 0 at a segment start, else 1)
    y_t     = h_t C_t + D x_t,   y_t *= silu(z_t)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def selective_scan_reference(x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus=True,
                             initial_state=None, return_final_state=False, segment_ids=None):
    """Same arguments and results as the kernel entry `selective_scan` (y in x.dtype, final state float32)."""
    b, l, d = x.shape
    n = A.shape[1]
    f32 = lambda a: a.astype(jnp.float32)
    g = 1 if B.ndim == 3 else B.shape[2]
    per_channel = lambda M: jnp.repeat(f32(M).reshape(b, l, g, n), d // g, axis=2)  # (b, l, d, n)
    v = f32(dt) if dt_bias is None else f32(dt) + f32(dt_bias)
    delta = jax.nn.softplus(v) if dt_softplus else v
    keep = jnp.ones((b, l), jnp.float32)
    if segment_ids is not None:
        keep = keep.at[:, 1:].set((segment_ids[:, 1:] == segment_ids[:, :-1]).astype(jnp.float32))
    h0 = jnp.zeros((b, d, n), jnp.float32) if initial_state is None else f32(initial_state)

    def step(h, inp):
        u, dl, Bt, Ct, k = inp  # (b, d), (b, d), (b, d, n), (b, d, n), (b,)
        h = k[:, None, None] * jnp.exp(dl[..., None] * f32(A)) * h + (dl * u)[..., None] * Bt
        return h, jnp.sum(h * Ct, axis=-1)

    tm = lambda a: jnp.moveaxis(a, 1, 0)
    h, y = lax.scan(step, h0, (tm(f32(x)), tm(delta), tm(per_channel(B)), tm(per_channel(C)), tm(keep)))
    y = tm(y)
    if D is not None:
        y = y + f32(x) * f32(D)
    if z is not None:
        y = y * jax.nn.silu(f32(z))
    y = y.astype(x.dtype)
    return (y, h) if return_final_state else y
