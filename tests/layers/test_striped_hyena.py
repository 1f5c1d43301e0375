"""StripedHyenaMixer contracts: decode == forward, chunked prefill == forward, packed == per-segment, causality (full
Jacobian), paths agree, bf16 compute with float32 poles/residues, the channel split, init, logical axes, Linen
interop and the documented errors. Parity with stripedhyena lives in tests/parity/test_striped_hyena_parity.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from seqmix_jax.layers.striped_hyena import StripedHyenaMixer, StripedHyenaState
from tests.helpers import assert_close, check_mixer_input_errors

D_MODEL, HEADS, N = 24, 4, 3


def make(impl: str = "xla", seed: int = 3, **kw):
    """A mixer with a non-zero D (it is zero at init, which would hide the skip path)."""
    m = StripedHyenaMixer(D_MODEL, HEADS, state_size=N, impl=impl, chunk_size=8, rngs=nnx.Rngs(seed), **kw)
    m.D[...] = jax.random.normal(jax.random.PRNGKey(seed + 100), (D_MODEL,))
    return m


def jitted(m, method: str = "__call__"):
    """m.<method> under jax.jit (nnx.split -> jit -> merge): compiled once instead of dispatched op by op."""
    graphdef, params = nnx.split(m)

    @jax.jit
    def run(params, *args, **kw):
        return getattr(nnx.merge(graphdef, params), method)(*args, **kw)

    return functools.partial(run, params)


def decode(m, x, state):
    step, outs = jitted(m, "step"), []
    for t in range(x.shape[1]):
        yt, state = step(x[:, t], state)
        outs.append(yt)
    return jnp.stack(outs, 1), state


def assert_states_close(name, a, b, tol):
    assert_close(f"{name} fir", a.fir, b.fir, tol)
    assert_close(f"{name} modal", np.asarray(a.modal).view(np.float32), np.asarray(b.modal).view(np.float32), tol)


@pytest.mark.parametrize("filter_init", ["decay", pytest.param("stripedhyena", marks=pytest.mark.slow)])
def test_step_by_step_equals_forward(key, filter_init):
    m = make(filter_init=filter_init)
    x = jax.random.normal(key, (2, 29, D_MODEL))
    y = jitted(m)(x)
    y_dec, state = decode(m, x, m.init_state(2))
    assert_close(f"{filter_init} step vs forward", y_dec, y, 1e-5)
    _, prefill_state = jitted(m, "prefill")(x)
    assert isinstance(state, StripedHyenaState) and isinstance(prefill_state, StripedHyenaState)
    assert_states_close(f"{filter_init} step state vs prefill", state, prefill_state, 1e-5)


def test_prefill_chunks_then_decode_equal_forward(key):
    m = make()
    x = jax.random.normal(key, (2, 31, D_MODEL))
    y = jitted(m)(x)
    prefill = jitted(m, "prefill")
    y0, s0 = prefill(x[:, :13])  # FFT forward + modal prefill
    y1, s1 = prefill(x[:, 13:22], s0)  # continues a state: the modal scan form
    y2, s2 = decode(m, x[:, 22:], s1)
    assert_close("prefill + prefill + step", jnp.concatenate([y0, y1, y2], 1), y, 1e-5)
    _, s_full = prefill(x)
    assert_states_close("chained state vs one prefill", s2, s_full, 1e-5)
    # Continuing a zero state is the same as starting fresh.
    y_zero, s_zero = prefill(x[:, :13], m.init_state(2))
    assert_close("prefill from init_state", y_zero, y0, 1e-5)
    assert_states_close("prefill from init_state", s_zero, s0, 1e-5)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_packed_sequences_equal_separate_runs(key, impl):
    m = make(impl)
    lens = [5, 11, 1, 9, 4]
    x = jax.random.normal(key, (2, sum(lens), D_MODEL))
    seg = jnp.asarray(np.tile(np.repeat(np.arange(len(lens)), lens), (2, 1)))
    call, prefill = jitted(m), jitted(m, "prefill")
    y, packed_state = prefill(x, segment_ids=seg)
    assert_close(f"{impl} packed __call__ vs prefill", call(x, segment_ids=seg), y, 1e-6)
    start = 0
    for i, n in enumerate(lens):
        assert_close(f"{impl} segment {i}", y[:, start:start + n], call(x[:, start:start + n]), 1e-5)
        start += n
    _, own_state = prefill(x[:, -lens[-1]:])
    assert_states_close(f"{impl} packed final state", packed_state, own_state, 1e-5)


@pytest.mark.parametrize("impl,segmented", [("reference", False), ("xla", True), ("xla", False)],
                         ids=["recurrence", "chunked_scan", "fft"])
def test_causal_by_full_jacobian(key, impl, segmented):
    """d y[t] / d x[s > t] is exactly 0 for the recurrent paths. The FFT convolution mixes every position in its
    float32 round-off, so there the future's share is only bounded (observed ~1e-10 of the past's)."""
    m = make(impl)
    l = 17
    x = jax.random.normal(key, (1, l, D_MODEL))
    seg = jnp.zeros((1, l), jnp.int32) if segmented else None  # one segment: forces the modal scan form
    jac = jax.jit(jax.jacrev(lambda x: m(x, segment_ids=seg)[0]))(x)[:, :, 0]  # (t, c, s, c')
    per_pair = jnp.abs(jac).max(axis=(1, 3))  # (t, s)
    future = np.triu(np.ones((l, l), bool), k=1)
    past = float(per_pair[~future].min())
    assert past > 0.0  # every past position reaches every later output (long filter)
    leak = float(per_pair[future].max())
    print(f"{impl} segmented={segmented}: max |dy[t]/dx[s>t]| {leak:.3e}, min past {past:.3e}")
    if impl == "xla" and not segmented:
        assert leak <= 1e-6 * float(per_pair.max())
    else:
        assert leak == 0.0


def test_paths_agree(key):
    x = jax.random.normal(key, (2, 19, D_MODEL))
    seg = jnp.asarray(np.repeat([[0] * 7 + [1] * 12], 2, 0))
    ref = jitted(make("reference"))
    y_ref, y_ref_seg = ref(x), ref(x, segment_ids=seg)
    for impl in ("associative", "xla"):
        call = jitted(make(impl))
        if impl == "xla":  # FFT convolution; the associative path is the same scan with or without segments
            assert_close(f"{impl} vs reference", call(x), y_ref, 1e-5)
        assert_close(f"{impl} vs reference (segments)", call(x, segment_ids=seg), y_ref_seg, 1e-5)


def test_bf16_compute_keeps_float32_modes_and_state(key):
    m = make(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jax.random.normal(key, (2, 11, D_MODEL)).astype(jnp.bfloat16)
    y, state = jitted(m, "prefill")(x)
    assert y.dtype == jnp.bfloat16 and state.fir.dtype == jnp.bfloat16 and state.modal.dtype == jnp.complex64
    for name in ("poles", "residues", "D"):
        assert getattr(m, name)[...].dtype == jnp.float32, name
    assert m.projections.kernel[...].dtype == jnp.bfloat16
    yt, state2 = jitted(m, "step")(x[:, 0], m.init_state(2))
    assert yt.dtype == jnp.bfloat16 and state2.modal.dtype == jnp.complex64
    m32 = make()  # the same parameters in float32
    nnx.update(m32, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(m, nnx.Param)))
    y32 = jitted(m32)(x.astype(jnp.float32))
    err = float(jnp.abs(y.astype(jnp.float32) - y32).max() / jnp.abs(y32).max())
    print(f"bf16 vs fp32 max rel err {err:.3e}")
    assert err < 5e-2


def test_column_split_is_a_permutation_of_thirds(key):
    """column_split=True equals column_split=False with the projection (and FIR) channels permuted so that
    head j's [x2 | x1 | v] blocks land in the thirds."""
    a = make(column_split=True)
    b = make(column_split=False)
    k = D_MODEL // HEADS
    idx = np.arange(3 * D_MODEL).reshape(HEADS, 3, k)  # column-split position of (head, part, i)
    perm = np.concatenate([idx[:, part].reshape(-1) for part in range(3)])  # thirds order
    b.projections.kernel[...] = a.projections.kernel[...][:, perm]
    b.projections.bias[...] = a.projections.bias[...][perm]
    b.short_filter_weight[...] = a.short_filter_weight[...][:, perm]
    b.short_filter_bias[...] = a.short_filter_bias[...][perm]
    for name in ("poles", "residues", "D"):
        getattr(b, name)[...] = getattr(a, name)[...]
    b.out_proj.kernel[...], b.out_proj.bias[...] = a.out_proj.kernel[...], a.out_proj.bias[...]
    x = jax.random.normal(key, (2, 9, D_MODEL))
    assert_close("column split vs permuted thirds", b(x), a(x), 1e-6)


def test_initializations():
    m = StripedHyenaMixer(64, 8, state_size=4, rngs=nnx.Rngs(0))
    p = np.asarray(m.poles[...], np.float64)
    mag = np.hypot(p[..., 0], p[..., 1])
    tau = -1 / np.log(mag)
    assert tau.min() >= 1.0 - 1e-4 and tau.max() <= 1024 * (1 + 1e-4), (tau.min(), tau.max())
    assert np.log(tau).std() > 1.0  # spread over scales, not one time constant
    assert (np.arctan2(p[..., 1], p[..., 0]) >= 0).all()
    r = np.asarray(m.residues[...], np.float64)
    energy = np.sum((r ** 2).sum(-1) / (1 - mag ** 2), axis=-1)  # sum_t |sum_n R p^t|^2 without cross terms
    assert 0.5 < energy.mean() < 2.0, energy.mean()
    np.testing.assert_array_equal(np.asarray(m.D[...]), 0.0)
    assert np.abs(np.asarray(m.short_filter_weight[...])).max() <= 1 / np.sqrt(3)
    s = StripedHyenaMixer(64, 8, state_size=4, filter_init="stripedhyena", rngs=nnx.Rngs(0))
    ps = np.asarray(s.poles[...])
    assert 0.5e-2 < ps[..., 0].std() < 2e-2 and 0.5e-3 < ps[..., 1].std() < 2e-3
    assert 0.7 < np.asarray(s.residues[...]).std() < 1.3
    assert 0.7 < np.asarray(s.short_filter_weight[...]).std() < 1.3


def test_parameters_carry_logical_axis_names():
    specs = nnx.get_partition_spec(nnx.state(make(), nnx.Param))
    assert tuple(specs["projections"]["kernel"].get_value()) == ("embed", "ssm_inner")
    assert tuple(specs["short_filter_weight"].get_value()) == ("conv_width", "ssm_inner")
    assert tuple(specs["poles"].get_value()) == ("ssm_inner", "ssm_state", None)
    assert tuple(specs["residues"].get_value()) == ("ssm_inner", "ssm_state", None)
    assert tuple(specs["D"].get_value()) == ("ssm_inner",)
    assert tuple(specs["out_proj"]["kernel"].get_value()) == ("ssm_inner", "embed")


def test_inside_a_linen_module_via_bridge(key):
    class LinenBlock(linen.Module):
        @linen.compact
        def __call__(self, x):
            mixer = nnx.bridge.to_linen(StripedHyenaMixer, D_MODEL, HEADS, state_size=N, chunk_size=8)
            return x + mixer(linen.LayerNorm()(x))

    x = jax.random.normal(key, (2, 13, D_MODEL))
    block = LinenBlock()
    variables = jax.jit(block.init)(jax.random.PRNGKey(0), x)
    y, grads = jax.jit(jax.value_and_grad(lambda v: block.apply(v, x).sum()))(variables)
    assert bool(jnp.isfinite(y))
    for name in ("poles", "residues"):
        g = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if name in jax.tree_util.keystr(path)]
        assert len(g) == 1 and g[0].shape == (D_MODEL, N, 2) and float(jnp.abs(g[0]).max()) > 0, name


def test_bad_inputs_raise():
    m = make()
    check_mixer_input_errors(m, 24)
    with pytest.raises(ValueError, match=r"hyena_filter expects z of shape \(b, l, 3 \* d_model=72\)"):
        m.hyena_filter(jnp.zeros((2, 5, 24)))
    with pytest.raises(ValueError, match="state must be a StripedHyenaState"):
        m.step(jnp.zeros((2, 24)), (jnp.zeros((2, 2, 72)), jnp.zeros((2, 24, N), jnp.complex64)))
    with pytest.raises(ValueError, match=r"state shapes fir \(3, 2, 72\), modal \(3, 24, 3\) do not match"):
        m.step(jnp.zeros((2, 24)), m.init_state(3))
    with pytest.raises(ValueError, match="state shapes"):
        m.prefill(jnp.zeros((2, 5, 24)), m.init_state(3))


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="num_heads=5 must divide d_model=24"):
        StripedHyenaMixer(24, 5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="filter_init must be one of"):
        StripedHyenaMixer(24, 4, filter_init="hippo", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="impl='fast' is not one of"):
        StripedHyenaMixer(24, 4, impl="fast", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="state_size must be a positive int"):
        StripedHyenaMixer(24, 4, state_size=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        make().init_state(0)
