"""Modal (poles-and-residues) long filters: StripedHyena's Hyena filter as a convolution and as a recurrence.

Axis letters: b batch, l sequence, d channels, n modes (StripedHyena's `state_size`), t/s positions in a chunk.

Per channel c, a diagonal complex linear system with poles p[c, n] and residues R[c, n] (complex64):

    filter       h[t, c] = Re sum_n R[c, n] p[c, n]^t                              t = 0, 1, ...
    recurrence   S_t = p * S_{t-1} + x_t       (S: (d, n) complex, x_t broadcast over n)
                 y_t = Re sum_n R * S_t (+ D * x_t)

The two agree: Re sum_n R S_t = sum_{s<=t} h[t - s] x_s, the causal convolution `fftconv(x, h)`. The FFT form
cannot start from a state or reset inside a row, the recurrence can; so `modal_scan` is the form for packed
sequences (`segment_ids`: S is zeroed at a segment start) and for continuing a decoding state.

Powers are computed as StripedHyena computes them (`ParallelHyenaFilter.compute_filter`): p^t = exp(t log p) in
complex64, one multiply and one exp per power, no repeated products. The phase of p^t then carries an error of
~ t * eps * |arg p|, as in the reference: with time constants ~1000 steps and l = 4096, the power-based forms (FFT
filter, xla prefill) differ from the sequential recurrence by ~1e-4 relative (H200, float32), the chunked scan
(powers up to the chunk size only) by ~3e-5.

Convention: poles and residues are complex (d, n) arrays (a real float array is a system with real poles).
StripedHyena stores them as float32 (d, n, 1, 2) (re, im) pairs: `from_stripedhyena` / `to_stripedhyena`
convert, `as_complex` turns any (..., 2) pair array into complex64. Everything runs in float32/complex64;
y is cast to x.dtype; states are complex64.

Paths (see `dispatch.py`) for `modal_scan` and `modal_prefill`:
  reference    sequential `lax.scan` over l: the definition.
  associative  `lax.associative_scan` over l; materializes (b, l, d, n) complex.
  xla          chunks of `chunk_size` steps: inside a chunk, a (t, s) Toeplitz matrix of the filter taps gives
               the chunk-local convolution and powers of p carry the state in and out; a rematerialized
               (`jax.checkpoint`) scan runs over the chunks. With segment_ids the chunk-local terms are masked
               by "same segment". For `modal_prefill` only the state part runs (O(b l d n) work, no Toeplitz
               matrix): S_{l-1} = sum_k p^(l-1-k) x_k, the last entry of the convolution that StripedHyena's
               `prefill_via_modal_fft` evaluates with FFTs of size 2l.
Measured (b 4, l 4096, d 1024, n 2, float32): on an H200 the reference scan takes 68 ms, xla 2-3 ms (chunk 32-64),
associative 0.5 ms, the FFT convolution 0.75 ms; on XLA:CPU (b 2, l 1024, d 256) the sequential scan is fastest
(2 ms vs 11 ms xla chunk 32, 24 ms FFT, 36 ms associative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Complex, Float, Inexact, Int

from seqmix_jax.ops import _checks as ck
from seqmix_jax.ops.dispatch import Impl, resolve_impl
from seqmix_jax.ops.segments import check_segment_ids, segment_index

_HI = lax.Precision.HIGHEST
_PATHS = ("reference", "associative", "xla", "pallas")


# ------------------------------------------------------------------ layout helpers

def as_complex(pairs: Float[Array, "... 2"]) -> Complex[Array, "..."]:
    """(..., 2) float (re, im) pairs -> (...) complex64."""
    if pairs.ndim < 1 or pairs.shape[-1] != 2:
        raise ValueError(f"pairs must have a last axis of size 2 (re, im), got shape {tuple(pairs.shape)}")
    ck.check_float("pairs", pairs)
    return lax.complex(pairs[..., 0].astype(jnp.float32), pairs[..., 1].astype(jnp.float32))


def from_stripedhyena(a) -> Complex[Array, "d n"]:
    """StripedHyena's `poles` / `residues` (d, n, 1, 2) float (re, im) -> (d, n) complex64."""
    if a.ndim != 4 or a.shape[2:] != (1, 2):
        raise ValueError(f"expected StripedHyena's (d, n, 1, 2) layout, got shape {tuple(a.shape)}")
    return as_complex(jnp.asarray(a)[:, :, 0])


def to_stripedhyena(z: Complex[Array, "d n"]) -> Float[Array, "d n 1 2"]:
    """(d, n) complex -> StripedHyena's (d, n, 1, 2) float32 (re, im) layout."""
    if z.ndim != 2:
        raise ValueError(f"expected (d, n) complex poles or residues, got shape {tuple(z.shape)}")
    return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1)[:, :, None].astype(jnp.float32)


# ------------------------------------------------------------------ public ops

def modal_filter(poles: Inexact[Array, "d n"], residues: Inexact[Array, "d n"], l: int) -> Float[Array, "l d"]:
    """The first l taps h[t, c] = Re sum_n R[c, n] p[c, n]^t, float32 (l, d); p^t = exp(t log p)."""
    p, R = _check_modal(poles, residues)
    ck.check_positive_int("l", l)
    return _taps(p, R, jnp.arange(l, dtype=jnp.float32))


def modal_step(state: Complex[Array, "b d n"], x: Float[Array, "b d"], poles: Inexact[Array, "d n"],
               residues: Inexact[Array, "d n"], D: Float[Array, "d"] | None = None):
    """One decoding step: S <- p * S + x;  y = Re sum_n R * S (+ D * x).

    Returns (y (b, d) in x.dtype, computed in float32; new state (b, d, n) complex64)."""
    p, R = _check_modal(poles, residues)
    ck.check_rank("x", x, 2, "(b, d)")
    ck.check_float("x", x)
    b, d = x.shape
    _check_channels(p, d, "x")
    if D is not None:
        ck.check_shape("D", D, (d,), "(d,)")
    ck.check_shape("state", state, (b, d, p.shape[1]), "(b, d, n)")
    xf = x.astype(jnp.float32)
    state = p * state.astype(jnp.complex64) + xf[..., None]
    y = _re_sum(R, state)
    if D is not None:
        y = y + xf * D.astype(jnp.float32)
    return y.astype(x.dtype), state


def modal_scan(x: Float[Array, "b l d"], poles: Inexact[Array, "d n"], residues: Inexact[Array, "d n"],
               D: Float[Array, "d"] | None = None, *, initial_state: Complex[Array, "b d n"] | None = None,
               segment_ids: Int[Array, "b l"] | None = None, return_final_state: bool = False,
               impl: Impl = "auto", chunk_size: int = 32):
    """y_t = Re sum_n R S_t (+ D x_t) with S_t = p S_{t-1} + x_t, over a whole sequence.

    Args:
      x: (b, l, d) input.
      poles, residues: (d, n) complex (see the module docstring).
      D: optional (d,) skip.
      initial_state: optional (b, d, n) complex state before the first step; it feeds the first segment.
      segment_ids: optional (b, l) int; S is zeroed at every segment start (packed sequences).
      return_final_state: also return the (b, d, n) complex64 state after the last step (the last segment's).
      impl: "auto", "reference", "associative" or "xla".
      chunk_size: steps per chunk of the xla path (its intermediates are (b, T, T, d) with segment_ids).

    Returns:
      y (b, l, d) in x.dtype (computed in float32), or (y, final_state).
    """
    p, R, xf, h0, r = _prepare(x, poles, residues, initial_state, segment_ids)
    if D is not None:
        ck.check_shape("D", D, (x.shape[2],), "(d,)")
    ck.check_positive_int("chunk_size", chunk_size)
    path = resolve_impl("modal_scan", impl, _PATHS, x=x, segment_ids=segment_ids)
    if path == "reference":
        y, h = _scan_sequential(xf, p, R, h0, r)
    elif path == "associative":
        hs, _ = _states_associative(xf, p, h0, r)
        y, h = _re_sum(R[None, None], hs), hs[:, -1]
    elif path == "xla":
        y, h = _scan_chunked(xf, p, R, h0, r, chunk_size)
    else:  # resolve_impl returns "pallas" only for a registered kernel, and none is wired in yet
        raise AssertionError(f"modal_scan has no {path!r} branch")
    if D is not None:
        y = y + xf * D.astype(jnp.float32)
    y = y.astype(x.dtype)
    return (y, h) if return_final_state else y


def modal_scan_reference(x, poles, residues, D=None, *, initial_state=None, segment_ids=None,
                         return_final_state=False):
    """The definition: a sequential `lax.scan` over l in complex64. Slow on purpose."""
    return modal_scan(x, poles, residues, D, initial_state=initial_state, segment_ids=segment_ids,
                      return_final_state=return_final_state, impl="reference")


def modal_prefill(x: Float[Array, "b l d"], poles: Inexact[Array, "d n"], *,
                  initial_state: Complex[Array, "b d n"] | None = None, segment_ids: Int[Array, "b l"] | None = None,
                  impl: Impl = "auto", chunk_size: int = 256) -> Complex[Array, "b d n"]:
    """The state after the last token, S_{l-1} = p^l S_init + sum_k p^(l-1-k) x_k (complex64 (b, d, n)),
    without the outputs. With segment_ids only the last segment's tokens count (and S_init only when the row
    has a single segment). impl: "auto", "reference", "associative" or "xla" (chunks of `chunk_size` steps)."""
    p, _, xf, h0, r = _prepare(x, poles, poles, initial_state, segment_ids)
    ck.check_positive_int("chunk_size", chunk_size)
    path = resolve_impl("modal_prefill", impl, _PATHS, x=x, segment_ids=segment_ids)
    if path == "reference":
        return _scan_sequential(xf, p, jnp.zeros_like(p), h0, r)[1]
    if path == "associative":
        return _states_associative(xf, p, h0, r)[0][:, -1]
    if path == "xla":
        return _scan_chunked(xf, p, None, h0, r, chunk_size)[1]
    raise AssertionError(f"modal_prefill has no {path!r} branch")


def modal_prefill_fft(x: Float[Array, "b l d"], poles: Inexact[Array, "d n"]) -> Complex[Array, "b d n"]:
    """StripedHyena's FFT prefill (`prefill_via_modal_fft`): S_{l-1} = sum_k p^(l-1-k) x_k read off the last
    entry of the causal convolution of x with the powers p^t, computed with complex FFTs of size 2l.

    Same value as `modal_prefill` (which evaluates that one entry directly, O(b l d n) instead of
    O(b l log l d n)); kept as the formulation the reference uses. No initial state or segments."""
    p, _, xf, _, _ = _prepare(x, poles, poles, None, None)
    l = x.shape[1]
    n = 2 * l
    xs = jnp.fft.fft(xf.astype(jnp.complex64), n=n, axis=1)  # (b, 2l, d)
    ps = jnp.fft.fft(_powers(p, jnp.arange(l, dtype=jnp.float32)), n=n, axis=0)  # (2l, d, n)
    conv = jnp.fft.ifft(xs[..., None] * ps[None], n=n, axis=1)  # (b, 2l, d, n)
    return conv[:, l - 1].astype(jnp.complex64)


# ------------------------------------------------------------------ the paths
# Shapes: x (b, l, d) float32; p, R (d, n) complex64; h0 (b, d, n) complex64;
# r (b, l) int32 running segment index (0 until the first start after t = 0), or None.

def _powers(p, t):
    """p^t = exp(t log p) for a float vector t: (len(t), d, n) complex64 (StripedHyena's form)."""
    logp = jnp.log(p)
    t = t[:, None, None]
    return jnp.exp(lax.complex(t * jnp.real(logp), t * jnp.imag(logp)))


def _re_sum(R, S):
    """Re sum_n R * S over the last axis, float32."""
    return jnp.sum(jnp.real(R) * jnp.real(S) - jnp.imag(R) * jnp.imag(S), axis=-1)


def _taps(p, R, t):
    return _re_sum(R, _powers(p, t))


def _scan_sequential(x, p, R, h0, r):
    keep = None if r is None else 1.0 - _starts(r).astype(jnp.float32)

    def step(S, inp):
        x_t, keep_t = inp
        a = p if keep_t is None else p * keep_t[:, None, None]
        S = a * S + x_t[..., None]
        return S, _re_sum(R, S)

    xs = (jnp.moveaxis(x, 1, 0), None if keep is None else jnp.moveaxis(keep, 1, 0))
    S, ys = lax.scan(step, h0, xs)
    return jnp.moveaxis(ys, 0, 1), S


def _states_associative(x, p, h0, r):
    """Every state (b, l, d, n) and the cumulative decay, by a parallel prefix over (a, b) -> a S + b."""
    b, l, d = x.shape
    a = jnp.broadcast_to(p, (b, l) + p.shape)
    if r is not None:
        a = a * (1.0 - _starts(r).astype(jnp.float32))[..., None, None]
    u = jnp.broadcast_to(x[..., None], a.shape).astype(jnp.complex64)

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    decay, hs = lax.associative_scan(combine, (a, u), axis=1)
    return hs + decay * h0[:, None], decay


def _scan_chunked(x, p, R, h0, r, chunk_size):
    """Chunked scan; R=None computes only the final state. Returns (y or None, final state)."""
    b, l, d = x.shape
    T = min(chunk_size, l)
    nc, rem = divmod(l, T)
    rr = jnp.zeros((b, l), jnp.int32) if r is None else r
    # Segment index just before each chunk (0 before t = 0: the initial state belongs to the first segment).
    rprev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), rr[:, T - 1:nc * T - 1:T]], axis=1)  # (b, nc)
    body = jax.checkpoint(_chunk_body(p, R, T, r is not None))
    xs = (jnp.moveaxis(x[:, :nc * T].reshape(b, nc, T, d), 1, 0), jnp.moveaxis(rr[:, :nc * T].reshape(b, nc, T), 1, 0),
          jnp.moveaxis(rprev, 1, 0))
    S, ys = lax.scan(body, h0, xs)
    ys = None if R is None else jnp.moveaxis(ys, 0, 1).reshape(b, nc * T, d)
    if rem:  # the tail is one shorter chunk with its own tables
        tail_prev = rr[:, nc * T - 1] if nc else jnp.zeros((b,), jnp.int32)
        S, y_tail = _chunk_body(p, R, rem, r is not None)(S, (x[:, nc * T:], rr[:, nc * T:], tail_prev))
        ys = None if R is None else jnp.concatenate([ys, y_tail], axis=1)
    return ys, S


def _chunk_body(p, R, T, masked):
    """One chunk of T steps: S (b, d, n), x (b, T, d), r (b, T), r_prev (b,) -> (S after the chunk, y (b, T, d))."""
    t = jnp.arange(T, dtype=jnp.float32)
    out_w = _powers(p, T - 1 - t)  # (s, d, n): p^(T-1-s), input s -> state at the chunk end
    decay = _powers(p, jnp.full((1,), T, jnp.float32))[0]  # p^T
    if R is not None:
        h = _taps(p, R, t)  # (T, d)
        lag = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
        toeplitz = jnp.where((lag >= 0)[..., None], h[jnp.clip(lag, 0)], 0.0)  # (t, s, d): h[t - s], causal
        in_w = R * _powers(p, t + 1)  # (t, d, n): state before the chunk -> output t

    def body(S, inp):
        xc, rc, rprev = inp
        same_end = (rc == rc[:, -1:]).astype(jnp.float32) if masked else None  # inputs that reach the end state
        xs = xc if same_end is None else xc * same_end[..., None]
        carry = 1.0 if not masked else (rc[:, -1] == rprev).astype(jnp.float32)[:, None, None]
        S_new = (decay * S * carry
                 + lax.complex(jnp.einsum("sdn,bsd->bdn", jnp.real(out_w), xs, precision=_HI),
                               jnp.einsum("sdn,bsd->bdn", jnp.imag(out_w), xs, precision=_HI)))
        if R is None:
            return S_new, None
        y_in = (jnp.einsum("tdn,bdn->btd", jnp.real(in_w), jnp.real(S), precision=_HI)
                - jnp.einsum("tdn,bdn->btd", jnp.imag(in_w), jnp.imag(S), precision=_HI))
        if masked:
            same = (rc[:, :, None] == rc[:, None, :]).astype(jnp.float32)  # (b, t, s)
            y_local = jnp.einsum("tsd,bts,bsd->btd", toeplitz, same, xc, precision=_HI)
            y_in = y_in * (rc == rprev[:, None]).astype(jnp.float32)[..., None]
        else:
            y_local = jnp.einsum("tsd,bsd->btd", toeplitz, xc, precision=_HI)
        return S_new, y_local + y_in

    return body


def _starts(r):
    return jnp.concatenate([jnp.zeros_like(r[:, :1], dtype=bool), r[:, 1:] != r[:, :-1]], axis=1)


# ------------------------------------------------------------------ validation

def _check_modal(poles, residues):
    for name, a in (("poles", poles), ("residues", residues)):
        ck.check_rank(name, a, 2, "(d, n) complex")
        if not (jnp.iscomplexobj(a) or any(jnp.dtype(a.dtype) == jnp.dtype(t) for t in ck.FLOAT_DTYPES)):
            raise ValueError(f"{name} must be complex (or real float), got dtype {jnp.dtype(a.dtype).name}")
    if poles.shape != residues.shape:
        raise ValueError(f"poles and residues must have the same (d, n) shape, got poles {tuple(poles.shape)} and "
                         f"residues {tuple(residues.shape)}")
    return poles.astype(jnp.complex64), residues.astype(jnp.complex64)


def _check_channels(p, d, name):
    if p.shape[0] != d:
        raise ValueError(f"poles/residues have {p.shape[0]} channels (d, n) = {tuple(p.shape)}, but {name} has d={d}")


def _prepare(x, poles, residues, initial_state, segment_ids):
    p, R = _check_modal(poles, residues)
    ck.check_rank("x", x, 3, "(b, l, d)")
    ck.check_float("x", x)
    b, l, d = x.shape
    _check_channels(p, d, "x")
    if initial_state is not None:
        ck.check_shape("initial_state", initial_state, (b, d, p.shape[1]), "(b, d, n)")
        h0 = initial_state.astype(jnp.complex64)
    else:
        h0 = jnp.zeros((b, d, p.shape[1]), jnp.complex64)
    r = None
    if segment_ids is not None:
        check_segment_ids(segment_ids, b, l)
        r = segment_index(segment_ids)
    return p, R, x.astype(jnp.float32), h0, r
