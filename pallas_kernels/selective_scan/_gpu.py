"""GPU (Pallas -> Triton) variant: one program per (batch, block of channels) walks the whole sequence.

Layout: x, dt, z, y (b, L, Dp) channel-last; B, C (b, L, g, Np): a program reads the rows of its group.
The state h (block_d, Np) stays in registers for the whole sequence and is never written per step.

Each chunk of T steps has three phases, so that the per-step loop does as little as possible (the per-channel
work is done once per chunk on (T, block_d) tiles, spread over all threads instead of repeated by every thread
that holds a piece of the same channel row):
  1. tiles:  delta = softplus(dt + dt_bias) (0 on padded steps) and delta x  -> a per-program workspace
  2. steps:  a = keep_t exp(delta A)  (as exp2(delta A log2 e): one ex2 per state element)
             h = a h + (delta x) B_t,   y_raw_t = h C_t                        (rows read from / written to it)
  3. tiles:  y = (y_raw + D x) silu(z)
The workspace is an extra output (b, nDb, rows, T, block_d) float32 that stays in L2; threads hand tiles to
each other through it, hence the barriers. B, C in 16-bit are converted per chunk into a second one
(b, nDb, 2, T, Np) rather than row by row. The forward also stores h at every chunk start to `hc`
(b, nc, Dp, Np) for the backward.

Cost model (sm_90a SASS of this code, bf16, n = 16, block_d 8, one warp): ~33 instructions per step in the
recurrence loop plus ~24 per step of per-chunk tile work, for 128 state elements (4 per thread, one ex2 each).
ex2 runs at 16 per clock per SM, so one ex2 per (t, d, n) bounds any exact kernel at b=2, l=4096, d=2048,
n=16 to ~64 us on an H200 (the HBM floor of the forward is ~28 us); n = 64 / 128 are 4x / 8x that.

Backward (paper's names; gy = dy silu(z) is the gradient at y_raw + D x): chunks in reverse with the adjoint dh
(block_d, Np) in registers. Per chunk it recomputes the states at its sub-chunk starts from hc into a small
per-program scratch, then per sub-chunk (last first) recomputes `sub_chunk` states and decays in registers and
steps back through them:
    dh  += gy_t C_t                 dC_t = sum_d h_t gy_t          dB_t = sum_d dh (delta x)_t
    dhB  = sum_n dh B_t             dAsum = sum_n dh h_{t-1} a A   dA += dh h_{t-1} a delta
    dh  <- a dh                     (a = 0 across a segment start, so nothing flows back over it)
and per chunk, on tiles: dx = delta dhB + D gy, ddelta = x dhB + dAsum, ddt = ddelta softplus'(v),
dz = dy (y_raw + D x) silu'(z). dB, dC come out per channel block (b, L, nDb, Np) float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels._common import compiler_params, interpret_arg
from pallas_kernels.selective_scan._math import ddt_of, delta_of, dz_of, silu_gate, unpack
from pallas_kernels.selective_scan._plan import Plan

LOG2E = math.log2(math.e)
_SQ = pl.squeezed
F32 = jnp.float32


def _barrier(p: Plan):
    """Threads exchange tiles through the global workspace: wait for every thread's stores (no-op interpreted)."""
    if not p.interpret:
        pltr.debug_barrier()


def _delta_tile(p: Plan, c, dt_ref, bias):
    """(v, delta) for chunk c as (T, block_d) tiles; delta = 0 on steps past l (inert padding)."""
    T = p.T
    v = dt_ref[pl.ds(c * T, T), :].astype(F32)
    if bias is not None:
        v = v + bias[None, :]
    return v, delta_of(p, c, v)


def _stage_bc(p: Plan, c, B_ref, C_ref, bc_ref):
    """Row getters for B_t, C_t (t inside chunk c) as float32 (Np,). With bc_ref (inputs not float32) the chunk's
    (T, Np) tiles are converted once into that workspace instead of converting a row at every step."""
    T = p.T
    if bc_ref is None:
        return (lambda t: B_ref[c * T + t].astype(F32)), (lambda t: C_ref[c * T + t].astype(F32))
    bc_ref[0] = B_ref[pl.ds(c * T, T), :].astype(F32)
    bc_ref[1] = C_ref[pl.ds(c * T, T), :].astype(F32)
    return (lambda t: bc_ref[0, t]), (lambda t: bc_ref[1, t])


def _decay(t, delta, A2, keep_ref):
    """a = keep_t exp(delta A) for one step: (block_d, Np)."""
    a = jnp.exp2(delta[:, None] * A2)
    return a if keep_ref is None else a * keep_ref[t]


# ----------------------------------------------------------------------------------------------- forward

def _fwd_kernel(*refs, p: Plan, stage_bc: bool):
    names = ("x", "dt", "A", "B", "C", p.has_D or None, p.has_z or None, p.has_bias or None, p.has_h0 or None,
             p.has_keep or None, "y", "hc", "hT", "ws", stage_bc or None)
    (x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, z_ref, bias_ref, h0_ref, keep_ref,
     y_ref, hc_ref, hT_ref, ws_ref, bc_ref) = unpack(refs, names)
    T, U = p.T, p.bs.unroll
    A2 = A_ref[...] * LOG2E  # exp(delta A) = exp2(delta A log2 e)
    bias = None if bias_ref is None else bias_ref[...]
    h = h0_ref[...] if h0_ref is not None else jnp.zeros(A2.shape, F32)

    def step(c, t, h, rows):  # t: step inside the chunk
        delta, dx = ws_ref[0, t], ws_ref[1, t]
        a = _decay(c * T + t, delta, A2, keep_ref)
        h = a * h + dx[:, None] * rows[0](t)[None, :]
        ws_ref[2, t] = jnp.sum(h * rows[1](t)[None, :], axis=1)
        return h

    def unrolled(k, h, c, rows):  # U steps written out: their loads do not depend on h and can be issued early
        for i in range(U):
            h = step(c, k * U + i, h, rows)
        return h

    def chunk(c, h):
        hc_ref[c] = h
        _, delta = _delta_tile(p, c, dt_ref, bias)
        ws_ref[0] = delta
        ws_ref[1] = delta * x_ref[pl.ds(c * T, T), :].astype(F32)
        rows = _stage_bc(p, c, B_ref, C_ref, bc_ref)
        _barrier(p)
        h = lax.fori_loop(0, T // U, functools.partial(unrolled, c=c, rows=rows), h)
        _barrier(p)
        y = ws_ref[2]
        if D_ref is not None:
            y = y + D_ref[...][None, :] * x_ref[pl.ds(c * T, T), :].astype(F32)
        if z_ref is not None:
            zt = z_ref[pl.ds(c * T, T), :].astype(F32)
            y = silu_gate(y, zt)
        y_ref[pl.ds(c * T, T), :] = y.astype(y_ref.dtype)
        _barrier(p)  # the next chunk overwrites the workspace
        return h

    hT_ref[...] = lax.fori_loop(0, p.nc, chunk, h)


def _specs(p: Plan, bd: int):
    """BlockSpecs shared by both kernels, for a channel block of bd; grid (b, Dp / bd)."""
    bpg = p.e_pad // bd  # channel blocks per group
    return dict(
        row=pl.BlockSpec((_SQ, p.L, bd), lambda i, j: (i, 0, j)),
        grp=pl.BlockSpec((_SQ, p.L, _SQ, p.Np), lambda i, j: (i, 0, j // bpg, 0)),
        vec=pl.BlockSpec((bd,), lambda i, j: (j,)),
        mat=pl.BlockSpec((bd, p.Np), lambda i, j: (j, 0)),
        st=pl.BlockSpec((_SQ, bd, p.Np), lambda i, j: (i, j, 0)),
        keep=pl.BlockSpec((_SQ, p.L), lambda i, j: (i, 0)),
        hc=pl.BlockSpec((_SQ, p.nc, bd, p.Np), lambda i, j: (i, 0, j, 0)),
        part=pl.BlockSpec((_SQ, p.L, _SQ, p.Np), lambda i, j: (i, 0, j, 0)),
        pvec=pl.BlockSpec((_SQ, bd), lambda i, j: (i, j)),
    )


def _call(kernel, p, bd, num_warps, inputs, outputs, **kernel_kw):
    """pallas_call over (b, Dp / bd) with [(array or None, spec)] inputs and [(shape, dtype, spec)] outputs.

    num_warps is always set: without Triton compiler params, jax >= 0.10 lowers pallas_call on GPU to Mosaic GPU."""
    inputs = [(a, s) for a, s in inputs if a is not None]
    return pl.pallas_call(
        functools.partial(kernel, p=p, **kernel_kw),
        grid=(p.b, p.Dp // bd),
        in_specs=[s for _, s in inputs],
        out_specs=[s for _, _, s in outputs],
        out_shape=[jax.ShapeDtypeStruct(shape, dtype) for shape, dtype, _ in outputs],
        compiler_params=compiler_params("gpu", num_warps=num_warps, num_stages=p.bs.num_stages),
        interpret=interpret_arg("gpu", p.interpret),
        name=kernel.__name__.strip("_"),
    )(*[a for a, _ in inputs])


def forward(p: Plan, x, dt, A, B, C, D, z, bias, h0, keep):
    """Padded inputs -> (y (b, L, Dp) in x.dtype, final state (b, Dp, Np) f32, chunk states (b, nc, Dp, Np))."""
    bd = p.bs.block_d
    s = _specs(p, bd)
    stage_bc = B.dtype != F32
    y, hc, hT = _call(
        _fwd_kernel, p, bd, p.bs.num_warps,
        [(x, s["row"]), (dt, s["row"]), (A, s["mat"]), (B, s["grp"]), (C, s["grp"]), (D, s["vec"]),
         (z, s["row"]), (bias, s["vec"]), (h0, s["st"]), (keep, s["keep"])],
        [((p.b, p.L, p.Dp), x.dtype, s["row"]), ((p.b, p.nc, p.Dp, p.Np), F32, s["hc"]),
         ((p.b, p.Dp, p.Np), F32, s["st"])] + _workspaces(p, bd, 3, stage_bc),
        stage_bc=stage_bc)[:3]
    return y, hT, hc


def _workspaces(p: Plan, bd: int, rows: int, stage_bc: bool):
    """Per-program float32 workspaces (outputs nobody reads): `rows` (T, bd) tiles, and B, C (T, Np) tiles."""
    spec = lambda *tile: pl.BlockSpec((_SQ, _SQ, *tile), lambda i, j: (i, j, 0, 0, 0))
    ws = [((p.b, p.Dp // bd, rows, p.T, bd), F32, spec(rows, p.T, bd))]
    if stage_bc:
        ws.append(((p.b, p.Dp // bd, 2, p.T, p.Np), F32, spec(2, p.T, p.Np)))
    return ws


# ---------------------------------------------------------------------------------------------- backward

def _bwd_sub_chunk(p: Plan, c, s, carry, h, refs, A, A2):
    """Steps back through sub-chunk s of chunk c: recompute its Ts states, then propagate the adjoint dh."""
    (B_row, C_row), keep_ref, ws_ref, dB_ref, dC_ref = refs
    dh, dA = carry
    T, Ts = p.T, p.bs.sub_chunk
    hs, decays = [h], []  # hs[k] = state before step k of the sub-chunk (the paper's h_{t-1})
    for k in range(Ts):
        t = s * Ts + k
        a = _decay(c * T + t, ws_ref[0, t], A2, keep_ref)
        decays.append(a)
        hs.append(a * hs[-1] + ws_ref[1, t][:, None] * B_row(t)[None, :])
    for k in reversed(range(Ts)):
        t = s * Ts + k
        tg = c * T + t
        Bt, Ct, gy = B_row(t)[None, :], C_row(t)[None, :], ws_ref[2, t]
        if p.has_z:
            ws_ref[5, t] = jnp.sum(hs[k + 1] * Ct, axis=1)  # y_raw_t, for dz
        dC_ref[tg] = jnp.sum(hs[k + 1] * gy[:, None], axis=0)
        dh = dh + gy[:, None] * Ct
        dB_ref[tg] = jnp.sum(dh * ws_ref[1, t][:, None], axis=0)
        ws_ref[3, t] = jnp.sum(dh * Bt, axis=1)
        da = dh * hs[k] * decays[k]  # adjoint of delta A through a = exp(delta A)
        ws_ref[4, t] = jnp.sum(da * A, axis=1)
        dA = dA + da * ws_ref[0, t][:, None]
        dh = decays[k] * dh
    return dh, dA


def _bwd_tiles_in(p: Plan, c, x_ref, dt_ref, dy_ref, z_ref, bias, ws_ref):
    """Chunk prologue on (T, block_d) tiles: delta, delta x and gy = dy silu(z) to the workspace."""
    T = p.T
    _, delta = _delta_tile(p, c, dt_ref, bias)
    ws_ref[0] = delta
    ws_ref[1] = delta * x_ref[pl.ds(c * T, T), :].astype(F32)
    gy = dy_ref[pl.ds(c * T, T), :].astype(F32)
    if z_ref is not None:
        zt = z_ref[pl.ds(c * T, T), :].astype(F32)
        gy = silu_gate(gy, zt)
    ws_ref[2] = gy


def _bwd_tiles_out(p: Plan, c, refs, Dv, bias, acc):
    """Chunk epilogue on tiles: dx, ddt, dz from the rows the steps wrote; accumulate dD and d dt_bias."""
    x_ref, dt_ref, dy_ref, z_ref, ws_ref, dx_ref, ddt_ref, dz_ref = refs
    dD, dbias = acc
    T = p.T
    rows = pl.ds(c * T, T)
    x = x_ref[rows, :].astype(F32)
    v, delta = _delta_tile(p, c, dt_ref, bias)
    dhB, gy = ws_ref[3], ws_ref[2]
    dx = delta * dhB
    if Dv is not None:
        dx = dx + Dv[None, :] * gy
        dD = dD + jnp.sum(gy * x, axis=0)
    dx_ref[rows, :] = dx.astype(dx_ref.dtype)
    ddt = ddt_of(p, c, x * dhB + ws_ref[4], v)
    ddt_ref[rows, :] = ddt.astype(ddt_ref.dtype)
    if bias is not None:
        dbias = dbias + jnp.sum(ddt, axis=0)
    if z_ref is not None:
        y = ws_ref[5] if Dv is None else ws_ref[5] + Dv[None, :] * x
        dz_ref[rows, :] = dz_of(dy_ref[rows, :].astype(F32), y, z_ref[rows, :].astype(F32)).astype(dz_ref.dtype)
    return dD, dbias


def _bwd_kernel(*refs, p: Plan, stage_bc: bool):
    names = ("x", "dt", "A", "B", "C", "hc", "dy", "dhT", p.has_D or None, p.has_z or None, p.has_bias or None,
             p.has_keep or None, "dx", "ddt", p.has_z or None, "dB", "dC", "dA", p.has_D or None,
             p.has_bias or None, "dh0", "hs", "ws", stage_bc or None)
    (x_ref, dt_ref, A_ref, B_ref, C_ref, hc_ref, dy_ref, dhT_ref, D_ref, z_ref, bias_ref, keep_ref,
     dx_ref, ddt_ref, dz_ref, dB_ref, dC_ref, dA_ref, dD_ref, dbias_ref, dh0_ref, hs_ref, ws_ref, bc_ref) = \
        unpack(refs, names)
    T, Ts = p.T, p.bs.sub_chunk
    S = T // Ts
    A = A_ref[...]
    A2 = A * LOG2E
    bias = None if bias_ref is None else bias_ref[...]
    Dv = None if D_ref is None else D_ref[...]
    def sub_starts(c, B_row):  # the state at each sub-chunk start, from the chunk start the forward saved
        def advance(s, h):
            hs_ref[s] = h
            for k in range(Ts):
                t = s * Ts + k
                a = _decay(c * T + t, ws_ref[0, t], A2, keep_ref)
                h = a * h + ws_ref[1, t][:, None] * B_row(t)[None, :]
            return h
        hs_ref[S - 1] = lax.fori_loop(0, S - 1, advance, hc_ref[c])

    def chunk(i, carry):
        dh, dA, dD, dbias = carry
        c = p.nc - 1 - i
        _bwd_tiles_in(p, c, x_ref, dt_ref, dy_ref, z_ref, bias, ws_ref)
        rows = _stage_bc(p, c, B_ref, C_ref, bc_ref)
        _barrier(p)
        sub_starts(c, rows[0])
        _barrier(p)
        step_refs = (rows, keep_ref, ws_ref, dB_ref, dC_ref)

        def sub(j, dc):
            s = S - 1 - j
            return _bwd_sub_chunk(p, c, s, dc, hs_ref[s], step_refs, A, A2)

        dh, dA = lax.fori_loop(0, S, sub, (dh, dA))
        _barrier(p)
        dD, dbias = _bwd_tiles_out(p, c, (x_ref, dt_ref, dy_ref, z_ref, ws_ref, dx_ref, ddt_ref, dz_ref), Dv, bias,
                                   (dD, dbias))
        _barrier(p)  # the next chunk overwrites the workspace
        return dh, dA, dD, dbias

    zeros_d = jnp.zeros(A.shape[:1], F32)
    dh, dA, dD, dbias = lax.fori_loop(0, p.nc, chunk, (dhT_ref[...], jnp.zeros(A.shape, F32), zeros_d, zeros_d))
    dh0_ref[...] = dh
    dA_ref[...] = dA
    if dD_ref is not None:
        dD_ref[...] = dD
    if dbias_ref is not None:
        dbias_ref[...] = dbias


def backward(p: Plan, x, dt, A, B, C, D, z, bias, keep, hc, dy, dhT):
    """Gradients w.r.t. the padded inputs: dx, ddt, dz in their dtypes; dB, dC (b, L, g, Np), dA (Dp, Np),
    dD, d dt_bias (Dp,) and dh0 (b, Dp, Np) in float32 (per-program partial sums added here)."""
    bd = p.bs.block_d_bwd
    nDb = p.Dp // bd
    S = p.T // p.bs.sub_chunk
    s = _specs(p, bd)
    row = lambda dtype: ((p.b, p.L, p.Dp), dtype, s["row"])
    outs = [row(x.dtype), row(dt.dtype)] + ([row(z.dtype)] if z is not None else [])
    outs += [((p.b, p.L, nDb, p.Np), F32, s["part"])] * 2 + [((p.b, p.Dp, p.Np), F32, s["st"])]
    outs += [((p.b, p.Dp), F32, s["pvec"])] * ((D is not None) + (bias is not None))
    outs += [((p.b, p.Dp, p.Np), F32, s["st"]),
             ((p.b, nDb, S, bd, p.Np), F32, pl.BlockSpec((_SQ, _SQ, S, bd, p.Np), lambda i, j: (i, j, 0, 0, 0)))]
    stage_bc = B.dtype != F32
    outs += _workspaces(p, bd, 6, stage_bc)
    res = _call(
        _bwd_kernel, p, bd, p.bs.num_warps_bwd,
        [(x, s["row"]), (dt, s["row"]), (A, s["mat"]), (B, s["grp"]), (C, s["grp"]), (hc, s["hc"]),
         (dy, s["row"]), (dhT, s["st"]), (D, s["vec"]), (z, s["row"]), (bias, s["vec"]), (keep, s["keep"])],
        outs, stage_bc=stage_bc)
    it = iter(res[:len(res) - 2 - stage_bc])
    dx, ddt = next(it), next(it)
    dz = next(it) if z is not None else None
    group_sum = lambda part: part.reshape(p.b, p.L, p.g, nDb // p.g, p.Np).sum(3)  # blocks of a group
    dB, dC, dA = group_sum(next(it)), group_sum(next(it)), next(it).sum(0)
    dD = next(it).sum(0) if D is not None else None
    dbias = next(it).sum(0) if bias is not None else None
    return dx, ddt, dz, dB, dC, dA, dD, dbias, next(it)
