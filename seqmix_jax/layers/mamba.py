"""Mamba-1 mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

Axis letters: b batch, l sequence, d d_model, e d_inner = expand * d_model, n d_state, w d_conv, r dt_rank.

Same function and parameters as mamba_ssm `modules/mamba_simple.Mamba` and transformers `MambaMixer`:

    [x ; z] = in_proj(u)                      x, z: (b, l, e)
    x       = silu(causal_conv1d(x))          cross-correlation taps, last tap on the current token
    [dt ; B ; C] = x_proj(x)                  sizes (r, n, n)
    dt, B, C = rms(dt), rms(B), rms(C)        only with bcdt_rms_norm (Jamba): RMSNorms with their own scales
    dt      = dt_proj.kernel^T dt             the bias is added in float32 inside the scan, as mamba_ssm does
    y       = selective_scan(x, dt, -exp(A_log), B, C, D, z=z, dt_bias=dt_proj.bias)
    out     = out_proj(y)

With `bcdt_rms_norm=True` this is transformers' `JambaMambaMixer` (Jamba, Lieber et al. 2024): RMSNorms
(eps inside the sqrt, float32 statistics) over the last axis of dt (r), B (n) and C (n) right after x_proj, with
learned scales `dt_layernorm.scale` (r,), `b_layernorm.scale` (n,), `c_layernorm.scale` (n,) (transformers'
`dt_layernorm.weight`, `b_layernorm.weight`, `c_layernorm.weight`). The decode step applies the same norms.

Differences from the official code: the decode conv state holds the last w - 1 inputs (mamba_ssm keeps w,
including the current one), and the decode SSM state is float32 whatever `dtype` is (mamba_ssm caches it
in the model dtype); both make step == forward exact up to float32 rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix_jax.layers._init import check_dims, conv_init, dt_bias_init, linear, param, torch_uniform
from seqmix_jax.layers.norms import RMSNorm
from seqmix_jax.ops import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update


class MambaState(NamedTuple):
    conv: jax.Array  # (b, w - 1, e) previous conv inputs, oldest first
    ssm: jax.Array  # (b, e, n) float32


class MambaMixer(nnx.Module):
    """Mamba-1 selective-SSM mixer: (b, l, d_model) -> (b, l, d_model).

    Args:
      d_model: model width d.
      d_state: SSM state size n (16).
      d_conv: short conv width w (4).
      expand: e = expand * d_model (2).
      dt_rank: r, or "auto" = ceil(d_model / 16).
      dt_min, dt_max, dt_init_floor: range of the initial time steps (through the dt_proj bias).
      dt_init: "random" (U(-s, s) dt_proj kernel) or "constant" (= s), s = dt_scale / sqrt(r).
      dt_scale: scale of the dt_proj kernel init.
      conv_bias: bias on the short conv (True).
      bias: biases on in_proj / out_proj (False, as the released checkpoints).
      bcdt_rms_norm: RMSNorms on dt, B and C after x_proj (Jamba's mixer; False).
      bcdt_norm_eps: epsilon of those norms (Jamba: the model's rms_norm_eps, 1e-6).
      impl: backend for the scan (see `seqmix_jax.ops.dispatch`).
      chunk_size: steps per chunk of the xla scan.
      dtype: compute dtype (None: from inputs and params). The scan always runs in float32.
      param_dtype: storage dtype of the projections and conv; A_log, D and the dt bias stay float32.
      rngs: nnx.Rngs (keyword only).
    """

    def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 bcdt_rms_norm: bool = False, bcdt_norm_eps: float = 1e-6, impl: str = "auto", chunk_size: int = 32,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        check_dims(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank)
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        if not isinstance(bcdt_rms_norm, bool):
            raise ValueError(f"bcdt_rms_norm must be a bool, got {bcdt_rms_norm!r}")
        self.d_model, self.d_state, self.d_conv, self.dt_rank = d_model, d_state, d_conv, dt_rank
        self.d_inner = e = expand * d_model
        self.impl, self.chunk_size, self.dtype = impl, chunk_size, dtype
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = linear(d_model, 2 * e, use_bias=bias, names=("embed", "ssm_inner"), **common)
        self.conv_weight = param(conv_init(d_conv), (d_conv, e), ("conv_width", "ssm_inner"), param_dtype, rngs)
        self.conv_bias = (param(torch_uniform(d_conv), (e,), ("ssm_inner",), param_dtype, rngs)
                          if conv_bias else None)
        self.x_proj = linear(e, dt_rank + 2 * d_state, use_bias=False, names=("ssm_inner", None), **common)
        s = dt_scale / math.sqrt(dt_rank)
        dt_kernel_init = ((lambda k, shape, dt=jnp.float32: jnp.full(shape, s, dt)) if dt_init == "constant"
                          else (lambda k, shape, dt=jnp.float32: jax.random.uniform(k, shape, dt, -s, s)))
        self.dt_proj = linear(dt_rank, e, use_bias=False, names=("dt_rank", "ssm_inner"),
                              kernel_init=dt_kernel_init, **common)
        # The scan adds this bias in float32 (mamba_ssm's delta_bias), so it is kept apart from dt_proj.
        self.dt_bias = param(dt_bias_init(dt_min, dt_max, dt_init_floor), (e,), ("ssm_inner",), jnp.float32, rngs)
        # S4D-real init: A = -(1, 2, ..., n) for every channel.
        a_log = jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (e, d_state)))
        self.A_log = param(lambda k, shape, dt: a_log, (e, d_state), ("ssm_inner", "ssm_state"), jnp.float32, rngs)
        self.D = param(lambda k, shape, dt: jnp.ones(shape, dt), (e,), ("ssm_inner",), jnp.float32, rngs)
        self.out_proj = linear(e, d_model, use_bias=bias, names=("ssm_inner", "embed"), **common)
        self.bcdt_rms_norm = bcdt_rms_norm
        if bcdt_rms_norm:  # Jamba: norms on the selective parameters keep dt, B and C at unit scale
            norm = dict(eps=bcdt_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.dt_layernorm = RMSNorm(dt_rank, axis_name="dt_rank", **norm)
            self.b_layernorm = RMSNorm(d_state, axis_name="ssm_state", **norm)
            self.c_layernorm = RMSNorm(d_state, axis_name="ssm_state", **norm)
            self.bcdt_norm_eps = self.dt_layernorm.eps
        else:
            self.dt_layernorm = self.b_layernorm = self.c_layernorm = None
            self.bcdt_norm_eps = None

    def __call__(self, x, *, segment_ids=None):
        """x: (b, l, d_model) -> (b, l, d_model); `segment_ids (b, l)` resets conv and scan at segment starts."""
        return self._forward(x, None, segment_ids)[0]

    def prefill(self, x, state: MambaState | None = None, *, max_len: int | None = None, last_only: bool = False,
                segment_ids=None):
        """Run a prompt (optionally continuing `state`); returns (y, state after the last token). `max_len` is
        accepted for the mixer contract (the state's size does not depend on it); `last_only`: y (b, 1, d) of the
        last position only (out_proj runs on that position alone)."""
        del max_len
        return self._forward(x, state, segment_ids, last_only)

    def init_state(self, batch_size: int, max_len: int | None = None) -> MambaState:
        """Zero decode state; its size does not depend on max_len."""
        del max_len
        conv_dtype = self.dtype or self.conv_weight[...].dtype
        return MambaState(jnp.zeros((batch_size, self.d_conv - 1, self.d_inner), conv_dtype),
                          jnp.zeros((batch_size, self.d_inner, self.d_state), jnp.float32))

    def step(self, x, state: MambaState):
        """One token: x (b, d_model) -> (y (b, d_model), new state)."""
        if x.ndim != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"step expects x of shape (b, d_model={self.d_model}), got {tuple(x.shape)}")
        xi, z = jnp.split(self.in_proj(x), 2, axis=-1)
        xi, conv = causal_conv1d_update(state.conv, xi, self._conv_w(), self._conv_b(), activation="silu")
        dt, B, C = self._dt_B_C(xi)
        y, ssm = selective_state_update(state.ssm, xi, dt, self._A(), B, C, self.D[...], z=z,
                                        dt_bias=self.dt_bias[...])
        return self.out_proj(y), MambaState(conv, ssm)

    # --- internals
    def _forward(self, x, state, segment_ids, last_only=False):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (b, l, d_model={self.d_model}), got {tuple(x.shape)}")
        xi, z = jnp.split(self.in_proj(x), 2, axis=-1)
        xi, conv = causal_conv1d(xi, self._conv_w(), self._conv_b(), activation="silu", segment_ids=segment_ids,
                                 initial_state=None if state is None else state.conv, return_final_state=True)
        dt, B, C = self._dt_B_C(xi)
        y, ssm = selective_scan(xi, dt, self._A(), B, C, self.D[...], z=z, dt_bias=self.dt_bias[...],
                                initial_state=None if state is None else state.ssm, return_final_state=True,
                                segment_ids=segment_ids, impl=self.impl, chunk_size=self.chunk_size)
        return self.out_proj(y[:, -1:] if last_only else y), MambaState(conv, ssm)

    def _dt_B_C(self, xi):
        dbc = self.x_proj(xi)
        r, n = self.dt_rank, self.d_state
        dt, B, C = dbc[..., :r], dbc[..., r:r + n], dbc[..., r + n:]
        if self.bcdt_rms_norm:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        return self.dt_proj(dt), B, C

    def _A(self):
        return -jnp.exp(self.A_log[...].astype(jnp.float32))

    def _conv_w(self):
        return self.conv_weight[...] if self.dtype is None else self.conv_weight[...].astype(self.dtype)

    def _conv_b(self):
        if self.conv_bias is None:
            return None
        return self.conv_bias[...] if self.dtype is None else self.conv_bias[...].astype(self.dtype)
