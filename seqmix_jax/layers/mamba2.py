"""Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs", the SSD layer).

Axis letters: b batch, l sequence, d d_model, e d_inner = expand * d_model, h heads = e / p, p headdim,
g ngroups, n d_state, w d_conv.

Same function and parameters as mamba_ssm `modules/mamba2.Mamba2` (with d_ssm = d_inner) and transformers
`Mamba2Mixer`:

    [z ; xBC ; dt] = in_proj(u)                sizes (e, e + 2gn, h)
    xBC = silu(causal_conv1d(xBC))             the conv covers x, B and C only
    [x ; B ; C] = xBC                          x -> (b, l, h, p); B, C -> (b, l, g, n)
    y = ssd(x, dt, -exp(A_log), B, C, D, dt_bias=dt_bias, dt_limit=dt_limit)
    y = RMSNorm_grouped(y * silu(z)) * norm.weight     (rmsnorm=True, norm_before_gate=False), else y * silu(z)
    out = out_proj(y)

Differences from the official code: A_log is kept in float32 (mamba_ssm casts it to the model dtype);
`d_ssm < d_inner` (an extra gated-MLP slice) is not supported; the decode conv state holds the last w - 1
inputs and the SSM state is float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix_jax.layers._init import check_dims, conv_init as conv_initializer, dt_bias_init, linear, param, torch_uniform
from seqmix_jax.ops import causal_conv1d, causal_conv1d_update, rms_norm_gated, ssd, ssd_state_update


class Mamba2State(NamedTuple):
    conv: jax.Array  # (b, w - 1, e + 2gn) previous conv inputs, oldest first
    ssm: jax.Array  # (b, h, p, n) float32


class Mamba2Mixer(nnx.Module):
    """Mamba-2 SSD mixer: (b, l, d_model) -> (b, l, d_model).

    Args:
      d_model: model width d.
      d_state: n (128).
      d_conv: short conv width w (4).
      expand: e = expand * d_model (2).
      headdim: p (64); e must be a multiple of it.
      ngroups: g groups of B/C shared by contiguous heads (1); must divide the head count.
      A_init_range: A ~ U(lo, hi), A_log = log A (1, 16).
      D_has_hdim: D per channel (e,) instead of per head (h,).
      rmsnorm: gated RMSNorm with per-group statistics before out_proj (True).
      norm_before_gate: RMSNorm(y) * silu(z) instead of RMSNorm(y * silu(z)) (False).
      norm_eps: epsilon of that norm (1e-5).
      dt_min, dt_max, dt_init_floor: range of the initial time steps (through dt_bias).
      dt_limit: clamp of the time step after softplus ((0, inf): none).
      conv_init: U(-conv_init, conv_init) conv weights instead of PyTorch's default.
      bias, conv_bias: biases of in/out_proj (False) and of the conv (True).
      chunk_size: SSD chunk Q (256).
      impl: backend for the scan.
      dtype, param_dtype: compute and storage dtypes; A_log, D, dt_bias and the scan stay float32.
      rngs: nnx.Rngs (keyword only).
    """

    def __init__(self, d_model: int, *, d_state: int = 128, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, A_init_range: tuple[float, float] = (1.0, 16.0), D_has_hdim: bool = False,
                 rmsnorm: bool = True, norm_before_gate: bool = False, norm_eps: float = 1e-5, dt_min: float = 1e-3,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, dt_limit: tuple[float, float] = (0.0, float("inf")),
                 conv_init: float | None = None, bias: bool = False, conv_bias: bool = True, chunk_size: int = 256,
                 impl: str = "auto", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_dims(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                   ngroups=ngroups, chunk_size=chunk_size)
        e = expand * d_model
        if e % headdim:
            raise ValueError(f"d_inner = expand * d_model = {e} must be a multiple of headdim={headdim}")
        h = e // headdim
        if h % ngroups:
            raise ValueError(f"ngroups={ngroups} must divide the number of heads {h} (= d_inner {e} / headdim {headdim})")
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        self.d_model, self.d_inner, self.d_state, self.d_conv = d_model, e, d_state, d_conv
        self.headdim, self.nheads, self.ngroups = headdim, h, ngroups
        self.rmsnorm, self.norm_before_gate, self.norm_eps = rmsnorm, norm_before_gate, norm_eps
        self.dt_limit, self.chunk_size, self.impl, self.dtype = tuple(dt_limit), chunk_size, impl, dtype
        self.conv_dim = e + 2 * ngroups * d_state
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = linear(d_model, e + self.conv_dim + h, use_bias=bias, names=("embed", "ssm_inner"), **common)
        self.conv_weight = param(conv_initializer(d_conv, conv_init), (d_conv, self.conv_dim),
                                 ("conv_width", "ssm_inner"), param_dtype, rngs)
        self.conv_bias = (param(torch_uniform(d_conv), (self.conv_dim,), ("ssm_inner",), param_dtype, rngs)
                          if conv_bias else None)
        self.dt_bias = param(dt_bias_init(dt_min, dt_max, dt_init_floor), (h,), ("ssm_heads",), jnp.float32, rngs)
        self.A_log = param(lambda k, s, dt: jnp.log(jax.random.uniform(k, s, dt, lo, hi)), (h,), ("ssm_heads",),
                           jnp.float32, rngs)
        self.D_has_hdim = D_has_hdim
        d_shape, d_names = ((e,), ("ssm_inner",)) if D_has_hdim else ((h,), ("ssm_heads",))
        self.D = param(lambda k, s, dt: jnp.ones(s, dt), d_shape, d_names, jnp.float32, rngs)
        self.norm_weight = (param(lambda k, s, dt: jnp.ones(s, dt), (e,), ("ssm_inner",), param_dtype, rngs)
                            if rmsnorm else None)
        self.out_proj = linear(e, d_model, use_bias=bias, names=("ssm_inner", "embed"), **common)

    def __call__(self, x, *, segment_ids=None):
        """x: (b, l, d_model) -> (b, l, d_model); `segment_ids (b, l)` resets conv and scan at segment starts."""
        return self._forward(x, None, segment_ids)[0]

    def prefill(self, x, state: Mamba2State | None = None, *, max_len: int | None = None, last_only: bool = False,
                segment_ids=None):
        """Run a prompt (optionally continuing `state`); returns (y, state after the last token). `max_len` is
        accepted for the mixer contract (the state's size does not depend on it); `last_only`: y (b, 1, d) of the
        last position only (the gated norm and out_proj run on that position alone)."""
        del max_len
        return self._forward(x, state, segment_ids, last_only)

    def init_state(self, batch_size: int, max_len: int | None = None) -> Mamba2State:
        """Zero decode state; its size does not depend on max_len."""
        del max_len
        conv_dtype = self.dtype or self.conv_weight[...].dtype
        return Mamba2State(jnp.zeros((batch_size, self.d_conv - 1, self.conv_dim), conv_dtype),
                           jnp.zeros((batch_size, self.nheads, self.headdim, self.d_state), jnp.float32))

    def step(self, x, state: Mamba2State):
        """One token: x (b, d_model) -> (y (b, d_model), new state)."""
        if x.ndim != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"step expects x of shape (b, d_model={self.d_model}), got {tuple(x.shape)}")
        z, xBC, dt = self._split(self.in_proj(x))
        xBC, conv = causal_conv1d_update(state.conv, xBC, self._cast(self.conv_weight), self._cast(self.conv_bias),
                                         activation="silu")
        xs, B, C = self._split_xBC(xBC)
        y, ssm = ssd_state_update(state.ssm, xs, dt, self._A(), B, C, D=self._D(),
                                  z=None if self.rmsnorm else z.reshape(xs.shape), dt_bias=self.dt_bias[...],
                                  dt_limit=self.dt_limit)
        return self._out(y.reshape(z.shape), z), Mamba2State(conv, ssm)

    # --- internals
    def _forward(self, x, state, segment_ids, last_only=False):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (b, l, d_model={self.d_model}), got {tuple(x.shape)}")
        z, xBC, dt = self._split(self.in_proj(x))
        xBC, conv = causal_conv1d(xBC, self._cast(self.conv_weight), self._cast(self.conv_bias), activation="silu",
                                  segment_ids=segment_ids, initial_state=None if state is None else state.conv,
                                  return_final_state=True)
        xs, B, C = self._split_xBC(xBC)
        y, ssm = ssd(xs, dt, self._A(), B, C, chunk_size=self.chunk_size, D=self._D(),
                     z=None if self.rmsnorm else z.reshape(xs.shape), dt_bias=self.dt_bias[...],
                     dt_limit=self.dt_limit, initial_state=None if state is None else state.ssm,
                     return_final_state=True, segment_ids=segment_ids, impl=self.impl)
        y = y.reshape(z.shape)
        if last_only:
            y, z = y[:, -1:], z[:, -1:]
        return self._out(y, z), Mamba2State(conv, ssm)

    def _split(self, zxbcdt):
        e, c = self.d_inner, self.conv_dim
        return zxbcdt[..., :e], zxbcdt[..., e:e + c], zxbcdt[..., e + c:]

    def _split_xBC(self, xBC):
        e, gn = self.d_inner, self.ngroups * self.d_state
        lead = xBC.shape[:-1]
        xs = xBC[..., :e].reshape(*lead, self.nheads, self.headdim)
        B = xBC[..., e:e + gn].reshape(*lead, self.ngroups, self.d_state)
        C = xBC[..., e + gn:].reshape(*lead, self.ngroups, self.d_state)
        return xs, B, C

    def _out(self, y, z):
        if self.rmsnorm:
            y = rms_norm_gated(y, self.norm_weight[...], z, eps=self.norm_eps,
                               group_size=self.d_inner // self.ngroups, norm_before_gate=self.norm_before_gate)
        return self.out_proj(y)

    def _A(self):
        return -jnp.exp(self.A_log[...].astype(jnp.float32))

    def _D(self):
        return self.D[...].reshape(self.nheads, self.headdim) if self.D_has_hdim else self.D[...]

    def _cast(self, p):
        if p is None:
            return None
        return p[...] if self.dtype is None else p[...].astype(self.dtype)
