"""The depthwise causal conv restated in plain jnp (float32 accumulation), for tests and readers.

Axis letters: b batch, l sequence, c channels, w kernel width. With x_-(w-1) .. x_-1 taken from initial_state
(zeros when absent):

    y[t, c] = act( bias[c] + sum_{j<w} weight[j, c] * x[t - (w - 1) + j, c] * [t - (w - 1) + j in t's segment] )

The last tap weight[w - 1] multiplies the current input. initial_state belongs to the first segment. The
final state is the last w - 1 inputs, zeroed where they lie before the last segment's start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tap_allowance(segment_ids, big: int = 2 ** 30):
    """(b, l) int32 `a[t]`: how many steps back from t stay in t's segment (t - start of its segment), or
    `big` in the first segment, which initial_state continues. Tap j (distance d = w - 1 - j) counts iff
    d <= a[t]; only the current row's value is needed, so kernels never load segment ids at shifted rows."""
    l = segment_ids.shape[1]
    starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], dtype=bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    t = jnp.arange(l, dtype=jnp.int32)
    last_start = jax.lax.cummax(jnp.where(starts, t, -1), axis=1)
    return jnp.where(last_start < 0, big, t - last_start).astype(jnp.int32)


def causal_conv1d_reference(x, weight, bias=None, *, activation=None, segment_ids=None, initial_state=None,
                            return_final_state=False):
    """y (b, l, c) in x.dtype, or (y, final_state (b, w - 1, c)); a loop over the w taps."""
    b, l, c = x.shape
    w = weight.shape[0]
    prefix = jnp.zeros((b, w - 1, c), x.dtype) if initial_state is None else initial_state.astype(x.dtype)
    xp = jnp.concatenate([prefix, x], axis=1).astype(jnp.float32)  # xp[t + w - 1] = x[t]
    allow = None if segment_ids is None else tap_allowance(segment_ids)
    y = jnp.zeros((b, l, c), jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    for j in range(w):
        d = w - 1 - j  # how far back tap j reaches
        tap = xp[:, j:j + l] * weight[j].astype(jnp.float32)
        if allow is not None and d > 0:
            tap = jnp.where((allow >= d)[..., None], tap, 0.0)
        y = y + tap
    if activation is not None:
        y = y * jax.nn.sigmoid(y)
    y = y.astype(x.dtype)
    if not return_final_state:
        return y
    state = xp[:, l:].astype(x.dtype)
    if allow is not None:  # state row k is d = w - 2 - k steps before the last input
        d = jnp.arange(w - 2, -1, -1)
        state = jnp.where((d[None, :] <= allow[:, -1:])[..., None], state, jnp.zeros((), x.dtype))
    return y, state


def causal_conv1d_update_reference(state, x, weight, bias=None, *, activation=None):
    """One decode step: window = [state, x] (b, w, c); y = act(bias + sum_j weight[j] window[j]); the new state
    is window[1:], an exact copy."""
    window = jnp.concatenate([state.astype(x.dtype), x[:, None]], axis=1)
    y = jnp.sum(window.astype(jnp.float32) * weight.astype(jnp.float32)[None], axis=1)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if activation is not None:
        y = y * jax.nn.sigmoid(y)
    return y.astype(x.dtype), window[:, 1:]
