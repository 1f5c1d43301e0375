"""Softmax attention: causal mask, GQA/MQA, sliding window, packed segments, logit soft-cap.

Axis letters: b batch, l queries, s keys, h query heads, g kv heads (g divides h), k head dim.

    scores[i, j] = scale * q[i] . k[j]            (softcap c: c * tanh(scores / c))
    query i sits at position q_offset + i, key j at position j; it may attend key j when
      causal:   j <= q_offset + i
      window w: q_offset + i - w < j             (transformers' `sliding_window` semantics)
      segments: q_segment[i] == kv_segment[j]
    out[i] = sum_j softmax_j(scores[i, :])[j] v[j]

Softmax statistics are float32 whatever the input dtype. A query row with no allowed key outputs 0.
`q_offset` defaults to s - l (the queries are the last l positions, flash-attn's bottom-right alignment), which
is 0 for self-attention; a decode step against a preallocated KV cache passes the number of cached tokens.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from seqmix_jax.ops import _checks as ck
from seqmix_jax.ops.dispatch import Impl, resolve_impl

NEG_INF = -1e30  # finite, so fully masked rows give exp(-inf - -inf) = nan nowhere


def attention(q: Float[Array, "b l h k"], k: Float[Array, "b s g k"], v: Float[Array, "b s g k"], *,
              causal: bool = True, segment_ids=None, window: int | None = None, softcap: float | None = None,
              scale: float | None = None, q_offset: int | Int[Array, "b"] | None = None,
              impl: Impl = "auto") -> Float[Array, "b l h k"]:
    """Softmax attention.

    Args:
      q: (b, l, h, k) queries.
      k, v: (b, s, g, k) keys and values; g kv heads divide h (query head i uses kv head i // (h // g)).
      causal: mask keys after the query's position.
      segment_ids: None, an int (b, l) array when l == s, or a pair (q_segment_ids (b, l), kv_segment_ids (b, s)).
      window: sliding window w >= 1: query at position p sees keys p - w < j <= p (needs causal).
      softcap: logit soft-cap c > 0: scores -> c * tanh(scores / c).
      scale: score scale, default 1 / sqrt(k).
      q_offset: position of the first query (int, or (b,) ints); default s - l.
      impl: "auto", "reference" (materialized scores) or "xla" (blockwise, online softmax).

    Returns:
      (b, l, h, k) in q.dtype.
    """
    q_seg, kv_seg, q_offset, scale = _check_attention_args(q, k, v, causal, segment_ids, window, softcap, scale,
                                                            q_offset)
    path = resolve_impl("attention", impl, ("reference", "xla", "pallas"), q=q, k=k, v=v)
    if path == "pallas":
        raise AssertionError("attention has no 'pallas' branch")
    if path == "xla":
        return _attention_reference(q, k, v, causal, q_seg, kv_seg, window, softcap, scale, q_offset)
    return _attention_reference(q, k, v, causal, q_seg, kv_seg, window, softcap, scale, q_offset)


def attention_reference(q, k, v, *, causal=True, segment_ids=None, window=None, softcap=None, scale=None,
                        q_offset=None):
    """The definition: materialize the (b, h, l, s) scores, mask, softmax in float32."""
    q_seg, kv_seg, q_offset, scale = _check_attention_args(q, k, v, causal, segment_ids, window, softcap, scale,
                                                            q_offset)
    return _attention_reference(q, k, v, causal, q_seg, kv_seg, window, softcap, scale, q_offset)


def attention_mask(l: int, s: int, *, causal: bool, q_offset, window=None, q_segment_ids=None,
                   kv_segment_ids=None) -> jnp.ndarray:
    """(b or 1, l, s) bool: True where query i may attend key j (the rules in the module docstring)."""
    q_pos = jnp.asarray(q_offset).reshape(-1, 1, 1) + jnp.arange(l)[None, :, None]
    k_pos = jnp.arange(s)[None, None, :]
    mask = jnp.ones((1, l, s), bool)
    if causal:
        mask = mask & (k_pos <= q_pos)
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def _attention_reference(q, k, v, causal, q_seg, kv_seg, window, softcap, scale, q_offset):
    b, l, h, dk = q.shape
    s, g = k.shape[1], k.shape[2]
    qg = q.reshape(b, l, g, h // g, dk)
    scores = jnp.einsum("blgrk,bsgk->bgrls", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    mask = attention_mask(l, s, causal=causal, q_offset=q_offset, window=window, q_segment_ids=q_seg,
                          kv_segment_ids=kv_seg)[:, None, None]
    scores = jnp.where(mask, scores, NEG_INF)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(scores - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bgrls,bsgk->blgrk", p, v.astype(jnp.float32))
    return out.reshape(b, l, h, dk).astype(q.dtype)


def _check_attention_args(q, k, v, causal, segment_ids, window, softcap, scale, q_offset):
    """Validate; return (q_segment_ids, kv_segment_ids, q_offset, scale) with the defaults filled in."""
    ck.check_rank("q", q, 4, "(b, l, h, k)")
    ck.check_rank("k", k, 4, "(b, s, g, k)")
    for name, a in (("q", q), ("k", k), ("v", v)):
        ck.check_float(name, a)
    b, l, h, dk = q.shape
    s, g = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != dk:
        raise ValueError(f"k must have shape (b, s, g, k) with b={b} and head dim k={dk} as in q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    ck.check_shape("v", v, tuple(k.shape), "(b, s, g, k) like k")
    if h % g != 0:
        raise ValueError(f"the number of query heads h={h} must be divisible by the number of kv heads g={g}")
    if window is not None:
        ck.check_positive_int("window", window)
        if not causal:
            raise ValueError(f"window={window} needs causal=True (a sliding window looks back from each query)")
    if softcap is not None and not (isinstance(softcap, numbers.Real) and softcap > 0):
        raise ValueError(f"softcap must be a positive number, got {softcap!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(dk)
    if q_offset is None:
        q_offset = s - l
    elif isinstance(q_offset, numbers.Integral):
        if q_offset < 0:
            raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    else:
        q_offset = jnp.asarray(q_offset)
        ck.check_int("q_offset", q_offset)
        if q_offset.shape not in ((), (b,)):
            raise ValueError(f"q_offset must be an int or have shape (b,) = ({b},), got {tuple(q_offset.shape)}")
    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError(f"segment_ids as a pair must be (q_segment_ids, kv_segment_ids), got {len(segment_ids)}"
                                 " arrays")
            q_seg, kv_seg = segment_ids
        else:
            if l != s:
                raise ValueError(f"segment_ids as one (b, l) array needs l == s, got l={l}, s={s}; pass "
                                 "(q_segment_ids, kv_segment_ids)")
            q_seg = kv_seg = segment_ids
        ck.check_int("segment_ids", q_seg)
        ck.check_int("segment_ids", kv_seg)
        ck.check_shape("q_segment_ids", q_seg, (b, l), "(b, l)")
        ck.check_shape("kv_segment_ids", kv_seg, (b, s), "(b, s)")
    return q_seg, kv_seg, q_offset, float(scale)
