"""The static configuration both variants share, and the block arithmetic of the causal / window rule.

Positions: query row i (0 <= i < l_pad, rows >= l are padding) sits at position q_offset + i, key column j at
position j. Row i may attend column j when (the module docstring of `pallas_kernels.flash_attention`)

    j < s  and  (not causal or j <= q_offset + i)  and  (window is None or j > q_offset + i - window)
           and  (no segment ids or q_segment[i] == kv_segment[j])

The ranges below are computed over every row of the padded grid (padding rows included). That keeps the
forward and the backward consistent whatever their block sizes: a block that a range skips is masked for every
row in it, so each row's log-sum-exp covers exactly its allowed keys and the backward's p = exp(s - lse) <= 1,
also on the padding rows (whose output gradient is zero).

All arithmetic takes traced int32 scalars (a program id, a grid index) or Python ints and only divides
non-negative numbers, so truncating `lax.div` equals floor division on every backend.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)  # exp(x) = exp2(x * LOG2E): the GPU kernels keep scores in base 2
NEG_INF = -1e30  # finite start for the running maximum m, so exp(m_old - m_new) is never nan


class Config(NamedTuple):
    """Static description of one call (hashable: the custom_vjp's non-differentiable argument).

    l, s: true lengths; l_pad, s_pad: padded to the block multiples; kp: padded head dim; r = h / g."""
    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    q_offset: int
    l: int
    s: int
    l_pad: int
    s_pad: int
    h: int
    g: int
    kp: int
    has_segments: bool
    variant: str
    interpret: bool
    blocks: tuple  # the resolved BlockSizes (see _entry.resolve_blocks), as a hashable tuple of ints

    @property
    def r(self) -> int:
        return self.h // self.g


def _div(a, b: int):
    """floor(a / b) for a >= 0 (a traced int32 or a Python int)."""
    return jax.lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def _cdiv(a, b: int):
    return _div(jnp.asarray(a, jnp.int32) + (b - 1), b)


def key_blocks(cfg: Config, qi, bq: int, bk: int):
    """For query block qi: (lo, hi) the key blocks its rows can reach, and (a, b) with lo <= a <= b <= hi the
    ones every row sees entirely (no mask needed). Blocks [lo, a) and [b, hi) need the element mask."""
    nk = cfg.s_pad // bk
    p0 = cfg.q_offset + qi * bq  # first row position (FA-2: the block's queries Q_i)
    p1 = p0 + (bq - 1)  # last row position
    lo, hi = jnp.int32(0), jnp.int32(nk)
    a, b = jnp.int32(0), jnp.int32(nk)
    if cfg.causal:
        hi = jnp.minimum(hi, _div(p1, bk) + 1)  # keys j <= p1
        b = _div(p0 + 1, bk)  # blocks whose last key <= p0
    if cfg.window is not None:
        lo = _div(jnp.maximum(p0 - cfg.window + 1, 0), bk)  # keys j > p0 - window
        a = _cdiv(jnp.maximum(p1 - cfg.window + 1, 0), bk)  # blocks whose first key > p1 - window
    if cfg.s % bk:
        b = jnp.minimum(b, cfg.s // bk)  # the last block holds padding keys
    if cfg.has_segments:
        b = a  # segment ids can mask anything: every block takes the mask
    a = jnp.clip(a, lo, hi)
    return lo, hi, a, jnp.clip(b, a, hi)


def query_blocks(cfg: Config, kj, bq: int, bk: int):
    """For key block kj: (lo, hi) the query blocks that reach it, and (a, b) those whose every row sees all of
    its keys; the mirror image of `key_blocks` for the dK / dV pass."""
    nq = cfg.l_pad // bq
    c0 = kj * bk  # first key (FA-2: the block's keys K_j)
    c1 = c0 + (bk - 1)
    lo, hi = jnp.int32(0), jnp.int32(nq)
    a, b = jnp.int32(0), jnp.int32(nq)
    if cfg.causal:
        lo = _div(jnp.maximum(c0 - cfg.q_offset, 0), bq)  # some row i with q_offset + i >= c0
        a = _cdiv(jnp.maximum(c1 - cfg.q_offset, 0), bq)  # every row i has q_offset + i >= c1
    if cfg.window is not None:
        top = c1 - cfg.q_offset + cfg.window - 1  # rows i <= top see key c1
        hi = jnp.minimum(hi, _div(jnp.maximum(top, -1) + bq, bq))
        b = _div(jnp.maximum(c0 - cfg.q_offset + cfg.window, 0), bq)  # rows i < c0 - q_offset + window see c0
    if cfg.s % bk:
        b = jnp.where(c1 < cfg.s, b, a)  # the block holds padding keys: mask every row
    if cfg.has_segments:
        b = a
    a = jnp.clip(a, lo, hi)
    return lo, hi, a, jnp.clip(b, a, hi)


def element_mask(cfg: Config, rows, cols, q_seg=None, kv_seg=None):
    """Boolean mask for row indices `rows` against column indices `cols` (broadcastable int32 arrays), and the
    matching segment ids; None when nothing can be masked."""
    pos = rows + cfg.q_offset
    parts = []
    if cfg.s != cfg.s_pad:
        parts.append(cols < cfg.s)
    if cfg.causal:
        parts.append(cols <= pos)
    if cfg.window is not None:
        parts.append(cols > pos - cfg.window)
    if q_seg is not None:
        parts.append(q_seg == kv_seg)
    if not parts:
        return None
    mask = parts[0]
    for part in parts[1:]:
        mask = mask & part
    return mask


def ds_dot(dot, ds, x, acc=None, *, round_to_input: bool = False):
    """acc + the product of the float32 dS tile and x, a query or key tile in the input dtype, for dK = dS^T Q and
    dQ = dS K; `dot(a, b)` is the variant's float32-accumulated dot in the layout the caller needs.

    dS sums to ~0 along a row, so dQ and dK are small differences, and rounding dS to bf16 for a 16-bit dot
    (FlashAttention-2's choice; `round_to_input`) loses more of them than the rest of the backward does. Without it:
    - bf16 inputs: dS = hi + lo, two bf16 dots. hi is dS with its float32 significand cut to bf16's 8 bits by a mask
      (exact in bf16), lo = dS - hi (exact in float32) rounded to bf16, so dS keeps 16 significant bits where TF32
      keeps 11, and each product with the bf16 tile is exact: on the tensor cores / MXU the sum is a float32 dot
      up to 2^-16 of dS, the same as in interpret mode. Two bf16 passes cost one TF32 pass of the GPU's tensor
      cores and fewer MXU passes than a HIGHEST float32 dot (XLA's float32 algorithm on TPU takes six), and x is
      never upcast.
    - float32 inputs: one float32 dot. float16 inputs: dS in float32 and x upcast (TF32 on the GPU), because
      float16's exponent range would flush the small entries of hi and lo.
    Terms are added to acc one at a time, so Triton folds each into its dot's accumulator."""
    if round_to_input:
        terms = [(ds.astype(x.dtype), x)]
    elif x.dtype == jnp.bfloat16:
        hi = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(ds, jnp.uint32) & jnp.uint32(0xFFFF0000),
                                          jnp.float32)
        terms = [(hi.astype(x.dtype), x), ((ds - hi).astype(x.dtype), x)]
    else:
        terms = [(ds, x.astype(jnp.float32))]
    for a, b in terms:
        acc = dot(a, b) if acc is None else acc + dot(a, b)
    return acc


def store_output(o, o_ref, lo_ref=None):
    """Write the float32 output tile o in o_ref's dtype and, when lo_ref is given, what that rounding lost (o minus
    the rounded tile, itself rounded) into lo_ref: with it the backward's D = rowsum(dO * O) sees 16 significant bits
    of O instead of bf16's 8, which is what keeps dQ and dK at the xla path's error (see `row_delta`)."""
    out = o.astype(o_ref.dtype)
    o_ref[...] = out
    if lo_ref is not None:
        lo_ref[...] = (o - out.astype(jnp.float32)).astype(lo_ref.dtype)


def row_delta(subscripts: str, do, out, out_lo):
    """FlashAttention-2's D = rowsum(dO * O) in float32 (one XLA reduction), O = out + out_lo when the forward kept
    the output's rounding error. dS = P * (dP - D) sums to ~0 along a row only as far as D equals sum_j P_ij dP_ij;
    with D from the bf16 output, a key component shared by all keys (c in k_j = c + e_j) no longer cancels in
    dQ = dS K, and in tests the gradients' error grew to 1.4-2.7x the xla path's (which keeps a float32 output)."""
    o = out.astype(jnp.float32)
    if out_lo is not None:
        o = o + out_lo.astype(jnp.float32)
    return jnp.einsum(subscripts, do.astype(jnp.float32), o)
