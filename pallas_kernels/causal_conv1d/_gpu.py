"""GPU variant (Pallas lowered through Triton): whole-array refs and masked gathers at shifted rows.

Each program owns a (block_l, block_c) tile of (l, c) for one batch row. Taps are loads of the same tile shifted
back by d = w - 1 - j rows; they overlap their neighbours' tiles and hit L1/L2, so HBM sees x about once. Rows
are addressed with explicit index vectors (not `pl.ds` starts): the first tile's taps reach rows t - d < 0, which
read initial_state instead, and index vectors keep those masked rows exact in interpret mode too (a negative
`pl.ds` start would be clamped there). Nothing is padded: rows >= l and channels >= c are masked, so the
kernels touch x, dy and y exactly where they exist.

The backward is one pass: per chunk of rows it recomputes the pre-activation at the w rows each dx row gathers
from, so it reads x and dy and writes dx (3 passes over (b, l, c), vs the forward's 2). Its rows are shifted back
by w - 1 so the first chunk's rows before t = 0 are exactly d initial_state; dweight/dbias accumulate over a
program's chunks in registers.

Names: x (b, l, c) inputs; wb (w + 1, c) float32 taps with the bias as row w; init (b, w - 1, c) the inputs
before t = 0; allow (b, l) int32 the tap allowance (tap at distance d counts iff d <= allow[t]); dy the output
cotangent; gy = dy * silu'(pre) the cotangent of the pre-activation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels._common import compiler_params, interpret_arg

BIG = 2 ** 30  # allowance of the first segment (and of rows before t = 0): every tap counts


def _sigmoid(z):
    return 1.0 / (1.0 + jnp.exp(-z))


class _Tile:
    """Loads for one program: batch row `bi`, rows `base + o` for small static offsets o, channel columns `cols`
    (bc,). Each (offset, quantity) is loaded or computed once and reused (float32 (bl, bc) tiles)."""

    def __init__(self, refs, bi, base, cols, taps, *, w, l, c):
        self.x_ref, self.init_ref, self.allow_ref = refs
        self.bi, self.base, self.cols, self.taps, self.w, self.l = bi, base, cols, taps, w, l
        self.cmask = cols < c
        self._memo = {}

    def _once(self, key, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def load(self, ref, r, valid, other=0.0):
        m = valid[:, None] & self.cmask[None, :]
        return pltr.load(ref.at[self.bi, r[:, None], self.cols[None, :]], mask=m, other=other).astype(jnp.float32)

    def rows_in_seq(self, o):
        r = self.base + o
        return r, (r >= 0) & (r < self.l)

    def x(self, o):
        """x at rows base + o; rows before t = 0 read initial_state[r + w - 1] (zeros without one)."""
        def fn():
            r, valid = self.rows_in_seq(o)
            v = self.load(self.x_ref, r, valid)
            if self.init_ref is not None:
                v = v + self.load(self.init_ref, r + self.w - 1, (r < 0) & (r >= 1 - self.w))
            return v
        return self._once(("x", o), fn)

    def allow(self, o):
        """Tap allowance at rows base + o (BIG before t = 0: the first segment); None without segments."""
        if self.allow_ref is None:
            return None
        r, valid = self.rows_in_seq(o)
        return self._once(("allow", o), lambda: pltr.load(self.allow_ref.at[self.bi, r], mask=valid, other=BIG))

    def pre(self, o):
        """Pre-activation bias + sum_j wb[j] x[r - d_j] (same segment) at rows r = base + o."""
        def fn():
            acc, allow = self.taps[self.w], self.allow(o)
            for j in range(self.w):
                d = self.w - 1 - j
                tap = self.x(o - d) * self.taps[j]
                if allow is not None and d > 0:
                    tap = jnp.where((allow >= d)[:, None], tap, 0.0)
                acc = acc + tap
            return acc
        return self._once(("pre", o), fn)


def _load_taps(wb_ref, cols, w: int, c: int):
    """The w taps and the bias (row w) for these columns, each (1, bc) float32."""
    return [pltr.load(wb_ref.at[j, cols], mask=cols < c, other=0.0)[None, :] for j in range(w + 1)]


def _fwd_kernel(x_ref, wb_ref, init_ref, allow_ref, y_ref, *, w, l, c, bl, bc, silu):
    bi, i, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t = i * bl + jnp.arange(bl)
    cols = k * bc + jnp.arange(bc)
    tile = _Tile((x_ref, init_ref, allow_ref), bi, t, cols, _load_taps(wb_ref, cols, w, c), w=w, l=l, c=c)
    pre = tile.pre(0)
    y = pre * _sigmoid(pre) if silu else pre
    pltr.store(y_ref.at[bi, t[:, None], cols[None, :]], y.astype(y_ref.dtype),
               mask=(t < l)[:, None] & tile.cmask[None, :])


def _bwd_chunk(tile, dy_ref, dx_ref, dinit_ref, *, w, l, silu):
    """One (bl, bc) chunk at rows s = tile.base: stores dx (rows s >= 0) and d initial_state (rows s < 0), and
    returns this chunk's dweight/dbias terms summed over its rows t = s + w - 1."""
    s, bi, cols = tile.base, tile.bi, tile.cols[None, :]
    gys = {}

    def gy(o):
        """Cotangent of the pre-activation at rows s + o; 0 outside [0, l). silu'(p) = sig(p) (1 + p (1 - sig(p)))."""
        if o not in gys:
            r, valid = tile.rows_in_seq(o)
            g = tile.load(dy_ref, r, valid)
            if silu:
                p = tile.pre(o)  # recomputed: x is read here anyway for dweight, so this costs no HBM bytes
                sg = _sigmoid(p)
                g = g * sg * (1.0 + p * (1.0 - sg))
            gys[o] = g
        return gys[o]

    # dx[s] = sum_d wb[w - 1 - d] gy[s + d], counting target rows s + d whose segment reaches back d steps
    dx = None
    for d in range(w):
        g = gy(d)
        if tile.allow(d) is not None and d > 0:
            g = jnp.where((tile.allow(d) >= d)[:, None], g, 0.0)
        dx = g * tile.taps[w - 1 - d] if dx is None else dx + g * tile.taps[w - 1 - d]
    pltr.store(dx_ref.at[bi, s[:, None], cols], dx.astype(dx_ref.dtype),
               mask=((s >= 0) & (s < l))[:, None] & tile.cmask[None, :])
    if dinit_ref is not None:
        pltr.store(dinit_ref.at[bi, (s + w - 1)[:, None], cols], dx.astype(dinit_ref.dtype),
                   mask=(s < 0)[:, None] & tile.cmask[None, :])
    # dweight[j] = sum_t gy[t] x[t - d_j] over t = s + w - 1, i.e. x[s + j]; row w is dbias
    g_t, allow_t = gy(w - 1), tile.allow(w - 1)
    terms = []
    for j in range(w):
        d = w - 1 - j
        prod = g_t * tile.x(j)
        if allow_t is not None and d > 0:
            prod = jnp.where((allow_t >= d)[:, None], prod, 0.0)
        terms.append(jnp.sum(prod, axis=0))
    return terms + [jnp.sum(g_t, axis=0)]


def _bwd_kernel(x_ref, wb_ref, init_ref, allow_ref, dy_ref, dx_ref, dwb_ref, dinit_ref, *, w, l, c, bl, bc,
                chunks, silu):
    """Program i covers rows s in [i * chunks * bl, (i + 1) * chunks * bl) - (w - 1), chunk by chunk: rows s < 0
    are d initial_state, rows s >= 0 are dx, so d initial_state needs no extra pass. dweight/dbias accumulate over
    the chunks in registers and leave as one (w + 1, bc) partial per program (XLA adds the programs)."""
    bi, i, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cols = k * bc + jnp.arange(bc)
    taps = _load_taps(wb_ref, cols, w, c)

    def body(ci, acc):
        base = (i * chunks + ci) * bl - (w - 1) + jnp.arange(bl)
        tile = _Tile((x_ref, init_ref, allow_ref), bi, base, cols, taps, w=w, l=l, c=c)
        terms = _bwd_chunk(tile, dy_ref, dx_ref, dinit_ref, w=w, l=l, silu=silu)
        return tuple(a + t for a, t in zip(acc, terms))

    acc = jax.lax.fori_loop(0, chunks, body, tuple(jnp.zeros((bc,), jnp.float32) for _ in range(w + 1)))
    for j in range(w + 1):
        pltr.store(dwb_ref.at[bi, i, j, cols], acc[j], mask=cols < c)


def _optional(kernel, present):
    """Adapt `kernel(*refs)` to a pallas_call that omits the absent (None) operands."""
    def wrapped(*refs):
        it = iter(refs)
        return kernel(*[next(it) if p else None for p in present])
    return wrapped


def forward(x, wb, init, allow, *, w, silu, block_l, block_c, num_warps, num_stages, interpret):
    b, l, c = x.shape
    ins = (x, wb, init, allow)
    present = [a is not None for a in ins] + [True]
    kernel = functools.partial(_fwd_kernel, w=w, l=l, c=c, bl=block_l, bc=block_c, silu=silu)
    return pl.pallas_call(
        _optional(kernel, present), out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(b, pl.cdiv(l, block_l), pl.cdiv(c, block_c)),
        compiler_params=compiler_params("gpu", num_warps=num_warps, num_stages=num_stages),
        interpret=interpret_arg("gpu", interpret), name="causal_conv1d_fwd",
    )(*[a for a in ins if a is not None])


def backward(x, wb, init, allow, dy, *, w, silu, block_l, block_c, chunks, num_warps, num_stages, interpret):
    """(dx (b, l, c) in x.dtype, dwb (w + 1, c) float32 with dbias as row w, dinit (b, w - 1, c) float32 or
    None). Each program walks `chunks` tiles of block_l rows."""
    b, l, c = x.shape
    chunks = max(1, min(chunks, pl.cdiv(l + w - 1, block_l)))
    nl = pl.cdiv(l + w - 1, block_l * chunks)  # rows -(w - 1) .. l - 1
    ins = (x, wb, init, allow, dy)
    outs = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, nl, w + 1, c), jnp.float32)]
    if init is not None:
        outs.append(jax.ShapeDtypeStruct(init.shape, jnp.float32))
    present = [a is not None for a in ins] + [True, True, init is not None]
    kernel = functools.partial(_bwd_kernel, w=w, l=l, c=c, bl=block_l, bc=block_c, chunks=chunks, silu=silu)
    res = pl.pallas_call(
        _optional(kernel, present), out_shape=tuple(outs), grid=(b, nl, pl.cdiv(c, block_c)),
        compiler_params=compiler_params("gpu", num_warps=num_warps, num_stages=num_stages),
        interpret=interpret_arg("gpu", interpret), name="causal_conv1d_bwd",
    )(*[a for a in ins if a is not None])
    return res[0], res[1].sum(axis=(0, 1)), (res[2] if init is not None else None)


def _update_kernel(state_ref, x_ref, wb_ref, y_ref, new_ref, *, w, b, c, bb, bc, silu):
    rows = pl.program_id(0) * bb + jnp.arange(bb)
    cols = pl.program_id(1) * bc + jnp.arange(bc)
    m = (rows < b)[:, None] & (cols < c)[None, :]
    x = pltr.load(x_ref.at[rows[:, None], cols[None, :]], mask=m, other=0.0)
    taps = _load_taps(wb_ref, cols, w, c)
    acc = taps[w] + x.astype(jnp.float32) * taps[w - 1]
    for j in range(w - 1):  # window[j] = state[j] for j < w - 1; the new state is window[1:] (exact copies)
        v = pltr.load(state_ref.at[rows[:, None], j, cols[None, :]], mask=m, other=0.0)
        acc = acc + v.astype(jnp.float32) * taps[j]
        if j > 0:
            pltr.store(new_ref.at[rows[:, None], j - 1, cols[None, :]], v, mask=m)
    if w > 1:
        pltr.store(new_ref.at[rows[:, None], w - 2, cols[None, :]], x, mask=m)
    y = acc * _sigmoid(acc) if silu else acc
    pltr.store(y_ref.at[rows[:, None], cols[None, :]], y.astype(y_ref.dtype), mask=m)


def update(state, x, wb, *, w, silu, block_b, block_c, num_warps, interpret):
    """One decode step: (y (b, c), new_state (b, w - 1, c)); state is in x.dtype, or None when w = 1."""
    b, c = x.shape
    kernel = functools.partial(_update_kernel, w=w, b=b, c=c, bb=block_b, bc=block_c, silu=silu)
    has_state = state is not None
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)] + ([jax.ShapeDtypeStruct(state.shape, x.dtype)]
                                                             if has_state else [])
    res = pl.pallas_call(
        _optional(kernel, [has_state, True, True, True, has_state]), out_shape=tuple(out_shape),
        grid=(pl.cdiv(b, block_b), pl.cdiv(c, block_c)),
        compiler_params=compiler_params("gpu", num_warps=num_warps, num_stages=1),
        interpret=interpret_arg("gpu", interpret), name="causal_conv1d_update",
    )(*([state] if has_state else []), x, wb)
    return res[0], (res[1] if has_state else None)
