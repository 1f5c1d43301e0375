"""MambaMixer / Mamba2Mixer contracts: decode == forward, packed == per-segment, causality, dtypes, Linen interop,
initialization, and the documented errors. Parity with PyTorch lives in tests/parity/."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from seqmix_jax.layers import Mamba2Mixer, MambaMixer
from tests.helpers import Jitted, assert_close, check_mixer_input_errors

D_MODEL = 24


def make(kind: str, impl: str = "xla", **kw):
    rngs = nnx.Rngs(3)
    if kind == "mamba":
        return MambaMixer(D_MODEL, d_state=7, dt_rank=3, impl=impl, chunk_size=8, rngs=rngs, **kw)
    return Mamba2Mixer(D_MODEL, d_state=7, headdim=8, ngroups=2, chunk_size=8, impl=impl, rngs=rngs, **kw)


KINDS = ["mamba", "mamba2"]


@pytest.mark.parametrize("kind", KINDS)
def test_step_by_step_equals_forward(kind, key):
    m = Jitted(make(kind))
    x = jax.random.normal(key, (2, 29, D_MODEL))
    y = m(x)
    state = m.init_state(2)
    outs = []
    for t in range(x.shape[1]):
        yt, state = m.step(x[:, t], state)
        outs.append(yt)
    assert_close(f"{kind} step vs forward", jnp.stack(outs, 1), y, 1e-5)
    _, prefill_state = m.prefill(x)
    for name, a, b in zip(state._fields, state, prefill_state):
        assert_close(f"{kind} step state {name} vs prefill", a, b, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_decode_equals_forward(kind, key):
    m = Jitted(make(kind))
    x = jax.random.normal(key, (2, 23, D_MODEL))
    y = m(x)
    y0, state = m.prefill(x[:, :13])
    outs = [y0]
    for t in range(13, 23):
        yt, state = m.step(x[:, t], state)
        outs.append(yt[:, None])
    assert_close(f"{kind} prefill+step", jnp.concatenate(outs, 1), y, 1e-5)
    # A prefill that continues a state equals one long prefill.
    _, s1 = m.prefill(x[:, :13])
    y2, s2 = m.prefill(x[:, 13:], s1)
    assert_close(f"{kind} chained prefill", jnp.concatenate([y0, y2], 1), y, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_sequences_equal_separate_runs(kind, key):
    m = Jitted(make(kind))
    lens = [5, 11, 3, 9]
    x = jax.random.normal(key, (1, sum(lens), D_MODEL))
    seg = jnp.asarray(np.repeat(np.arange(len(lens)), lens)[None])
    y = m(x, segment_ids=seg)
    start = 0
    for i, n in enumerate(lens):
        ys = m(x[:, start:start + n])
        assert_close(f"{kind} segment {i}", y[:, start:start + n], ys, 1e-5)
        start += n
    # The state after a packed prefill is the last segment's own state.
    _, packed_state = m.prefill(x, segment_ids=seg)
    _, own_state = m.prefill(x[:, -lens[-1]:])
    for name, a, b in zip(packed_state._fields, packed_state, own_state):
        assert_close(f"{kind} packed final state {name}", a, b, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_causal_by_gradient(kind, key):
    m = make(kind)
    x = jax.random.normal(key, (1, 17, D_MODEL))
    t = 8
    grad = jax.grad(lambda x: m(x)[0, t].sum())(x)
    assert float(jnp.abs(grad[0, t + 1:]).max()) == 0.0
    assert float(jnp.abs(grad[0, : t + 1]).max()) > 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_paths_agree(kind, key):
    x = jax.random.normal(key, (2, 19, D_MODEL))
    ref = make(kind, impl="reference")(x)
    for impl in ("associative", "xla", "auto"):
        assert_close(f"{kind} {impl} vs reference", make(kind, impl=impl)(x), ref, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_compute_keeps_float32_ssm_params_and_state(kind, key):
    m = make(kind, dtype=jnp.bfloat16)
    x = jax.random.normal(key, (2, 11, D_MODEL)).astype(jnp.bfloat16)
    y, state = m.prefill(x)
    assert y.dtype == jnp.bfloat16
    assert state.ssm.dtype == jnp.float32
    for name in ("A_log", "D", "dt_bias"):
        assert getattr(m, name)[...].dtype == jnp.float32
    y32 = make(kind)(x.astype(jnp.float32))
    err = float(jnp.abs(y.astype(jnp.float32) - y32).max() / jnp.abs(y32).max())
    print(f"{kind} bf16 vs fp32 max rel err {err:.3e}")
    assert err < 5e-2


def test_mamba_initialization_matches_reference_recipe():
    m = MambaMixer(32, d_state=5, dt_min=1e-3, dt_max=0.1, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(-np.exp(np.asarray(m.A_log[...])), -np.tile(np.arange(1, 6), (64, 1)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m.D[...]), 1.0)
    dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
    assert 1e-3 * (1 - 1e-5) <= dt.min() and dt.max() <= 0.1 * (1 + 1e-5), (dt.min(), dt.max())
    assert m.dt_rank == 2 and m.dt_proj.kernel[...].shape == (2, 64)
    s = 1 / np.sqrt(2)
    assert np.abs(np.asarray(m.dt_proj.kernel[...])).max() <= s


def test_mamba2_initialization_matches_reference_recipe():
    m = Mamba2Mixer(64, d_state=16, headdim=16, rngs=nnx.Rngs(0))
    A = np.exp(np.asarray(m.A_log[...]))
    assert m.nheads == 8 and A.shape == (8,) and (A >= 1).all() and (A <= 16).all()
    dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 0.1 * (1 + 1e-5)).all()
    assert m.in_proj.kernel[...].shape == (64, 2 * 128 + 2 * 16 + 8)
    np.testing.assert_array_equal(np.asarray(m.norm_weight[...]), 1.0)


def test_parameters_carry_logical_axis_names():
    specs = nnx.get_partition_spec(nnx.state(make("mamba2"), nnx.Param))
    assert tuple(specs["in_proj"]["kernel"].get_value()) == ("embed", "ssm_inner")
    assert tuple(specs["A_log"].get_value()) == ("ssm_heads",)


@pytest.mark.parametrize("kind", KINDS)
def test_inside_a_linen_module_via_bridge(kind, key):
    """A Linen model that embeds the nnx mixer through flax.nnx.bridge gives the mixer's own output."""
    cls, kw = ((MambaMixer, dict(d_state=7, dt_rank=3)) if kind == "mamba"
               else (Mamba2Mixer, dict(d_state=7, headdim=8, ngroups=2, chunk_size=8)))

    class LinenBlock(linen.Module):
        @linen.compact
        def __call__(self, x):
            mixer = nnx.bridge.to_linen(cls, D_MODEL, **kw)
            return x + mixer(linen.LayerNorm()(x))

    x = jax.random.normal(key, (2, 13, D_MODEL))
    block = LinenBlock()
    variables = block.init(jax.random.PRNGKey(0), x)
    y = block.apply(variables, x)
    assert y.shape == x.shape and bool(jnp.isfinite(y).all())
    # The mixer's parameters live in the Linen variables and receive gradients.
    grads = jax.grad(lambda v: block.apply(v, x).sum())(variables)
    a_log = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if "A_log" in jax.tree_util.keystr(path)]
    assert len(a_log) == 1 and float(jnp.abs(a_log[0]).max()) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_shapes_raise(kind):
    m = make(kind)
    check_mixer_input_errors(m, 24)


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match=r"headdim=7"):
        Mamba2Mixer(24, headdim=7, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"ngroups=4 must divide the number of heads 6"):
        Mamba2Mixer(24, headdim=8, ngroups=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_state must be a positive int"):
        MambaMixer(24, d_state=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dt_init must be"):
        MambaMixer(24, dt_init="uniform", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dt_min"):
        MambaMixer(24, dt_min=0.5, dt_max=0.1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="A_init_range"):
        Mamba2Mixer(24, headdim=8, A_init_range=(0.0, 16.0), rngs=nnx.Rngs(0))
