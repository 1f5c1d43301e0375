"""StripedHyena gated convolution mixer (Poli, Wang, Massaroli et al. 2023, StripedHyena-7B; togethercomputer/
stripedhyena `ParallelGatedConvBlock` without its norms, MLP and residual).

Axis letters: b batch, l sequence, d d_model, h heads (only used to split channels), k = d / h, n modes
(`state_size`), w short filter width.

    z = projections(u)                              d -> 3d, with bias
    z = short_fir(z)                                depthwise causal conv, width w, cross-correlation order
    (x2, x1, v) = split(z)                          per head: [x2 | x1 | v] blocks of k channels (column split),
                                                    or plain thirds of 3d (column_split=False)
    x1v = x1 * v
    y = (h * x1v + D * x1v) * x2                    h[t, c] = Re sum_n R[c, n] p[c, n]^t, causal convolution
    out = out_proj(y)                               d -> d, with bias (StripedHyena's `out_filter_dense`)

The long convolution runs as a float32 FFT (`fftconv`) when there is no state and no packing; with `segment_ids`
or a decoding state it runs as the equivalent modal recurrence S_t = p S_{t-1} + x1v_t, y_t = Re sum_n R S_t
(`modal_scan`), which resets at segment starts. Decoding is O(1) per token: a (w - 1)-input FIR window and the
(d, n) complex64 modal state.

Parameters (stripedhyena name -> ours): `projections.{weight,bias}` -> `projections.{kernel,bias}` (transposed);
`filter.short_filter_weight (3d, 1, w)` -> `short_filter_weight (w, 3d)`; `filter.short_filter_bias` ->
`short_filter_bias`; `filter.poles` / `filter.residues (d, n, 1, 2)` -> `poles` / `residues (d, n, 2)` float32
(re, im); `filter.D` -> `D`; `out_filter_dense.{weight,bias}` -> `out_proj.{kernel,bias}`.

Differences from the official code:
  * one filter per channel (stripedhyena's `hyena_filter_groups = 1`, as in SH-7B); grouped filters are not
    supported (stripedhyena's own grouped path repeats the filters inconsistently and its decode raises);
  * poles, residues and D stay float32 whatever `param_dtype` is (the reference keeps poles/residues float32 via
    `to_bfloat16_except_poles_residues` but casts D); the skip D * x1v is added in float32 before one cast to the
    compute dtype, where the reference adds it after casting the convolution;
  * the short-filter bias is added inside the float32 accumulation, not after the conv (a rounding difference);
  * default init (`filter_init="decay"`) differs, see below; `filter_init="stripedhyena"` reproduces the open code.

Initialization. The open code's init is a placeholder ("TODO: bring over init from internals"): poles
re ~ 1e-2 N(0, 1), im ~ 1e-3 N(0, 1), so |p| ~ 0.01 and the long filter dies after one or two taps (the layer
starts as a pointwise gate; the gradient reaching tap t scales like t p^(t-1), so long memory is slow to learn);
residues, short filter weight and bias ~ N(0, 1); D = 0. `filter_init="decay"` (default) instead spreads the
poles' time constants tau = -1 / log|p| log-uniformly over [1, 1024] steps, at angles U(0, pi), and scales the
complex-normal residues by sqrt((1 - |p|^2) / n) so that every channel's complex filter has unit expected energy
(sum_t E|sum_n R p^t|^2 = 1): stable (|p| < 1), multi-scale memory at init, output variance independent of tau.
Its short filter uses PyTorch's Conv1d default U(+-1/sqrt(w)); D = 0 in both.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from seqmix_jax.layers._init import axes, check_dims, linear, param, torch_uniform
from seqmix_jax.ops.conv import causal_conv1d, causal_conv1d_update
from seqmix_jax.ops.dispatch import IMPLS
from seqmix_jax.ops.fftconv import fftconv
from seqmix_jax.ops.modal import as_complex, modal_filter, modal_prefill, modal_scan, modal_step

FILTER_INITS = ("decay", "stripedhyena")
TIMESCALES = (1.0, 1024.0)  # range of the "decay" init's time constants, in steps


class StripedHyenaState(NamedTuple):
    fir: jax.Array  # (b, w - 1, 3d) previous projection outputs (the short filter's inputs), oldest first
    modal: jax.Array  # (b, d, n) complex64 modal state


class StripedHyenaMixer(nnx.Module):
    """StripedHyena gated convolution mixer: (b, l, d_model) -> (b, l, d_model).

    Args:
      d_model: model width d.
      num_heads: h; the column split takes [x2 | x1 | v] inside each head's 3d / h projection channels. Must divide
        d_model.
      state_size: n poles per channel (2 in SH-7B, 8 in Evo 1).
      short_filter_length: w of the short FIR (3).
      short_filter_bias: learn the FIR bias (True).
      proj_bias: bias of the d -> 3d projections (True).
      out_bias: bias of the output projection (True).
      column_split: per-head split (StripedHyena checkpoints, True) or plain thirds (False).
      filter_init: "decay" (default, see the module docstring) or "stripedhyena" (the open code's placeholder).
      impl: "auto"/"xla": FFT convolution, and the chunked modal scan with segment_ids or a state; "reference" /
        "associative": the modal recurrence (sequential / parallel prefix) everywhere.
      chunk_size: chunk of the xla modal scan.
      dtype, param_dtype: compute and storage dtypes; poles, residues and D stay float32.
      rngs: nnx.Rngs (keyword only).
    """

    def __init__(self, d_model: int, num_heads: int, *, state_size: int = 2, short_filter_length: int = 3,
                 short_filter_bias: bool = True, proj_bias: bool = True, out_bias: bool = True,
                 column_split: bool = True, filter_init: str = "decay", impl: str = "auto", chunk_size: int = 32,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_dims(d_model=d_model, num_heads=num_heads, state_size=state_size,
                   short_filter_length=short_filter_length, chunk_size=chunk_size)
        if d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
        if filter_init not in FILTER_INITS:
            raise ValueError(f"filter_init must be one of {FILTER_INITS}, got {filter_init!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
        self.d_model, self.num_heads, self.state_size = d_model, num_heads, state_size
        self.short_filter_length, self.column_split = short_filter_length, bool(column_split)
        self.impl, self.chunk_size, self.dtype = impl, chunk_size, dtype
        d, n, w = d_model, state_size, short_filter_length
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.projections = linear(d, 3 * d, use_bias=proj_bias, names=("embed", "ssm_inner"), **common)
        if filter_init == "stripedhyena":
            fir_init = lambda k, s, dt: jax.random.normal(k, s, dt)
            poles, residues = _stripedhyena_modes(rngs.params(), d, n)
        else:
            fir_init = torch_uniform(w)
            poles, residues = _decay_modes(rngs.params(), d, n)
        self.short_filter_weight = param(fir_init, (w, 3 * d), ("conv_width", "ssm_inner"), param_dtype, rngs)
        self.short_filter_bias = (param(fir_init, (3 * d,), ("ssm_inner",), param_dtype, rngs)
                                  if short_filter_bias else None)
        self.poles = nnx.Param(poles, **axes("ssm_inner", "ssm_state", None))
        self.residues = nnx.Param(residues, **axes("ssm_inner", "ssm_state", None))
        self.D = param(lambda k, s, dt: jnp.zeros(s, dt), (d,), ("ssm_inner",), jnp.float32, rngs)
        self.out_proj = linear(d, d, use_bias=out_bias, names=("ssm_inner", "embed"), **common)

    # --- the mixer contract
    def __call__(self, x: Float[Array, "b l d"], *, segment_ids: Int[Array, "b l"] | None = None
                 ) -> Float[Array, "b l d"]:
        """x: (b, l, d_model) -> (b, l, d_model); `segment_ids (b, l)` resets the FIR and the long filter at
        segment starts."""
        return self._forward(x, None, segment_ids, want_state=False)[0]

    def prefill(self, x, state: StripedHyenaState | None = None, *, max_len: int | None = None,
                last_only: bool = False, segment_ids=None):
        """Run a prompt (optionally continuing `state`); returns (y, state after the last token). `max_len` is
        accepted for the mixer contract (the state's size does not depend on it); `last_only`: y (b, 1, d) of the
        last position only (out_proj runs on that position alone)."""
        del max_len
        if state is not None:
            self._check_state(state, x.shape[0] if x.ndim == 3 else None)
        return self._forward(x, state, segment_ids, want_state=True, last_only=last_only)

    def init_state(self, batch_size: int, max_len: int | None = None) -> StripedHyenaState:
        """Zero decode state; its size does not depend on max_len."""
        del max_len
        check_dims(batch_size=batch_size)
        fir_dtype = self.dtype or self.projections.kernel[...].dtype
        return StripedHyenaState(
            jnp.zeros((batch_size, self.short_filter_length - 1, 3 * self.d_model), fir_dtype),
            jnp.zeros((batch_size, self.d_model, self.state_size), jnp.complex64))

    def step(self, x: Float[Array, "b d"], state: StripedHyenaState):
        """One token: x (b, d_model) -> (y (b, d_model), new state). O(1) in the position."""
        if x.ndim != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"step expects x of shape (b, d_model={self.d_model}), got {tuple(x.shape)}")
        self._check_state(state, x.shape[0])
        z, fir = causal_conv1d_update(state.fir, self.projections(x), self._cast(self.short_filter_weight),
                                      self._cast(self.short_filter_bias))
        x2, x1, v = self._split(z)
        p, R = self._modes()
        y, modal = modal_step(state.modal, x1 * v, p, R, self.D[...])
        return self.out_proj(y * x2), StripedHyenaState(fir, modal)

    def hyena_filter(self, z: Float[Array, "b l three_d"], *, segment_ids: Int[Array, "b l"] | None = None
                     ) -> Float[Array, "b l d"]:
        """StripedHyena's `ParallelHyenaFilter`: projection outputs (b, l, 3d) -> gated long convolution (b, l, d),
        before out_proj."""
        if z.ndim != 3 or z.shape[-1] != 3 * self.d_model:
            raise ValueError(f"hyena_filter expects z of shape (b, l, 3 * d_model={3 * self.d_model}), "
                             f"got {tuple(z.shape)}")
        return self._filter(z, None, segment_ids, want_state=False)[0]

    # --- internals
    def _forward(self, x, state, segment_ids, want_state, last_only=False):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (b, l, d_model={self.d_model}), got {tuple(x.shape)}")
        y, new_state = self._filter(self.projections(x), state, segment_ids, want_state)
        return self.out_proj(y[:, -1:] if last_only else y), new_state

    def _filter(self, z, state, segment_ids, want_state):
        z, fir = causal_conv1d(z, self._cast(self.short_filter_weight), self._cast(self.short_filter_bias),
                               segment_ids=segment_ids, initial_state=None if state is None else state.fir,
                               return_final_state=True)
        x2, x1, v = self._split(z)
        x1v = x1 * v
        p, R = self._modes()
        fft_path = self.impl in ("auto", "xla", "pallas")
        if state is None and segment_ids is None and fft_path:
            # No state to start from and nothing to reset: the long convolution as one float32 FFT; the state
            # after the prompt (when asked for) is a separate O(b l d n) reduction, not a recurrence.
            y = fftconv(x1v, modal_filter(p, R, x1v.shape[1]), self.D[...], impl=self.impl)
            modal = modal_prefill(x1v, p, impl="xla" if self.impl == "pallas" else self.impl) if want_state else None
        else:
            y, modal = modal_scan(x1v, p, R, self.D[...], initial_state=None if state is None else state.modal,
                                  segment_ids=segment_ids, return_final_state=True, impl=self.impl,
                                  chunk_size=self.chunk_size)
        return y * x2, (StripedHyenaState(fir, modal) if want_state else None)

    def _split(self, z):
        """(..., 3d) -> x2, x1, v, each (..., d)."""
        lead, d = z.shape[:-1], self.d_model
        if not self.column_split:
            return z[..., :d], z[..., d:2 * d], z[..., 2 * d:]
        zh = z.reshape(*lead, self.num_heads, 3, d // self.num_heads)  # per head: [x2 | x1 | v]
        return tuple(zh[..., i, :].reshape(*lead, d) for i in range(3))

    def _modes(self):
        return as_complex(self.poles[...]), as_complex(self.residues[...])

    def _cast(self, p):
        if p is None:
            return None
        return p[...] if self.dtype is None else p[...].astype(self.dtype)

    def _check_state(self, state, b):
        if not isinstance(state, StripedHyenaState):
            raise ValueError(f"state must be a StripedHyenaState (from init_state or prefill), "
                             f"got {type(state).__name__}")
        fir_shape = (b, self.short_filter_length - 1, 3 * self.d_model)
        modal_shape = (b, self.d_model, self.state_size)
        if b is not None and (tuple(state.fir.shape) != fir_shape or tuple(state.modal.shape) != modal_shape):
            raise ValueError(f"state shapes fir {tuple(state.fir.shape)}, modal {tuple(state.modal.shape)} do not "
                             f"match (b, w - 1, 3d) = {fir_shape} and (b, d, n) = {modal_shape}")


def _stripedhyena_modes(key, d, n):
    """The open code's placeholder: poles re ~ 1e-2 N, im ~ 1e-3 N; residues (re, im) ~ N(0, 1)."""
    kp, kr = jax.random.split(key)
    poles = jax.random.normal(kp, (d, n, 2), jnp.float32) * jnp.asarray([1e-2, 1e-3], jnp.float32)
    return poles, jax.random.normal(kr, (d, n, 2), jnp.float32)


def _decay_modes(key, d, n):
    """Time constants log-uniform over TIMESCALES, angles U(0, pi), unit-energy complex filters per channel."""
    kt, ka, kr = jax.random.split(key, 3)
    lo, hi = TIMESCALES
    tau = jnp.exp(jax.random.uniform(kt, (d, n), jnp.float32, math.log(lo), math.log(hi)))
    mag = jnp.exp(-1.0 / tau)
    angle = jax.random.uniform(ka, (d, n), jnp.float32, 0.0, math.pi)
    poles = jnp.stack([mag * jnp.cos(angle), mag * jnp.sin(angle)], axis=-1)
    scale = jnp.sqrt((1.0 - mag ** 2) / n)[..., None] / math.sqrt(2.0)  # E|R|^2 = (1 - |p|^2) / n
    return poles, jax.random.normal(kr, (d, n, 2), jnp.float32) * scale
