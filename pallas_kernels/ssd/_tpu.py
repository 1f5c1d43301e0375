"""SSD on TPU (Pallas lowered through Mosaic): the chunk walk is the last grid axis, marked "arbitrary".

Grid (b, h, n_chunks). The state S (P, N) of a (batch, head) lives in a VMEM scratch across the chunk axis
(the backward walks the chunks in reverse through its index maps, with the adjoint dS in VMEM). Blocks are
whole chunks: the arrays are laid out (b, h, chunk, Q, P) in XLA so every block's last two dims are the
array's full dims (any Q, any P), N is padded to 128 lanes, and per-step vectors come as (Q, 1) columns or
(1, Q) rows. Mosaic has no cumsum and no dynamic lane slicing: cumulative sums are masked (Q, Q) reductions,
and a row becomes a column (or back) through a diagonal mask and a reduction, which is exact.

The math per chunk is that of `_gpu.chunk_decays` / `_gpu.chunk_backward`, written with 2-D vectors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import compiler_params, interpret_arg
from pallas_kernels.ssd._gpu import boundary_decays, dot

F32 = jnp.float32


def _iotas(Q):
    return lax.broadcasted_iota(jnp.int32, (Q, Q), 0), lax.broadcasted_iota(jnp.int32, (Q, Q), 1)


def _to_row(col, Q):
    """(Q, 1) -> (1, Q) without a transpose: mask the diagonal of the broadcast and reduce (exact)."""
    i, j = _iotas(Q)
    return jnp.sum(jnp.where(i == j, col, 0.0), axis=0, keepdims=True)


def chunk_decays(a_row, seg, Q):
    """L (Q, Q), win (Q, 1), wout (Q, 1), carry (1, 1) from the log decays a (1, Q); see `_gpu.chunk_decays`.
    seg = (r column (Q, 1), r row (1, Q), r0 (1, 1)) or None."""
    i, j = _iotas(Q)
    cum = jnp.sum(jnp.where(j <= i, a_row, 0.0), axis=1, keepdims=True)  # (Q, 1) inclusive cumsum
    cum_row = _to_row(cum, Q)  # (1, Q), the same numbers
    last = jnp.sum(jnp.where(i[:, :1] == Q - 1, cum, 0.0), axis=0, keepdims=True)  # (1, 1)
    keep = i >= j
    bounds = None
    if seg is not None:
        r, r_row, r0 = seg
        keep = keep & (r == r_row)
        bounds = (r, r0, jnp.max(r, axis=0, keepdims=True))
    L = jnp.where(keep, jnp.exp(jnp.where(keep, cum - cum_row, 0.0)), 0.0)
    return (L, *boundary_decays(cum, last, bounds))


def _seg(seg_refs):
    if seg_refs is None:
        return None
    r_ref, r_row_ref, r0_ref = seg_refs
    return r_ref[...], r_row_ref[...], jnp.max(r0_ref[...], axis=0, keepdims=True)


def _split(refs, n_in, seg, n_out):
    refs = list(refs)
    ins, refs = refs[:n_in], refs[n_in:]
    segs = (refs.pop(0), refs.pop(0), refs.pop(0)) if seg else None
    return ins, segs, refs[:n_out], refs[n_out:]


def _layouts(cfg, x, delta, a, B, C, D, r, r0):
    """Canonical arrays -> chunk-blocked TPU layouts (XLA transposes)."""
    b, Lp, h, Pp = x.shape
    g, Np = B.shape[2], B.shape[3]
    Q = cfg.chunk
    nc = Lp // Q
    xs = jnp.moveaxis(x.reshape(b, nc, Q, h, Pp), 3, 1)  # (b, h, nc, Q, Pp)
    col = lambda t: t.reshape(b, h, nc, Q, 1)
    Bs, Cs = (jnp.moveaxis(t.reshape(b, nc, Q, g, Np), 3, 1) for t in (B, C))  # (b, g, nc, Q, Np)
    args = [xs, col(delta), a.reshape(b, h, nc, 1, Q), Bs, Cs, D.reshape(h, 1, Pp)]
    segs = [] if r is None else [r.reshape(b, nc, Q, 1), r.reshape(b, nc, 1, Q), r0.reshape(b, nc, Q, 1)]
    return args, segs


def _specs(h, g, Q, Pp, Np, nc, reverse):
    """BlockSpecs over the grid (b, h, chunk); `reverse` walks the chunks last to first."""
    hg = h // g
    ch = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
    chunk_x = pl.BlockSpec((None, None, None, Q, Pp), lambda i, j, c: (i, j, ch(c), 0, 0))
    chunk_col = pl.BlockSpec((None, None, None, Q, 1), lambda i, j, c: (i, j, ch(c), 0, 0))
    chunk_row = pl.BlockSpec((None, None, None, 1, Q), lambda i, j, c: (i, j, ch(c), 0, 0))
    chunk_bc = pl.BlockSpec((None, None, None, Q, Np), lambda i, j, c: (i, lax.div(j, hg), ch(c), 0, 0))
    head_d = pl.BlockSpec((None, 1, Pp), lambda i, j, c: (j, 0, 0))
    state = pl.BlockSpec((None, None, Pp, Np), lambda i, j, c: (i, j, 0, 0))
    chunk_state = pl.BlockSpec((None, None, None, Pp, Np), lambda i, j, c: (i, j, ch(c), 0, 0))
    seg = [pl.BlockSpec((None, None, Q, 1), lambda i, j, c: (i, ch(c), 0, 0)),
           pl.BlockSpec((None, None, 1, Q), lambda i, j, c: (i, ch(c), 0, 0)),
           pl.BlockSpec((None, None, Q, 1), lambda i, j, c: (i, ch(c), 0, 0))]
    return dict(x=chunk_x, col=chunk_col, row=chunk_row, bc=chunk_bc, d=head_d, state=state,
                chunk_state=chunk_state, seg=seg)


# --- forward ---------------------------------------------------------------------------------------------

def _fwd_kernel(*refs, Q, nc, seg, save, emit_y, mm, ss, sm):
    ins, seg_refs, outs, (S_scr,) = _split(refs, 7 if emit_y else 5, seg, emit_y + 1 + save)
    x_ref, delta_ref, a_ref, B_ref = ins[:4]
    C_ref, D_ref, S0_ref = ins[4:] if emit_y else (None, None, ins[4])  # the state walk alone needs no C, D
    y_ref = outs.pop(0) if emit_y else None
    Sf_ref, st_ref = outs[0], (outs[1] if save else None)
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        S_scr[...] = S0_ref[...]

    S = S_scr[...]  # S_prev (P, N)
    if save:
        st_ref[...] = S
    x, B, delta = x_ref[...], B_ref[...], delta_ref[...]  # delta (Q, 1)
    L, win, wout, carry = chunk_decays(a_ref[...], _seg(seg_refs), Q)
    if emit_y:
        C = C_ref[...]
        M = dot(C, B, mm, tb=True) * L * _to_row(delta, Q)  # ((C B^T) o L) diag(delta); x stays exact in the matmul
        y = dot(M, x, mm, split=sm) + win * dot(C, S, mm, tb=True, split=ss) + D_ref[...] * x.astype(F32)
        y_ref[...] = y.astype(y_ref.dtype)
    S = carry * S + dot(x, (delta * wout) * B.astype(F32), mm, ta=True, split=ss)
    S_scr[...] = S

    @pl.when(c == nc - 1)
    def _():
        Sf_ref[...] = S


def forward(cfg, x, delta, a, B, C, D, S0, r, r0, *, save_states, emit_y=True):
    """As `_gpu.forward`; the chunk-start states come back as (b, h, nc, P, N)."""
    b, Lp, h, Pp = x.shape
    g, Np = B.shape[2], B.shape[3]
    Q = cfg.chunk
    nc = Lp // Q
    args, segs = _layouts(cfg, x, delta, a, B, C, D, r, r0)
    sp = _specs(h, g, Q, Pp, Np, nc, reverse=False)
    in_specs = [sp["x"], sp["col"], sp["row"], sp["bc"], sp["bc"], sp["d"], sp["state"]] + (sp["seg"] if segs else [])
    if not emit_y:  # the state walk alone: no C, D
        del in_specs[4:6], args[4:6]
    out_shape = [jax.ShapeDtypeStruct((b, h, nc, Q, Pp), cfg.out_dtype)] if emit_y else []
    out_specs = [sp["x"]] if emit_y else []
    out_shape.append(jax.ShapeDtypeStruct((b, h, Pp, Np), F32))
    out_specs.append(sp["state"])
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc, Pp, Np), F32))
        out_specs.append(sp["chunk_state"])
    kernel = functools.partial(_fwd_kernel, Q=Q, nc=nc, seg=bool(segs), save=save_states, emit_y=emit_y, mm=cfg.mm,
                               ss=cfg.split_state, sm=cfg.split_m)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, h, nc), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((Pp, Np), F32)], interpret=interpret_arg("tpu", cfg.interpret),
        compiler_params=compiler_params("tpu", dimension_semantics=("parallel", "parallel", "arbitrary")),
        name="ssd_fwd" if emit_y else "ssd_states",
    )(*args, S0, *segs)
    outs = list(outs)
    y = jnp.moveaxis(outs.pop(0), 1, 3).reshape(b, Lp, h, Pp) if emit_y else None
    return y, outs[0], (outs[1] if save_states else None)


# --- backward --------------------------------------------------------------------------------------------

def chunk_backward(x, delta, a_row, B, C, dy, S, dS, Dv, seg, Q, mm, ss, sd, sm):
    """`_gpu.chunk_backward` with columns / rows: returns dx, ddx (Q, 1), da (1, Q), dB, dC, dS_prev, dD (1, P)."""
    L, win, wout, carry = chunk_decays(a_row, seg, Q)
    M = dot(C, B, mm, tb=True) * L
    Cf, Bf = C.astype(F32), B.astype(F32)
    dM = dot(dy, x, mm, tb=True, split=sd) * _to_row(delta, Q)  # dy xbar^T
    dxbar = dot(M, dy, mm, ta=True, split=sm + (sd and "b")) + wout * dot(B, dS, mm, tb=True, split=ss)
    dG = dM * L
    dyS = dot(dy, S, mm, split=sd + ss)
    xdS = delta * dot(x, dS, mm, split=ss)  # xbar dS
    dC = dot(dG, Bf, mm) + win * dyS
    dB = dot(dG, Cf, mm, ta=True) + wout * xdS
    P = dM * M
    t_in = win * jnp.sum(Cf * dyS, axis=1, keepdims=True)
    t_out = wout * jnp.sum(Bf * xdS, axis=1, keepdims=True)
    sum_all = lambda t: jnp.sum(jnp.sum(t, axis=1, keepdims=True), axis=0, keepdims=True)  # -> (1, 1)
    dlast = sum_all(t_out) + carry * sum_all(dS * S)
    i, j = _iotas(Q)
    cols = jnp.sum(jnp.where(i == j, jnp.sum(P, axis=0, keepdims=True), 0.0), axis=1, keepdims=True)  # to (Q, 1)
    dcum = jnp.sum(P, axis=1, keepdims=True) - cols + t_in - t_out + jnp.where(i[:, :1] == Q - 1, dlast, 0.0)
    da = jnp.sum(jnp.where(i >= j, dcum, 0.0), axis=0, keepdims=True)  # (1, Q): reverse cumsum
    dS_prev = carry * dS + dot(dy, win * Cf, mm, ta=True, split=sd + ss)
    xf, dyf = x.astype(F32), dy.astype(F32)
    return (dxbar * delta + Dv * dyf, jnp.sum(dxbar * xf, axis=1, keepdims=True), da, dB, dC, dS_prev,
            jnp.sum(dyf * xf, axis=0, keepdims=True))


def _bwd_kernel(*refs, Q, nc, seg, mm, ss, sd, sm):
    (x_ref, delta_ref, a_ref, B_ref, C_ref, D_ref, st_ref, dy_ref, dSf_ref), seg_refs, outs, scratch = _split(
        refs, 9, seg, 7)
    dx_ref, ddx_ref, da_ref, dB_ref, dC_ref, dD_ref, dS0_ref = outs
    dS_scr, dD_scr = scratch
    k = pl.program_id(2)  # chunk nc - 1 - k

    @pl.when(k == 0)
    def _():
        dS_scr[...] = dSf_ref[...]
        dD_scr[...] = jnp.zeros(dD_scr.shape, F32)

    dx, ddx, da, dB, dC, dS, dD = chunk_backward(
        x_ref[...], delta_ref[...], a_ref[...], B_ref[...], C_ref[...], dy_ref[...],
        st_ref[...], dS_scr[...], D_ref[...], _seg(seg_refs), Q, mm, ss, sd, sm)
    dx_ref[...] = dx.astype(dx_ref.dtype)
    ddx_ref[...] = ddx
    da_ref[...] = da
    dB_ref[...] = dB
    dC_ref[...] = dC
    dS_scr[...] = dS
    dD_scr[...] += dD

    @pl.when(k == nc - 1)
    def _():
        dS0_ref[...] = dS
        dD_ref[...] = dD_scr[...]


def backward(cfg, x, delta, a, B, C, D, states, r, r0, dy, dSf):
    """As `_gpu.backward`: dB / dC per head and dD per batch row, summed here in XLA."""
    b, Lp, h, Pp = x.shape
    g, Np = B.shape[2], B.shape[3]
    Q = cfg.chunk
    nc, hg = Lp // Q, h // g
    args, segs = _layouts(cfg, x, delta, a, B, C, D, r, r0)
    dys = jnp.moveaxis(dy.reshape(b, nc, Q, h, Pp), 3, 1)
    sp = _specs(h, g, Q, Pp, Np, nc, reverse=True)
    in_specs = ([sp["x"], sp["col"], sp["row"], sp["bc"], sp["bc"], sp["d"], sp["chunk_state"], sp["x"], sp["state"]]
                + (sp["seg"] if segs else []))
    per_head_n = pl.BlockSpec((None, None, None, Q, Np), lambda i, j, c: (i, j, nc - 1 - c, 0, 0))
    out_shape = [jax.ShapeDtypeStruct((b, h, nc, Q, Pp), x.dtype), jax.ShapeDtypeStruct((b, h, nc, Q, 1), F32),
                 jax.ShapeDtypeStruct((b, h, nc, 1, Q), F32)]
    out_shape += [jax.ShapeDtypeStruct((b, h, nc, Q, Np), F32)] * 2
    out_shape += [jax.ShapeDtypeStruct((b, h, 1, Pp), F32), jax.ShapeDtypeStruct((b, h, Pp, Np), F32)]
    out_specs = [sp["x"], sp["col"], sp["row"], per_head_n, per_head_n,
                 pl.BlockSpec((None, None, 1, Pp), lambda i, j, c: (i, j, 0, 0)), sp["state"]]
    kernel = functools.partial(_bwd_kernel, Q=Q, nc=nc, seg=bool(segs), mm=cfg.mm, ss=cfg.split_state,
                               sd=cfg.split_dy, sm=cfg.split_m)
    dx, ddx, da, dB, dC, dD, dS0 = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, h, nc), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((Pp, Np), F32), pltpu.VMEM((1, Pp), F32)],
        interpret=interpret_arg("tpu", cfg.interpret),
        compiler_params=compiler_params("tpu", dimension_semantics=("parallel", "parallel", "arbitrary")),
        name="ssd_bwd",
    )(*args, states, dys, dSf, *segs)
    to_canonical_bc = lambda t: jnp.moveaxis(t.reshape(b, g, hg, nc, Q, Np).sum(2), 1, 3).reshape(b, Lp, g, Np)
    return (jnp.moveaxis(dx, 1, 3).reshape(b, Lp, h, Pp), ddx.reshape(b, h, Lp), da.reshape(b, h, Lp),
            to_canonical_bc(dB), to_canonical_bc(dC), dD.sum((0, 2)), dS0)
