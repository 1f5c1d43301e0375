"""Entry point: validation, padding to the kernels' shapes, `custom_vjp` over the variant's forward/backward.

Axis letters: b batch, l sequence, d channels, n state, g groups of B/C; e = d / g channels per group.
The kernels see padded arrays (see `_plan.py`): l -> L with steps past l made inert inside the kernels (delta = 0:
no decay, no input); each group's e -> e_pad with zero inputs; n -> Np with A = B = C = 0 and a zero initial
state (the padded state columns stay 0 and add nothing to y). Results are sliced back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import (FLOAT_DTYPES, check_block, check_dtype, check_shape, resolve_interpret,
                                    resolve_variant)
from pallas_kernels.selective_scan import _gpu, _tpu
from pallas_kernels.selective_scan._plan import BlockSizes, Plan, make_plan, resolve_block_sizes

MAX_STATE = 256  # d_state the kernels take: the GPU keeps (block_d, Np) states in registers


def selective_scan(x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus: bool = True, initial_state=None,
                   return_final_state: bool = False, segment_ids=None, block_sizes: BlockSizes | None = None,
                   variant: str | None = None, interpret: bool | None = None):
    """Mamba-1 selective scan as a Pallas kernel; same arguments and results as `seqmix_jax.ops.selective_scan`.

    Args:
      x, dt: (b, l, d); A: (d, n); B, C: (b, l, n) or (b, l, g, n) with g dividing d; D, dt_bias: optional (d,);
      z: optional (b, l, d) gate; initial_state: optional (b, d, n); segment_ids: optional (b, l) int (the state
      restarts from 0 where the id changes). x, dt, z, B, C may be float32, bfloat16 or float16; all math is float32.
      block_sizes: tuning knobs (`BlockSizes`); variant: "gpu" (Triton) or "tpu" (Mosaic), None = the running
      accelerator ("gpu" on CPU); interpret: None = interpret exactly when that accelerator is not present.

    Returns:
      y (b, l, d) in x.dtype, or (y, final_state (b, d, n) float32) with return_final_state.
    """
    variant = resolve_variant(variant)
    interpret = resolve_interpret(interpret, variant)
    b, l, d, n, g = validate(x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids)
    bs = resolve_block_sizes(block_sizes, variant, b, d, n, g, interpret)
    check_block_sizes(bs, variant)
    p = make_plan(variant, interpret, bs, b=b, l=l, d=d, n=n, g=g, softplus=bool(dt_softplus), has_D=D is not None,
                  has_z=z is not None, has_bias=dt_bias is not None, has_h0=initial_state is not None,
                  has_keep=segment_ids is not None)
    f32 = lambda a: None if a is None else a.astype(jnp.float32)
    keep = None
    if segment_ids is not None:  # 0 where a new segment starts: the decay into that step is cut
        same = (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(jnp.float32)
        keep = jnp.pad(same, ((0, 0), (1, p.L - l)), constant_values=1.0)
    y, hT = _scan(p, _pad_seq(p, _pad_ch(p, x, 2)), _pad_seq(p, _pad_ch(p, dt, 2)),
                  _pad_n(p, _pad_ch(p, f32(A), 0)), _pad_seq(p, _pad_n(p, B.reshape(b, l, g, n))),
                  _pad_seq(p, _pad_n(p, C.reshape(b, l, g, n))), _pad_ch(p, f32(D), 0),
                  _pad_seq(p, _pad_ch(p, z, 2)), _pad_ch(p, f32(dt_bias), 0),
                  _pad_n(p, _pad_ch(p, f32(initial_state), 1)), keep)
    y = y[:, :l].reshape(b, l, g, p.e_pad)[..., :p.e].reshape(b, l, d)
    if not return_final_state:
        return y
    return y, hT.reshape(b, g, p.e_pad, p.Np)[:, :, :p.e, :n].reshape(b, d, n)


# ------------------------------------------------------------------------------------------------ checks

def validate(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, segment_ids=None):
    """Shapes and dtypes; returns (b, l, d, n, g). Raises ValueError naming the argument and its values."""
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"x must have shape (b, l, d), got {tuple(getattr(x, 'shape', ()))}")
    b, l, d = x.shape
    if getattr(A, "ndim", None) != 2 or A.shape[0] != d:
        raise ValueError(f"A must have shape (d, n) with d={d} (from x), got {tuple(A.shape)}")
    n = A.shape[1]
    if n > MAX_STATE:
        raise ValueError(f"d_state n={n} is larger than the kernel takes ({MAX_STATE})")
    if B.ndim not in (3, 4):
        raise ValueError(f"B must have shape (b, l, n) or (b, l, g, n), got {tuple(B.shape)}")
    g = 1 if B.ndim == 3 else B.shape[2]
    bc_shape, bc_axes = ((b, l, n), "(b, l, n)") if B.ndim == 3 else ((b, l, g, n), "(b, l, g, n)")
    if g < 1 or d % g:
        raise ValueError(f"ngroups g={g} (B.shape[2]) must divide d={d}")
    arrays = [("x", x, (b, l, d), "(b, l, d)"), ("dt", dt, (b, l, d), "(b, l, d)"), ("A", A, (d, n), "(d, n)"),
              ("B", B, bc_shape, bc_axes), ("C", C, bc_shape, bc_axes), ("D", D, (d,), "(d,)"),
              ("z", z, (b, l, d), "(b, l, d)"), ("dt_bias", dt_bias, (d,), "(d,)"),
              ("initial_state", initial_state, (b, d, n), "(b, d, n)")]
    for name, a, shape, axes in arrays:
        if a is not None:
            check_shape(name, a, shape, axes)
            check_dtype(name, a, FLOAT_DTYPES)
    if segment_ids is not None:
        check_shape("segment_ids", segment_ids, (b, l), "(b, l)")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be an integer array, got dtype {jnp.dtype(segment_ids.dtype).name}")
    return b, l, d, n, g


def check_block_sizes(bs: BlockSizes, variant: str) -> None:
    if variant == "gpu":  # Triton tiles: power-of-two dims
        for name in ("block_d", "block_d_bwd", "chunk", "unroll", "sub_chunk", "num_warps", "num_warps_bwd"):
            check_block(name, getattr(bs, name), power_of_two=True)
        for name in ("unroll", "sub_chunk"):
            if bs.chunk % getattr(bs, name):
                raise ValueError(f"chunk={bs.chunk} must be a multiple of {name}={getattr(bs, name)}")
        check_block("num_stages", bs.num_stages)
    else:  # Mosaic tiles: channels on the 128 lanes, steps on the 8 sublanes
        check_block("block_d", bs.block_d, multiple_of=128)
        check_block("block_d_bwd", bs.block_d_bwd, multiple_of=128)
        check_block("chunk", bs.chunk, multiple_of=8)
        check_block("unroll", bs.unroll)


def supports(**call) -> str | None:
    """None when the kernel can run this call (the arguments of `selective_scan`, by name), else the reason."""
    try:
        validate(*(call.get(k) for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state",
                                         "segment_ids")))
    except ValueError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------------------------- padding

def _pad_axis(a, axis, size, value=0.0):
    if a is None or a.shape[axis] == size:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, widths, constant_values=value)


def _pad_seq(p: Plan, a):
    return _pad_axis(a, 1, p.L)


def _pad_n(p: Plan, a):
    return None if a is None else _pad_axis(a, a.ndim - 1, p.Np)


def _pad_ch(p: Plan, a, axis):
    """Channels (axis) as (g, e) -> pad each group's e to e_pad -> (g * e_pad)."""
    if a is None or p.e == p.e_pad:
        return a
    s = a.shape
    a = _pad_axis(a.reshape(*s[:axis], p.g, p.e, *s[axis + 1:]), axis + 1, p.e_pad)
    return a.reshape(*s[:axis], p.Dp, *s[axis + 1:])


# ----------------------------------------------------------------------------------------- custom_vjp

def _impl(p: Plan):
    return _gpu if p.variant == "gpu" else _tpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(p: Plan, x, dt, A, B, C, D, z, bias, h0, keep):
    y, hT, _ = _impl(p).forward(p, x, dt, A, B, C, D, z, bias, h0, keep)
    return y, hT


def _scan_fwd(p: Plan, x, dt, A, B, C, D, z, bias, h0, keep):
    y, hT, hc = _impl(p).forward(p, x, dt, A, B, C, D, z, bias, h0, keep)
    # Saved: the inputs and one state per chunk (b, L / T, Dp, Np) - never a state per step.
    return (y, hT), (x, dt, A, B, C, D, z, bias, keep, hc)


def _scan_bwd(p: Plan, res, cts):
    x, dt, A, B, C, D, z, bias, keep, hc = res
    dy, dhT = cts
    dx, ddt, dz, dB, dC, dA, dD, dbias, dh0 = _impl(p).backward(p, x, dt, A, B, C, D, z, bias, keep, hc, dy,
                                                                dhT.astype(jnp.float32))
    return (dx, ddt, dA, dB.astype(B.dtype), dC.astype(C.dtype), dD, dz, dbias, dh0 if p.has_h0 else None,
            None if keep is None else jnp.zeros_like(keep))


_scan.defvjp(_scan_fwd, _scan_bwd)
