"""TPU variant (Pallas-Mosaic): non-overlapping (block_l, block_c) blocks plus small halo blocks.

BlockSpecs cannot overlap, so the w - 1 rows before a block arrive as a second view of x: a (h, block_c) block
(h = w - 1 rounded up to the sublane tile, 8 rows for 32-bit and 16 for 16-bit dtypes) whose index map points at
the h rows just before the block (clamped at the start; the first block takes initial_state, padded at the front
to h rows, instead). The block and its halo are copied once into a float32 VMEM scratch and every tap is a
static, sublane-offset slice of it. Channels sit on lanes (block_c a multiple of 128), the sequence on
sublanes; the entry pads c and l to the block multiple (a no-op for aligned shapes such as l = c = 4096).

The backward also needs the h rows *after* the block (dx[s] gathers gy[s .. s + w - 1]): a second halo view of
dy and x. The sequence axis is the innermost grid axis and "arbitrary", so dweight/dbias accumulate in an output
block that stays resident across it.

Names: x (b, l, c); wb (wpad, c) float32 taps, bias in row w; init (b, h, c) with initial_state in its last
w - 1 rows; allow (b, l, 1) int32 tap allowance (distance d counts iff d <= allow[t]); gy the pre-activation
cotangent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import compiler_params, interpret_arg

BIG = 2 ** 30
_SQ = pl.Squeezed()


def halo_rows(w: int, dtype) -> int:
    """Rows in a halo block: w - 1 rounded up to the sublane tile of `dtype` (8 rows of 32-bit, 16 of 16-bit)."""
    sub = 8 * (4 // jnp.dtype(dtype).itemsize)
    return max(sub, -(-(w - 1) // sub) * sub)


def _sigmoid(z):
    return 1.0 / (1.0 + jnp.exp(-z))


def _masked(v, allow, d):
    """Zero rows of v whose allowance (n, 1) is below d (the tap would reach into an earlier segment)."""
    if allow is None or d == 0:
        return v
    return jnp.where(jnp.broadcast_to(allow, v.shape) >= d, v, 0.0)  # broadcast the int32, not an i1 mask


def _pre(xe, wb_ref, allow, lo, n, w):
    """Pre-activation for the n rows whose current input sits at xe rows [lo, lo + n)."""
    acc = jnp.broadcast_to(wb_ref[w:w + 1, :], (n, xe.shape[1]))
    for j in range(w):
        d = w - 1 - j
        acc = acc + _masked(xe[pl.ds(lo - d, n), :] * wb_ref[j:j + 1, :], allow, d)
    return acc


def _fill_prev_halo(xe, halo_ref, init_ref, h):
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        if init_ref is None:
            xe[0:h, :] = jnp.zeros((h, xe.shape[1]), jnp.float32)
        else:
            xe[0:h, :] = init_ref[...].astype(jnp.float32)

    @pl.when(i > 0)
    def _():
        xe[0:h, :] = halo_ref[...].astype(jnp.float32)


def _fwd_kernel(x_ref, halo_ref, init_ref, wb_ref, allow_ref, y_ref, xe, *, w, h, bl, silu):
    _fill_prev_halo(xe, halo_ref, init_ref, h)
    xe[h:h + bl, :] = x_ref[...].astype(jnp.float32)
    pre = _pre(xe, wb_ref, None if allow_ref is None else allow_ref[...], h, bl, w)
    y = pre * _sigmoid(pre) if silu else pre
    y_ref[...] = y.astype(y_ref.dtype)


def _bwd_kernel(x_ref, xprev_ref, xnext_ref, init_ref, wb_ref, allow_ref, anext_ref, dy_ref, dynext_ref,
                dx_ref, dwb_ref, dinit_ref, xe, ge, ae, *, w, h, bl, silu):
    """Scratch rows: xe/ge/ae hold rows [s - h, s + bl + h) of x, gy and the allowance (s = block start)."""
    i = pl.program_id(2)
    last = i == pl.num_programs(2) - 1
    bc = xe.shape[1]
    has_allow = allow_ref is not None
    _fill_prev_halo(xe, xprev_ref, init_ref, h)
    xe[h:h + bl, :] = x_ref[...].astype(jnp.float32)
    xe[h + bl:, :] = xnext_ref[...].astype(jnp.float32)  # stale in the last block, whose next gy rows are zeroed
    if has_allow:
        ae[0:h, :] = jnp.full((h, 1), BIG, jnp.int32)  # rows before t = 0 belong to the first segment
        ae[h:h + bl, :] = allow_ref[...]
        ae[h + bl:, :] = anext_ref[...]

    def gy(dy, lo, n):
        if not silu:
            return dy
        p = _pre(xe, wb_ref, ae[pl.ds(lo, n), :] if has_allow else None, lo, n, w)
        s = _sigmoid(p)
        return dy * s * (1.0 + p * (1.0 - s))  # silu'(p)

    ge[0:h, :] = jnp.zeros((h, bc), jnp.float32)
    ge[h:h + bl, :] = gy(dy_ref[...].astype(jnp.float32), h, bl)

    @pl.when(last)
    def _():
        ge[h + bl:, :] = jnp.zeros((h, bc), jnp.float32)  # past the (padded) sequence end

    @pl.when(jnp.logical_not(last))
    def _():
        ge[h + bl:, :] = gy(dynext_ref[...].astype(jnp.float32), h + bl, h)

    def dx_rows(lo, n):
        """dx at the n rows starting at scratch row lo: sum_d wb[w - 1 - d] gy[s + d], target's allowance >= d."""
        acc = jnp.zeros((n, bc), jnp.float32)
        for d in range(w):
            a = ae[pl.ds(lo + d, n), :] if has_allow else None
            acc = acc + _masked(ge[pl.ds(lo + d, n), :], a, d) * wb_ref[w - 1 - d:w - d, :]
        return acc

    dx_ref[...] = dx_rows(h, bl).astype(dx_ref.dtype)

    @pl.when(i == 0)
    def _():
        dwb_ref[...] = jnp.zeros(dwb_ref.shape, jnp.float32)
        if dinit_ref is not None:  # rows -h .. -1: the last w - 1 are d initial_state
            dinit_ref[...] = dx_rows(0, h)

    g0 = ge[h:h + bl, :]
    allow = ae[h:h + bl, :] if has_allow else None
    for j in range(w):
        d = w - 1 - j
        dwb_ref[j:j + 1, :] += jnp.sum(_masked(g0 * xe[pl.ds(h - d, bl), :], allow, d), axis=0, keepdims=True)
    dwb_ref[w:w + 1, :] += jnp.sum(g0, axis=0, keepdims=True)


def _optional(kernel, present):
    def wrapped(*refs):
        it = iter(refs)
        return kernel(*[next(it) if p else None for p in present])
    return wrapped


def _specs(bl, bc, h, lp):
    """BlockSpecs over the (b, c blocks, l blocks) grid: the block, its halo before and after, column blocks."""
    r = bl // h  # halo blocks per block
    last_halo = lp // h - 1
    return dict(
        blk=pl.BlockSpec((_SQ, bl, bc), lambda b, k, i: (b, i, k)),
        prev=pl.BlockSpec((_SQ, h, bc), lambda b, k, i: (b, jnp.maximum(i * r - 1, 0), k)),
        next=pl.BlockSpec((_SQ, h, bc), lambda b, k, i: (b, jnp.minimum((i + 1) * r, last_halo), k)),
        init=pl.BlockSpec((_SQ, h, bc), lambda b, k, i: (b, 0, k)),
        cols=lambda rows: pl.BlockSpec((rows, bc), lambda b, k, i: (0, k)),
        acc=lambda rows: pl.BlockSpec((_SQ, rows, bc), lambda b, k, i: (b, 0, k)),
        ablk=pl.BlockSpec((_SQ, bl, 1), lambda b, k, i: (b, i, 0)),
        anext=pl.BlockSpec((_SQ, h, 1), lambda b, k, i: (b, jnp.minimum((i + 1) * r, last_halo), 0)),
    )


def forward(x, wb, init, allow, *, w, silu, block_l, block_c, interpret):
    """x (b, lp, cp) padded to the blocks; init (b, h, cp) or None; allow (b, lp, 1) or None."""
    b, lp, cp = x.shape
    h = halo_rows(w, x.dtype)
    sp = _specs(block_l, block_c, h, lp)
    ins = [(x, sp["blk"]), (x, sp["prev"]), (init, sp["init"]), (wb, sp["cols"](wb.shape[0])),
           (allow, sp["ablk"])]
    present = [a is not None for a, _ in ins] + [True, True]  # the inputs, y, the scratch
    ins = [(a, s) for a, s in ins if a is not None]
    kernel = functools.partial(_fwd_kernel, w=w, h=h, bl=block_l, silu=silu)
    return pl.pallas_call(
        _optional(kernel, present), out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(b, cp // block_c, lp // block_l), in_specs=[s for _, s in ins], out_specs=sp["blk"],
        scratch_shapes=[pltpu.VMEM((h + block_l, block_c), jnp.float32)],
        compiler_params=compiler_params("tpu", dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret_arg("tpu", interpret), name="causal_conv1d_fwd",
    )(*[a for a, _ in ins])


def backward(x, wb, init, allow, dy, *, w, silu, block_l, block_c, interpret):
    """(dx (b, lp, cp) in x.dtype, dwb (wpad, cp) float32 with dbias as row w, dinit (b, h, cp) float32 or None)."""
    b, lp, cp = x.shape
    h = halo_rows(w, x.dtype)
    sp = _specs(block_l, block_c, h, lp)
    wpad = wb.shape[0]
    ins = [(x, sp["blk"]), (x, sp["prev"]), (x, sp["next"]), (init, sp["init"]), (wb, sp["cols"](wpad)),
           (allow, sp["ablk"]), (allow, sp["anext"]), (dy, sp["blk"]), (dy, sp["next"])]
    outs = [(jax.ShapeDtypeStruct(x.shape, x.dtype), sp["blk"]),
            (jax.ShapeDtypeStruct((b, wpad, cp), jnp.float32), sp["acc"](wpad))]
    if init is not None:
        outs.append((jax.ShapeDtypeStruct((b, h, cp), jnp.float32), sp["acc"](h)))
    scratch = [pltpu.VMEM((2 * h + block_l, block_c), jnp.float32)] * 2
    scratch.append(pltpu.VMEM((2 * h + block_l, 1), jnp.int32) if allow is not None else None)
    # the inputs, dx, dwb, dinit, the scratch xe, ge, ae
    present = [a is not None for a, _ in ins] + [True, True, init is not None] + [s is not None for s in scratch]
    ins = [(a, s) for a, s in ins if a is not None]
    kernel = functools.partial(_bwd_kernel, w=w, h=h, bl=block_l, silu=silu)
    res = pl.pallas_call(
        _optional(kernel, present), out_shape=tuple(o for o, _ in outs),
        grid=(b, cp // block_c, lp // block_l), in_specs=[s for _, s in ins], out_specs=tuple(s for _, s in outs),
        scratch_shapes=[s for s in scratch if s is not None],
        compiler_params=compiler_params("tpu", dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret_arg("tpu", interpret), name="causal_conv1d_bwd",
    )(*[a for a, _ in ins])
    return res[0], res[1].sum(axis=0), (res[2] if init is not None else None)


def _update_kernel(state_ref, x_ref, wb_ref, y_ref, new_ref, acc, *, w, silu):
    """Grid step j walks the window: tap j is state slot j (j < w - 1) or x (j = w - 1); slot j - 1 of the new
    state is written with that same tap (an exact copy)."""
    j = pl.program_id(2)
    is_x = j == w - 1

    @pl.when(j == 0)
    def _():
        acc[...] = jnp.broadcast_to(wb_ref[w:w + 1, :], acc.shape)

    if state_ref is not None:  # w >= 2
        @pl.when(jnp.logical_not(is_x))
        def _():
            v = state_ref[...]
            acc[...] += v.astype(jnp.float32) * wb_ref[pl.ds(j, 1), :]

            @pl.when(j > 0)
            def _():
                new_ref[...] = v

    @pl.when(is_x)
    def _():
        v = x_ref[...]
        pre = acc[...] + v.astype(jnp.float32) * wb_ref[w - 1:w, :]
        y_ref[...] = (pre * _sigmoid(pre) if silu else pre).astype(y_ref.dtype)
        if new_ref is not None:
            new_ref[...] = v


def update(state_flat, x, wb, *, w, silu, block_b, block_c, interpret):
    """One decode step on padded inputs: state_flat (bp, (w - 1) * cp) is the (b, w - 1, c) state with each slot
    a run of cp lanes, so slot j of column block k is lane block j * (cp / block_c) + k: every operand is a 2-D
    (block_b, block_c) tile. Returns (y (bp, cp), new_state_flat); state_flat is None when w = 1."""
    bp, cp = x.shape
    nc = cp // block_c
    blk = lambda f: pl.BlockSpec((block_b, block_c), f)
    has_state = state_flat is not None
    in_specs = [blk(lambda bi, k, j: (bi, k)), pl.BlockSpec((wb.shape[0], block_c), lambda bi, k, j: (0, k))]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    out_specs = [blk(lambda bi, k, j: (bi, k))]
    if has_state:  # tap j reads slot min(j, w - 2) (x takes the last step); step j writes new slot j - 1
        in_specs.insert(0, blk(lambda bi, k, j: (bi, jnp.minimum(j, w - 2) * nc + k)))
        out_shape.append(jax.ShapeDtypeStruct(state_flat.shape, x.dtype))
        out_specs.append(blk(lambda bi, k, j: (bi, jnp.maximum(j - 1, 0) * nc + k)))
    present = [has_state, True, True, True, has_state, True]
    kernel = _optional(functools.partial(_update_kernel, w=w, silu=silu), present)
    res = pl.pallas_call(
        kernel, out_shape=tuple(out_shape), grid=(bp // block_b, nc, w), in_specs=in_specs,
        out_specs=tuple(out_specs),
        scratch_shapes=[pltpu.VMEM((block_b, block_c), jnp.float32)],
        compiler_params=compiler_params("tpu", dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret_arg("tpu", interpret), name="causal_conv1d_update",
    )(*([state_flat] if has_state else []), x, wb)
    return res[0], (res[1] if has_state else None)
