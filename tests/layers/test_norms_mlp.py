"""RMSNorm (both epsilon placements), LayerNorm and GatedMLP against numpy float64 definitions; dtypes, logical
axes and the documented errors. Parity with transformers' Llama modules lives in tests/parity/."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix_jax.layers.mlp import GatedMLP, mlp_hidden_size
from seqmix_jax.layers.norms import LayerNorm, RMSNorm
from tests.helpers import assert_close

D = 13


def _randomize(module, rng):
    """Replace every parameter by a random one so a ones/zeros init cannot hide a missing term."""
    for path, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            var[...] = jnp.asarray(rng.standard_normal(var[...].shape), var[...].dtype)
    return module


@pytest.mark.parametrize("inside", [True, False])
def test_rms_norm_matches_numpy(inside, rng):
    x = rng.standard_normal((3, 7, D)) * 2.5
    m = _randomize(RMSNorm(D, eps=0.1, eps_inside_sqrt=inside, rngs=nnx.Rngs(0)), rng)
    w = np.asarray(m.scale[...], np.float64)
    if inside:
        ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 0.1) * w
    else:  # StripedHyena's non-flash RMSNorm: eps added to the RMS itself
        ref = w * x / (np.linalg.norm(x, axis=-1, keepdims=True) / math.sqrt(D) + 0.1)
    assert_close(f"RMSNorm eps_inside_sqrt={inside}", m(jnp.asarray(x, jnp.float32)), ref, 1e-6)


def test_layer_norm_matches_numpy(rng):
    x = rng.standard_normal((4, D)) * 3 + 1.5
    m = _randomize(LayerNorm(D, eps=0.05, rngs=nnx.Rngs(0)), rng)
    w, b = np.asarray(m.scale[...], np.float64), np.asarray(m.bias[...], np.float64)
    mu = x.mean(-1, keepdims=True)
    ref = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 0.05) * w + b
    assert_close("LayerNorm", m(jnp.asarray(x, jnp.float32)), ref, 1e-6)
    no_bias = LayerNorm(D, use_bias=False, rngs=nnx.Rngs(0))
    assert no_bias.bias is None
    assert_close("LayerNorm no bias", no_bias(jnp.asarray(x, jnp.float32)),
                 (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5), 1e-6)


def test_norm_dtypes_and_init():
    x = jnp.linspace(-3, 3, 2 * D).reshape(2, D).astype(jnp.bfloat16)
    for cls in (RMSNorm, LayerNorm):
        m = cls(D, rngs=nnx.Rngs(0))
        assert m.scale[...].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(m.scale[...]), 1.0)
        assert m(x).dtype == jnp.bfloat16  # follows the input when dtype is None
        assert cls(D, dtype=jnp.float32, rngs=nnx.Rngs(0))(x).dtype == jnp.float32
        assert cls(D, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)).scale[...].dtype == jnp.bfloat16


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_gated_mlp_matches_numpy(activation, rng):
    f = 19
    m = GatedMLP(D, f, activation=activation, use_bias=True, rngs=nnx.Rngs(1))
    x = rng.standard_normal((2, 5, D))
    p = {n: (np.asarray(getattr(m, n).kernel[...], np.float64), np.asarray(getattr(m, n).bias[...], np.float64))
         for n in ("gate", "up", "down")}
    g = x @ p["gate"][0] + p["gate"][1]
    u = x @ p["up"][0] + p["up"][1]
    erf = np.vectorize(math.erf)
    act = {"silu": lambda z: z / (1 + np.exp(-z)),
           "gelu": lambda z: 0.5 * z * (1 + erf(z / math.sqrt(2))),
           "gelu_tanh": lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))}[activation]
    ref = (act(g) * u) @ p["down"][0] + p["down"][1]
    assert_close(f"GatedMLP {activation}", m(jnp.asarray(x, jnp.float32)), ref, 1e-5)


def test_gated_mlp_shapes_axes_and_dtype():
    m = GatedMLP(D, 24, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert m.gate.bias is None and m.gate.kernel[...].shape == (D, 24) and m.down.kernel[...].shape == (24, D)
    assert m.gate.kernel[...].dtype == jnp.float32
    assert m(jnp.ones((3, D), jnp.bfloat16)).dtype == jnp.bfloat16
    specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
    assert tuple(specs["gate"]["kernel"].get_value()) == ("embed", "mlp")
    assert tuple(specs["up"]["kernel"].get_value()) == ("embed", "mlp")
    assert tuple(specs["down"]["kernel"].get_value()) == ("mlp", "embed")
    specs = nnx.get_partition_spec(nnx.state(RMSNorm(D, rngs=nnx.Rngs(0)), nnx.Param))
    assert tuple(specs["scale"].get_value()) == ("embed",)


def test_mlp_hidden_size_rule():
    assert mlp_hidden_size(4096, 16) == 10928  # Evo 1: int(10922.67) = 10922 rounded up to 16
    assert mlp_hidden_size(4096) == 10944  # multiple of 64
    assert mlp_hidden_size(96, 64) == 256  # int(256.0) is already a multiple
    assert mlp_hidden_size(4096, 64, hidden=14336) == 14336  # SH-7B's explicit inner_mlp_size


def test_errors():
    with pytest.raises(ValueError, match="d must be a positive int"):
        RMSNorm(0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        RMSNorm(D, eps=-1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d must be a positive int"):
        LayerNorm(-2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"RMSNorm expects x of shape \(\.\.\., d=13\)"):
        RMSNorm(D, rngs=nnx.Rngs(0))(jnp.ones((2, 12)))
    with pytest.raises(ValueError, match=r"LayerNorm expects x of shape \(\.\.\., d=13\)"):
        LayerNorm(D, rngs=nnx.Rngs(0))(jnp.ones((2, 12)))
    with pytest.raises(ValueError, match="activation must be one of"):
        GatedMLP(D, 8, activation="relu", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        GatedMLP(D, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        GatedMLP(-1, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"GatedMLP expects x of shape \(\.\.\., d_model=13\)"):
        GatedMLP(D, 8, rngs=nnx.Rngs(0))(jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="multiple_of must be a positive int"):
        mlp_hidden_size(64, 0)
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        mlp_hidden_size(64, hidden=-3)


@pytest.mark.parametrize("use_bias,dtype", [(False, None), (True, None), (True, jnp.bfloat16)])
def test_shared_input_linears_one_matmul_equals_separate(use_bias, dtype):
    """Few rows (a decode step): one matmul over the concatenated kernels, split; many rows: one per layer. Both
    equal the layers called one by one."""
    from seqmix_jax.layers._init import FUSE_MAX_ROWS, linear, shared_input_linears

    rngs = nnx.Rngs(0)
    common = dict(use_bias=use_bias, names=("embed", "mlp"), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    layers = (linear(24, 40, **common), linear(24, 8, **common), linear(24, 16, **common))
    tol = 1e-6 if dtype is None else 1e-2
    for shape in [(3, 24), (2, 1, 24), (FUSE_MAX_ROWS + 1, 24)]:
        x = jax.random.normal(jax.random.key(1), shape)
        outs = jax.jit(lambda x: shared_input_linears(layers, x))(x)
        for i, (out, layer) in enumerate(zip(outs, layers)):
            ref = layer(x)
            assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
            assert_close(f"layer {i} x{shape} bias={use_bias} dtype={dtype}", out.astype(jnp.float32),
                         ref.astype(jnp.float32), tol)
    # how many matmuls run: one for few rows on the CPU; one per layer for many rows, or on other backends
    dots = lambda x: str(jax.make_jaxpr(lambda x: shared_input_linears(layers, x))(x)).count("dot_general")
    assert dots(jnp.ones((3, 24))) == 1 and dots(jnp.ones((FUSE_MAX_ROWS + 1, 24))) == 3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax, "default_backend", lambda: "gpu")
        assert dots(jnp.ones((3, 24))) == 3
    # layers that disagree (here on dtype) are called one by one
    mixed = (layers[0], linear(24, 8, use_bias=use_bias, names=("embed", "mlp"), dtype=jnp.bfloat16,
                               param_dtype=jnp.float32, rngs=rngs))
    outs = shared_input_linears(mixed, jnp.ones((2, 24)))
    assert [o.dtype for o in outs] == [m(jnp.ones((2, 24))).dtype for m in mixed]
