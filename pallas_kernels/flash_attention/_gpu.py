"""GPU variant: FlashAttention-2 lowered through Pallas-Triton.

Layout: the caller's (b, l, h, k) / (b, s, g, k) arrays, padded to (b, l_pad, h, kp) / (b, s_pad, g, kp) (kp the
head dim's next power of two; zero columns leave q.k unchanged and the extra output columns are sliced off).
Each program reads its (block, kp) tiles through strided pointers, so no head-major transpose is made.

Forward, grid (l_pad / B_r, b * h): a program owns query block Q_i (B_r rows) of one head and loops over the
key blocks K_j, V_j its causal / window range reaches, keeping per row (FA-2 Algorithm 1)
    m_i   running maximum of the scores (base 2: s * log2 e, so exp2 replaces exp),
    l_i   running sum of exp2(s - m_i),
    acc   running sum of exp2(s - m_i) V_j (float32, B_r x kp),
then writes O_i = acc / l_i and L_i = m_i + log2(l_i) (the base-2 log-sum-exp, saved for the backward). m_i is a
reference, not always the maximum (FlashAttention-4's lazy rescaling): it moves only where a block's row maximum
exceeds it by more than RESCALE_AT, so p <= 2^RESCALE_AT and most key blocks skip rescaling acc and l (a warp-uniform
branch). Without a soft-cap the scores are scaled inside p = exp2(x * scale log2 e - m_i), one FFMA per score.
Key blocks every row sees entirely run without the element mask; only the boundary blocks build it.
Query blocks are scheduled last-first: under a causal mask they are the longest, so the tail of the launch is
short blocks.

Backward (FA-2 Algorithm 2 split in two kernels, p recomputed from L):
    P = exp2(S - L),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dK = scale * dS^T Q,  dQ = scale * dS K
with D = rowsum(dO * O) from XLA; for 16-bit inputs the forward also writes O's rounding error, and D sums
dO * (O + that) (`_blocks.row_delta`), so dS's rows sum to ~0 as they do in float32. With bf16 inputs dQ and dK
take dS as two bf16 terms (`_blocks.ds_dot`): every dot is a bf16 tensor-core dot and no Q or K tile is upcast.
dK/dV: grid (s_pad / B_c, b * g); a program owns K_j, V_j of one kv head and loops over the r = h / g query heads
of its group and their query blocks, so GQA needs no partial sums.
dQ: grid (l_pad / B_r, b * h), looping over key blocks like the forward. The dK/dV kernel works with the
transposed score tile S^T = K Q^T so that no tile is transposed in registers.
BlockSizes(fused_bwd=True) drops the dQ kernel: the dK/dV kernel also forms dS K_j per tile and atomically adds
it into a float32 dQ buffer (FA-2's own schedule: 5 matmuls per tile instead of 7, non-deterministic sums).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels import _common as c
from pallas_kernels.flash_attention._blocks import LOG2E, NEG_INF, Config, _div, ds_dot, element_mask, \
    key_blocks, query_blocks, row_delta, store_output

_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a^T @ b
Q_SEG_PAD, KV_SEG_PAD = -1, -2  # padding ids (padding keys are masked by index too)
RESCALE_AT = 8.0  # forward: rescale the running sums only when a row's maximum grows by more than this (base 2)


# --- layout -----------------------------------------------------------------------------------------------------

def to_layout(cfg: Config, q, k, v, q_seg, kv_seg):
    dk = q.shape[-1]
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, cfg.kp - dk)))
    segs = (None, None)
    if cfg.has_segments:
        segs = (jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, cfg.l_pad - cfg.l)), constant_values=Q_SEG_PAD),
                jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, cfg.s_pad - cfg.s)), constant_values=KV_SEG_PAD))
    return pad(q, cfg.l_pad), pad(k, cfg.s_pad), pad(v, cfg.s_pad), segs


def from_layout(cfg: Config, out, shape):
    return out[:, :cfg.l, :, :shape[-1]]


def _precision(dtype):
    # float32 inputs: IEEE float32 dots (Triton's default would be TF32); 16-bit inputs: tensor-core dots (a float32
    # operand, which only float16 inputs' dS x K / dS^T x Q have, then runs in TF32)
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, dims, precision):
    """Float32-accumulated dot; dQ = dS K and dK = dS^T Q go through `_blocks.ds_dot` (bf16 inputs: dS split in
    two bf16 terms, so every dot of the backward runs on bf16 tensor cores)."""
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _scores2(cfg: Config, x):
    """x = q . k (float32) -> (s * log2 e, tanh(x * scale / c) or None), s the scaled, soft-capped score."""
    if cfg.softcap is None:
        return x * (cfg.scale * LOG2E), None
    t = jnp.tanh(x * (cfg.scale / cfg.softcap))
    return t * (cfg.softcap * LOG2E), t


def _loop(lo, hi, a, b, body, carry, *, head: bool, tail: bool):
    """Run body(j, carry, masked) over [lo, a) masked, [a, b) unmasked, [b, hi) masked; `head` / `tail` False
    statically drop a part that the configuration keeps empty."""
    if head:
        carry = lax.fori_loop(lo, a, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(a, b, functools.partial(body, masked=False), carry)
    if tail:
        carry = lax.fori_loop(b, hi, functools.partial(body, masked=True), carry)
    return carry


def _key_loop_parts(cfg: Config):
    """(head, tail) for `key_blocks`: can [lo, a) / [b, hi) be non-empty?"""
    return cfg.window is not None, cfg.causal or cfg.s != cfg.s_pad or cfg.has_segments


def _query_loop_parts(cfg: Config):
    """(head, tail) for `query_blocks`."""
    return cfg.causal, cfg.window is not None or cfg.s != cfg.s_pad or cfg.has_segments


def _blocks(cfg):
    bq, bk, bq_dkv, bk_dkv, bq_dq, bk_dq, warps, stages, warps_bwd, stages_bwd, warps_dq, fused, ds_16 = cfg.blocks
    return dict(fwd=(bq, bk), dkv=(bq_dkv, bk_dkv), dq=(bq_dq, bk_dq), fwd_params=(warps, stages),
                bwd_params=(warps_bwd, stages_bwd), dq_params=(warps_dq, stages_bwd), fused_bwd=fused,
                ds_in_input_dtype=ds_16)


def _call(cfg, kernel, name, grid, in_specs, out_specs, out_shape, params, aliases=None):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=c.compiler_params("gpu", num_warps=params[0], num_stages=params[1]),
                          input_output_aliases=aliases or {}, interpret=c.interpret_arg("gpu", cfg.interpret),
                          name=name)


def _query_major_specs(cfg, bq):
    """BlockSpecs over the grid (l_pad / B_r, b * h) of the forward and the dQ kernel, query blocks last-first:
    Q_i (or dO_i) of one head, the whole padded K / V of its kv head, the (B_r,) row statistics of L / D, and the
    segment ids (empty without them)."""
    h, r, kp = cfg.h, cfg.r, cfg.kp
    nq = cfg.l_pad // bq
    qi = lambda i: nq - 1 - i
    q_spec = pl.BlockSpec((None, bq, None, kp), lambda i, j: (_div(j, h), qi(i), j % h, 0))
    kv_spec = pl.BlockSpec((None, cfg.s_pad, None, kp), lambda i, j: (_div(j, h), 0, _div(j % h, r), 0))
    stat_spec = pl.BlockSpec((None, None, bq), lambda i, j: (_div(j, h), j % h, qi(i)))
    seg_specs = []
    if cfg.has_segments:
        seg_specs = [pl.BlockSpec((None, bq), lambda i, j: (_div(j, h), qi(i))),
                     pl.BlockSpec((None, cfg.s_pad), lambda i, j: (_div(j, h), 0))]
    return q_spec, kv_spec, stat_spec, seg_specs


# --- forward ----------------------------------------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, *refs, cfg: Config, bq: int, bk: int, with_lo: bool):
    qs_ref, ks_ref = refs[:2] if cfg.has_segments else (None, None)
    o_ref, lse_ref, lo_ref = refs[-3:] if with_lo else (*refs[-2:], None)
    qi = cfg.l_pad // bq - 1 - pl.program_id(0)  # last block first
    q = q_ref[...]  # Q_i (B_r, kp), stays in registers
    prec = _precision(q.dtype)
    rows = qi * bq + jnp.arange(bq)
    q_seg = None if qs_ref is None else qs_ref[...][:, None]

    # Without a soft-cap, the scores stay unscaled until p = exp2(x * scale log2 e - m), one FFMA per score, and the
    # row maximum is taken before scaling (scale > 0 keeps the order).
    unscaled = cfg.softcap is None and cfg.scale > 0
    c2 = cfg.scale * LOG2E

    def body(j, carry, masked):
        m, l, acc = carry
        start = pl.multiple_of(j * bk, bk)
        x = _dot(q, k_ref[pl.ds(start, bk), :], _NT, prec)  # (B_r, B_c)
        s2 = x if unscaled else _scores2(cfg, x)[0]
        if masked:
            kv_seg = None if ks_ref is None else ks_ref[pl.ds(start, bk)][None, :]
            mask = element_mask(cfg, rows[:, None], (start + jnp.arange(bk))[None, :], q_seg, kv_seg)
            s2 = jnp.where(mask, s2, -jnp.inf)  # exp2(-inf - finite m) = 0
        row_max = jnp.max(s2, axis=1) * c2 if unscaled else jnp.max(s2, axis=1)
        # Lazy rescaling (FlashAttention-4): the reference maximum m moves only where a row's maximum exceeds it by
        # more than RESCALE_AT, so p <= 2^RESCALE_AT, and most blocks skip rescaling the accumulator.
        m_new = jnp.where(row_max > m + RESCALE_AT, row_max, m)
        p = jnp.exp2((s2 * c2 if unscaled else s2) - m_new[:, None])

        def rescale(acc_l):
            alpha = jnp.exp2(m - m_new)  # 1 where m did not move
            return acc_l[0] * alpha[:, None], acc_l[1] * alpha

        acc, l = lax.cond(jnp.max(m_new - m) > 0, rescale, lambda acc_l: acc_l, (acc, l))  # m_new >= m
        v = v_ref[pl.ds(start, bk), :]
        return m_new, l + jnp.sum(p, axis=1), acc + _dot(p.astype(v.dtype), v, _NN, prec)

    init = (jnp.full((bq,), NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, cfg.kp), jnp.float32))
    head, tail = _key_loop_parts(cfg)
    m, l, acc = _loop(*key_blocks(cfg, qi, bq, bk), body, init, head=head, tail=tail)
    empty = l == 0.0  # no visible key: output 0
    l_safe = jnp.where(empty, 1.0, l)
    store_output(acc * (1.0 / l_safe)[:, None], o_ref, lo_ref)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log2(l_safe))


def forward(cfg: Config, q, k, v, q_seg, kv_seg, with_lo: bool = False):
    """(out (b, l_pad, h, kp) in q.dtype, lse2 (b, h, l_pad) float32 base-2 log-sum-exp), and with with_lo the
    output's rounding error (`store_output`) as a third array."""
    b, h = q.shape[0], cfg.h
    bq, bk = _blocks(cfg)["fwd"]
    q_spec, kv_spec, stat_spec, seg_specs = _query_major_specs(cfg, bq)
    in_specs = [q_spec, kv_spec, kv_spec, *seg_specs]
    args = [q, k, v] + ([q_seg, kv_seg] if cfg.has_segments else [])
    out_specs = [q_spec, stat_spec] + [q_spec] * with_lo  # O_i, L_i (, the rounding error of O_i)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, cfg.l_pad), jnp.float32)]
    out_shape += [jax.ShapeDtypeStruct(q.shape, q.dtype)] * with_lo
    kernel = functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk, with_lo=with_lo)
    return tuple(_call(cfg, kernel, "flash_attention_fwd", (cfg.l_pad // bq, b * h), in_specs, out_specs, out_shape,
                       _blocks(cfg)["fwd_params"])(*args))


# --- backward: dK, dV -------------------------------------------------------------------------------------------

def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: Config, bq: int, bk: int,
                fused: bool, ds_16: bool):
    qs_ref, ks_ref = refs[:2] if cfg.has_segments else (None, None)
    dk_ref, dv_ref, dq_ref = refs[-3:] if fused else (*refs[-2:], None)  # dq_ref: the float32 dQ buffer
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]  # K_j, V_j (B_c, kp)
    prec = _precision(k.dtype)
    cols = j * bk + jnp.arange(bk)
    kv_seg = None if ks_ref is None else ks_ref[...][:, None]
    lo, hi, a, b = query_blocks(cfg, j, bq, bk)
    head, tail = _query_loop_parts(cfg)

    def head_body(hr, carry):  # query head hr of the group
        def body(i, carry, masked):
            dk, dv = carry
            start = pl.multiple_of(i * bq, bq)
            q = q_ref[pl.ds(start, bq), hr, :]
            do = do_ref[pl.ds(start, bq), hr, :]
            s2t, t = _scores2(cfg, _dot(k, q, _NT, prec))  # S^T (B_c, B_r)
            pt = jnp.exp2(s2t - lse_ref[hr, pl.ds(start, bq)][None, :])  # P^T
            if masked:
                q_seg = None if qs_ref is None else qs_ref[pl.ds(start, bq)][None, :]
                mask = element_mask(cfg, (start + jnp.arange(bq))[None, :], cols[:, None], q_seg, kv_seg)
                pt = jnp.where(mask, pt, 0.0)
            dv = dv + _dot(pt.astype(do.dtype), do, _NN, prec)
            dpt = _dot(v, do, _NT, prec)  # dP^T
            dst = pt * (dpt - delta_ref[hr, pl.ds(start, bq)][None, :])
            if t is not None:
                dst = dst * (1.0 - t * t)  # d(c tanh(x / c)) / dx
            if dq_ref is not None:  # dQ_i += dS K_j, scaled in XLA
                dq = ds_dot(lambda a, b: _dot(a, b, _TN, prec), dst, k, round_to_input=ds_16)
                pltr.atomic_add(dq_ref, (pl.ds(start, bq), hr, slice(None)), dq)
            return ds_dot(lambda a, b: _dot(a, b, _NN, prec), dst, q, dk, round_to_input=ds_16), dv

        return _loop(lo, hi, a, b, body, carry, head=head, tail=tail)

    zeros = jnp.zeros((bk, cfg.kp), jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.r, head_body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_dkv(cfg, q, k, v, q_seg, kv_seg, lse, delta, do, ds_16):
    """(dk, dv), and with fused_bwd the unscaled float32 dQ = sum_j dS K_j as a third output."""
    b = q.shape[0]
    g, r, kp = cfg.g, cfg.r, cfg.kp
    bq, bk = _blocks(cfg)["dkv"]
    fused = _blocks(cfg)["fused_bwd"]
    bg = lambda j: (_div(j, g), j % g)
    group_spec = pl.BlockSpec((None, cfg.l_pad, r, kp), lambda i, j: (bg(j)[0], 0, bg(j)[1], 0))
    kv_spec = pl.BlockSpec((None, bk, None, kp), lambda i, j: (bg(j)[0], i, bg(j)[1], 0))
    stat_spec = pl.BlockSpec((None, r, cfg.l_pad), lambda i, j: (bg(j)[0], bg(j)[1], 0))
    in_specs = [group_spec, kv_spec, kv_spec, group_spec, stat_spec, stat_spec]
    args = [q, k, v, do, lse, delta]
    if cfg.has_segments:
        in_specs += [pl.BlockSpec((None, cfg.l_pad), lambda i, j: (bg(j)[0], 0)),
                     pl.BlockSpec((None, bk), lambda i, j: (bg(j)[0], i))]
        args += [q_seg, kv_seg]
    out_specs = [kv_spec, kv_spec]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    aliases = None
    if fused:  # the zero dQ buffer goes in and comes out (aliased), the programs add into it
        in_specs.append(group_spec)
        args.append(jnp.zeros(q.shape, jnp.float32))
        out_specs.append(group_spec)
        out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
        aliases = {len(args) - 1: 2}
    kernel = functools.partial(_dkv_kernel, cfg=cfg, bq=bq, bk=bk, fused=fused, ds_16=ds_16)
    return _call(cfg, kernel, "flash_attention_bwd" if fused else "flash_attention_dkv", (cfg.s_pad // bk, b * g),
                 in_specs, out_specs, out_shape, _blocks(cfg)["bwd_params"], aliases)(*args)


# --- backward: dQ -----------------------------------------------------------------------------------------------

def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: Config, bq: int, bk: int, ds_16: bool):
    qs_ref, ks_ref = refs[:2] if cfg.has_segments else (None, None)
    dq_ref = refs[-1]
    i = cfg.l_pad // bq - 1 - pl.program_id(0)
    q, do = q_ref[...], do_ref[...]  # Q_i, dO_i (B_r, kp)
    prec = _precision(q.dtype)
    lse2, delta = lse_ref[...][:, None], delta_ref[...][:, None]  # L_i, D_i
    rows = i * bq + jnp.arange(bq)
    q_seg = None if qs_ref is None else qs_ref[...][:, None]

    def body(j, dq, masked):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        s2, t = _scores2(cfg, _dot(q, k, _NT, prec))
        p = jnp.exp2(s2 - lse2)
        if masked:
            kv_seg = None if ks_ref is None else ks_ref[pl.ds(start, bk)][None, :]
            p = jnp.where(element_mask(cfg, rows[:, None], (start + jnp.arange(bk))[None, :], q_seg, kv_seg), p, 0.0)
        ds = p * (_dot(do, v_ref[pl.ds(start, bk), :], _NT, prec) - delta)
        if t is not None:
            ds = ds * (1.0 - t * t)
        return ds_dot(lambda a, b: _dot(a, b, _NN, prec), ds, k, dq, round_to_input=ds_16)

    head, tail = _key_loop_parts(cfg)
    dq = _loop(*key_blocks(cfg, i, bq, bk), body, jnp.zeros((bq, cfg.kp), jnp.float32), head=head, tail=tail)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _backward_dq(cfg, q, k, v, q_seg, kv_seg, lse, delta, do, ds_16):
    b, h = q.shape[0], cfg.h
    bq, bk = _blocks(cfg)["dq"]
    q_spec, kv_spec, stat_spec, seg_specs = _query_major_specs(cfg, bq)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec, *seg_specs]
    args = [q, k, v, do, lse, delta] + ([q_seg, kv_seg] if cfg.has_segments else [])
    kernel = functools.partial(_dq_kernel, cfg=cfg, bq=bq, bk=bk, ds_16=ds_16)
    return _call(cfg, kernel, "flash_attention_dq", (cfg.l_pad // bq, b * h), in_specs, q_spec,
                 jax.ShapeDtypeStruct(q.shape, q.dtype), _blocks(cfg)["dq_params"])(*args)


def backward(cfg: Config, q, k, v, q_seg, kv_seg, out, out_lo, lse, do):
    """(dq, dk, dv) in the padded layout. D = rowsum(dO * O) (FA-2's D_i) is one XLA reduction
    (`_blocks.row_delta`)."""
    delta = row_delta("blhk,blhk->bhl", do, out, out_lo)
    do = do.astype(q.dtype)
    ds_16 = _blocks(cfg)["ds_in_input_dtype"]
    if _blocks(cfg)["fused_bwd"]:
        dk, dv, dq = _backward_dkv(cfg, q, k, v, q_seg, kv_seg, lse, delta, do, ds_16)
        return (dq * cfg.scale).astype(q.dtype), dk, dv
    dk, dv = _backward_dkv(cfg, q, k, v, q_seg, kv_seg, lse, delta, do, ds_16)
    return _backward_dq(cfg, q, k, v, q_seg, kv_seg, lse, delta, do, ds_16), dk, dv
