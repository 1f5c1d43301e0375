"""Modal (poles/residues) ops: the filter vs its complex128 definition, every scan/prefill path vs a numpy float64
recurrence, decode steps == scan, packed == separate sequences, gradients of the parallel paths vs the reference,
the StripedHyena layout helpers and every validation error.

Sizes are distinct and prime-ish per axis (b 3, l 61, d 11, n 3, chunk 8: 61 = 7 * 8 + 5 leaves a tail chunk)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix_jax.ops.fftconv import fftconv
from seqmix_jax.ops.modal import (as_complex, from_stripedhyena, modal_filter, modal_prefill, modal_prefill_fft,
                                  modal_scan, modal_scan_reference, modal_step, to_stripedhyena)
from tests.helpers import assert_close

PATHS = ("reference", "associative", "xla")
B, L, D, N, CHUNK = 3, 61, 11, 3, 8


def make_system(rng, d=D, n=N):
    """Poles with |p| in [0.5, 0.98] (memory of up to ~50 steps, so states cross chunks) at any angle, complex
    normal residues; returned as complex128 numpy arrays."""
    mag = rng.uniform(0.5, 0.98, (d, n))
    p = mag * np.exp(1j * rng.uniform(-np.pi, np.pi, (d, n)))
    R = rng.standard_normal((d, n)) + 1j * rng.standard_normal((d, n))
    return p.astype(np.complex64).astype(np.complex128), R.astype(np.complex64).astype(np.complex128)


def make_inputs(rng, b=B, l=L, d=D, n=N):
    p, R = make_system(rng, d, n)
    x = rng.standard_normal((b, l, d)).astype(np.float32)
    Dskip = rng.standard_normal(d).astype(np.float32)
    h0 = (rng.standard_normal((b, d, n)) + 1j * rng.standard_normal((b, d, n))).astype(np.complex64)
    return p, R, x, Dskip, h0


def numpy_modal(x, p, R, Dskip=None, h0=None, seg=None):
    """The recurrence in float64/complex128, one position at a time: (y (b, l, d), final state (b, d, n))."""
    b, l, d = x.shape
    ys = np.zeros((b, l, d))
    states = np.zeros((b, d, p.shape[1]), np.complex128)
    for i in range(b):
        S = np.zeros_like(p) if h0 is None else h0[i].astype(np.complex128)
        for t in range(l):
            if seg is not None and t > 0 and seg[i, t] != seg[i, t - 1]:
                S = np.zeros_like(S)
            S = p * S + x[i, t].astype(np.float64)[:, None]
            ys[i, t] = np.real(np.sum(R * S, axis=-1))
            if Dskip is not None:
                ys[i, t] += Dskip * x[i, t]
        states[i] = S
    return ys, states


def c64(a):
    return jnp.asarray(a, jnp.complex64)


def packed_ids(lens, b=1):
    return jnp.asarray(np.tile(np.repeat(np.arange(len(lens)), lens), (b, 1)))


# ------------------------------------------------------------------ filter and layout

def test_filter_matches_complex128_definition(rng):
    p, R = make_system(rng)
    t = np.arange(L)
    expected = np.real(np.sum(R[None] * p[None] ** t[:, None, None], axis=-1))  # (l, d)
    h = modal_filter(c64(p), c64(R), L)
    assert h.shape == (L, D) and h.dtype == jnp.float32
    assert_close("modal_filter vs complex128", h, expected, 1e-5)
    # A real float array is a system with real poles.
    hr = modal_filter(jnp.asarray(np.abs(p), jnp.float32), jnp.asarray(np.real(R), jnp.float32), 7)
    expected_r = np.sum(np.real(R)[None] * np.abs(p)[None] ** np.arange(7)[:, None, None], axis=-1)
    assert_close("modal_filter real poles", hr, expected_r, 1e-5)


def test_stripedhyena_layout_round_trip(rng):
    pairs = rng.standard_normal((D, N, 1, 2)).astype(np.float32)
    z = from_stripedhyena(jnp.asarray(pairs))
    assert z.shape == (D, N) and z.dtype == jnp.complex64
    np.testing.assert_array_equal(np.real(np.asarray(z)), pairs[:, :, 0, 0])
    np.testing.assert_array_equal(np.imag(np.asarray(z)), pairs[:, :, 0, 1])
    np.testing.assert_array_equal(np.asarray(to_stripedhyena(z)), pairs)
    np.testing.assert_array_equal(np.asarray(as_complex(jnp.asarray(pairs[:, :, 0]))), np.asarray(z))


# ------------------------------------------------------------------ scan / prefill / step

@functools.partial(jax.jit, static_argnames=("impl",))
def _scan(x, p, R, Dskip, h0, seg, *, impl):
    return modal_scan(x, p, R, Dskip, initial_state=h0, segment_ids=seg, return_final_state=True, impl=impl,
                      chunk_size=CHUNK)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _prefill(x, p, h0, seg, *, impl, chunk_size):
    return modal_prefill(x, p, initial_state=h0, segment_ids=seg, impl=impl, chunk_size=chunk_size)


@pytest.mark.parametrize("l", [L, 5, 1], ids=["tail_chunk", "l_shorter_than_chunk", "l_1"])
def test_scan_paths_match_numpy_recurrence(rng, l):
    p, R, x, Dskip, h0 = make_inputs(rng, l=l)
    y_np, s_np = numpy_modal(x, p, R, Dskip, h0)
    for impl in PATHS:
        y, s = _scan(jnp.asarray(x), c64(p), c64(R), jnp.asarray(Dskip), c64(h0), None, impl=impl)
        assert y.dtype == jnp.float32 and s.dtype == jnp.complex64
        assert_close(f"{impl} y (l={l})", y, y_np, 1e-5)
        assert_close(f"{impl} final state (l={l})", np.asarray(s).view(np.float32),
                     s_np.astype(np.complex64).view(np.float32), 1e-5)


def test_scan_without_state_equals_fft_convolution_with_the_filter(rng):
    p, R, x, Dskip, _ = make_inputs(rng)
    y_fft = fftconv(jnp.asarray(x), modal_filter(c64(p), c64(R), L), jnp.asarray(Dskip), impl="xla")
    for impl in PATHS:
        y, _ = _scan(jnp.asarray(x), c64(p), c64(R), jnp.asarray(Dskip), None, None, impl=impl)
        assert_close(f"{impl} scan vs fftconv(x, modal_filter)", y, y_fft, 1e-5)


def test_scan_segments_match_numpy_and_separate_runs(rng):
    p, R, x, Dskip, h0 = make_inputs(rng, b=2)
    lens = [9, 17, 1, 3, 31]  # a segment longer than two chunks, one of length 1, starts inside chunks
    seg = packed_ids(lens, b=2)
    y_np, s_np = numpy_modal(x, p, R, Dskip, h0, np.asarray(seg))
    for impl in PATHS:
        y, s = _scan(jnp.asarray(x), c64(p), c64(R), jnp.asarray(Dskip), c64(h0), seg, impl=impl)
        assert_close(f"{impl} packed y vs numpy", y, y_np, 1e-5)
        assert_close(f"{impl} packed final state", np.asarray(s).view(np.float32),
                     s_np.astype(np.complex64).view(np.float32), 1e-5)
        # Each segment run alone (the first one continuing h0) gives the same outputs.
        start = 0
        for i, n in enumerate(lens):
            ys, _ = numpy_modal(x[:, start:start + n], p, R, Dskip, h0 if i == 0 else None)
            assert_close(f"{impl} segment {i} vs its own run", y[:, start:start + n], ys, 1e-5)
            start += n


def test_prefill_paths_match_numpy_loop(rng):
    p, R, x, _, h0 = make_inputs(rng)
    seg = packed_ids([20, 41], b=B)
    cases = {"initial_state": dict(h0=h0), "segments+state": dict(h0=h0, seg=seg)}
    for name, kw in cases.items():
        _, s_np = numpy_modal(x, p, R, h0=kw.get("h0"), seg=None if "seg" not in kw else np.asarray(seg))
        for impl in PATHS:
            for chunk in (CHUNK, 256) if impl == "xla" else (CHUNK,):
                s = _prefill(jnp.asarray(x), c64(p), None if "h0" not in kw else c64(h0), kw.get("seg"), impl=impl,
                             chunk_size=chunk)
                assert s.shape == (B, D, N) and s.dtype == jnp.complex64
                assert_close(f"prefill {impl} chunk {chunk} {name}", np.asarray(s).view(np.float32),
                             s_np.astype(np.complex64).view(np.float32), 1e-5)


def test_fft_prefill_matches_numpy_loop(rng):
    """StripedHyena's FFT formulation of the prefill state (no initial state) against the float64 loop."""
    p, R, x, _, _ = make_inputs(rng)
    _, s_np = numpy_modal(x, p, R)
    s = jax.jit(modal_prefill_fft)(jnp.asarray(x), c64(p))
    assert s.shape == (B, D, N) and s.dtype == jnp.complex64
    assert_close("prefill fft", np.asarray(s).view(np.float32), s_np.astype(np.complex64).view(np.float32), 1e-5)


def test_step_chain_equals_scan(rng):
    p, R, x, Dskip, h0 = make_inputs(rng, l=23)
    y_ref, s_ref = modal_scan_reference(jnp.asarray(x), c64(p), c64(R), jnp.asarray(Dskip), initial_state=c64(h0),
                                        return_final_state=True)
    step = jax.jit(modal_step)
    S, outs = c64(h0), []
    for t in range(x.shape[1]):
        y_t, S = step(S, jnp.asarray(x[:, t]), c64(p), c64(R), jnp.asarray(Dskip))
        outs.append(y_t)
    assert_close("step chain y", jnp.stack(outs, 1), y_ref, 1e-6)
    assert_close("step chain state", np.asarray(S).view(np.float32), np.asarray(s_ref).view(np.float32), 1e-6)
    y_bf, _ = modal_step(c64(h0), jnp.asarray(x[:, 0], jnp.bfloat16), c64(p), c64(R))
    assert y_bf.dtype == jnp.bfloat16


def test_bf16_input_runs_in_float32(rng):
    p, R, x, Dskip, _ = make_inputs(rng, l=19)
    xb = jnp.asarray(x, jnp.bfloat16)
    y_np, _ = numpy_modal(np.asarray(xb.astype(jnp.float32)), p, R, Dskip)
    for impl in PATHS:
        y, s = _scan(xb, c64(p), c64(R), jnp.asarray(Dskip), None, None, impl=impl)
        assert y.dtype == jnp.bfloat16 and s.dtype == jnp.complex64
        assert_close(f"{impl} bf16 input", y.astype(jnp.float32), y_np, 8e-3)  # one bf16 rounding of y


# ------------------------------------------------------------------ gradients

def _grads(impl, inputs, seg, key):
    """Gradients of a random projection of (y, final state) w.r.t. x, D and the (re, im) parts of poles,
    residues and the initial state (real parameters, so no complex-gradient convention is involved)."""
    k1, k2 = jax.random.split(key)

    def loss(a):
        y, s = modal_scan(a["x"], jax.lax.complex(a["p_re"], a["p_im"]), jax.lax.complex(a["R_re"], a["R_im"]), a["D"],
                          initial_state=jax.lax.complex(a["h0_re"], a["h0_im"]), segment_ids=seg,
                          return_final_state=True, impl=impl, chunk_size=CHUNK)
        sr = jnp.stack([jnp.real(s), jnp.imag(s)], -1)
        return jnp.sum(y * jax.random.normal(k1, y.shape)) + jnp.sum(sr * jax.random.normal(k2, sr.shape))

    return jax.jit(jax.grad(loss))(inputs)


@pytest.mark.parametrize("segmented", [pytest.param(False, marks=pytest.mark.slow), True], ids=["plain", "segments"])
def test_gradients_of_parallel_paths_match_reference(rng, key, segmented):
    p, R, x, Dskip, h0 = make_inputs(rng, l=29)
    f = lambda a: jnp.asarray(a, jnp.float32)
    inputs = dict(x=f(x), D=f(Dskip), p_re=f(p.real), p_im=f(p.imag), R_re=f(R.real), R_im=f(R.imag),
                  h0_re=f(h0.real), h0_im=f(h0.imag))
    seg = packed_ids([12, 4, 13], b=B) if segmented else None
    g_ref = _grads("reference", inputs, seg, key)
    for impl in ("associative", "xla"):
        g = _grads(impl, inputs, seg, key)
        for name in inputs:
            assert float(jnp.abs(g_ref[name]).max()) > 0, name
            assert_close(f"{impl} d/d{name}", g[name], g_ref[name], 1e-4)


@pytest.mark.slow
def test_prefill_gradients_match_reference(rng, key):
    p, _, x, _, h0 = make_inputs(rng, l=29)
    seg = packed_ids([10, 19], b=B)
    ct = jax.random.normal(key, (B, D, N, 2))

    def loss(impl, x, p_re, p_im):
        s = modal_prefill(x, jax.lax.complex(p_re, p_im), initial_state=c64(h0), segment_ids=seg, impl=impl,
                          chunk_size=CHUNK)
        return jnp.sum(jnp.stack([jnp.real(s), jnp.imag(s)], -1) * ct)

    args = (jnp.asarray(x), jnp.asarray(p.real, jnp.float32), jnp.asarray(p.imag, jnp.float32))
    g_ref = jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2))(*args)
    for impl in ("associative", "xla"):
        g = jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2)))(*args)
        for name, a, r in zip(("x", "p_re", "p_im"), g, g_ref):
            assert_close(f"prefill {impl} d/d{name}", a, r, 1e-4)


# ------------------------------------------------------------------ errors

def test_errors(rng):
    p, R, x, Dskip, h0 = make_inputs(rng, l=5)
    p, R, x = c64(p), c64(R), jnp.asarray(x)
    with pytest.raises(ValueError, match=r"poles must have rank 2"):
        modal_filter(p[None], R, 4)
    with pytest.raises(ValueError, match=r"poles and residues must have the same \(d, n\) shape"):
        modal_filter(p, R[:, :2], 4)
    with pytest.raises(ValueError, match="residues must be complex"):
        modal_filter(p, jnp.zeros((D, N), jnp.int32), 4)
    with pytest.raises(ValueError, match="l must be a positive int"):
        modal_filter(p, R, 0)
    with pytest.raises(ValueError, match=r"poles/residues have 11 channels .* but x has d=7"):
        modal_scan(x[..., :7], p, R)
    with pytest.raises(ValueError, match=r"x must have rank 3"):
        modal_scan(x[0], p, R)
    with pytest.raises(ValueError, match=r"D must have shape"):
        modal_scan(x, p, R, jnp.zeros(4))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(b, d, n\) = \(3, 11, 3\)"):
        modal_scan(x, p, R, initial_state=c64(h0[:, :, :2]))
    with pytest.raises(ValueError, match="segment_ids"):
        modal_scan(x, p, R, segment_ids=jnp.zeros((B, 4), jnp.int32))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        modal_scan(x, p, R, chunk_size=0)
    with pytest.raises(ValueError, match="impl='pallas' cannot run modal_scan"):
        modal_scan(x, p, R, impl="pallas")
    with pytest.raises(ValueError, match="impl='bogus' is not one of"):
        modal_prefill(x, p, impl="bogus")
    with pytest.raises(ValueError, match=r"state must have shape \(b, d, n\)"):
        modal_step(c64(h0[:2]), x[:, 0], p, R)
    with pytest.raises(ValueError, match=r"x must have rank 2 \(b, d\)"):
        modal_step(c64(h0), x, p, R)
    with pytest.raises(ValueError, match="last axis of size 2"):
        as_complex(jnp.zeros((D, 3)))
    with pytest.raises(ValueError, match=r"StripedHyena's \(d, n, 1, 2\) layout"):
        from_stripedhyena(jnp.zeros((D, N, 2)))
    with pytest.raises(ValueError, match=r"expected \(d, n\) complex"):
        to_stripedhyena(p[None])
