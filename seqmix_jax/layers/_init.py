"""Parameter helpers shared by the layers: PyTorch-default initializers, logical axis names, the dt init."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def axes(*names: str | None) -> dict:
    """Variable metadata carrying logical axis names (`embed`, `ssm_inner`, ...), mapped to mesh axes by the
    trainer's rules table. Not applied eagerly: a layer builds without a mesh."""
    return {"out_sharding": tuple(names), "eager_sharding": False}


def torch_uniform(fan_in: int):
    """PyTorch's default Linear/Conv init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Linear(nnx.Linear):
    """nnx.Linear that multiplies a 2-D (rows, d_in) view of its input: the same parameters and result, but XLA:CPU
    ran the backward of (b, l, d) @ (d, f) about 2x faster as one (b l, d) @ (d, f) matmul (measured on the 2-core
    CI machine, b 8, l 512, d 256, f 688)."""

    def __call__(self, inputs, *args, **kwargs):
        if inputs.ndim <= 2:
            return super().__call__(inputs, *args, **kwargs)
        lead = inputs.shape[:-1]
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]), *args, **kwargs)
        return y.reshape(*lead, y.shape[-1])


# Rows (product of the leading axes) up to which `shared_input_linears` runs one matmul on the CPU: a decode step's
# handful of tokens. Training and prefill keep one matmul per layer, so kernels sharded by the trainer are never
# concatenated.
FUSE_MAX_ROWS = 64


def shared_input_linears(layers, x):
    """[layer(x) for layer in layers] for Linears that read the same input (q/k/v, gate/up). On the CPU backend, with
    at most FUSE_MAX_ROWS rows and layers that agree on dtypes, precision and bias, it is one matmul over the kernels
    concatenated on the output axis, split afterwards: the same parameters and per-element products (summation
    order may differ in the last bit). XLA:CPU runs a decode step's several small (rows, d) @ (d, f) products
    measurably slower than one (tiny Llama, b = 1: ~15-25% of the whole generate time, bench_generate.py). Other
    backends keep separate matmuls: there it has not been measured, and a concatenation that XLA failed to hoist
    out of a decode loop would copy the kernels every token."""
    first = layers[0]
    rows = math.prod(x.shape[:-1])
    if jax.default_backend() != "cpu":
        return [m(x) for m in layers]
    same = all(type(m) is Linear and m.dtype == first.dtype and m.param_dtype == first.param_dtype
               and m.precision == first.precision and m.dot_general is first.dot_general
               and m.promote_dtype is first.promote_dtype and m.preferred_element_type == first.preferred_element_type
               and (m.bias is None) == (first.bias is None) and m.in_features == first.in_features for m in layers)
    if len(layers) == 1 or rows > FUSE_MAX_ROWS or not same:
        return [m(x) for m in layers]
    kernel = jnp.concatenate([m.kernel[...] for m in layers], axis=1)
    bias = None if first.bias is None else jnp.concatenate([m.bias[...] for m in layers])
    lead = x.shape[:-1]
    inputs, kernel, bias = first.promote_dtype((x.reshape(rows, x.shape[-1]), kernel, bias), dtype=first.dtype)
    kw = {} if first.preferred_element_type is None else {"preferred_element_type": first.preferred_element_type}
    y = first.dot_general(inputs, kernel, (((1,), (0,)), ((), ())), precision=first.precision, **kw)
    if bias is not None:
        y = y + bias
    ends = np.cumsum([m.out_features for m in layers])[:-1]
    return [part.reshape(*lead, part.shape[-1]) for part in jnp.split(y, ends, axis=-1)]


def linear(d_in: int, d_out: int, *, use_bias: bool, names: tuple[str | None, str | None], dtype, param_dtype,
           rngs: nnx.Rngs, kernel_init=None) -> nnx.Linear:
    """Linear (2-D matmul view) with PyTorch's default init (the reference modules keep it) and logical axis
    names."""
    return Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=kernel_init or torch_uniform(d_in), bias_init=torch_uniform(d_in),
                      kernel_metadata=axes(*names), bias_metadata=axes(names[1]), rngs=rngs)


def param(init, shape: tuple[int, ...], names: tuple[str | None, ...], dtype, rngs: nnx.Rngs) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), **axes(*names))


def dt_bias_init(dt_min: float, dt_max: float, dt_init_floor: float):
    """dt ~ exp(U(log dt_min, log dt_max)) clamped >= floor, stored through the inverse softplus so that
    softplus(bias) = dt at init: the time steps start spread over [dt_min, dt_max] (Mamba §3.6)."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, dt_init_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus, stable for small dt

    return init


def conv_init(width: int, conv_init_range: float | None = None):
    """Depthwise Conv1d default init (fan_in = width), or U(-r, r) when the reference's `conv_init` is set."""
    if conv_init_range is None:
        return torch_uniform(width)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -conv_init_range, conv_init_range)

    return init


def check_dims(**named: int) -> None:
    for name, v in named.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
