"""Causal long convolution (Hyena, StripedHyena) with the D skip.

Axis letters: b batch, l sequence, d channels.

    y[t, c] = sum_{s <= t} h[t - s, c] * u[s, c] + D[c] * u[t, c]

This is a true convolution (tap 0 multiplies the current input), unlike the short depthwise conv
(`causal_conv1d`, cross-correlation). The xla path is the float32 real FFT of size 2l used by safari and
stripedhyena (REFERENCE_NOTES §0.4): rfft(u, 2l) * rfft(h, 2l), irfft, keep the first l outputs. `reference` is
the direct O(l^2) convolution, computed as a depthwise `conv_general_dilated` so it needs O(l d) memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from seqmix_jax.ops import _checks as ck
from seqmix_jax.ops.dispatch import Impl, resolve_impl


def fftconv(u: Float[Array, "b l d"], h: Float[Array, "lh d"], D: Float[Array, "d"] | None = None, *,
            impl: Impl = "auto") -> Float[Array, "b l d"]:
    """Causal convolution of every channel of `u` with its filter, plus the skip `D * u`.

    Args:
      u: (b, l, d) input.
      h: (lh, d) filter taps with lh >= l; only the first l taps can reach an output.
      D: optional (d,) skip.
      impl: "auto", "reference" (direct convolution) or "xla" (float32 FFT of size 2l).

    Returns:
      (b, l, d) in u.dtype; computed in float32.
    """
    _check_fftconv_args(u, h, D)
    path = resolve_impl("fftconv", impl, ("reference", "xla", "pallas"), u=u, h=h)
    if path == "pallas":
        raise AssertionError("fftconv has no 'pallas' branch")
    if path == "reference":
        return _direct_conv(u, h, D)
    l = u.shape[1]
    n = 2 * l
    uf = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)
    hf = jnp.fft.rfft(h[:l].astype(jnp.float32), n=n, axis=0)
    y = jnp.fft.irfft(uf * hf[None], n=n, axis=1)[:, :l]
    return _skip(y, u, D)


def fftconv_reference(u, h, D=None):
    """The direct O(l^2) causal convolution (the definition)."""
    _check_fftconv_args(u, h, D)
    return _direct_conv(u, h, D)


def _direct_conv(u, h, D):
    b, l, d = u.shape
    # conv_general_dilated cross-correlates, so flip the taps; left padding l - 1 makes it causal.
    kernel = jnp.flip(h[:l].astype(jnp.float32), axis=0)[:, None, :]  # (l, 1, d): width, in/group, out
    y = jax.lax.conv_general_dilated(u.astype(jnp.float32), kernel, window_strides=(1,), padding=[(l - 1, 0)],
                                     dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=d,
                                     precision=jax.lax.Precision.HIGHEST)
    return _skip(y, u, D)


def _skip(y, u, D):
    if D is not None:
        y = y + u.astype(jnp.float32) * D.astype(jnp.float32)
    return y.astype(u.dtype)


def _check_fftconv_args(u, h, D):
    ck.check_rank("u", u, 3, "(b, l, d)")
    ck.check_rank("h", h, 2, "(lh, d)")
    ck.check_float("u", u)
    ck.check_float("h", h)
    b, l, d = u.shape
    if h.shape[1] != d:
        raise ValueError(f"h must have shape (lh, d) with d={d} channels as in u {tuple(u.shape)}, got "
                         f"{tuple(h.shape)}")
    if h.shape[0] < l:
        raise ValueError(f"the filter has lh={h.shape[0]} taps, fewer than the sequence length l={l}")
    if D is not None:
        ck.check_shape("D", D, (d,), "(d,)")
