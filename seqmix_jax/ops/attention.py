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
Segment ids are compared raw: tokens with equal ids attend each other wherever they sit (the transformers /
flash-attn packed convention), so a packer gives every document its own id.

`reference` materializes the (b, h, l, s) scores. `xla` is blockwise with an online softmax (FlashAttention-2,
below): O(l * block) memory in the forward and the backward, key blocks that the causal / window rule masks
entirely are never visited. Its gradient is a `jax.custom_vjp` (reverse mode only; `jax.jvp` is not supported).
`pallas` runs `pallas_kernels.flash_attention`: the same FlashAttention-2 algorithm as Pallas kernels (Triton on
GPU, Mosaic on TPU, interpret mode on CPU) with Pallas dK/dV and dQ backward kernels; it pads any l, s and head
dims 16..256 inside, and takes an int q_offset only (a (b,) offset array makes "auto" fall back to xla).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels import flash_attention as fa
from seqmix_jax.ops import _checks as ck
from seqmix_jax.ops.dispatch import Impl, register_pallas, resolve_impl

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
      impl: "auto", "reference" (materialized scores), "xla" (blockwise, online softmax) or "pallas" (the
        FlashAttention-2 kernels of `pallas_kernels.flash_attention`; needs an int q_offset, head dim 16..256).

    Returns:
      (b, l, h, k) in q.dtype.
    """
    q_seg, kv_seg, q_offset, scale = _check_attention_args(q, k, v, causal, segment_ids, window, softcap, scale,
                                                            q_offset)
    path = resolve_impl("attention", impl, ("reference", "xla", "pallas"), q=q, k=k, v=v, causal=causal,
                        q_segment_ids=q_seg, kv_segment_ids=kv_seg, window=window, softcap=softcap, scale=scale,
                        q_offset=q_offset)
    if path == "pallas":
        return fa.flash_attention(q, k, v, causal=causal, segment_ids=None if q_seg is None else (q_seg, kv_seg),
                                  window=window, softcap=softcap, scale=scale, q_offset=q_offset).astype(q.dtype)
    if path == "xla":
        block_q, block_k = _block_sizes(q.shape[0] * q.shape[2], jax.default_backend())
        return _attention_blockwise(q, k, v, causal, q_seg, kv_seg, window, softcap, scale, q_offset, block_q,
                                    block_k)
    return _attention_reference(q, k, v, causal, q_seg, kv_seg, window, softcap, scale, q_offset)


def attention_reference(q, k, v, *, causal=True, segment_ids=None, window=None, softcap=None, scale=None,
                        q_offset=None):
    """The definition: materialize the (b, h, l, s) scores, mask, softmax in float32."""
    q_seg, kv_seg, q_offset, scale = _check_attention_args(q, k, v, causal, segment_ids, window, softcap, scale,
                                                            q_offset)
    return _attention_reference(q, k, v, causal, q_seg, kv_seg, window, softcap, scale, q_offset)


def attention_decode(q: Float[Array, "b h k"], k_cache: Float[Array, "b g s k"], v_cache: Float[Array, "b g s k"],
                     position: Int[Array, "b"], *, window: int | None = None, softcap: float | None = None,
                     scale: float | None = None, impl: Impl = "auto") -> Float[Array, "b h k"]:
    """One causal query per row against a head-major KV cache: the decode step of `attention`.

    Args:
      q: (b, h, k) the query of each row, at position `position[b]`.
      k_cache, v_cache: (b, g, s, k) keys and values laid out head-major (each head's keys contiguous, so the
        scores are one (1 x k) @ (k x s) product per kv head); slot j holds position j.
      position: (b,) int, the query's position; keys j <= position (and > position - window) are attended,
        later slots (unwritten cache) are ignored.
      window, softcap, scale: as `attention`.
      impl: "auto"/"xla" (the product above, float32 statistics) or "reference" (`attention_reference` on the
        sequence-major view of the cache, i.e. the definition).

    Returns:
      (b, h, k) in q.dtype; equals `attention(q[:, None], k, v, causal=True, q_offset=position)[:, 0]` with k, v
      the cache transposed to (b, s, g, k).
    """
    if q.ndim != 3 or k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"attention_decode expects q (b, h, k) and k_cache, v_cache (b, g, s, k) of one shape, got "
                         f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    b, h, dk = q.shape
    g, s = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != b or k_cache.shape[3] != dk or h % g:
        raise ValueError(f"attention_decode: q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)} "
                         f"(need the same b and k, and g={g} dividing h={h})")
    position = jnp.broadcast_to(jnp.asarray(position, jnp.int32), (b,))
    path = resolve_impl("attention", impl, ("reference", "xla"), q=q, k=k_cache, v=v_cache)
    seq_major = jax.ShapeDtypeStruct((b, s, g, dk), k_cache.dtype)  # the layout `attention` validates
    _, _, _, scale = _check_attention_args(jax.ShapeDtypeStruct((b, 1, h, dk), q.dtype), seq_major, seq_major, True,
                                           None, window, softcap, scale, position)
    if path == "reference":
        kt, vt = jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2)
        return _attention_reference(q[:, None], kt, vt, True, None, None, window, softcap, scale, position)[:, 0]
    qg = q.reshape(b, g, h // g, dk)
    scores = jnp.einsum("bgrk,bgsk->bgrs", qg, k_cache, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    key_pos = jnp.arange(s)[None, :]
    mask = key_pos <= position[:, None]
    if window is not None:
        mask = mask & (key_pos > position[:, None] - window)
    mask = mask[:, None, None, :]
    scores = jnp.where(mask, scores, NEG_INF)
    p = jnp.where(mask, jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bgrs,bgsk->bgrk", p.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, h, dk).astype(q.dtype)


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


# --- xla path: blockwise attention with an online softmax (FlashAttention-2) ---------------------------------
#
# Queries are cut into blocks of BLOCK_Q rows and keys into blocks of BLOCK_K. The forward visits, for each query
# block, only the key blocks the causal / window rule can reach, keeping per row the running maximum m, the
# running denominator den = sum_j exp(score_j - m) and the unnormalized output acc = sum_j exp(score_j - m) v_j;
# a new block with a larger maximum rescales both by exp(m_old - m_new). It saves q, k, v, the float32 output and
# the float32 logsumexp lse = m + log(den) per row, nothing of size l * s. The backward recomputes each score block
# from lse (p = exp(score - lse)) and, for each key block, loops over the query blocks that reach it:
#   dv += p^T do,   dp = do v^T,   ds = p * (dp - rowsum(do * out)),   dq += ds k * scale,   dk += ds^T q * scale
# (through a soft-cap, ds is multiplied by d(c tanh(x / c))/dx = 1 - tanh^2). GQA: q is viewed as (b, l, g, r, k)
# with r = h / g query heads per kv head, so k and v are never repeated; dk and dv sum over r inside the matmul.
# Matmuls take the input dtype and accumulate in float32 (p is rounded to it for p v and p^T do); every running
# statistic, ds and the dq / dk / dv accumulators are float32.

BLOCK_Q = 128  # query rows per block; min(BLOCK_Q, l) when l is shorter
BLOCK_K = 256  # keys per block; min(BLOCK_K, s) when s is shorter
# On a GPU / TPU every block costs a few kernel launches, so blocks grow until one (b, h, bq, bk) score tile has
# this many elements (32 MiB of float32 scores; the backward holds a few such tiles). Measured on an H200, b=1,
# h=4, k=64, l=16384, causal, fwd / fwd+bwd: 128 x 256 blocks 116 / 240 ms, 2048 x 1024 (what this picks)
# 6.9 / 18 ms, the materialized reference 8.6 / 21 ms. On CPU small blocks stay in cache and skip more masked work.
ACCEL_BLOCK_ELEMENTS = 1 << 23
# A forward that is not differentiated (inference: a prefill, an eval) on the CPU starts from square blocks
# (bk = bq: a causal diagonal block then wastes less masked work) and grows them until a score tile has this many
# elements (4 MiB of float32). CI machine, h=4, k=64, causal, forward, against the constants' 128 x 256:
# b=1 l=512 1.43x faster (512 x 512), b=1 l=2048 1.72x, b=2 l=1024 1.47x (512 x 256), b=8 l=512 1.12x (256 x 128),
# b=16 l=256 1.45x (128 x 128), paired runs. The backward keeps the constants: grown blocks made it up to 1.3x slower
# (b=2, l=1024), so a differentiated forward keeps them too (its blocks are the backward's).
CPU_FORWARD_BLOCK_ELEMENTS = 1 << 20


def _grown(bq: int, bk: int, bh: int, elements: int, l: int = 1 << 62, s: int = 1 << 62) -> tuple[int, int]:
    """Double bq (while bq < 2 bk) or bk until a (bh, bq, bk) score tile has `elements` elements, never beyond l or
    s queries and keys."""
    while bh * bq * bk < elements:
        if bq < l and (bq < 2 * bk or bk >= s):
            bq = min(2 * bq, l)
        elif bk < s:
            bk = min(2 * bk, s)
        else:
            break
    return bq, bk


def _block_sizes(bh: int, backend: str) -> tuple[int, int]:
    """(block_q, block_k) for batch * heads = bh on `backend`: the constants, grown on accelerators."""
    if backend in ("gpu", "cuda", "rocm", "tpu"):
        return _grown(BLOCK_Q, BLOCK_K, bh, ACCEL_BLOCK_ELEMENTS)
    return BLOCK_Q, BLOCK_K


class _Blocks(NamedTuple):
    """Static configuration of one blockwise call (hashable: the custom_vjp's non-differentiable argument)."""
    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    l: int
    s: int
    bq: int
    bk: int

    @property
    def nq(self):
        return -(-self.l // self.bq)

    @property
    def nk(self):
        return -(-self.s // self.bk)


def _attention_blockwise(q, k, v, causal, q_seg, kv_seg, window, softcap, scale, q_offset, block_q, block_k):
    b, l = q.shape[:2]
    s = k.shape[1]
    if l == 0 or s == 0:  # nothing to attend: zeros, with zero gradients
        return jnp.zeros(q.shape, q.dtype) + 0 * (jnp.sum(q) + jnp.sum(k) + jnp.sum(v)).astype(q.dtype)
    cfg = _Blocks(bool(causal), window, None if softcap is None else float(softcap), float(scale), l, s,
                  min(block_q, l), min(block_k, s))
    offsets = jnp.broadcast_to(jnp.asarray(q_offset).astype(jnp.int32), (b,))
    return _flash(cfg, q, k, v, q_seg, kv_seg, offsets)


def _acc_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _q_blocks(cfg, x):
    """(b, l, g, r, ...) -> (nq, b, g, bq, r, ...) zero-padded."""
    b, l = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, cfg.nq * cfg.bq - l)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, cfg.nq, cfg.bq, *x.shape[2:]), (1, 3), (0, 2))


def _kv_blocks(cfg, x):
    """(b, s, g, k) -> (nk, b, g, bk, k) zero-padded."""
    b, s = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, cfg.nk * cfg.bk - s), (0, 0), (0, 0)])
    return jnp.moveaxis(x.reshape(b, cfg.nk, cfg.bk, *x.shape[2:]), (1, 3), (0, 2))


def _seg_blocks(seg, n, size):
    """(b, t) -> (n, b, size) padded with -1 (padded positions are masked by index anyway)."""
    if seg is None:
        return None
    b, t = seg.shape
    seg = jnp.pad(seg, [(0, 0), (0, n * size - t)], constant_values=-1)
    return jnp.swapaxes(seg.reshape(b, n, size), 0, 1)


def _unblock_q(cfg, x):
    """(nq, b, g, bq, r, k) -> (b, l, g * r, k)."""
    x = jnp.moveaxis(x, (0, 2), (1, 3))
    b, g, r, dk = x.shape[0], x.shape[3], x.shape[4], x.shape[5]
    return x.reshape(b, cfg.nq * cfg.bq, g * r, dk)[:, :cfg.l]


def _unblock_kv(cfg, x):
    """(nk, b, g, bk, k) -> (b, s, g, k)."""
    x = jnp.moveaxis(x, (0, 2), (1, 3))
    return x.reshape(x.shape[0], cfg.nk * cfg.bk, *x.shape[3:])[:, :cfg.s]


def _block_mask(cfg, i, j, offsets, q_seg, kv_seg, key_start=None):
    """(b or 1, 1, bq, 1, bk) bool for query block i against key block j, or None when nothing is masked.

    `key_start`: the block's keys are key_start + [0, bk) (an unpadded slice that ends at s, see `_kv_slice`);
    keys before j * bk belong to block j - 1 and are masked here."""
    t = i * cfg.bq + jnp.arange(cfg.bq)  # query indices
    c = (j * cfg.bk if key_start is None else key_start) + jnp.arange(cfg.bk)  # key indices = key positions
    pos = offsets[:, None] + t[None, :]  # (b, bq) query positions
    parts = []
    if cfg.nq * cfg.bq != cfg.l:
        parts.append((t < cfg.l)[None, :, None])
    if key_start is not None:
        if cfg.nk * cfg.bk != cfg.s:
            parts.append((c >= j * cfg.bk)[None, None, :])
    elif cfg.nk * cfg.bk != cfg.s:
        parts.append((c < cfg.s)[None, None, :])
    if cfg.causal:
        parts.append(c[None, None, :] <= pos[:, :, None])
    if cfg.window is not None:
        parts.append(c[None, None, :] > pos[:, :, None] - cfg.window)
    if q_seg is not None:
        parts.append(q_seg[:, :, None] == kv_seg[:, None, :])
    if not parts:
        return None
    mask = parts[0]
    for m in parts[1:]:
        mask = mask & m
    return mask[:, None, :, None, :]


def _key_range(cfg, i, offsets):
    """[lo, hi): the key blocks query block i can reach (any batch row); the rest are fully masked."""
    if not cfg.causal:
        return 0, cfg.nk
    last = jnp.minimum(i * cfg.bq + cfg.bq, cfg.l) - 1 + jnp.max(offsets)  # latest query position in the block
    hi = jnp.clip(last // cfg.bk + 1, 0, cfg.nk)
    if cfg.window is None:
        return 0, hi
    first = i * cfg.bq + jnp.min(offsets)
    return jnp.clip((first - cfg.window + 1) // cfg.bk, 0, cfg.nk), hi


def _query_range(cfg, j, offsets):
    """[lo, hi): the query blocks that reach key block j (any batch row)."""
    if not cfg.causal:
        return 0, cfg.nq
    lo = jnp.clip((j * cfg.bk - jnp.max(offsets)) // cfg.bq, 0, cfg.nq)  # queries at or after the block's first key
    if cfg.window is None:
        return lo, cfg.nq
    last_key = jnp.minimum(j * cfg.bk + cfg.bk, cfg.s) - 1
    return lo, jnp.clip((last_key + cfg.window - 1 - jnp.min(offsets)) // cfg.bq + 1, 0, cfg.nq)


def _scores(cfg, qi, kj, mask):
    """(b, g, bq, r, bk) float32 scores (scaled, soft-capped, masked to -inf) and tanh(x / c) for the backward."""
    sc = jnp.einsum("bgqrk,bgsk->bgqrs", qi, kj, preferred_element_type=_acc_dtype(qi.dtype)) * cfg.scale
    t = None
    if cfg.softcap is not None:
        t = jnp.tanh(sc / cfg.softcap)
        sc = cfg.softcap * t
    if mask is not None:
        sc = jnp.where(mask, sc, -jnp.inf)  # exp(-inf - finite) = 0 in the forward and the backward
    return sc, t


def _kv_slice(x, start, size):
    """(b, s, g, k) -> the (b, g, size, k) block of keys start .. start + size - 1."""
    return jnp.swapaxes(jax.lax.dynamic_slice_in_dim(x, start, size, axis=1), 1, 2)


def _prepare(cfg, q, k, v, q_seg, kv_seg):
    dt = jnp.result_type(q, k, v)
    g = k.shape[2]
    q = q.astype(dt).reshape(*q.shape[:2], g, q.shape[2] // g, q.shape[3])
    return (_q_blocks(cfg, q), _kv_blocks(cfg, k.astype(dt)), _kv_blocks(cfg, v.astype(dt)),
            _seg_blocks(q_seg, cfg.nq, cfg.bq), _seg_blocks(kv_seg, cfg.nk, cfg.bk))


def _forward(cfg, q, k, v, q_seg, kv_seg, offsets):
    """Output (b, l, h, k) in float32 (or wider) and lse (nq, b, g, bq, r) in float32."""
    # Queries are blocked up front; keys and values are sliced per visited block from the unpadded (b, s, g, k)
    # arrays, so a decode step against a large, mostly empty KV cache costs O(visited blocks), not O(s).
    dt = jnp.result_type(q, k, v)
    g = k.shape[2]
    qb = _q_blocks(cfg, q.astype(dt).reshape(*q.shape[:2], g, q.shape[2] // g, q.shape[3]))
    qsb = _seg_blocks(q_seg, cfg.nq, cfg.bq)
    k, v = k.astype(dt), v.astype(dt)
    acc_t = _acc_dtype(qb.dtype)
    row_shape = qb.shape[1:-1]  # (b, g, bq, r)

    def query_block(_, xs):
        i, qi, qsi = xs

        def key_block(j, carry):
            m, den, acc = carry
            start = jnp.minimum(j * cfg.bk, cfg.s - cfg.bk)
            kj, vj = _kv_slice(k, start, cfg.bk), _kv_slice(v, start, cfg.bk)
            ksj = None if kv_seg is None else jax.lax.dynamic_slice_in_dim(kv_seg, start, cfg.bk, axis=1)
            mask = _block_mask(cfg, i, j, offsets, qsi, ksj, key_start=start)
            sc, _ = _scores(cfg, qi, kj, mask)
            m_new = jnp.maximum(m, sc.max(-1))  # stays NEG_INF (finite) while every key so far is masked
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(sc - m_new[..., None])
            pv = jnp.einsum("bgqrs,bgsk->bgqrk", p.astype(vj.dtype), vj, preferred_element_type=acc_t)
            return m_new, alpha * den + p.sum(-1), alpha[..., None] * acc + pv

        init = (jnp.full(row_shape, NEG_INF, acc_t), jnp.zeros(row_shape, acc_t), jnp.zeros(qi.shape, acc_t))
        m, den, acc = jax.lax.fori_loop(*_key_range(cfg, i, offsets), key_block, init)
        empty = den == 0  # no allowed key: output 0
        out = acc / jnp.where(empty, 1.0, den)[..., None]
        lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, den)))
        return None, (out, lse)

    _, (ob, lse) = jax.lax.scan(query_block, None, (jnp.arange(cfg.nq), qb, qsb))
    return _unblock_q(cfg, ob), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_seg, kv_seg, offsets):
    # Only a forward that is not differentiated runs here (see CPU_FORWARD_BLOCK_ELEMENTS).
    if jax.default_backend() == "cpu" and CPU_FORWARD_BLOCK_ELEMENTS:
        bq, bk = _grown(cfg.bq, min(cfg.bk, cfg.bq), q.shape[0] * q.shape[2], CPU_FORWARD_BLOCK_ELEMENTS, cfg.l, cfg.s)
        cfg = cfg._replace(bq=bq, bk=bk)
    return _forward(cfg, q, k, v, q_seg, kv_seg, offsets)[0].astype(q.dtype)


def _flash_fwd(cfg, q, k, v, q_seg, kv_seg, offsets):
    out, lse = _forward(cfg, q, k, v, q_seg, kv_seg, offsets)
    # the float32 output (the same array for float32 inputs): rowsum(do * out) from a bf16-rounded output would
    # shift every ds of the row and cost dk twice the error of the reference's bf16 gradients
    return out.astype(q.dtype), (q, k, v, q_seg, kv_seg, offsets, out, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_seg, kv_seg, offsets, out, lse = res
    qb, kb, vb, qsb, ksb = _prepare(cfg, q, k, v, q_seg, kv_seg)
    dt, acc_t = qb.dtype, _acc_dtype(qb.dtype)
    g = k.shape[2]
    split = lambda x: x.reshape(*x.shape[:2], g, x.shape[2] // g, *x.shape[3:])
    dob = _q_blocks(cfg, split(do.astype(dt)))
    delta = _q_blocks(cfg, split(jnp.sum(do.astype(acc_t) * out.astype(acc_t), axis=-1)))  # rowsum(do * out)

    def key_block(dq, xs):
        j, kj, vj, ksj = xs

        def query_block(i, carry):
            dq, dk, dv = carry
            qi, doi = qb[i], dob[i]
            mask = _block_mask(cfg, i, j, offsets, None if qsb is None else qsb[i], ksj)
            sc, t = _scores(cfg, qi, kj, mask)
            p = jnp.exp(sc - lse[i][..., None])
            dv = dv + jnp.einsum("bgqrs,bgqrk->bgsk", p.astype(dt), doi, preferred_element_type=acc_t)
            dp = jnp.einsum("bgqrk,bgsk->bgqrs", doi, vj, preferred_element_type=acc_t)
            ds = p * (dp - delta[i][..., None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            # ds stays float32 (q, k upcast): ds sums to ~0 along a row, and rounding it to bf16 gave dq / dk
            # up to 2x the error of the reference's bf16 gradients (p for dv is rounded, as in the forward)
            ds = ds * cfg.scale
            dqi = jnp.einsum("bgqrs,bgsk->bgqrk", ds, kj.astype(acc_t), preferred_element_type=acc_t)
            dq = jax.lax.dynamic_update_index_in_dim(dq, jax.lax.dynamic_index_in_dim(dq, i, 0, False) + dqi, i, 0)
            dk = dk + jnp.einsum("bgqrs,bgqrk->bgsk", ds, qi.astype(acc_t), preferred_element_type=acc_t)
            return dq, dk, dv

        zeros = jnp.zeros(kj.shape, acc_t)
        dq, dk, dv = jax.lax.fori_loop(*_query_range(cfg, j, offsets), query_block, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dkb, dvb) = jax.lax.scan(key_block, jnp.zeros(qb.shape, acc_t), (jnp.arange(cfg.nk), kb, vb, ksb))
    dq = _unblock_q(cfg, dq).astype(q.dtype)
    return dq, _unblock_kv(cfg, dkb).astype(k.dtype), _unblock_kv(cfg, dvb).astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


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


def _pallas_supports(q, k, v, *, causal=True, q_segment_ids=None, kv_segment_ids=None, window=None, softcap=None,
                     scale=None, q_offset=None) -> str | None:
    """The dispatcher's question for `attention` (validated arguments; attention_decode passes q, k, v only and
    lists no pallas path, so its call never reaches the kernel)."""
    segments = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
    return fa.supports(q, k, v, causal=causal, segment_ids=segments, window=window, softcap=softcap, scale=scale,
                       q_offset=q_offset)


register_pallas("attention", _pallas_supports)
