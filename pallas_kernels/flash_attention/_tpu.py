"""TPU variant: FlashAttention-2 lowered through Pallas-Mosaic.

Layout: head-major (b, h, l_pad, kp) / (b, g, s_pad, kp) (one XLA transpose in and out), so every block's last
two dims are (sequence block, kp) with kp a multiple of 128 lanes (the head dim zero-padded) and the sequence
blocks multiples of 128. Per-row statistics live in (rows, 128) lane-broadcast arrays: a column (rows, 1) would
occupy the same vregs, and (rows, 128) blocks are (8, 128)-legal where a (rows,) block of a (b, h, l) array is
not (its second-minor dim would be the squeezed head). So the forward writes the log-sum-exp L as
(b, h, l_pad, 128) (every lane equal; the residual keeps lane 0), and the backward broadcasts L and D back to 128
lanes for the dQ kernel and to 8 sublanes for the dK/dV kernel. Segment ids come in as q ids broadcast along lanes
(b, l_pad, 128) and kv ids along sublanes (b, 8, s_pad), so a (B_r, B_c) comparison needs only a lane tile and a
sublane broadcast; the dK/dV kernel's (B_c, B_r) comparison gets them the other way round.

Forward, grid (b, h, l_pad / B_r, s_pad / B_c), the key axis "arbitrary" (sequential): m, l, acc (FA-2
Algorithm 1's m_i, l_i, O_i) are VMEM scratch, reset at key block 0 and written out at the last key block. A
key block outside the query block's causal / window range is skipped with pl.when, and its index map repeats
the nearest visible block, so the pipeline issues no DMA for it. Only boundary blocks build the element mask.

Backward: dK/dV with grid (b, g, s_pad / B_c, r, l_pad / B_r), the r = h / g query heads of a kv head and
their query blocks both "arbitrary": the group's dK, dV accumulate in VMEM scratch (no per-head partial sums).
dQ with grid (b, h, l_pad / B_r, s_pad / B_c) accumulating dQ in VMEM scratch. Both recompute
P = exp(S - L) and use D = rowsum(dO * O) from XLA, O with the rounding error the forward keeps for 16-bit inputs.
The dK/dV kernel works with the transposed tiles S^T = K Q^T and dP^T = V dO^T, with L and D as (8, B_r)
sublane-broadcast rows, so dV += P^T dO and dK += dS^T Q take their tiles as they are (no transpose on the XLU).
With bf16 inputs dQ = dS K and dK = dS^T Q take dS as two bf16 terms (`_blocks.ds_dot`): two MXU passes where a
HIGHEST float32 dot takes several (XLA's float32 algorithm on TPU is six bf16 passes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common as c
from pallas_kernels.flash_attention._blocks import NEG_INF, Config, _div, ds_dot, element_mask, key_blocks, \
    query_blocks, row_delta, store_output

LANES, SUBLANES = 128, 8
_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))
Q_SEG_PAD, KV_SEG_PAD = -1, -2


# --- layout -----------------------------------------------------------------------------------------------------

def to_layout(cfg: Config, q, k, v, q_seg, kv_seg):
    dk = q.shape[-1]
    pad = lambda x, n: jnp.swapaxes(jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, cfg.kp - dk))), 1, 2)
    segs = (None, None)
    if cfg.has_segments:
        qs = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, cfg.l_pad - cfg.l)), constant_values=Q_SEG_PAD)
        ks = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, cfg.s_pad - cfg.s)), constant_values=KV_SEG_PAD)
        b = qs.shape[0]
        segs = (jnp.broadcast_to(qs[:, :, None], (b, cfg.l_pad, LANES)),
                jnp.broadcast_to(ks[:, None, :], (b, SUBLANES, cfg.s_pad)))
    return pad(q, cfg.l_pad), pad(k, cfg.s_pad), pad(v, cfg.s_pad), segs


def from_layout(cfg: Config, out, shape):
    return jnp.swapaxes(out, 1, 2)[:, :cfg.l, :, :shape[-1]]


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, dims, precision):
    """Float32-accumulated dot; dQ = dS K and dK = dS^T Q go through `_blocks.ds_dot` (dS is never rounded to
    bf16 alone: Mosaic's default precision would do that to a float32 operand)."""
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _lanes(x, n: int):
    """(rows, 128) lane-broadcast statistic -> (rows, n), n a multiple of 128."""
    return x if n == LANES else jnp.tile(x, (1, n // LANES))


def _scores(cfg: Config, x):
    """x = q . k (float32) -> (scaled, soft-capped score s, tanh(x * scale / c) or None)."""
    if cfg.softcap is None:
        return x * cfg.scale, None
    t = jnp.tanh(x * (cfg.scale / cfg.softcap))
    return t * cfg.softcap, t


def _clamp(x, lo, hi, n: int):
    """x clamped into the visible block range [lo, hi) and into [0, n): a skipped grid step's index map repeats
    a visible block, so no new DMA is issued."""
    return jnp.minimum(jnp.maximum(jnp.minimum(jnp.maximum(x, lo), hi - 1), 0), n - 1)


def _mask(cfg, qi, kj, bq, bk, qs_ref, ks_ref, transposed: bool = False):
    """The (B_r, B_c) element mask, or with `transposed` its (B_c, B_r) transpose (the segment ids then come
    in the other layouts, see `_seg_specs`)."""
    shape, row_axis = ((bk, bq), 1) if transposed else ((bq, bk), 0)
    rows = qi * bq + lax.broadcasted_iota(jnp.int32, shape, row_axis)
    cols = kj * bk + lax.broadcasted_iota(jnp.int32, shape, 1 - row_axis)
    q_seg = kv_seg = None
    if qs_ref is not None:
        if transposed:
            q_seg, kv_seg = qs_ref[...][:1, :], _lanes(ks_ref[...], bq)
        else:
            q_seg, kv_seg = _lanes(qs_ref[...], bk), ks_ref[...][:1, :]
    return element_mask(cfg, rows, cols, q_seg, kv_seg)


def _when_visible(visible, full, step):
    """Run step(masked=False) on blocks every row sees entirely, step(masked=True) on the other visible ones."""
    pl.when(visible & full)(functools.partial(step, masked=False))
    pl.when(visible & jnp.logical_not(full))(functools.partial(step, masked=True))


def _call(cfg, kernel, name, grid, in_specs, out_specs, out_shape, scratch, semantics):
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=0, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch)
    return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                          compiler_params=c.compiler_params("tpu", dimension_semantics=semantics),
                          interpret=c.interpret_arg("tpu", cfg.interpret), name=name)


def _seg_specs(cfg, bq, bk, q_index, k_index, transposed: bool = False):
    """BlockSpecs for the lane-broadcast q ids and sublane-broadcast kv ids (`to_layout`), or with `transposed`
    for sublane-broadcast q ids and lane-broadcast kv ids (`_transposed_ids`); index fns give (b, block)."""
    lanes = lambda index: lambda *g: (*index(*g), 0)
    sublanes = lambda index: lambda *g: _insert_zero(index(*g), 1)
    if transposed:
        return [pl.BlockSpec((None, SUBLANES, bq), sublanes(q_index)), pl.BlockSpec((None, bk, LANES), lanes(k_index))]
    return [pl.BlockSpec((None, bq, LANES), lanes(q_index)), pl.BlockSpec((None, SUBLANES, bk), sublanes(k_index))]


def _batch_and_block(index: tuple) -> tuple:
    """(batch, head, sequence block) -> (batch, sequence block), the index of a segment-id block."""
    return index[0], index[2]


def _insert_zero(index: tuple, at: int) -> tuple:
    """A block index with a 0 inserted at position `at` (the block's sublane axis)."""
    return (*index[:at], 0, *index[at:])


def _transposed_ids(q_seg, kv_seg):
    """`to_layout`'s lane-broadcast q ids (b, l_pad, 128) and sublane-broadcast kv ids (b, 8, s_pad) as
    sublane-broadcast q ids (b, 8, l_pad) and lane-broadcast kv ids (b, s_pad, 128), for transposed tiles."""
    b, l_pad, s_pad = q_seg.shape[0], q_seg.shape[1], kv_seg.shape[2]
    return (jnp.broadcast_to(q_seg[:, None, :, 0], (b, SUBLANES, l_pad)),
            jnp.broadcast_to(kv_seg[:, 0, :, None], (b, s_pad, LANES)))


def _query_major_specs(cfg, bq, bk):
    """BlockSpecs over the grid (b, h, l_pad / B_r, s_pad / B_c) of the forward and the dQ kernel: Q_i (or dO_i),
    K_j / V_j of the head's kv head (a key block outside the visible range repeats the nearest visible one), the
    (B_r, 128) row statistics, and the segment ids (empty without them)."""
    nk = cfg.s_pad // bk

    def kv_block(bi, hh, qi, kj):
        lo, hi, _, _ = key_blocks(cfg, qi, bq, bk)
        return bi, _div(hh, cfg.r), _clamp(kj, lo, hi, nk)

    q_spec = pl.BlockSpec((None, None, bq, cfg.kp), lambda bi, hh, qi, kj: (bi, hh, qi, 0))
    kv_spec = pl.BlockSpec((None, None, bk, cfg.kp), lambda *g: (*kv_block(*g), 0))
    stat_spec = pl.BlockSpec((None, None, bq, LANES), lambda bi, hh, qi, kj: (bi, hh, qi, 0))
    seg_specs = []
    if cfg.has_segments:
        seg_specs = _seg_specs(cfg, bq, bk, lambda bi, hh, qi, kj: (bi, qi),
                               lambda *g: _batch_and_block(kv_block(*g)))
    return q_spec, kv_spec, stat_spec, seg_specs


# --- forward ----------------------------------------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, *refs, cfg: Config, bq: int, bk: int, with_lo: bool):
    qs_ref, ks_ref = refs[:2] if cfg.has_segments else (None, None)
    m_sc, l_sc, acc_sc = refs[-3:]
    o_ref, lse_ref, lo_ref = refs[-6:-3] if with_lo else (*refs[-5:-3], None)
    qi, kj = pl.program_id(2), pl.program_id(3)

    @pl.when(kj == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        prec = _precision(q.dtype)
        s, _ = _scores(cfg, _dot(q, k, _NT, prec))  # S_ij (B_r, B_c)
        if masked:
            s = jnp.where(_mask(cfg, qi, kj, bq, bk, qs_ref, ks_ref), s, -jnp.inf)
        m_prev, l_prev = m_sc[...], l_sc[...]  # (B_r, 128)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])
        p = jnp.exp(s - _lanes(m_new, bk))
        alpha = jnp.exp(m_prev - m_new)
        m_sc[...] = m_new
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1)[:, None]
        acc_sc[...] = acc_sc[...] * _lanes(alpha, cfg.kp) + _dot(p.astype(v.dtype), v, _NN, prec)

    lo, hi, a, b = key_blocks(cfg, qi, bq, bk)
    _when_visible((kj >= lo) & (kj < hi), (kj >= a) & (kj < b), step)

    @pl.when(kj == pl.num_programs(3) - 1)
    def _write():
        l = l_sc[...]
        empty = l == 0.0  # no visible key: output 0
        l_safe = jnp.where(empty, 1.0, l)
        store_output(acc_sc[...] * _lanes(1.0 / l_safe, cfg.kp), o_ref, lo_ref)
        lse_ref[...] = jnp.where(empty, 0.0, m_sc[...] + jnp.log(l_safe))


def forward(cfg: Config, q, k, v, q_seg, kv_seg, with_lo: bool = False):
    """(out (b, h, l_pad, kp) in q.dtype, lse (b, h, l_pad) float32), and with with_lo the output's rounding error
    (`store_output`) as a third array."""
    b = q.shape[0]
    bq, bk = cfg.blocks[0], cfg.blocks[1]
    nq, nk = cfg.l_pad // bq, cfg.s_pad // bk
    q_spec, kv_spec, stat_spec, seg_specs = _query_major_specs(cfg, bq, bk)
    in_specs = [q_spec, kv_spec, kv_spec, *seg_specs]
    args = [q, k, v] + ([q_seg, kv_seg] if cfg.has_segments else [])
    out_specs = [q_spec, stat_spec] + [q_spec] * with_lo  # O_i, L_i (, the rounding error of O_i)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, cfg.h, cfg.l_pad, LANES), jnp.float32)]
    out_shape += [jax.ShapeDtypeStruct(q.shape, q.dtype)] * with_lo
    scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
               pltpu.VMEM((bq, cfg.kp), jnp.float32)]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk, with_lo=with_lo)
    out, lse, *lo = _call(cfg, kernel, "flash_attention_fwd", (b, cfg.h, nq, nk), in_specs, out_specs, out_shape,
                          scratch, ("parallel", "parallel", "parallel", "arbitrary"))(*args)
    return (out, lse[..., 0], *lo)


def _ds_dot_fn(dims):
    """`ds_dot`'s dot: HIGHEST for a float32 operand (float32 / float16 inputs), one bf16 pass for bf16 terms."""
    return lambda a, b: _dot(a, b, dims, _precision(a.dtype))


# --- backward ---------------------------------------------------------------------------------------------------

def _grads(cfg, q, k, v, do, lse, delta, mask, transposed: bool = False):
    """P, dS (B_r, B_c) for one tile: P = exp(S - L) (0 where masked), dS = P * (dP - D) through the soft-cap;
    L and D are (B_r, 128) lane-broadcast columns. With `transposed`, P^T and dS^T (B_c, B_r) from S^T = K Q^T and
    dP^T = V dO^T, with L and D (1, B_r) rows: the dK/dV kernel's products P^T dO and dS^T Q then need no
    transposed tile (as jax's splash attention computes them)."""
    prec = _precision(q.dtype)
    if transposed:
        x, dp, lse_b, delta_b = _dot(k, q, _NT, prec), _dot(v, do, _NT, prec), lse, delta
    else:
        bk = k.shape[0]
        x, dp, lse_b, delta_b = _dot(q, k, _NT, prec), _dot(do, v, _NT, prec), _lanes(lse, bk), _lanes(delta, bk)
    s, t = _scores(cfg, x)
    p = jnp.exp(s - lse_b)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    ds = p * (dp - delta_b)
    if t is not None:
        ds = ds * (1.0 - t * t)  # d(c tanh(x / c)) / dx
    return p, ds


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: Config, bq: int, bk: int):
    qs_ref, ks_ref = refs[:2] if cfg.has_segments else (None, None)
    dk_ref, dv_ref, dk_sc, dv_sc = refs[-4:]
    kj, hr, qi = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((hr == 0) & (qi == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        prec = _precision(q.dtype)
        mask = _mask(cfg, qi, kj, bq, bk, qs_ref, ks_ref, transposed=True) if masked else None
        pt, dst = _grads(cfg, q, k_ref[...], v_ref[...], do, lse_ref[...][:1, :], delta_ref[...][:1, :], mask,
                         transposed=True)
        dv_sc[...] += _dot(pt.astype(do.dtype), do, _NN, prec)  # dV_j += P^T dO_i
        dk_sc[...] += ds_dot(_ds_dot_fn(_NN), dst, q)  # dK_j += dS^T Q_i

    lo, hi, a, b = query_blocks(cfg, kj, bq, bk)
    _when_visible((qi >= lo) & (qi < hi), (qi >= a) & (qi < b), step)

    @pl.when((hr == pl.num_programs(3) - 1) & (qi == pl.num_programs(4) - 1))
    def _write():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward_dkv(cfg, q, k, v, q_seg, kv_seg, lse, delta, do):
    """dK, dV from the transposed tiles (`_grads`): lse and delta come as (b, h, 8, l_pad) sublane-broadcast rows,
    the segment ids as sublane-broadcast q ids and lane-broadcast kv ids (`_transposed_ids`)."""
    b = q.shape[0]
    bq, bk = cfg.blocks[2], cfg.blocks[3]
    nq, nk = cfg.l_pad // bq, cfg.s_pad // bk

    def q_block(bi, gi, kj, hr, qi):
        lo, hi, _, _ = query_blocks(cfg, kj, bq, bk)
        return bi, gi * cfg.r + hr, _clamp(qi, lo, hi, nq)

    q_spec = pl.BlockSpec((None, None, bq, cfg.kp), lambda *g: (*q_block(*g), 0))
    kv_spec = pl.BlockSpec((None, None, bk, cfg.kp), lambda bi, gi, kj, hr, qi: (bi, gi, kj, 0))
    stat_spec = pl.BlockSpec((None, None, SUBLANES, bq), lambda *g: _insert_zero(q_block(*g), 2))
    in_specs, args = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec], [q, k, v, do, lse, delta]
    if cfg.has_segments:
        in_specs += _seg_specs(cfg, bq, bk, lambda *g: _batch_and_block(q_block(*g)),
                               lambda bi, gi, kj, hr, qi: (bi, kj), transposed=True)
        args += list(_transposed_ids(q_seg, kv_seg))
    scratch = [pltpu.VMEM((bk, cfg.kp), jnp.float32), pltpu.VMEM((bk, cfg.kp), jnp.float32)]
    kernel = functools.partial(_dkv_kernel, cfg=cfg, bq=bq, bk=bk)
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    return _call(cfg, kernel, "flash_attention_dkv", (b, cfg.g, nk, cfg.r, nq), in_specs, [kv_spec, kv_spec],
                 out_shape, scratch, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"))(*args)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: Config, bq: int, bk: int):
    qs_ref, ks_ref = refs[:2] if cfg.has_segments else (None, None)
    dq_ref, dq_sc = refs[-2:]
    qi, kj = pl.program_id(2), pl.program_id(3)

    @pl.when(kj == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked):
        q, k = q_ref[...], k_ref[...]
        mask = _mask(cfg, qi, kj, bq, bk, qs_ref, ks_ref) if masked else None
        _, ds = _grads(cfg, q, k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask)
        dq_sc[...] += ds_dot(_ds_dot_fn(_NN), ds, k)  # dQ_i += dS K_j

    lo, hi, a, b = key_blocks(cfg, qi, bq, bk)
    _when_visible((kj >= lo) & (kj < hi), (kj >= a) & (kj < b), step)

    @pl.when(kj == pl.num_programs(3) - 1)
    def _write():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _backward_dq(cfg, q, k, v, q_seg, kv_seg, lse, delta, do):
    b = q.shape[0]
    bq, bk = cfg.blocks[4], cfg.blocks[5]
    nq, nk = cfg.l_pad // bq, cfg.s_pad // bk
    q_spec, kv_spec, stat_spec, seg_specs = _query_major_specs(cfg, bq, bk)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec, *seg_specs]
    args = [q, k, v, do, lse, delta] + ([q_seg, kv_seg] if cfg.has_segments else [])
    kernel = functools.partial(_dq_kernel, cfg=cfg, bq=bq, bk=bk)
    return _call(cfg, kernel, "flash_attention_dq", (b, cfg.h, nq, nk), in_specs, q_spec,
                 jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((bq, cfg.kp), jnp.float32)],
                 ("parallel", "parallel", "parallel", "arbitrary"))(*args)


def backward(cfg: Config, q, k, v, q_seg, kv_seg, out, out_lo, lse, do):
    """(dq, dk, dv) in the head-major padded layout; L and D = rowsum(dO * O) (`_blocks.row_delta`) broadcast to
    128 lanes for the dQ kernel and to 8 sublanes for the dK/dV kernel."""
    delta = row_delta("bhlk,bhlk->bhl", do, out, out_lo)
    lanes = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, LANES))
    do = do.astype(q.dtype)
    sublanes = lambda x: jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], SUBLANES, x.shape[-1]))
    dk, dv = _backward_dkv(cfg, q, k, v, q_seg, kv_seg, sublanes(lse), sublanes(delta), do)
    dq = _backward_dq(cfg, q, k, v, q_seg, kv_seg, lanes(lse), lanes(delta), do)
    return dq, dk, dv
