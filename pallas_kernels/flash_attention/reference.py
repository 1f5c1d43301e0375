"""The definition in plain jnp, for readers and tests: materialize every score, mask, softmax in float32.

    s[i, j] = scale * q[i] . k[j]               (softcap c: c * tanh(s / c))
    row i (position q_offset + i) may see key j when
        causal:   j <= q_offset + i
        window w: j >  q_offset + i - w
        segments: q_segment[i] == kv_segment[j]
    out[i] = sum_j softmax_j(s[i, :]) v[j] over the visible keys; 0 when no key is visible.
Query head n reads kv head n // (h // g).
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def flash_attention_reference(q, k, v, *, causal=True, segment_ids=None, window=None, softcap=None, scale=None,
                              q_offset=None):
    b, l, h, dk = q.shape
    s, g = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    q_offset = s - l if q_offset is None else q_offset
    kv_head = jnp.arange(h) // (h // g)
    kh, vh = k[:, :, kv_head].astype(jnp.float32), v[:, :, kv_head].astype(jnp.float32)  # (b, s, h, k)
    scores = jnp.einsum("blhk,bshk->bhls", q.astype(jnp.float32), kh) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    pos = q_offset + jnp.arange(l)[:, None]
    j = jnp.arange(s)[None, :]
    visible = jnp.ones((1, 1, l, s), bool)
    if causal:
        visible = visible & (j <= pos)
    if window is not None:
        visible = visible & (j > pos - window)
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        visible = visible & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    scores = jnp.where(visible, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    return jnp.einsum("bhls,bshk->blhk", p, vh).astype(q.dtype)
