"""Entries: validation, block sizes, padding per variant, and the custom_vjp around the forward kernel.

    y[t, c] = act( bias[c] + sum_{j<w} weight[j, c] * x[t - (w - 1) + j, c] )      (same segment only)

Forward and backward are Pallas kernels for both variants (GPU/Triton in `_gpu.py`, TPU/Mosaic in `_tpu.py`).
The backward recomputes the pre-activation from x instead of saving it: saving it would add a (b, l, c) write
to the forward (+50% of its bytes) and a read to the backward, while the backward reads x anyway (dweight needs
it), so recomputing costs only arithmetic. The final state (the last w - 1 inputs) is a (b, w - 1, c) slice taken
in XLA outside the custom_vjp; its gradient flows by ordinary autodiff.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import (check_block, check_dtype, check_shape, next_power_of_two, resolve_interpret,
                                    resolve_variant, round_up)
from pallas_kernels.causal_conv1d import _gpu, _tpu
from pallas_kernels.causal_conv1d.reference import causal_conv1d_update_reference, tap_allowance

MAX_WIDTH = 16  # taps are unrolled (w^2 terms in the silu backward); the TPU halo is at most 16 rows


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes; None = the variant's default for the shape (see `resolve`). GPU: block sizes and num_warps
    powers of two. TPU: block_l* a multiple of the halo (w - 1 rounded up to 8 rows, 16 for 16-bit dtypes),
    block_c* a multiple of 128, block_b_update a multiple of 8 (16 for 16-bit dtypes); the GPU-only fields
    (chunks_bwd, num_warps*, num_stages) are ignored there."""
    block_l: int | None = None  # forward: sequence rows per program
    block_c: int | None = None  # forward: channels per program
    block_l_bwd: int | None = None
    block_c_bwd: int | None = None
    chunks_bwd: int | None = None  # GPU: block_l_bwd-row chunks one backward program walks (fewer dweight partials)
    block_b_update: int | None = None  # decode update: batch rows per program
    block_c_update: int | None = None
    num_warps: int | None = None  # GPU only (forward, backward and update)
    num_warps_bwd: int | None = None
    num_stages: int | None = None

    def resolve(self, variant: str, *, b: int, l: int, c: int, w: int, dtype) -> BlockSizes:
        """Concrete sizes for this call (defaults clamped to the problem), validated for the variant."""
        return (_resolve_gpu if variant == "gpu" else _resolve_tpu)(self, b=b, l=l, c=c, w=w, dtype=dtype)


def _given(value, default):
    return default if value is None else value


def _resolve_gpu(bs: BlockSizes, *, b, l, c, w, dtype) -> BlockSizes:
    lrows = max(8, min(32, next_power_of_two(max(l, 1))))
    cols = max(16, min(128, next_power_of_two(c)))
    out = BlockSizes(
        block_l=_given(bs.block_l, lrows), block_c=_given(bs.block_c, cols),
        block_l_bwd=_given(bs.block_l_bwd, lrows), block_c_bwd=_given(bs.block_c_bwd, min(cols, 64)),
        chunks_bwd=_given(bs.chunks_bwd, 8),
        block_b_update=_given(bs.block_b_update, max(1, min(8, next_power_of_two(b)))),
        block_c_update=_given(bs.block_c_update, cols),
        num_warps=_given(bs.num_warps, 4), num_warps_bwd=_given(bs.num_warps_bwd, 4),
        num_stages=_given(bs.num_stages, 2))
    for f in dataclasses.fields(out):
        check_block(f"block_sizes.{f.name}", getattr(out, f.name),
                    power_of_two=f.name not in ("num_stages", "chunks_bwd"))
    return out


def _lane_block(c: int, cap: int, given: int | None) -> int:
    """Largest multiple of 128 that is <= cap and divides c rounded up to 128 (so padding stays < 128)."""
    if given is not None:
        return given
    c128 = round_up(c, 128) // 128
    return 128 * max(d for d in range(1, cap // 128 + 1) if c128 % d == 0)


def _resolve_tpu(bs: BlockSizes, *, b, l, c, w, dtype) -> BlockSizes:
    h = _tpu.halo_rows(w, dtype)
    sub = 8 * (4 // jnp.dtype(dtype).itemsize)
    rows = min(256, round_up(max(l, 1), h))
    out = BlockSizes(
        block_l=_given(bs.block_l, rows), block_c=_lane_block(c, 512, bs.block_c),
        block_l_bwd=_given(bs.block_l_bwd, rows), block_c_bwd=_lane_block(c, 512, bs.block_c_bwd),
        block_b_update=_given(bs.block_b_update, min(64, round_up(b, sub))),
        block_c_update=_lane_block(c, 512, bs.block_c_update))
    for name in ("block_l", "block_l_bwd"):
        check_block(f"block_sizes.{name}", getattr(out, name), multiple_of=h)
    for name in ("block_c", "block_c_bwd", "block_c_update"):
        check_block(f"block_sizes.{name}", getattr(out, name), multiple_of=128)
    check_block("block_sizes.block_b_update", out.block_b_update, multiple_of=sub)
    return out


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: the custom_vjp's non-differentiable argument)."""
    variant: str
    interpret: bool
    w: int
    silu: bool
    blocks: BlockSizes


# --- validation ---------------------------------------------------------------------------------------------

def _check_activation(activation) -> bool:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    return activation is not None


def _check_weight(weight, bias, c: int) -> int:
    if weight.ndim != 2 or weight.shape[1] != c:
        raise ValueError(f"weight must have shape (w, c) with c={c}, got {tuple(weight.shape)}")
    check_dtype("weight", weight)
    w = weight.shape[0]
    if not 1 <= w <= MAX_WIDTH:
        raise ValueError(f"weight has width w={w}; the kernel takes 1 <= w <= {MAX_WIDTH}")
    if bias is not None:
        check_shape("bias", bias, (c,), "(c,)")
        check_dtype("bias", bias)
    return w


def _check_conv(x, weight, bias, activation, segment_ids, initial_state) -> tuple[int, bool]:
    if x.ndim != 3:
        raise ValueError(f"x must have rank 3 (b, l, c), got shape {tuple(x.shape)}")
    check_dtype("x", x)
    b, l, c = x.shape
    if l < 1 or c < 1:
        raise ValueError(f"x must have l >= 1 and c >= 1, got shape {tuple(x.shape)}")
    w = _check_weight(weight, bias, c)
    if initial_state is not None:
        check_shape("initial_state", initial_state, (b, w - 1, c), "(b, w - 1, c)")
        check_dtype("initial_state", initial_state)
    if segment_ids is not None:
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be an integer array, got dtype {jnp.dtype(segment_ids.dtype).name}")
        check_shape("segment_ids", segment_ids, (b, l), "(b, l)")
    return w, _check_activation(activation)


def supports(x, weight, bias=None, *, activation=None, segment_ids=None, initial_state=None,
             block_sizes: BlockSizes | None = None, variant: str | None = None) -> str | None:
    """None when `causal_conv1d` can run this call (arrays or ShapeDtypeStructs), else the reason."""
    try:
        w, _ = _check_conv(x, weight, bias, activation, segment_ids, initial_state)
        (block_sizes or BlockSizes()).resolve(resolve_variant(variant), b=x.shape[0], l=x.shape[1],
                                              c=x.shape[2], w=w, dtype=x.dtype)
    except ValueError as e:
        return str(e)
    return None


def supports_update(state, x, weight, bias=None, *, activation=None, block_sizes: BlockSizes | None = None,
                    variant: str | None = None) -> str | None:
    """None when `causal_conv1d_update` can run this call, else the reason."""
    try:
        _check_update(state, x, weight, bias, activation)
        (block_sizes or BlockSizes()).resolve(resolve_variant(variant), b=x.shape[0], l=1, c=x.shape[1],
                                              w=weight.shape[0], dtype=x.dtype)
    except ValueError as e:
        return str(e)
    return None


# --- forward / backward -----------------------------------------------------------------------------------

def _pack_taps(weight, bias, rows: int, cols: int):
    """(rows, cols) float32: the taps in rows 0..w-1, the bias (or 0) in row w, zeros elsewhere."""
    w, c = weight.shape
    bias = jnp.zeros((c,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    wb = jnp.concatenate([weight.astype(jnp.float32), bias[None]], axis=0)
    return jnp.pad(wb, ((0, rows - (w + 1)), (0, cols - c)))


def _pad_to(a, shape, value=0):
    pads = [(0, n - s) for s, n in zip(a.shape, shape)]
    return a if not any(p for _, p in pads) else jnp.pad(a, pads, constant_values=value)


def _tpu_operands(st: _Static, x, weight, bias, init, allow, bl: int, bc: int):
    """Pad for the TPU blocks: l and c to the block multiples, init to h rows at the front, taps to 8 rows."""
    b, l, c = x.shape
    h = _tpu.halo_rows(st.w, x.dtype)
    lp, cp = round_up(l, bl), round_up(c, bc)
    xp = _pad_to(x, (b, lp, cp))
    wb = _pack_taps(weight, bias, round_up(st.w + 1, 8), cp)
    if init is not None:
        init = jnp.pad(init.astype(x.dtype), ((0, 0), (h - (st.w - 1), 0), (0, cp - c)))
    if allow is not None:
        allow = _pad_to(allow, (b, lp), _tpu.BIG)[..., None]
    return xp, wb, init, allow


def _forward(st: _Static, x, weight, bias, init, allow):
    bs = st.blocks
    if st.variant == "gpu":
        init = None if init is None else init.astype(x.dtype)
        return _gpu.forward(x, _pack_taps(weight, bias, st.w + 1, x.shape[2]), init, allow, w=st.w, silu=st.silu,
                            block_l=bs.block_l, block_c=bs.block_c, num_warps=bs.num_warps,
                            num_stages=bs.num_stages, interpret=st.interpret)
    b, l, c = x.shape
    xp, wb, initp, allowp = _tpu_operands(st, x, weight, bias, init, allow, bs.block_l, bs.block_c)
    y = _tpu.forward(xp, wb, initp, allowp, w=st.w, silu=st.silu, block_l=bs.block_l, block_c=bs.block_c,
                     interpret=st.interpret)
    return y[:, :l, :c]


def _backward(st: _Static, x, weight, bias, init, allow, dy):
    """(dx, dwb (>= w + 1, c) float32 with dbias in row w, dinit (b, w - 1, c) float32 or None)."""
    bs = st.blocks
    b, l, c = x.shape
    if st.variant == "gpu":
        init = None if init is None else init.astype(x.dtype)
        return _gpu.backward(x, _pack_taps(weight, bias, st.w + 1, c), init, allow, dy.astype(x.dtype), w=st.w,
                             silu=st.silu, block_l=bs.block_l_bwd, block_c=bs.block_c_bwd, chunks=bs.chunks_bwd,
                             num_warps=bs.num_warps_bwd, num_stages=bs.num_stages, interpret=st.interpret)
    xp, wb, initp, allowp = _tpu_operands(st, x, weight, bias, init, allow, bs.block_l_bwd, bs.block_c_bwd)
    dyp = _pad_to(dy.astype(x.dtype), xp.shape)
    dx, dwb, dinit = _tpu.backward(xp, wb, initp, allowp, dyp, w=st.w, silu=st.silu, block_l=bs.block_l_bwd,
                                   block_c=bs.block_c_bwd, interpret=st.interpret)
    h = _tpu.halo_rows(st.w, x.dtype)
    return dx[:, :l, :c], dwb[:, :c], (None if dinit is None else dinit[:, h - (st.w - 1):, :c])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(st: _Static, x, weight, bias, init, allow):
    return _forward(st, x, weight, bias, init, allow)


def _conv_fwd(st, x, weight, bias, init, allow):
    return _forward(st, x, weight, bias, init, allow), (x, weight, bias, init, allow)


def _conv_bwd(st, res, dy):
    x, weight, bias, init, allow = res
    dx, dwb, dinit = _backward(st, x, weight, bias, init, allow, dy)
    return (dx.astype(x.dtype), dwb[:st.w].astype(weight.dtype),
            None if bias is None else dwb[st.w].astype(bias.dtype),
            None if init is None else dinit.astype(init.dtype), None)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _final_state(x, initial_state, allow, w: int):
    """The last w - 1 inputs of [initial_state, x], zeroed before the last segment's start."""
    b, l, c = x.shape
    prefix = jnp.zeros((b, w - 1, c), x.dtype) if initial_state is None else initial_state.astype(x.dtype)
    tail = jnp.concatenate([prefix, x[:, max(0, l - (w - 1)):]], axis=1)
    state = tail[:, tail.shape[1] - (w - 1):]
    if allow is not None:  # state row k lies d = w - 2 - k steps before the last input
        d = jnp.arange(w - 2, -1, -1)
        state = jnp.where((d[None, :] <= allow[:, -1:])[..., None], state, jnp.zeros((), x.dtype))
    return state


def causal_conv1d(x, weight, bias=None, *, activation: str | None = None, segment_ids=None, initial_state=None,
                  return_final_state: bool = False, block_sizes: BlockSizes | None = None,
                  variant: str | None = None, interpret: bool | None = None):
    """Depthwise causal conv1d (Mamba's conv1d, Hyena's short filter) as Pallas kernels, with a Pallas backward.

    Args:
      x: (b, l, c) float32 / bfloat16 / float16.
      weight: (w, c) taps, last tap on the current input; 1 <= w <= MAX_WIDTH.
      bias: optional (c,).
      activation: None or "silu" ("swish" is accepted as its alias).
      segment_ids: optional (b, l) int; taps never reach into an earlier segment.
      initial_state: optional (b, w - 1, c) inputs preceding x; they belong to the first segment.
      return_final_state: also return the last w - 1 inputs (b, w - 1, c) in x.dtype, zeroed before the last
        segment's start.
      block_sizes, variant ("gpu" | "tpu" | None = the running accelerator, "gpu" on CPU), interpret (None =
        exactly when the variant's hardware is absent).

    Returns:
      y (b, l, c) in x.dtype (accumulated in float32), or (y, final_state).
    """
    w, silu = _check_conv(x, weight, bias, activation, segment_ids, initial_state)
    variant = resolve_variant(variant)
    b, l, c = x.shape
    blocks = (block_sizes or BlockSizes()).resolve(variant, b=b, l=l, c=c, w=w, dtype=x.dtype)
    st = _Static(variant, resolve_interpret(interpret, variant), w, silu, blocks)
    allow = None if segment_ids is None else tap_allowance(segment_ids)
    init = initial_state if (initial_state is not None and w > 1) else None
    y = _conv(st, x, weight, bias, init, allow)
    if not return_final_state:
        return y
    return y, _final_state(x, initial_state, allow, w)


# --- decode update ----------------------------------------------------------------------------------------

def _check_update(state, x, weight, bias, activation) -> tuple[int, bool]:
    if x.ndim != 2:
        raise ValueError(f"x must have rank 2 (b, c), got shape {tuple(x.shape)}")
    check_dtype("x", x)
    b, c = x.shape
    w = _check_weight(weight, bias, c)
    check_shape("state", state, (b, w - 1, c), "(b, w - 1, c)")
    check_dtype("state", state)
    return w, _check_activation(activation)


def _update(st: _Static, state, x, weight, bias):
    bs = st.blocks
    b, c = x.shape
    state = None if st.w == 1 else state.astype(x.dtype)
    if st.variant == "gpu":
        y, new = _gpu.update(state, x, _pack_taps(weight, bias, st.w + 1, c), w=st.w, silu=st.silu,
                             block_b=bs.block_b_update, block_c=bs.block_c_update, num_warps=bs.num_warps,
                             interpret=st.interpret)
        return y, (jnp.zeros((b, 0, c), x.dtype) if new is None else new)
    bb, bc = bs.block_b_update, bs.block_c_update
    bp, cp = round_up(b, bb), round_up(c, bc)
    flat = None if state is None else _pad_to(state, (bp, st.w - 1, cp)).reshape(bp, (st.w - 1) * cp)
    y, new = _tpu.update(flat, _pad_to(x, (bp, cp)), _pack_taps(weight, bias, round_up(st.w + 1, 8), cp),
                         w=st.w, silu=st.silu, block_b=bb, block_c=bc, interpret=st.interpret)
    new = jnp.zeros((b, 0, c), x.dtype) if new is None else new.reshape(bp, st.w - 1, cp)[:b, :, :c]
    return y[:b, :c], new


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _update_vjp(st: _Static, state, x, weight, bias):
    return _update(st, state, x, weight, bias)


def _update_fwd(st, state, x, weight, bias):
    return _update(st, state, x, weight, bias), (state, x, weight, bias)


def _update_bwd(st, res, cts):
    """Decoding rarely needs gradients: the reference's vjp (a (b, w, c) computation) is enough."""
    state, x, weight, bias = res
    fn = lambda s, xx, wt, bi: causal_conv1d_update_reference(s, xx, wt, bi, activation="silu" if st.silu else None)
    _, vjp = jax.vjp(fn, state, x, weight, bias)
    return vjp(cts)


_update_vjp.defvjp(_update_fwd, _update_bwd)


def causal_conv1d_update(state, x, weight, bias=None, *, activation: str | None = None,
                         block_sizes: BlockSizes | None = None, variant: str | None = None,
                         interpret: bool | None = None):
    """One decode step. state (b, w - 1, c) previous inputs, oldest first; x (b, c).

    Returns (y (b, c) in x.dtype, new_state (b, w - 1, c) in x.dtype): y = act(bias + sum_j weight[j] window[j])
    over window = [state, x], and new_state = window[1:], copied exactly (no arithmetic)."""
    w, silu = _check_update(state, x, weight, bias, activation)
    variant = resolve_variant(variant)
    blocks = (block_sizes or BlockSizes()).resolve(variant, b=x.shape[0], l=1, c=x.shape[1], w=w, dtype=x.dtype)
    st = _Static(variant, resolve_interpret(interpret, variant), w, silu, blocks)
    return _update_vjp(st, state, x, weight, bias)
