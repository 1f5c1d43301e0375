"""Mamba-1 selective scan (Gu & Dao 2023, Algorithm 2), channel-last.

Axis letters: b batch, l sequence, d channels (Mamba's d_inner), n state, g groups of B/C, e = d // g
channels per group.

    delta = softplus(dt + dt_bias)                         (fp32; softplus optional)
    h_t   = exp(delta_t A) * h_{t-1} + delta_t x_t B_t     (ZOH for A, Euler for B; h: (d, n))
    y_t   = h_t C_t + D x_t,   then  y_t *= silu(z_t)      (when z is given)

Channel d uses B/C group d // e (contiguous blocks, as mamba_ssm's `selective_scan_ref`).
Everything inside runs in float32 whatever the input dtype; `y` is cast back to `x.dtype` and the final
state is float32 (as the CUDA kernel returns it).

Paths (see `dispatch.py`):
  reference    sequential `lax.scan` over l: the definition.
  associative  `lax.associative_scan` over l: the parallel reference; materializes (b, l, d, n).
  xla          chunks of `chunk_size` steps: a sequential scan across chunks whose body is rematerialized
               (`jax.checkpoint`), so the backward pass keeps only one (b, d, n) state per chunk and
               recomputes the states inside a chunk. Forward+backward memory therefore grows with l·d
               (the inputs and their gradients), not with l·d·n. Its primal (inference, e.g. a prompt's
               prefill) carries the state as (b, n, d), its VJP a (b, d, n) program: whichever XLA:CPU runs
               faster (see `_scan_chunked_block`; no jvp on this path).
  pallas       `pallas_kernels.selective_scan` (interpret mode on CPU): one program per (batch, block of
               channels) keeps its (block_d, n) state on chip and walks l; softplus(dt + dt_bias), the D skip
               and the z gate are fused, so per token only x, dt, z, B, C are read and y written (inputs in
               their own dtype). It saves one state per chunk for its Pallas backward, which recomputes the
               states inside a chunk. `chunk_size` does not apply (the kernel's `BlockSizes` do).

Packed sequences: with `segment_ids (b, l)` the state is zeroed at each segment start, which equals
running every segment separately. `initial_state` feeds the first segment; the final state is the last
segment's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float, Int

from pallas_kernels.selective_scan import entry as scan_kernel
from seqmix_jax.ops import _checks as ck
from seqmix_jax.ops.dispatch import Impl, register_pallas, resolve_impl
from seqmix_jax.ops.segments import check_segment_ids, segment_starts



def selective_scan(x: Float[Array, "b l d"], dt: Float[Array, "b l d"], A: Float[Array, "d n"],
                   B: Float[Array, "b l n"] | Float[Array, "b l g n"], C: Float[Array, "b l n"] | Float[Array, "b l g n"],
                   D: Float[Array, "d"] | None = None, *, z: Float[Array, "b l d"] | None = None,
                   dt_bias: Float[Array, "d"] | None = None, dt_softplus: bool = True,
                   initial_state: Float[Array, "b d n"] | None = None, return_final_state: bool = False,
                   segment_ids: Int[Array, "b l"] | None = None, impl: Impl = "auto", chunk_size: int = 32):
    """Mamba-1 selective scan.

    Args:
      x: (b, l, d) input.
      dt: (b, l, d) raw time step (before `dt_bias` and softplus).
      A: (d, n) state matrix (negative, e.g. -exp(A_log)).
      B, C: (b, l, n) or (b, l, g, n) input-dependent projections; g must divide d.
      D: optional (d,) skip.
      z: optional (b, l, d) gate: y *= silu(z).
      dt_bias: optional (d,) added to dt in float32.
      dt_softplus: apply softplus to dt + dt_bias.
      initial_state: optional (b, d, n) state before the first step.
      return_final_state: also return the (b, d, n) float32 state after the last step.
      segment_ids: optional (b, l) int: reset the state at segment starts (packed sequences).
      impl: "auto", "reference", "associative", "xla" or "pallas".
      chunk_size: steps per chunk of the xla path.

    Returns:
      y (b, l, d) in x.dtype, or (y, final_state) with return_final_state.
    """
    b, l, d, n, g = _validate(x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids)
    ck.check_positive_int("chunk_size", chunk_size)
    path = resolve_impl("selective_scan", impl, ("reference", "associative", "xla", "pallas"), x=x, dt=dt, A=A, B=B,
                        C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state, segment_ids=segment_ids)
    if path == "pallas":
        return scan_kernel.selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                     initial_state=initial_state, return_final_state=return_final_state,
                                     segment_ids=segment_ids)
    f32 = lambda a: a.astype(jnp.float32)
    delta = f32(dt) if dt_bias is None else f32(dt) + f32(dt_bias)
    if dt_softplus:
        delta = jax.nn.softplus(delta)
    u = f32(x)
    Bg = f32(B).reshape(b, l, g, n)
    Cg = f32(C).reshape(b, l, g, n)
    h0 = jnp.zeros((b, d, n), jnp.float32) if initial_state is None else f32(initial_state)
    keep = None if segment_ids is None else 1.0 - segment_starts(segment_ids).astype(jnp.float32)
    A = f32(A)

    if path == "reference":
        y, h = _scan_sequential(A, u, delta, Bg, Cg, keep, h0)
    elif path == "associative":
        y, h = _scan_associative(A, u, delta, Bg, Cg, keep, h0)
    else:
        y, h = _scan_chunked(A, u, delta, Bg, Cg, keep, h0, chunk_size)

    if D is not None:
        y = y + u * f32(D)
    if z is not None:
        y = y * jax.nn.silu(f32(z))
    y = y.astype(x.dtype)
    if return_final_state:
        return y, h
    return y


def selective_scan_reference(x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus=True,
                             initial_state=None, return_final_state=False, segment_ids=None):
    """The definition: a sequential `lax.scan` over l in float32. Slow on purpose."""
    return selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                          initial_state=initial_state, return_final_state=return_final_state,
                          segment_ids=segment_ids, impl="reference")


def selective_state_update(state, x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus=True):
    """One decoding step (mamba_ssm `selective_state_update`): returns (y (b, d), new_state (b, d, n) fp32).

    x, dt, z: (b, d); B, C: (b, n) or (b, g, n); state: (b, d, n)."""
    ck.check_rank("x", x, 2, "(b, d)")
    ck.check_shape("dt", dt, tuple(x.shape), "(b, d)")
    ck.check_rank("B", B, (2, 3), "(b, n) or (b, g, n)")
    ck.check_rank("state", state, 3, "(b, d, n)")
    # The scan's checks on the length-1 view (shapes of A, B, C, D, z, dt_bias and state; groups dividing d).
    b, _, d, n, g = _validate(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, None if z is None else z[:, None],
                              dt_bias, state, None)
    # One step of the recurrence in the module docstring, written out (no length-1 scan: a decode loop runs this
    # every token, and XLA:CPU ran the scan form ~1.5x slower at b = 8).
    f32 = lambda a: a.astype(jnp.float32)
    delta = f32(dt) if dt_bias is None else f32(dt) + f32(dt_bias)
    if dt_softplus:
        delta = jax.nn.softplus(delta)
    u = f32(x)
    group_rows = lambda M: f32(M).reshape(b, g, n)
    h = jnp.exp(delta[..., None] * f32(A)) * f32(state) + (delta * u)[..., None] * _per_channel(group_rows(B), d)
    y = jnp.sum(h * _per_channel(group_rows(C), d), axis=-1)
    if D is not None:
        y = y + u * f32(D)
    if z is not None:
        y = y * jax.nn.silu(f32(z))
    return y.astype(x.dtype), h


# --- the three paths. Shapes: u, delta (b, l, d); B, C (b, l, g, n); A (d, n); h (b, d, n);
#     keep (b, l) float, 0 at segment starts, or None.
# The reference and associative paths keep the state as (b, d, n) (a (b, g, e, n) layout, even with g = 1, made
# XLA:CPU's backward ~3x slower). The xla path's forward holds it as (b, n, d) instead; see `_scan_chunked_block`.

def _per_channel(Bt, d, state_last=True):
    """Group rows (..., g, n) -> per-channel rows: channel c uses group c // (d / g). state_last: (..., d, n), else
    (..., n, d); with g = 1 the channel axis has size 1 (broadcast)."""
    g = Bt.shape[-2]
    if not state_last:
        Bt = jnp.swapaxes(Bt, -1, -2)
    return Bt if g == 1 else jnp.repeat(Bt, d // g, axis=-2 if state_last else -1)


def _step(A, h, inp):
    """h (..., d, n), A (d, n); inputs u, delta (..., d), Bt, Ct (..., g, n), keep (...) or None."""
    u, delta, Bt, Ct, keep = inp
    dA = jnp.exp(delta[..., None] * A)
    if keep is not None:
        dA = dA * keep[..., None, None]
    d = u.shape[-1]
    h = dA * h + (delta * u)[..., None] * _per_channel(Bt, d)
    return h, jnp.sum(h * _per_channel(Ct, d), axis=-1)


def _step_channels_last(A_t, h, inp):
    """`_step` on h (..., n, d) with A_t = A.T (n, d): the channel axis is the vectorized one."""
    u, delta, Bt, Ct, keep = inp
    dA = jnp.exp(delta[..., None, :] * A_t)
    if keep is not None:
        dA = dA * keep[..., None, None]
    d = u.shape[-1]
    h = dA * h + (delta * u)[..., None, :] * _per_channel(Bt, d, state_last=False)
    return h, jnp.sum(h * _per_channel(Ct, d, state_last=False), axis=-2)


def _time_major(*arrays):
    return tuple(None if a is None else jnp.moveaxis(a, 1, 0) for a in arrays)


def _scan_sequential(A, u, delta, B, C, keep, h0):
    h, ys = lax.scan(functools.partial(_step, A), h0, _time_major(u, delta, B, C, keep))
    return jnp.moveaxis(ys, 0, 1), h


def _scan_associative(A, u, delta, B, C, keep, h0):
    d = u.shape[-1]
    dA = jnp.exp(delta[..., None] * A)  # (b, l, d, n): this materialization is what the xla path avoids
    if keep is not None:
        dA = dA * keep[:, :, None, None]
    dBu = (delta * u)[..., None] * jax.vmap(_per_channel, (1, None), 1)(B, d)

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    decay, hs = lax.associative_scan(combine, (dA, dBu), axis=1)
    hs = hs + decay * h0[:, None]
    ys = jnp.sum(hs * jax.vmap(_per_channel, (1, None), 1)(C, d), axis=-1)
    return ys, hs[:, -1]


# Largest (b, d, n) state the xla path scans at once (256 KiB in float32). Wider states are processed in
# blocks of channels, one after the other (channels are independent given B and C), so that the per-chunk
# buffers of the backward pass stay this size whatever n is: training memory grows with l·d, not with n.
STATE_BLOCK_ELEMENTS = 1 << 16


def _scan_chunked(A, u, delta, B, C, keep, h0, chunk_size):
    b, l, d = u.shape
    g, n = B.shape[2:]
    if b * d * n <= STATE_BLOCK_ELEMENTS:
        return _scan_chunked_block(A, u, delta, B, C, keep, h0, chunk_size)
    e = d // g
    need = -(-b * e * n // STATE_BLOCK_ELEMENTS)
    k = next(k for k in range(need, e + 1) if e % k == 0)  # blocks per group, so each block sees one B/C row
    # Channel axes as (groups, blocks, channels per block); scans over the leading axis of each.
    split = lambda t, axis, parts: jnp.moveaxis(t.reshape(*t.shape[:axis], parts, -1, *t.shape[axis + 1:]), axis, 0)
    merge = lambda t, axis: jnp.moveaxis(t, 0, axis).reshape(*t.shape[1:axis + 1], -1, *t.shape[axis + 2:])

    def group(args):  # one group: B, C (b, l, 1, n) shared by its k blocks (closed over, never replicated)
        A_, u_, delta_, B_, C_, h0_ = args
        # The backward pass redoes one block's forward at a time instead of keeping every block's states.
        block = jax.checkpoint(lambda a: _scan_chunked_block(a[0], a[1], a[2], B_, C_, keep, a[3], chunk_size))
        ys, h = lax.map(block, (split(A_, 0, k), split(u_, 2, k), split(delta_, 2, k), split(h0_, 1, k)))
        return merge(ys, 2), merge(h, 1)

    if g == 1:
        return group((A, u, delta, B, C, h0))
    ys, h = lax.map(jax.checkpoint(group), (split(A, 0, g), split(u, 2, g), split(delta, 2, g),
                                            jnp.moveaxis(B, 2, 0)[:, :, :, None], jnp.moveaxis(C, 2, 0)[:, :, :, None],
                                            split(h0, 1, g)))
    return merge(ys, 2), merge(h, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _scan_chunked_block(A, u, delta, B, C, keep, h0, chunk_size):
    """The xla path on one block of channels. On the CPU its forward runs `_chunks(channels_last=True)`; differentiated,
    it runs `_chunks(channels_last=False)` and that function's VJP, because XLA:CPU compiles the two layouts' programs
    very differently (2-core CI machine, float32, d 512, n 16, l 512, medians of paired runs): the forward with the
    state as (b, n, d) is 2.2x (b = 8) to 7.4x (b = 1) faster than the (b, d, n) one, while the backward of the
    (b, n, d) program is ~1.3x slower at b = 8. Other backends (where "auto" prefers the Pallas kernel) run the
    (b, d, n) program both ways: the layout choice has not been measured there. Forward-mode differentiation (jvp) of
    this path is not available."""
    return _chunks(A, u, delta, B, C, keep, h0, chunk_size, channels_last=jax.default_backend() == "cpu")


def _scan_chunked_block_fwd(A, u, delta, B, C, keep, h0, chunk_size):
    # symbolic_zeros: every argument comes as CustomVJPPrimal(value, perturbed). Only the perturbed ones are
    # differentiated, as plain autodiff would (a dh0 nobody asked for cost ~8% of the backward).
    args = (A, u, delta, B, C, keep, h0)  # keep may be None (no segments)
    values = [None if a is None else a.value for a in args]
    wanted = [i for i, a in enumerate(args) if a is not None and a.perturbed]

    def forward(*diff):
        full = list(values)
        for i, v in zip(wanted, diff):
            full[i] = v
        return _chunks(*full, chunk_size=chunk_size, channels_last=False)

    out, vjp = jax.vjp(forward, *(values[i] for i in wanted))
    # Which arguments were differentiated, kept in the residual's tree structure (None leaves are dropped).
    mask = tuple(jnp.zeros((0,)) if i in wanted else None for i in range(len(values)))
    return out, (vjp, mask)


def _scan_chunked_block_bwd(chunk_size, residual, cotangents):
    del chunk_size
    vjp, mask = residual
    cts = jax.tree.map(lambda c: jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c, cotangents,
                       is_leaf=lambda c: isinstance(c, SymbolicZero))
    grads = iter(vjp(cts))
    return tuple(next(grads) if m is not None else None for m in mask)


_scan_chunked_block.defvjp(_scan_chunked_block_fwd, _scan_chunked_block_bwd, symbolic_zeros=True)


def _chunks(A, u, delta, B, C, keep, h0, chunk_size, channels_last):
    """Sequential scan over chunks of T = chunk_size steps, each chunk's body rematerialized (`jax.checkpoint`).

    channels_last: the carried state is (b, n, d) instead of (b, d, n). With b = 1 the batch axis is dropped inside
    the loop: XLA:CPU runs a loop whose carry has a size-1 axis several times slower (3-8x measured)."""
    b, l = u.shape[:2]
    T = min(chunk_size, l)
    nc = -(-l // T)
    pad = nc * T - l
    if pad:
        # delta = 0 on padded steps: exp(0 * A) = 1 and no input, so the final state is unchanged.
        padder = lambda a, v=0.0: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=v)
        u, delta, B, C = map(padder, (u, delta, B, C))
        keep = None if keep is None else padder(keep, 1.0)
    if channels_last:
        A, h0 = A.T, jnp.swapaxes(h0, 1, 2)
    if b == 1:
        h0 = h0[0]
        chunks = lambda a: None if a is None else a[0].reshape(nc, T, *a.shape[2:])  # (nc, T, ...)
    else:
        chunks = lambda a: None if a is None else jnp.moveaxis(a.reshape(b, nc, T, *a.shape[2:]), (1, 2), (0, 1))
    step = functools.partial(_step_channels_last if channels_last else _step, A)

    @jax.checkpoint
    def chunk(h, xs):
        return lax.scan(step, h, xs, unroll=min(T, 8))

    h, ys = lax.scan(chunk, h0, tuple(map(chunks, (u, delta, B, C, keep))))
    if b == 1:
        ys, h = ys.reshape(1, nc * T, -1), h[None]
    else:
        ys = jnp.moveaxis(ys, (0, 1), (1, 2)).reshape(b, nc * T, -1)
    if channels_last:
        h = jnp.swapaxes(h, 1, 2)
    return ys[:, :l], h


def _validate(x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids):
    ck.check_rank("x", x, 3, "(b, l, d)")
    b, l, d = x.shape
    ck.check_float("x", x)
    ck.check_shape("dt", dt, (b, l, d), "(b, l, d)")
    ck.check_float("dt", dt)
    ck.check_rank("A", A, 2, "(d, n)")
    if A.shape[0] != d:
        raise ValueError(f"A must have shape (d, n) with d={d} (from x), got {tuple(A.shape)}")
    n = A.shape[1]
    ck.check_float("A", A)
    for name, a in (("B", B), ("C", C)):
        ck.check_rank(name, a, (3, 4), "(b, l, n) or (b, l, g, n)")
        ck.check_float(name, a)
        expected = (b, l, n) if a.ndim == 3 else (b, l, a.shape[2], n)
        ck.check_shape(name, a, expected, "(b, l, n)" if a.ndim == 3 else "(b, l, g, n)")
    if B.ndim != C.ndim or B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got B {tuple(B.shape)} and C {tuple(C.shape)}")
    g = 1 if B.ndim == 3 else B.shape[2]
    ck.check_divides("ngroups (B.shape[2])", g, "d", d)
    for name, a, shape, axes in (("D", D, (d,), "(d,)"), ("dt_bias", dt_bias, (d,), "(d,)"),
                                 ("z", z, (b, l, d), "(b, l, d)"),
                                 ("initial_state", initial_state, (b, d, n), "(b, d, n)")):
        if a is not None:
            ck.check_shape(name, a, shape, axes)
            ck.check_float(name, a)
    if segment_ids is not None:
        check_segment_ids(segment_ids, b, l)
    return b, l, d, n, g


def _pallas_supports(**call) -> str | None:
    """Whether the Pallas kernel takes this call (the op's arguments by name): None, or the reason it cannot."""
    return scan_kernel.supports(**call)


register_pallas("selective_scan", _pallas_supports)
