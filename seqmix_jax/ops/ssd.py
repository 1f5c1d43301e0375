"""Mamba-2 state-space duality (Dao & Gu 2024), channel-last.

Axis letters: b batch, l sequence, h heads, p head dim, n state, g groups of B/C (heads share a group in
contiguous blocks: head i uses group i // (h / g)), q/s positions inside a chunk.

Per head, with a_t = delta_t A (a scalar log-decay <= 0) and state S (p, n):

    delta = softplus(dt + dt_bias), clamped to dt_limit      (fp32)
    S_t   = exp(a_t) S_{t-1} + delta_t x_t B_t^T
    y_t   = S_t C_t + D x_t,   then  y_t *= silu(z_t)        (when z is given)

Paths:
  reference    sequential `lax.scan` over l: the definition.
  associative  `lax.associative_scan` over l; materializes (b, l, h, p, n).
  xla          the chunked SSD algorithm: inside a chunk of Q steps the quadratic "attention" form
               Y_diag = (L o C B^T) (delta x) with L = exp(segsum(a)); across chunks the linear recurrence
               on the (p, n) states. The scan over chunks is rematerialized (`jax.checkpoint`), so training
               keeps one state per chunk, never a (b, l, h, Q) decay matrix for the whole sequence.
  pallas       `pallas_kernels.ssd`: one fused kernel per (batch, head, head-dim block) walks the chunks in
               order with its state in registers (GPU, Triton) or VMEM (TPU, Mosaic); per chunk the products
               of the xla path as 2-D matmuls with float32 accumulation (bf16 / f16 operands when x, B and C
               are, the float32 state as a hi + lo pair), D x fused, the z gate in XLA. It saves the
               chunk-start states for its Pallas backward, which walks the chunks in reverse. Its chunk is
               its own block size (64 on GPU, 128 on TPU): `chunk_size` is not used. Interpret mode on CPU.
Any l works: the xla path pads to a multiple of Q with delta = 0 (no decay, no input).
Everything runs in float32 (pallas: see above); y is cast to x.dtype, the final state is float32.
`segment_ids (b, l)` resets the state at segment starts (packed sequences).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from pallas_kernels.ssd import ssd as ssd_pallas
from pallas_kernels.ssd import supports as ssd_pallas_supports
from seqmix_jax.ops import _checks as ck
from seqmix_jax.ops.dispatch import Impl, register_pallas, resolve_impl
from seqmix_jax.ops.segments import check_segment_ids, segment_index, segment_starts

_HI = lax.Precision.HIGHEST


def ssd(x: Float[Array, "b l h p"], dt: Float[Array, "b l h"], A: Float[Array, "h"], B: Float[Array, "b l g n"],
        C: Float[Array, "b l g n"], *, chunk_size: int = 256, D: Float[Array, "h"] | Float[Array, "h p"] | None = None,
        z: Float[Array, "b l h p"] | None = None, dt_bias: Float[Array, "h"] | None = None, dt_softplus: bool = True,
        dt_limit: tuple[float, float] | None = None, initial_state: Float[Array, "b h p n"] | None = None,
        return_final_state: bool = False, segment_ids: Int[Array, "b l"] | None = None, impl: Impl = "auto"):
    """Mamba-2 SSD scan.

    Args:
      x: (b, l, h, p) input.
      dt: (b, l, h) raw time step.
      A: (h,) negative per-head decay rate (-exp(A_log)).
      B, C: (b, l, g, n); g must divide h.
      chunk_size: Q of the chunked (xla) path; the output does not depend on it beyond rounding.
      D: optional (h,) or (h, p) skip.
      z: optional (b, l, h, p) gate: y *= silu(z).
      dt_bias: optional (h,).
      dt_softplus: apply softplus to dt + dt_bias.
      dt_limit: optional (lo, hi) clamp of delta after softplus (mamba_ssm `dt_limit`).
      initial_state: optional (b, h, p, n).
      return_final_state: also return the (b, h, p, n) float32 final state.
      segment_ids: optional (b, l) int; the state resets at segment starts.
      impl: "auto", "reference", "associative", "xla" or "pallas".

    Returns:
      y (b, l, h, p) in x.dtype, or (y, final_state).
    """
    b, l, h, p, g, n = _validate(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_state, segment_ids)
    ck.check_positive_int("chunk_size", chunk_size)
    path = resolve_impl("ssd", impl, ("reference", "associative", "xla", "pallas"), x=x, B=B)
    if path == "pallas":
        return ssd_pallas(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                          initial_state=initial_state, return_final_state=return_final_state,
                          segment_ids=segment_ids)
    hg = h // g
    f32 = lambda a: a.astype(jnp.float32)
    delta = f32(dt) if dt_bias is None else f32(dt) + f32(dt_bias)
    if dt_softplus:
        delta = jax.nn.softplus(delta)
    if dt_limit is not None and tuple(dt_limit) != (0.0, float("inf")):
        delta = jnp.clip(delta, dt_limit[0], dt_limit[1])
    delta = delta.reshape(b, l, g, hg)
    xg = f32(x).reshape(b, l, g, hg, p)
    a = delta * f32(A).reshape(g, hg)  # log decay
    xbar = xg * delta[..., None]
    Bf, Cf = f32(B), f32(C)
    S0 = (jnp.zeros((b, g, hg, p, n), jnp.float32) if initial_state is None
          else f32(initial_state).reshape(b, g, hg, p, n))

    if path == "reference":
        ys, S = _ssd_sequential(a, xbar, Bf, Cf, segment_ids, S0)
    elif path == "associative":
        ys, S = _ssd_associative(a, xbar, Bf, Cf, segment_ids, S0)
    else:
        ys, S = _ssd_chunked(a, xbar, Bf, Cf, segment_ids, S0, chunk_size)

    y = ys.reshape(b, l, h, p)
    if D is not None:
        Df = f32(D)
        y = y + f32(x) * (Df[:, None] if Df.ndim == 1 else Df)
    if z is not None:
        y = y * jax.nn.silu(f32(z))
    y = y.astype(x.dtype)
    if return_final_state:
        return y, S.reshape(b, h, p, n)
    return y


def ssd_reference(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=True, dt_limit=None,
                  initial_state=None, return_final_state=False, segment_ids=None):
    """The definition: a sequential `lax.scan` over l in float32. Slow on purpose."""
    return ssd(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
               initial_state=initial_state, return_final_state=return_final_state, segment_ids=segment_ids,
               impl="reference")


def ssd_state_update(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=True, dt_limit=None):
    """One decoding step: x (b, h, p), dt (b, h), B, C (b, g, n), state (b, h, p, n) -> (y (b, h, p), state)."""
    ck.check_rank("x", x, 3, "(b, h, p)")
    ck.check_shape("dt", dt, tuple(x.shape[:2]), "(b, h)")
    ck.check_rank("B", B, 3, "(b, g, n)")
    ck.check_rank("state", state, 4, "(b, h, p, n)")
    y, S = ssd_reference(x[:, None], dt[:, None], A, B[:, None], C[:, None], D=D,
                         z=None if z is None else z[:, None], dt_bias=dt_bias, dt_softplus=dt_softplus,
                         dt_limit=dt_limit, initial_state=state, return_final_state=True)
    return y[:, 0], S


# --- the three paths. Shapes: a (b, l, g, hg); xbar = delta x (b, l, g, hg, p); B, C (b, l, g, n);
#     S (b, g, hg, p, n).

def _decay(a, segment_ids):
    """Per-step decay exp(a) (b, l, g, hg), zero at segment starts so the state resets there."""
    decay = jnp.exp(a)
    if segment_ids is not None:
        decay = decay * (1.0 - segment_starts(segment_ids).astype(jnp.float32))[:, :, None, None]
    return decay


def _ssd_sequential(a, xbar, B, C, segment_ids, S0):
    decay = _decay(a, segment_ids)

    def step(S, inp):
        dA, xb, Bt, Ct = inp
        S = dA[..., None, None] * S + xb[..., None] * Bt[:, :, None, None, :]
        return S, jnp.einsum("bghpn,bgn->bghp", S, Ct, precision=_HI)

    S, ys = lax.scan(step, S0, tuple(jnp.moveaxis(t, 1, 0) for t in (decay, xbar, B, C)))
    return jnp.moveaxis(ys, 0, 1), S


def _ssd_associative(a, xbar, B, C, segment_ids, S0):
    decay = _decay(a, segment_ids)
    dBx = xbar[..., None] * B[:, :, :, None, None, :]  # (b, l, g, hg, p, n)

    def combine(left, right):
        return left[0] * right[0], right[0][..., None, None] * left[1] + right[1]

    cum, Ss = lax.associative_scan(combine, (decay, dBx), axis=1)
    Ss = Ss + cum[..., None, None] * S0[:, None]
    ys = jnp.einsum("blghpn,blgn->blghp", Ss, C, precision=_HI)
    return ys, Ss[:, -1]


def _segsum(a):
    """segsum(a)[..., q, s] = sum_{k=s+1}^{q} a_k for q >= s, -inf above the diagonal.

    Built as a masked cumsum rather than cumsum[q] - cumsum[s]: the difference of two large cumulative
    sums loses the small decays that matter (ssd_minimal.py's "stable" segsum)."""
    Q = a.shape[-1]
    rep = jnp.broadcast_to(a[..., :, None], a.shape + (Q,))  # [..., k, s] = a_k
    strictly_lower = jnp.tril(jnp.ones((Q, Q), bool), -1)
    ss = jnp.cumsum(jnp.where(strictly_lower, rep, 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((Q, Q), bool)), ss, -jnp.inf)


def _ssd_chunked(a, xbar, B, C, segment_ids, S0, chunk_size):
    b, l = a.shape[:2]
    Q = min(chunk_size, l)
    nc = -(-l // Q)
    pad = nc * Q - l
    r = (jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_index(segment_ids))
    if pad:
        # Padded steps have a = 0 and no input (the state passes through unchanged) and stay in the last segment.
        padder = lambda t, mode="constant": jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2), mode=mode)
        a, xbar, B, C = map(padder, (a, xbar, B, C))
        r = padder(r, "edge")
    r_prev = jnp.concatenate([r[:, :1], r[:, :-1]], axis=1)[:, ::Q]  # segment index just before each chunk

    def chunks(t):  # (b, nc*Q, ...) -> (nc, b, Q, ...)
        return jnp.moveaxis(t.reshape(b, nc, Q, *t.shape[2:]), 1, 0)

    body = jax.checkpoint(functools.partial(_chunk, masked=segment_ids is not None))
    S, ys = lax.scan(body, S0, (chunks(a), chunks(xbar), chunks(B), chunks(C), chunks(r), jnp.moveaxis(r_prev, 1, 0)))
    ys = jnp.moveaxis(ys, 0, 1).reshape(b, nc * Q, *ys.shape[3:])
    return ys[:, :l], S


def _chunk(S, inp, *, masked):
    """One chunk: a (b, Q, g, hg), xbar (b, Q, g, hg, p), B, C (b, Q, g, n), r (b, Q), r0 (b,)."""
    a, xbar, B, C, r, r0 = inp
    at = jnp.moveaxis(a, 1, -1)  # (b, g, hg, Q)
    cum = jnp.cumsum(at, axis=-1)
    # Intra-chunk: the quadratic (masked attention) form.
    L = jnp.exp(_segsum(at))  # (b, g, hg, q, s)
    if masked:
        L = L * (r[:, :, None] == r[:, None, :])[:, None, None]
    CB = jnp.einsum("bqgn,bsgn->bgqs", C, B, precision=_HI)
    y = jnp.einsum("bgqs,bghqs,bsghp->bqghp", CB, L, xbar, precision=_HI)
    # Carried state -> outputs: decay from the chunk start to q, zero after a segment start.
    into = jnp.exp(cum)  # (b, g, hg, q)
    if masked:
        into = into * (r == r0[:, None])[:, None, None, :]
    y = y + jnp.einsum("bghpn,bqgn,bghq->bqghp", S, C, into, precision=_HI)
    # Chunk state (decay from s to the chunk end, summed without differencing cumsums) and passing.
    rest = jnp.concatenate([jnp.flip(jnp.cumsum(jnp.flip(at[..., 1:], -1), -1), -1), jnp.zeros_like(at[..., :1])], -1)
    out_w = jnp.exp(rest)
    carry = jnp.exp(cum[..., -1])  # (b, g, hg)
    if masked:
        out_w = out_w * (r == r[:, -1:])[:, None, None, :]
        carry = carry * (r[:, -1] == r0)[:, None, None]
    S = carry[..., None, None] * S + jnp.einsum("bghs,bsghp,bsgn->bghpn", out_w, xbar, B, precision=_HI)
    return S, y


def _validate(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_state, segment_ids):
    ck.check_rank("x", x, 4, "(b, l, h, p)")
    b, l, h, p = x.shape
    ck.check_float("x", x)
    ck.check_shape("dt", dt, (b, l, h), "(b, l, h)")
    ck.check_float("dt", dt)
    ck.check_shape("A", A, (h,), "(h,)")
    ck.check_float("A", A)
    ck.check_rank("B", B, 4, "(b, l, g, n)")
    g, n = B.shape[2], B.shape[3]
    ck.check_shape("B", B, (b, l, g, n), "(b, l, g, n)")
    ck.check_shape("C", C, (b, l, g, n), "(b, l, g, n) like B")
    ck.check_float("B", B)
    ck.check_float("C", C)
    ck.check_divides("ngroups (B.shape[2])", g, "heads h", h)
    if D is not None:
        if tuple(D.shape) not in ((h,), (h, p)):
            raise ValueError(f"D must have shape (h,) = ({h},) or (h, p) = ({h}, {p}), got {tuple(D.shape)}")
        ck.check_float("D", D)
    for name, t, shape, axes in (("z", z, (b, l, h, p), "(b, l, h, p)"), ("dt_bias", dt_bias, (h,), "(h,)"),
                                 ("initial_state", initial_state, (b, h, p, n), "(b, h, p, n)")):
        if t is not None:
            ck.check_shape(name, t, shape, axes)
            ck.check_float(name, t)
    if dt_limit is not None and (len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]):
        raise ValueError(f"dt_limit must be a pair (lo, hi) with lo <= hi, got {dt_limit!r}")
    if segment_ids is not None:
        check_segment_ids(segment_ids, b, l)
    return b, l, h, p, g, n


def _pallas_supports(*, x, B, **_) -> str | None:
    """What the dispatcher asks before choosing (auto) or running (pallas) the kernel: shapes and dtypes."""
    return ssd_pallas_supports(x, B)


register_pallas("ssd", _pallas_supports)
