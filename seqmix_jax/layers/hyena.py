"""Hyena operator with an implicit long filter (Poli et al. 2023, "Hyena Hierarchy", arXiv 2302.10866).

Axis letters: b batch, l sequence, d d_model, w short-filter width, f filter-MLP width (filter_order),
m positional-feature width (emb_dim), N order (N - 1 long convolutions), c = d (N - 1) filter channels.

Same function and parameters as safari `src/models/sequence/hyena.py` `HyenaOperator` (num_heads = num_blocks =
inner_factor = 1, no outer mixing, no post-order FFN):

    [x_0 ; ... ; x_{N-1} ; v] = short_filter(in_proj(u))        N + 1 chunks of d; depthwise, no activation
    h = filter_fn.filter(l)                                     (l, c), channel c = d (N - 1) + o  ("(v o)")
    for o = 0 .. N - 2, with x_i = x_{N-1}, x_{N-2}, ..., x_1:
        v = v * x_i
        v = h_o * v + bias_o * v                                causal convolution (fftconv) + the D skip
    y = out_proj(activation(v * x_0))

The implicit filter (HyenaFilter.filter): z = [t, cos(f w), -sin(f w)] (l_max, m) positional features,
h = W_last S(W_k ... S(W_1 S(W_0 z + b_0) + b_1) ... + b_k), S(a) = sin(freq * a) with ONE shared `freq`,
optionally h /= sum_c |h|, then h *= exp(-t |deltas_c|) + shift (exponential window, fast to slow decay over
the channels). A sequence of length l uses the prefix h[:l] of the l_max grid, so the filter depends on l_max.

Decoding (not in safari, whose `recurrence` raises NotImplementedError): the long convolutions have no
finite state, so `HyenaState` caches the input of each of the N - 1 long convolutions, (b, N - 1, l_cap, d)
float32, with l_cap = l_max (or `max_len`), plus the filter evaluated once on the grid. `step` is the direct
causal convolution of that history with the filter prefix: O(t d) useful work per level per token at position
t, but with static shapes under jit it evaluates the full masked window, O(l_cap d (N - 1)) per token; memory
O(b l_cap d (N - 1)). The constant-memory alternative, distilling the filter into a modal SSM (Laughing Hyena,
arXiv 2310.18780; what StripedHyena ships), is not implemented. Decoding past l_cap raises ValueError when the
position is concrete and returns NaN under jit (the position is traced there).

Differences from the official code:
  * l > l_max raises ValueError (safari truncates the filter length with min(l, l_max) and then fails).
  * `learn_pos_emb` (default False) decides whether z is a trainable `nnx.Param` or a `Buffer`; safari's
    default lr_pos_emb=1e-5 makes z a parameter with its own tiny learning rate (optimizer groups are the
    trainer's business here). `t` is recomputed (linspace(0, 1, l_max)), not stored.
  * The implicit filter, the D skip and every FFT run in float32 whatever `dtype` is.
  * `segment_ids` raises NotImplementedError: an FFT long convolution cannot reset at segment boundaries.

Checkpoint name map (safari state_dict key under the mixer -> path here; F = filter_order, K = num_inner_mlps):
  in_proj.weight ((N+1)d, d)                 -> in_proj.kernel (d, (N+1)d)           transpose
  in_proj.bias, out_proj.bias                -> in_proj.bias, out_proj.bias
  out_proj.weight (d, d)                     -> out_proj.kernel                      transpose
  short_filter.weight ((N+1)d, 1, w)         -> short_filter.weight (w, (N+1)d)      weight[:, 0, :].T
  short_filter.bias                          -> short_filter.bias
  filter_fn.bias (c,)                        -> filter_fn.bias (the D skip, "(v o)" order kept)
  filter_fn.pos_emb.z (1, l_max, m)          -> filter_fn.pos_emb.z (l_max, m)        [0]
  filter_fn.pos_emb.t (1, l_max, 1)          -> not stored (recomputed; check it equals linspace(0, 1, l_max))
  filter_fn.implicit_filter.{2i}.weight      -> filter_fn.implicit_filter[i].kernel   transpose, i = 0..K+1
  filter_fn.implicit_filter.{2i}.bias        -> filter_fn.implicit_filter[i].bias     i = 0..K (last has none)
  filter_fn.implicit_filter.{2i+1}.freq (1,F)-> filter_fn.freq (1, F)                 ONE tied parameter: the keys
                                                 .1, .3, ..., .{2K+1} hold the same tensor; check they agree
  filter_fn.modulation.deltas (1, 1, c)      -> filter_fn.deltas (c,)                 [0, 0]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from seqmix_jax.layers._init import axes, check_dims, conv_init, param, torch_uniform
from seqmix_jax.layers._init import linear as _linear
from seqmix_jax.ops import causal_conv1d, causal_conv1d_update
from seqmix_jax.ops.fftconv import fftconv

ACTIVATIONS = {
    "id": lambda a: a,
    "identity": lambda a: a,
    "gelu": lambda a: jax.nn.gelu(a, approximate=False),  # torch nn.GELU default (erf)
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


class Buffer(nnx.Variable):
    """A non-trainable array that belongs to the model (PyTorch `register_buffer`): saved and loaded with the
    parameters, never updated by an optimizer built with `wrt=nnx.Param`. Linen collection: "buffers"."""


nnx.register_variable_name("buffers", Buffer)


class HyenaState(NamedTuple):
    conv: jax.Array  # (b, w - 1, (N+1) d) previous in_proj outputs (short-filter inputs), oldest first
    history: jax.Array  # (b, N - 1, l_cap, d) float32 inputs of each long convolution; zeros past `pos`
    pos: jax.Array  # () int32 number of tokens seen
    k: jax.Array  # (N - 1, l_cap, d) float32 filters on the grid, computed once (no batch axis)


def positional_features(l_max: int, emb_dim: int) -> np.ndarray:
    """Hyena's filter-MLP input z (l_max, emb_dim), float64: [t, cos(f w), -sin(f w)] with t = linspace(0, 1),
    w = 2 pi (0..l_max-1) / l_max and M = (emb_dim - 1) / 2 bands f = linspace(1e-4, M - 1, M) (the real and
    imaginary parts of exp(-i f w))."""
    if not isinstance(emb_dim, int) or emb_dim < 3 or emb_dim % 2 == 0:
        raise ValueError(f"emb_dim must be an odd int >= 3 (time plus cos/sin pairs), got {emb_dim!r}")
    check_dims(l_max=l_max)
    bands = (emb_dim - 1) // 2
    t = np.linspace(0.0, 1.0, l_max)[:, None]
    w = 2 * math.pi * np.arange(l_max)[:, None] / l_max
    f = np.linspace(1e-4, bands - 1, bands)[None, :]
    return np.concatenate([t, np.cos(f * w), -np.sin(f * w)], axis=-1)


class PositionalEmbedding(nnx.Module):
    """Positional features z (l_max, emb_dim) fed to the filter MLP; a Buffer, or a Param if `trainable`."""

    def __init__(self, emb_dim: int, l_max: int, *, trainable: bool = False):
        z = jnp.asarray(positional_features(l_max, emb_dim), jnp.float32)
        self.z = (nnx.Param if trainable else Buffer)(z, **axes("hyena_seq", "hyena_pos"))

    def __call__(self, l: int) -> Float[Array, "l m"]:
        return self.z[...][:l].astype(jnp.float32)


class HyenaFilter(nnx.Module):
    """Implicit long filter with an exponential window: (l,) -> h (l, channels), float32.

    Args:
      channels: c = d_model (order - 1) output channels.
      l_max: length of the positional grid.
      emb_dim: m, odd >= 3.
      filter_order: f, width of the MLP.
      w: initial value of the shared sine frequency.
      num_inner_mlps: hidden f -> f layers (2).
      modulate, fast_decay_pct, slow_decay_pct, target, shift: the window exp(-t |deltas|) + shift, deltas =
        linspace(ln(target) / slow_decay_pct, ln(target) / fast_decay_pct, c).
      normalized: divide h by its L1 norm over the channels before the window.
      learn_pos_emb: z trainable.
      param_dtype: storage of the MLP and freq; z, deltas and the D skip `bias` are float32.
      rngs: nnx.Rngs.
    """

    def __init__(self, channels: int, l_max: int, *, emb_dim: int = 3, filter_order: int = 64, w: float = 1.0,
                 num_inner_mlps: int = 2, modulate: bool = True, fast_decay_pct: float = 0.3,
                 slow_decay_pct: float = 1.5, target: float = 1e-2, shift: float = 0.0, normalized: bool = False,
                 learn_pos_emb: bool = False, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_dims(channels=channels, l_max=l_max, filter_order=filter_order)
        if not isinstance(num_inner_mlps, int) or num_inner_mlps < 0:
            raise ValueError(f"num_inner_mlps must be an int >= 0, got {num_inner_mlps!r}")
        if not (0 < target < 1 and fast_decay_pct > 0 and slow_decay_pct > 0):
            raise ValueError(f"need 0 < target < 1 and positive decay percentages, got target={target}, "
                             f"fast_decay_pct={fast_decay_pct}, slow_decay_pct={slow_decay_pct}")
        self.channels, self.l_max, self.modulate, self.shift, self.normalized = (
            channels, l_max, modulate, shift, normalized)
        self.pos_emb = PositionalEmbedding(emb_dim, l_max, trainable=learn_pos_emb)
        f = filter_order
        sizes = [(emb_dim, f, ("hyena_pos", "hyena_filter"))] + [(f, f, (None, "hyena_filter"))] * num_inner_mlps
        layers = [_filter_linear(i, o, True, names, param_dtype, rngs) for i, o, names in sizes]
        layers.append(_filter_linear(f, channels, False, ("hyena_filter", "hyena_inner"), param_dtype, rngs))
        self.implicit_filter = nnx.List(layers)
        # One frequency shared by every sine (safari reuses a single Sin module).
        self.freq = param(lambda k, s, dt: jnp.full(s, w, dt), (1, f), (None, "hyena_filter"), param_dtype, rngs)
        deltas = np.linspace(math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct, channels)
        self.deltas = Buffer(jnp.asarray(deltas, jnp.float32), **axes("hyena_inner"))
        # The D skip of each long convolution (safari `filter_fn.bias`), standard normal at init.
        self.bias = param(jax.random.normal, (channels,), ("hyena_inner",), jnp.float32, rngs)

    def filter(self, l: int) -> Float[Array, "l c"]:
        """The filter taps h[:l] (l, channels) in float32."""
        h = self.pos_emb(l)
        freq = self.freq[...].astype(jnp.float32)
        for layer in self.implicit_filter[:-1]:
            h = jnp.sin(freq * layer(h))
        h = self.implicit_filter[-1](h)
        if self.normalized:
            h = h / jnp.sum(jnp.abs(h), axis=-1, keepdims=True)
        if self.modulate:
            t = jnp.asarray(np.linspace(0.0, 1.0, self.l_max)[:l, None], jnp.float32)
            h = h * (jnp.exp(-t * jnp.abs(self.deltas[...])) + self.shift)
        return h


def _filter_linear(d_in, d_out, use_bias, names, param_dtype, rngs):
    # float32 HIGHEST: the sine (freq up to ~14 in released configs) amplifies matmul rounding, and TF32 would
    # lose most of it. The MLP only runs on the (l, m) grid, so this costs little.
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=jnp.float32, param_dtype=param_dtype,
                      precision=jax.lax.Precision.HIGHEST, kernel_init=torch_uniform(d_in),
                      bias_init=torch_uniform(d_in), kernel_metadata=axes(*names), bias_metadata=axes(names[1]),
                      rngs=rngs)


class ShortFilter(nnx.Module):
    """safari's `short_filter`: depthwise causal conv (cross-correlation, last tap on the current token) with
    bias and no activation. weight (w, channels), bias (channels,)."""

    def __init__(self, channels: int, width: int, *, param_dtype, rngs: nnx.Rngs):
        self.weight = param(conv_init(width), (width, channels), ("conv_width", "hyena_inner"), param_dtype, rngs)
        self.bias = param(torch_uniform(width), (channels,), ("hyena_inner",), param_dtype, rngs)


class HyenaOperator(nnx.Module):
    """Hyena operator (safari `HyenaOperator`): (b, l, d_model) -> (b, l, d_model), l <= l_max.

    Args:
      d_model: model width d.
      l_max: longest sequence; the filter grid (and the decode cache) has this length.
      order: N >= 2, number of gates; N - 1 long convolutions (2).
      filter_order: width f of the filter MLP (64).
      emb_dim: positional features m, odd >= 3 (3).
      short_filter_order: width w of the short depthwise filter (3).
      w: initial sine frequency of the filter MLP (1.0; released configs use 10 or 14).
      num_inner_mlps: hidden layers of the filter MLP (2).
      modulate, fast_decay_pct, slow_decay_pct, target, shift: exponential window of the filter.
      normalized: L1-normalize the filter over its channels (False).
      learn_pos_emb: positional features trainable (False).
      activation: applied to v * x_0 before out_proj: "id" (default), "gelu", "silu", "relu", "tanh", "sigmoid".
      impl: backend of the long convolution: "auto", "xla" (FFT) or "reference" (direct convolution).
      dtype: compute dtype of the projections and gates (None: from inputs and params); the filter, the D
        skip and the FFTs stay float32.
      param_dtype: storage dtype of the projections, short filter and filter MLP.
      rngs: nnx.Rngs (keyword only).
    """

    def __init__(self, d_model: int, l_max: int, *, order: int = 2, filter_order: int = 64, emb_dim: int = 3,
                 short_filter_order: int = 3, w: float = 1.0, num_inner_mlps: int = 2, modulate: bool = True,
                 fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5, target: float = 1e-2, shift: float = 0.0,
                 normalized: bool = False, learn_pos_emb: bool = False, activation: str = "id", impl: str = "auto",
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_dims(d_model=d_model, l_max=l_max, filter_order=filter_order, short_filter_order=short_filter_order)
        if not isinstance(order, int) or order < 2:
            raise ValueError(f"order must be an int >= 2 (at least one long convolution), got {order!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if impl not in ("auto", "reference", "xla", "pallas"):
            raise ValueError(f"impl must be 'auto', 'reference', 'xla' or 'pallas', got {impl!r}")
        self.d_model, self.l_max, self.order, self.width = d_model, l_max, order, short_filter_order
        self.activation, self.impl, self.dtype = activation, impl, dtype
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = _linear(d_model, (order + 1) * d_model, use_bias=True, names=("embed", "hyena_inner"),
                               **common)
        self.short_filter = ShortFilter((order + 1) * d_model, short_filter_order, param_dtype=param_dtype, rngs=rngs)
        self.filter_fn = HyenaFilter(d_model * (order - 1), l_max, emb_dim=emb_dim, filter_order=filter_order, w=w,
                                     num_inner_mlps=num_inner_mlps, modulate=modulate, fast_decay_pct=fast_decay_pct,
                                     slow_decay_pct=slow_decay_pct, target=target, shift=shift, normalized=normalized,
                                     learn_pos_emb=learn_pos_emb, param_dtype=param_dtype, rngs=rngs)
        self.out_proj = _linear(d_model, d_model, use_bias=True, names=("hyena_inner", "embed"), **common)

    def __call__(self, x: Float[Array, "b l d"], *, segment_ids: Int[Array, "b l"] | None = None
                 ) -> Float[Array, "b l d"]:
        """x: (b, l, d_model) with l <= l_max -> (b, l, d_model)."""
        self._check_call(x, segment_ids)
        k, skip = self.filters(x.shape[1])
        return self._forward(x, k, skip)[0]

    def filters(self, l: int) -> tuple[Float[Array, "o l d"], Float[Array, "o d"]]:
        """The long filters k (N - 1, l, d) and D skips (N - 1, d), float32, undoing the "(v o)" interleave:
        filter channel c = d (N - 1) + o belongs to convolution o, model channel d."""
        n1, d = self.order - 1, self.d_model
        k = self.filter_fn.filter(l).reshape(l, d, n1).transpose(2, 0, 1)
        return k, self._skips()

    def _skips(self):
        return self.filter_fn.bias[...].astype(jnp.float32).reshape(self.d_model, self.order - 1).T

    # --- decoding
    def init_state(self, batch_size: int, max_len: int | None = None) -> HyenaState:
        """Empty decode state able to hold `max_len` tokens (default and at most l_max)."""
        check_dims(batch_size=batch_size)
        cap = self.l_max if max_len is None else max_len
        check_dims(max_len=cap)
        if cap > self.l_max:
            raise ValueError(f"max_len={cap} exceeds l_max={self.l_max}, the length of the Hyena filter")
        n1, c = self.order - 1, (self.order + 1) * self.d_model
        conv_dtype = self.dtype or self.in_proj.kernel[...].dtype
        return HyenaState(jnp.zeros((batch_size, self.width - 1, c), conv_dtype),
                          jnp.zeros((batch_size, n1, cap, self.d_model), jnp.float32),
                          jnp.zeros((), jnp.int32), self.filters(cap)[0])

    def prefill(self, x: Float[Array, "b l d"], state: HyenaState | None = None, *, max_len: int | None = None,
                last_only: bool = False, segment_ids: Int[Array, "b l"] | None = None
                ) -> tuple[Float[Array, "b l d"], HyenaState]:
        """Run a prompt; returns (y, state after its last token).

        Without a state: the FFT forward, then the long-convolution inputs fill a fresh history of `max_len`
        positions (default l_max). With a state (continuing): each level writes its inputs into the history at
        `pos` and convolves the whole history (fftconv of length l_cap), keeping the outputs at pos..pos+l-1 —
        exact, O(l_cap log l_cap) per call. `last_only`: y (b, 1, d) of the last position only (the output gate
        and out_proj run on that position alone)."""
        self._check_call(x, segment_ids)
        b, l, _ = x.shape
        if state is None:
            cap = self.l_max if max_len is None else max_len
            check_dims(max_len=cap)
            if not l <= cap <= self.l_max:
                raise ValueError(f"max_len={cap} must hold the prompt (l={l}) and be at most l_max={self.l_max}")
            k, skip = self.filters(cap)
            y, inputs, conv = self._forward(x, k[:, :l], skip, last_only)
            history = jnp.zeros((b, self.order - 1, cap, self.d_model), jnp.float32)
            history = history.at[:, :, :l].set(jnp.stack(inputs, axis=1).astype(jnp.float32))
            return y, HyenaState(conv, history, jnp.asarray(l, jnp.int32), k)
        self._check_state(state, b)
        cap = state.history.shape[2]
        pos = jnp.asarray(state.pos, jnp.int32)
        _check_room(pos, l, cap)
        xs, v, conv = self._gates(x, state.conv)
        skip = self._skips()
        history = state.history
        for o, x_i in enumerate(reversed(xs[1:])):
            v = v * x_i
            hist_o = jax.lax.dynamic_update_slice(history[:, o], v.astype(jnp.float32), (0, pos, 0))
            history = history.at[:, o].set(hist_o)
            y_all = fftconv(hist_o, state.k[o], skip[o], impl=self.impl)
            v = jax.lax.dynamic_slice(y_all, (0, pos, 0), (b, l, self.d_model)).astype(v.dtype)
        y = _nan_past_end(self._out(v, xs[0], last_only), pos + l <= cap)
        return y, HyenaState(conv, history, pos + l, state.k)

    def step(self, x: Float[Array, "b d"], state: HyenaState) -> tuple[Float[Array, "b d"], HyenaState]:
        """One token x (b, d_model) -> (y (b, d_model), new state): at position t, y_o = sum_{s<=t} k_o[t-s]
        u_o[s] + skip_o u_o[t] over the cached inputs u_o of each level."""
        if x.ndim != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"step expects x of shape (b, d_model={self.d_model}), got {tuple(x.shape)}")
        self._check_state(state, x.shape[0])
        cap = state.history.shape[2]
        pos = jnp.asarray(state.pos, jnp.int32)
        _check_room(pos, 1, cap)
        u = self.in_proj(x)
        uc, conv = causal_conv1d_update(state.conv, u, self._cast(self.short_filter.weight),
                                        self._cast(self.short_filter.bias))
        xs, v = self._split(uc)
        skip = self._skips()
        lag = pos - jnp.arange(cap)  # lag t - s of every cached position s; negative = not yet seen
        seen = (lag >= 0)[:, None]
        history = state.history
        for o, x_i in enumerate(reversed(xs[1:])):
            v = v * x_i
            history = history.at[:, o].set(
                jax.lax.dynamic_update_slice(history[:, o], v.astype(jnp.float32)[:, None], (0, pos, 0)))
            taps = jnp.where(seen, state.k[o][jnp.clip(lag, 0, cap - 1)], 0.0)  # (l_cap, d): k_o[t - s]
            y = jnp.einsum("bsd,sd->bd", history[:, o], taps, precision=jax.lax.Precision.HIGHEST)
            v = (y + v.astype(jnp.float32) * skip[o]).astype(v.dtype)
        y = _nan_past_end(self._out(v, xs[0]), pos < cap)
        return y, HyenaState(conv, history, pos + 1, state.k)

    # --- internals
    def _forward(self, x, k, skip, last_only=False):
        """Full-sequence forward; returns (y, inputs of each long convolution, final short-filter state); y is the
        last position's only (b, 1, d) with last_only."""
        xs, v, conv = self._gates(x, None)
        inputs = []
        for o, x_i in enumerate(reversed(xs[1:])):
            v = v * x_i
            inputs.append(v)
            v = fftconv(v, k[o], skip[o], impl=self.impl)
        return self._out(v, xs[0], last_only), inputs, conv

    def _gates(self, x, conv_state):
        u = self.in_proj(x)
        uc, conv = causal_conv1d(u, self._cast(self.short_filter.weight), self._cast(self.short_filter.bias),
                                 initial_state=conv_state, return_final_state=True)
        xs, v = self._split(uc)
        return xs, v, conv

    def _split(self, uc):
        d = self.d_model
        chunks = [uc[..., i * d:(i + 1) * d] for i in range(self.order + 1)]
        return chunks[:-1], chunks[-1]

    def _out(self, v, x0, last_only=False):
        if last_only:  # the output gate and out_proj at the last position alone
            v, x0 = v[:, -1:], x0[:, -1:]
        return self.out_proj(ACTIVATIONS[self.activation](v * x0))

    def _cast(self, p):
        return p[...] if self.dtype is None else p[...].astype(self.dtype)

    def _check_call(self, x, segment_ids):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (b, l, d_model={self.d_model}), got {tuple(x.shape)}")
        if x.shape[1] > self.l_max:
            raise ValueError(f"sequence length l={x.shape[1]} exceeds l_max={self.l_max}: the implicit Hyena "
                             "filter is only defined on the l_max grid")
        if segment_ids is not None:
            raise NotImplementedError("HyenaOperator does not support segment_ids: its FFT long convolution cannot "
                                      "reset at segment boundaries, so packed documents would mix; run each "
                                      "sequence separately (padded) instead")

    def _check_state(self, state, b):
        n1, d = self.order - 1, self.d_model
        if state.history.ndim != 4 or state.history.shape[:2] != (b, n1) or state.history.shape[3] != d:
            raise ValueError(f"state.history must have shape (b={b}, N-1={n1}, l_cap, d={d}), "
                             f"got {tuple(state.history.shape)}")


def _concrete_int(a) -> int | None:
    try:
        return int(a)
    except jax.errors.ConcretizationTypeError:
        return None


def _check_room(pos, l, cap):
    p = _concrete_int(pos)
    if p is not None and p + l > cap:
        raise ValueError(f"cannot decode past the cache: position {p} + {l} new token(s) > {cap} "
                         f"(l_max or the init_state max_len)")


def _nan_past_end(y, ok):
    # Under jit the position is traced and cannot raise; poison the output instead of returning garbage
    # (dynamic_update_slice would clamp the write index and silently overwrite the last cached input).
    return jnp.where(ok, y, jnp.asarray(jnp.nan, y.dtype))
