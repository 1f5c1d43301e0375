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
