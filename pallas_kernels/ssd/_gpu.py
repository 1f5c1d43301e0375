"""SSD on GPU (Pallas lowered through Triton).

Forward: grid (b, h, P / bp). A program keeps its state slice S (bp, N) in registers and visits the Q-step
chunks in order (a `fori_loop`), so nothing of size (b, l, h, p, n) ever exists. Backward: `ssd_states` repeats
the forward's walk without y (one product per chunk) and writes each chunk's start state (b, h, l / Q, P, N),
unless BlockSizes.save_states had the forward write them; `ssd_bwd_state` walks the chunks in reverse the same
way, carrying only the adjoint dS (one product per chunk), and saves each chunk's dS_next; then two
chunk-parallel kernels, grid (h * P / bp, l / Q, b), compute every chunk's adjoints from its start state and
dS_next: `ssd_bwd_bc` those of B, C and the log decays, `ssd_bwd_x` those of x and delta. (An earlier single
backward kernel walked the chunks carrying S and dS at once: b * h programs, and ptxas spilled 1.1-1.9 KB per
thread in every chunk step at sm_90; see BENCHMARKS.md.) Per chunk every product is a 2-D `dot` with float32
accumulation (Triton needs power-of-two dims >= 16: Q, bp and the padded state N are). Vectors over the chunk
are 1-D (Q,).

Canonical (padded) arrays, shared with the TPU variant through `kernel.py`:
  x (b, Lp, h, Pp); delta, a (b, h, Lp) float32; B, C (b, Lp, g, Np); D (h, Pp) float32;
  S0 (b, h, Pp, Np) float32; r, r0 (b, Lp) int32 (segment index of each step, and the segment index in force
  just before the step's chunk) or None.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import compiler_params, interpret_arg

F32 = jnp.float32


def dot(a, b, mm, *, ta=False, tb=False, split=""):
    """a @ b (a^T if ta, b^T if tb) as 2-D matmuls with float32 accumulation. `mm` names the operand
    precision: "bfloat16" / "float16" (operands rounded to it: tensor cores), "float32" (full precision; Triton
    IEEE) or "tf32x3" (float32 as three TF32 products: ~float32 accuracy on tensor cores). With a 16-bit mm,
    `split` names the float32 operands ("a", "b", "ab") to pass as hi + lo pairs of 16-bit parts (one more
    matmul per split operand, ~16 mantissa bits): for the state and float32 cotangent products, whose rounding
    would compound over the chunks."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    if mm == "float32":
        return lax.dot_general(a.astype(F32), b.astype(F32), dims, precision=lax.Precision.HIGHEST,
                               preferred_element_type=F32)
    if mm == "tf32x3":
        return lax.dot_general(a.astype(F32), b.astype(F32), dims,
                               precision=lax.DotAlgorithmPreset.TF32_TF32_F32_X3, preferred_element_type=F32)
    mul = lambda u, v: lax.dot_general(u, v, dims, preferred_element_type=F32)
    lo = lambda t: (t.astype(F32) - t.astype(mm).astype(F32)).astype(mm)  # what rounding to mm dropped
    a_hi, b_hi = a.astype(mm), b.astype(mm)
    out = mul(a_hi, b_hi)
    if "b" in split:
        out += mul(a_hi, lo(b))
    if "a" in split:
        out += mul(lo(a), b_hi)
    return out


def chunk_decays(a, seg, Q):
    """The chunk's decay factors from its log decays a (Q,) (paper: the 1-semiseparable mask).

    Returns L (Q, Q) = exp(cum_i - cum_j) on and below the diagonal within a segment, win (Q,) = exp(cum_i)
    (how S_prev reaches step i), wout (Q,) = exp(last - cum_j) (how step j reaches S_next), carry =
    exp(last) (S_prev -> S_next); cum = inclusive cumsum of a, last = cum[Q - 1]. `seg` = (r (Q,), r0): the
    steps' segment indices and the one S_prev belongs to; factors across a segment start are 0."""
    iq = lax.broadcasted_iota(jnp.int32, (Q,), 0)
    cum, last = _cumsum_last(a, Q)
    keep = iq[:, None] >= iq[None, :]
    bounds = None
    if seg is not None:
        r, r0 = seg
        keep = keep & (r[:, None] == r[None, :])
        bounds = (r, r0, jnp.max(r))
    diff = jnp.where(keep, cum[:, None] - cum[None, :], 0.0)  # masked first: no overflow above the diagonal
    L = jnp.where(keep, jnp.exp(diff), 0.0)
    return (L, *boundary_decays(cum, last, bounds))


def _cumsum_last(a, Q):
    """(cum, last): the inclusive cumsum of a (Q,) and its last entry (a masked sum: no dynamic index)."""
    cum = jnp.cumsum(a)
    return cum, jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, (Q,), 0) == Q - 1, cum, 0.0))


def boundary_decays(cum, last, bounds):
    """(win, wout, carry) = (exp(cum), exp(last - cum), exp(last)), each 0 across a segment start: `bounds` =
    (r, r0, r_last), the steps' segment indices, the one S_prev belongs to and the chunk's last, or None. Shared
    with the TPU variant: any shapes that broadcast against cum (1-D here, (Q, 1) columns there)."""
    win, wout, carry = jnp.exp(cum), jnp.exp(last - cum), jnp.exp(last)
    if bounds is not None:
        r, r0, r_last = bounds
        win = jnp.where(r == r0, win, 0.0)
        wout = jnp.where(r == r_last, wout, 0.0)
        carry = jnp.where(r_last == r0, carry, 0.0)
    return win, wout, carry


def _split_refs(refs, n_in_fixed, seg, n_out):
    ins = list(refs[:n_in_fixed])
    rest = list(refs[n_in_fixed:])
    segs = (rest.pop(0), rest.pop(0)) if seg else None
    return ins, segs, rest[:n_out], rest[n_out:]


def _specs(x, B, bp, nc):
    """BlockSpecs over the grid (b, h, Pp / bp) that the forward and the backward share: x-like (Lp, bp) slabs,
    the head's (Lp,) vectors, its group's (Lp, Np) rows of B / C, its (bp,) block of D, a (bp, Np) state slice,
    the nc chunk-start states of that slice, and the two segment-index rows (Lp,)."""
    Lp, h, g, Np = x.shape[1], x.shape[2], B.shape[2], B.shape[3]
    hg = h // g
    return dict(x=pl.BlockSpec((None, Lp, None, bp), lambda i, j, k: (i, 0, j, k)),
                head_l=pl.BlockSpec((None, None, Lp), lambda i, j, k: (i, j, 0)),
                group=pl.BlockSpec((None, Lp, None, Np), lambda i, j, k: (i, 0, lax.div(j, hg), 0)),
                D=pl.BlockSpec((None, bp), lambda i, j, k: (j, k)),
                state=pl.BlockSpec((None, None, bp, Np), lambda i, j, k: (i, j, k, 0)),
                states=pl.BlockSpec((None, None, nc, bp, Np), lambda i, j, k: (i, j, 0, k, 0)),
                seg=[pl.BlockSpec((None, Lp), lambda i, j, k: (i, 0))] * 2)


# --- forward ---------------------------------------------------------------------------------------------

def chunk_output(x, delta, B, C, L, win, S, Dv, mm, ss, sm):
    """One chunk's y (Q, bp) from its start state S (bp, N): the intra-chunk part M xbar, the part from S, D x.
    delta goes to the side of M and B, never into x: x stays exact in a bf16 matmul (xbar = delta x)."""
    M = dot(C, B, mm, tb=True) * L * delta[None, :]  # ((C B^T) o L) diag(delta)
    y = dot(M, x, mm, split=sm) + win[:, None] * dot(C, S, mm, tb=True, split=ss)
    return y + Dv[None, :] * x.astype(F32)


def _fwd_kernel(*refs, Q, nc, seg, save, emit_y, mm, ss, sm):
    ins, seg_refs, outs, _ = _split_refs(refs, 7 if emit_y else 5, seg, emit_y + 1 + save)
    x_ref, delta_ref, a_ref, B_ref = ins[:4]
    C_ref, D_ref, S0_ref = ins[4:] if emit_y else (None, None, ins[4])  # the state walk alone needs no C, D
    y_ref = outs.pop(0) if emit_y else None
    Sf_ref, st_ref = outs[0], (outs[1] if save else None)
    Dv = D_ref[...] if emit_y else None

    def body(c, S):  # S = S_prev (bp, N), the state before chunk c
        rows = pl.ds(pl.multiple_of(c * Q, Q), Q)
        x, B, delta = x_ref[rows, :], B_ref[rows, :], delta_ref[rows]
        segc = (seg_refs[0][rows], jnp.max(seg_refs[1][rows])) if seg else None
        L, win, wout, carry = chunk_decays(a_ref[rows], segc, Q)
        if save:
            st_ref[c] = S
        if emit_y:
            y_ref[rows, :] = chunk_output(x, delta, B, C_ref[rows, :], L, win, S, Dv, mm, ss, sm).astype(y_ref.dtype)
        return carry * S + dot(x, (delta * wout)[:, None] * B.astype(F32), mm, ta=True, split=ss)

    Sf_ref[...] = lax.fori_loop(0, nc, body, S0_ref[...])


def _y_kernel(*refs, Q, seg, mm, ss, sm):
    (x_ref, delta_ref, a_ref, B_ref, C_ref, D_ref, S_ref), seg_refs, (y_ref,), _ = _split_refs(refs, 7, seg, 1)
    segc = _chunk_seg(seg_refs) if seg else None
    L, win, _, _ = chunk_decays(a_ref[...], segc, Q)
    y = chunk_output(x_ref[...], delta_ref[...], B_ref[...], C_ref[...], L, win, S_ref[...], D_ref[...], mm, ss, sm)
    y_ref[...] = y.astype(y_ref.dtype)


def forward(cfg, x, delta, a, B, C, D, S0, r, r0, *, save_states, emit_y=True):
    """y (b, Lp, h, Pp) in cfg.out_dtype (None unless emit_y), S_final (b, h, Pp, Np) f32, and the chunk-start
    states (b, h, nc, Pp, Np) f32 (or None). save_states without emit_y is the backward's recomputation: the
    state walk alone, one product per chunk. With cfg.two_pass, y comes from that walk's states and a
    chunk-parallel kernel (`ssd_y`, one program per (head and p block, chunk, batch row)) instead of the walk."""
    if emit_y and cfg.two_pass:
        _, S, states = forward(cfg, x, delta, a, B, C, D, S0, r, r0, save_states=True, emit_y=False)
        return _chunk_parallel_y(cfg, x, delta, a, B, C, D, states, r, r0), S, (states if save_states else None)
    b, Lp, h, Pp = x.shape
    Np = B.shape[3]
    Q, bp = cfg.chunk, cfg.block_p
    nc, npb = Lp // Q, Pp // bp
    seg = r is not None
    sp = _specs(x, B, bp, nc)
    in_specs = [sp["x"], sp["head_l"], sp["head_l"], sp["group"], sp["group"], sp["D"], sp["state"]]
    args = [x, delta, a, B, C, D, S0]
    if not emit_y:
        del in_specs[4:6], args[4:6]
    if seg:
        in_specs += sp["seg"]
        args += [r, r0]
    out_shape = [jax.ShapeDtypeStruct((b, Lp, h, Pp), cfg.out_dtype)] if emit_y else []
    out_specs = [sp["x"]] if emit_y else []
    out_shape.append(jax.ShapeDtypeStruct((b, h, Pp, Np), F32))
    out_specs.append(sp["state"])
    if save_states:  # chunk-start states for the backward
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc, Pp, Np), F32))
        out_specs.append(sp["states"])
    kernel = functools.partial(_fwd_kernel, Q=Q, nc=nc, seg=seg, save=save_states, emit_y=emit_y, mm=cfg.mm,
                               ss=cfg.split_state, sm=cfg.split_m)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, h, npb), in_specs=in_specs, out_specs=out_specs,
        interpret=interpret_arg("gpu", cfg.interpret), name="ssd_fwd" if emit_y else "ssd_states",
        compiler_params=compiler_params("gpu", num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(*args)
    outs = list(outs)
    y = outs.pop(0) if emit_y else None
    return y, outs[0], (outs[1] if save_states else None)


def _chunk_parallel_y(cfg, x, delta, a, B, C, D, states, r, r0):
    sp, grid = _chunk_grid(cfg, x, B)
    return _chunk_parallel_call(
        cfg, functools.partial(_y_kernel, sm=cfg.split_m), "ssd_y", sp, grid,
        jax.ShapeDtypeStruct(x.shape, cfg.out_dtype),
        [sp["x"], sp["head_l"], sp["head_l"], sp["group"], sp["group"], sp["D"], sp["state"]], sp["x"],
        [x, delta, a, B, C, D, states], r, r0)


def _chunk_grid(cfg, x, B):
    """(BlockSpecs, grid) of the chunk-parallel kernels: one program per (head and p block, chunk, batch row)."""
    b, Lp, h, Pp = x.shape
    npb = Pp // cfg.block_p_bwd
    return _chunk_specs(h, B.shape[2], cfg.chunk, cfg.block_p_bwd, npb, B.shape[3]), (h * npb, Lp // cfg.chunk, b)


def _chunk_parallel_call(cfg, kernel, name, sp, grid, out_shape, in_specs, out_specs, args, r, r0):
    """A chunk-parallel kernel's pallas_call (block_p_bwd, num_warps_bwd, num_stages_bwd); the segment rows, when
    there are any, are appended to its inputs."""
    segs = [] if r is None else [r, r0]
    return pl.pallas_call(
        functools.partial(kernel, Q=cfg.chunk, seg=bool(segs), mm=cfg.mm, ss=cfg.split_state),
        out_shape=out_shape, grid=grid, in_specs=in_specs + sp["seg"][:len(segs)], out_specs=out_specs,
        interpret=interpret_arg("gpu", cfg.interpret), name=name,
        compiler_params=compiler_params("gpu", num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_bwd),
    )(*args, *segs)


# --- backward --------------------------------------------------------------------------------------------
# After the chunk-start states (recomputed by `forward(..., emit_y=False)` unless saved), three kernels.
# `ssd_bwd_state` walks the chunks in reverse per (batch, head, p block), like the forward, with one product per
# chunk: it saves every chunk's dS_next (the adjoint of the state the chunk ends in) and returns dS0. `ssd_bwd_bc`
# and `ssd_bwd_x` then run one program per (head and p block, chunk, batch row): a chunk's adjoints depend only on
# its own inputs, its start state and dS_next, so the chunks are independent. The grid fills the GPU whatever
# b * h is, no state is carried across a loop, and splitting the adjoints over two kernels halves the tiles each
# holds (ptxas spilled 284 B / 752 B per thread at n = 64 / 128 with one kernel, 4 B / 208 B with two).

def state_adjoint(dy, C, a, segc, dS, Q, mm, ss, sd):
    """dS_prev = carry dS_next + dy^T (win C): the adjoint of a chunk's start state, from dS_next (bp, N)."""
    cum, last = _cumsum_last(a, Q)
    bounds = None if segc is None else (segc[0], segc[1], jnp.max(segc[0]))
    win, _, carry = boundary_decays(cum, last, bounds)
    return carry * dS + dot(dy, win[:, None] * C.astype(F32), mm, ta=True, split=sd + ss)


def chunk_backward_bc(x, delta, a, B, C, dy, S, dS, segc, Q, mm, ss, sd, put):
    """The adjoints of one chunk that reach B, C and the log decays; S = S_prev (bp, N), dS = dL/dS_next. Each
    result goes to `put(name, value)` as soon as it is known (short live ranges: fewer registers): dC, dB (Q, N),
    da (Q,). Derivation: y = M xbar + (win C) S^T + D x with M = G o L, G = C B^T, xbar = delta x;
    S_next = carry S + xbar^T (wout B); L, win, wout, carry are exponentials of cumsums of a."""
    L, win, wout, carry = chunk_decays(a, segc, Q)
    dyS = dot(dy, S, mm, split=sd + ss)  # (Q, N): dy S_prev
    dlast = carry * jnp.sum(dS * S)  # last = cum[Q - 1], through carry = exp(last); S_prev is done here
    dcum = win * jnp.sum(C.astype(F32) * dyS, axis=1)  # through win = exp(cum)
    M = dot(C, B, mm, tb=True) * L
    dM = dot(dy, x, mm, tb=True, split=sd) * delta[None, :]  # dy xbar^T, x exact in the matmul
    P = dM * M  # dL o L: d/dcum_i gets its row sums, d/dcum_j minus its column sums
    dcum += jnp.sum(P, axis=1) - jnp.sum(P, axis=0)
    dG = dM * L
    put("dC", dot(dG, B, mm) + win[:, None] * dyS)
    xdS = delta[:, None] * dot(x, dS, mm, split=ss)  # (Q, N): xbar dS_next
    t_out = wout * jnp.sum(B.astype(F32) * xdS, axis=1)  # through wout = exp(last - cum)
    put("dB", dot(dG, C, mm, ta=True) + wout[:, None] * xdS)
    iq = lax.broadcasted_iota(jnp.int32, (Q,), 0)
    dcum = dcum - t_out + jnp.where(iq == Q - 1, dlast + jnp.sum(t_out), 0.0)
    put("da", jnp.sum(jnp.where(iq[None, :] >= iq[:, None], dcum[None, :], 0.0), axis=1))  # reverse cumsum


def chunk_backward_x(x, delta, a, B, C, dy, dS, Dv, segc, Q, mm, ss, sd, sm, put):
    """The adjoints of one chunk that reach x and delta through xbar = delta x (see `chunk_backward_bc`):
    dx (Q, bp), ddx = sum_p dxbar x (Q,), and dD = sum_q dy x (bp,), each to `put(name, value)`."""
    L, _, wout, _ = chunk_decays(a, segc, Q)
    M = dot(C, B, mm, tb=True) * L
    dxbar = dot(M, dy, mm, ta=True, split=sm + (sd and "b")) + wout[:, None] * dot(B, dS, mm, tb=True, split=ss)
    put("dx", dxbar * delta[:, None] + Dv[None, :] * dy.astype(F32))
    put("ddx", jnp.sum(dxbar * x.astype(F32), axis=1))
    put("dD", jnp.sum(dy.astype(F32) * x.astype(F32), axis=0))


def _bwd_state_kernel(*refs, Q, nc, seg, mm, ss, sd):
    (a_ref, C_ref, dy_ref, dSf_ref), seg_refs, (dst_ref, dS0_ref), _ = _split_refs(refs, 4, seg, 2)

    def body(k, dS):
        c = nc - 1 - k
        rows = pl.ds(pl.multiple_of(c * Q, Q), Q)
        segc = (seg_refs[0][rows], jnp.max(seg_refs[1][rows])) if seg else None
        dst_ref[c] = dS
        return state_adjoint(dy_ref[rows, :], C_ref[rows, :], a_ref[rows], segc, dS, Q, mm, ss, sd)

    dS0_ref[...] = lax.fori_loop(0, nc, body, dSf_ref[...])


def _chunk_seg(seg_refs):
    """(r (Q,), r0) of a chunk-parallel program's chunk: its steps' segment indices and its start state's."""
    return seg_refs[0][...], jnp.max(seg_refs[1][...])


def _putter(names, refs):
    dst = dict(zip(names, refs))

    def put(name, value):
        ref = dst[name]
        ref[...] = value.astype(ref.dtype)
    return put


def _bwd_bc_kernel(*refs, Q, seg, mm, ss, sd):
    (x_ref, delta_ref, a_ref, B_ref, C_ref, S_ref, dS_ref, dy_ref), seg_refs, outs, _ = _split_refs(
        refs, 8, seg, 3)
    segc = _chunk_seg(seg_refs) if seg else None
    chunk_backward_bc(x_ref[...], delta_ref[...], a_ref[...], B_ref[...], C_ref[...], dy_ref[...], S_ref[...],
                      dS_ref[...], segc, Q, mm, ss, sd, _putter(("dB", "dC", "da"), outs))


def _bwd_x_kernel(*refs, Q, seg, mm, ss, sd, sm):
    (x_ref, delta_ref, a_ref, B_ref, C_ref, D_ref, dS_ref, dy_ref), seg_refs, outs, _ = _split_refs(
        refs, 8, seg, 3)
    segc = _chunk_seg(seg_refs) if seg else None
    chunk_backward_x(x_ref[...], delta_ref[...], a_ref[...], B_ref[...], C_ref[...], dy_ref[...], dS_ref[...],
                     D_ref[...], segc, Q, mm, ss, sd, sm, _putter(("dx", "ddx", "dD"), outs))


def _chunk_specs(h, g, Q, bp, npb, Np):
    """BlockSpecs over the chunk-parallel grid (h * npb, nc, b): program (j, c, i) is head j // npb, p block
    j % npb, chunk c, batch row i (heads vary fastest: a group's B / C rows are read while in L2)."""
    hg = h // g
    head = (lambda j: j) if npb == 1 else (lambda j: lax.div(j, npb))
    pb = (lambda j: 0) if npb == 1 else (lambda j: lax.rem(j, npb))
    return dict(x=pl.BlockSpec((None, Q, None, bp), lambda j, c, i: (i, c, head(j), pb(j))),
                head_l=pl.BlockSpec((None, None, Q), lambda j, c, i: (i, head(j), c)),
                group=pl.BlockSpec((None, Q, None, Np), lambda j, c, i: (i, c, lax.div(head(j), hg), 0)),
                D=pl.BlockSpec((None, bp), lambda j, c, i: (head(j), pb(j))),
                state=pl.BlockSpec((None, None, None, bp, Np), lambda j, c, i: (i, head(j), c, pb(j), 0)),
                seg=[pl.BlockSpec((None, Q), lambda j, c, i: (i, c))] * 2,
                per_prog_l=pl.BlockSpec((None, None, None, Q), lambda j, c, i: (i, head(j), pb(j), c)),
                per_prog_n=pl.BlockSpec((None, Q, None, Np), lambda j, c, i: (i, c, j, 0)),
                dD=pl.BlockSpec((None, None, None, bp), lambda j, c, i: (i, c, head(j), pb(j))))


def backward(cfg, x, delta, a, B, C, D, states, r, r0, dy, dSf):
    """Canonical gradients: dx (x.dtype), d delta through xbar and da (b, h, Lp), dB, dC (b, Lp, g, Np) f32,
    dD (h, Pp), dS0.

    dB and dC are written per (head, p block) and chunk, da and d delta per p block, dD per (batch row,
    chunk), and summed here in XLA (over the heads of a group and the p blocks)."""
    b, Lp, h, Pp = x.shape
    g, Np = B.shape[2], B.shape[3]
    Q, hg = cfg.chunk, h // g
    nc = Lp // Q
    seg = r is not None
    segs = [r, r0] if seg else []

    # 1. dS_next of every chunk, walking the chunks in reverse (the forward's p block: more programs)
    bp = cfg.block_p
    sp = _specs(x, B, bp, nc)
    dstates, dS0 = pl.pallas_call(
        functools.partial(_bwd_state_kernel, Q=Q, nc=nc, seg=seg, mm=cfg.mm, ss=cfg.split_state,
                          sd=cfg.split_dy),
        out_shape=[jax.ShapeDtypeStruct(states.shape, F32), jax.ShapeDtypeStruct(dSf.shape, F32)],
        grid=(b, h, Pp // bp), in_specs=[sp["head_l"], sp["group"], sp["x"], sp["state"]] + sp["seg"][:len(segs)],
        out_specs=[sp["states"], sp["state"]], interpret=interpret_arg("gpu", cfg.interpret), name="ssd_bwd_state",
        compiler_params=compiler_params("gpu", num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(a, C, dy, dSf, *segs)

    # 2. every chunk's adjoints at once, in two kernels (each holds fewer tiles): B, C and a; then x and delta
    sp, grid = _chunk_grid(cfg, x, B)
    npb = grid[0] // h
    dB, dC, da = _chunk_parallel_call(
        cfg, functools.partial(_bwd_bc_kernel, sd=cfg.split_dy), "ssd_bwd_bc", sp, grid,
        [jax.ShapeDtypeStruct((b, Lp, h * npb, Np), F32)] * 2 + [jax.ShapeDtypeStruct((b, h, npb, Lp), F32)],
        [sp["x"], sp["head_l"], sp["head_l"], sp["group"], sp["group"], sp["state"], sp["state"], sp["x"]],
        [sp["per_prog_n"], sp["per_prog_n"], sp["per_prog_l"]], [x, delta, a, B, C, states, dstates, dy], r, r0)
    dx, ddx, dD = _chunk_parallel_call(
        cfg, functools.partial(_bwd_x_kernel, sd=cfg.split_dy, sm=cfg.split_m), "ssd_bwd_x", sp, grid,
        [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, h, npb, Lp), F32),
         jax.ShapeDtypeStruct((b, nc, h, Pp), F32)],
        [sp["x"], sp["head_l"], sp["head_l"], sp["group"], sp["group"], sp["D"], sp["state"], sp["x"]],
        [sp["x"], sp["per_prog_l"], sp["dD"]], [x, delta, a, B, C, D, dstates, dy], r, r0)
    group_sum = lambda t: t.reshape(b, Lp, g, hg * npb, Np).sum(3)
    return dx, ddx.sum(2), da.sum(2), group_sum(dB), group_sum(dC), dD.sum((0, 1)), dS0
