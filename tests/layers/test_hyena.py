"""HyenaOperator (safari implicit-filter Hyena): the filter and the whole operator against NumPy float64
restatements of safari's definitions (no installable PyTorch Hyena exists), FFT vs direct convolution,
decoding == forward, causality, dtypes, logical axes, Linen interop and the documented errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from seqmix_jax.layers.hyena import Buffer, HyenaFilter, HyenaOperator
from tests.helpers import assert_close, rel_err

D, L_MAX, L, F, EMB = 10, 31, 23, 16, 5  # distinct sizes so a transposed axis cannot pass


def make(order=2, impl="xla", **kw):
    kw.setdefault("filter_order", F)
    kw.setdefault("emb_dim", EMB)
    return HyenaOperator(D, L_MAX, order=order, impl=impl, rngs=nnx.Rngs(5), **kw)


def f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


# --- NumPy float64 restatement of safari's definitions (REFERENCE_NOTES §0.1, §0.4, §4.3, §4.4)

def np_positional(l_max, emb_dim):
    bands = (emb_dim - 1) // 2
    z = np.zeros((l_max, emb_dim))
    for s in range(l_max):
        z[s, 0] = s / (l_max - 1)
        for j in range(bands):
            freq = 1e-4 + j * ((bands - 1) - 1e-4) / (bands - 1) if bands > 1 else 1e-4
            angle = freq * 2 * math.pi * s / l_max
            z[s, 1 + j] = math.cos(angle)
            z[s, 1 + bands + j] = -math.sin(angle)
    return z


def np_deltas(channels, fast=0.3, slow=1.5, target=1e-2):
    lo, hi = math.log(target) / slow, math.log(target) / fast
    return np.array([lo + (hi - lo) * i / (channels - 1) for i in range(channels)]) if channels > 1 else np.array([lo])


def np_filter(filt: HyenaFilter, l, *, emb_dim, modulate=True, normalized=False, shift=0.0, dtype=np.float64):
    """h (l, channels): MLP with one shared sine frequency on the positional grid, then the window. `dtype`
    float32 gives the error of plain same-precision code (the yardstick for ill-conditioned settings)."""
    layers = list(filt.implicit_filter)
    cast = lambda a: np.asarray(jnp.asarray(a, jnp.float32), dtype)  # noqa: E731
    freq = cast(filt.freq[...])[0]
    h = np_positional(filt.l_max, emb_dim)[:l].astype(dtype)
    for layer in layers[:-1]:
        h = np.sin(freq * (h @ cast(layer.kernel[...]) + cast(layer.bias[...])))
    h = h @ cast(layers[-1].kernel[...])
    if normalized:
        h = h / np.abs(h).sum(-1, keepdims=True)
    if modulate:
        t = (np.arange(l)[:, None] / (filt.l_max - 1)).astype(dtype)
        h = h * (np.exp(-t * np.abs(np_deltas(filt.channels).astype(dtype))) + dtype(shift))
    return h


def np_causal_conv(u, k, skip):
    """y[b, t, d] = sum_{s <= t} k[t - s, d] u[b, s, d] + skip[d] u[b, t, d]."""
    l = u.shape[1]
    y = np.zeros_like(u)
    for t in range(l):
        for s in range(t + 1):
            y[:, t] += k[t - s] * u[:, s]
    return y + skip * u


def np_operator(m: HyenaOperator, x, *, emb_dim=EMB, blocked=False, activation=lambda a: a):
    """safari HyenaOperator.forward; `blocked` uses the standalone "(o d)" channel order instead of "(v o)"."""
    n, d = m.order, m.d_model
    b, l, _ = x.shape
    u = np.asarray(x, np.float64) @ f64(m.in_proj.kernel[...]) + f64(m.in_proj.bias[...])
    w = f64(m.short_filter.weight[...])  # (width, channels), cross-correlation: last tap on the current token
    width = w.shape[0]
    uc = np.zeros_like(u) + f64(m.short_filter.bias[...])
    for t in range(l):
        for j in range(width):
            s = t - (width - 1) + j
            if s >= 0:
                uc[:, t] += w[j] * u[:, s]
    xs = [uc[..., i * d:(i + 1) * d] for i in range(n + 1)]
    v = xs[n]
    h = np_filter(m.filter_fn, l, emb_dim=emb_dim)
    bias = f64(m.filter_fn.bias[...])
    for o in range(n - 1):
        chan = [(o * d + c) if blocked else (c * (n - 1) + o) for c in range(d)]
        v = v * xs[n - 1 - o]  # gates x_{N-1}, ..., x_1
        v = np_causal_conv(v, h[:, chan], bias[chan])
    y = activation(v * xs[0])
    return y @ f64(m.out_proj.kernel[...]) + f64(m.out_proj.bias[...])


# --- filter

@pytest.mark.parametrize("emb_dim", [3, 7])
def test_positional_features_match_definition(emb_dim):
    m = HyenaOperator(D, L_MAX, emb_dim=emb_dim, filter_order=F, rngs=nnx.Rngs(0))
    assert isinstance(m.filter_fn.pos_emb.z, Buffer) and not isinstance(m.filter_fn.pos_emb.z, nnx.Param)
    assert_close(f"z emb_dim={emb_dim}", m.filter_fn.pos_emb.z[...], np_positional(L_MAX, emb_dim), 1e-6)
    trained = HyenaOperator(D, L_MAX, emb_dim=emb_dim, filter_order=F, learn_pos_emb=True, rngs=nnx.Rngs(0))
    assert isinstance(trained.filter_fn.pos_emb.z, nnx.Param)
    assert "pos_emb" not in nnx.state(m, nnx.Param)["filter_fn"]
    assert "pos_emb" in nnx.state(trained, nnx.Param)["filter_fn"]


FILTER_CASES = {"defaults": dict(), "w10-normalized-shift": dict(w=10.0, normalized=True, shift=0.1),
                "w10-3inner-stress": dict(w=10.0, normalized=True, shift=0.1, num_inner_mlps=3)}


@pytest.mark.parametrize("name", list(FILTER_CASES))
def test_filter_matches_numpy(name):
    case = FILTER_CASES[name]
    filt = HyenaFilter(14, L_MAX, emb_dim=EMB, filter_order=F, rngs=nnx.Rngs(1), **case)
    assert len(filt.implicit_filter) == case.get("num_inner_mlps", 2) + 2
    np.testing.assert_array_equal(np.asarray(filt.freq[...]), case.get("w", 1.0))
    kw = dict(emb_dim=EMB, normalized=case.get("normalized", False), shift=case.get("shift", 0.0))
    for l in (L_MAX, 9):
        ref = np_filter(filt, l, **kw)
        got = filt.filter(l)
        assert got.shape == (l, 14) and got.dtype == jnp.float32
        if name != "w10-3inner-stress":
            assert_close(f"{name} filter l={l}", got, ref, 1e-5)
        else:  # four sines at frequency 10 amplify float32 rounding past 1e-5 for ANY float32 code:
            # require at most 2x the error of the same computation in plain float32 NumPy.
            plain = rel_err(np_filter(filt, l, dtype=np.float32, **kw), ref)[0]
            print(f"plain float32 NumPy error {plain:.3e}")
            assert_close(f"{name} filter l={l}", got, ref, max(1e-5, 2 * plain))
    # The filter for a shorter sequence is the prefix of the l_max grid (t is not re-normalized).
    np.testing.assert_array_equal(np.asarray(filt.filter(9)), np.asarray(filt.filter(L_MAX))[:9])


def test_filter_shapes_and_decay():
    m = HyenaOperator(8, 64, order=3, rngs=nnx.Rngs(0))  # default filter hyper-parameters
    deltas = np.asarray(m.filter_fn.deltas[...])
    print(f"deltas endpoints {deltas[0]:.5f} {deltas[-1]:.5f}")
    assert deltas.shape == (16,)
    np.testing.assert_allclose(deltas[[0, -1]], [-3.0701, -15.3506], atol=1e-4)
    np.testing.assert_allclose(deltas, np_deltas(16), rtol=1e-6)
    k, skip = m.filters(40)
    assert k.shape == (2, 40, 8) and skip.shape == (2, 8) and m.filter_fn.filter(40).shape == (40, 16)
    # The window: modulated filter = unmodulated filter * exp(-t |delta_c|), decreasing in t for every channel.
    flat = HyenaOperator(8, 64, order=3, modulate=False, rngs=nnx.Rngs(0))
    t = np.arange(64)[:, None] / 63
    envelope = np.exp(-t * np.abs(np_deltas(16)))
    assert (np.diff(envelope, axis=0) < 0).all()
    assert_close("modulated filter", m.filter_fn.filter(64), f64(flat.filter_fn.filter(64)) * envelope, 1e-5)
    np.testing.assert_allclose(envelope[-1, [0, -1]], [1e-2 ** (1 / 1.5), 1e-2 ** (1 / 0.3)], rtol=1e-6)


def test_parameter_shapes_and_torch_like_init():
    m = make(order=3)
    n1 = 2
    assert m.in_proj.kernel[...].shape == (D, 4 * D) and m.in_proj.bias[...].shape == (4 * D,)
    assert m.short_filter.weight[...].shape == (3, 4 * D) and m.short_filter.bias[...].shape == (4 * D,)
    assert m.out_proj.kernel[...].shape == (D, D)
    assert m.filter_fn.bias[...].shape == (D * n1,) and m.filter_fn.freq[...].shape == (1, F)
    assert m.filter_fn.implicit_filter[-1].bias is None
    for name, a, fan_in in [("in_proj", m.in_proj.kernel, D), ("short_filter", m.short_filter.weight, 3),
                            ("filter 0", m.filter_fn.implicit_filter[0].kernel, EMB),
                            ("filter last", m.filter_fn.implicit_filter[-1].kernel, F)]:
        assert np.abs(np.asarray(a[...])).max() <= 1 / math.sqrt(fan_in), name
    big = HyenaFilter(4000, 8, rngs=nnx.Rngs(0))  # the D skip is standard normal
    bias = np.asarray(big.bias[...])
    assert abs(bias.mean()) < 0.1 and abs(bias.std() - 1) < 0.1


# --- operator forward

@pytest.mark.parametrize("order", [2, 3])
def test_forward_matches_numpy(order, key):
    activation = {2: ("id", lambda a: a), 3: ("gelu", None)}[order]
    erf = np.vectorize(math.erf)
    np_act = activation[1] or (lambda a: 0.5 * a * (1 + erf(a / math.sqrt(2))))  # exact (erf) GELU
    m = make(order=order, activation=activation[0])
    x = jax.random.normal(key, (2, L, D))
    y = m(x)
    ref = np_operator(m, x, activation=np_act)
    assert_close(f"order {order} forward vs numpy", y, ref, 1e-5)
    if order == 3:  # the check can fail: the standalone "(o d)" channel order gives another function
        wrong, _ = rel_err(y, np_operator(m, x, blocked=True, activation=np_act))
        print(f"order 3 with the blocked (o d) order: max rel err {wrong:.3e}")
        assert wrong > 1e-2


def test_fft_path_equals_direct_convolution_with_gradients(key):
    kx, kp = jax.random.split(key)
    x = jax.random.normal(kx, (2, L, D))
    proj = jax.random.normal(kp, (2, L, D))

    def forward_and_grads(impl):
        graphdef, params, rest = nnx.split(make(order=3, impl=impl), nnx.Param, ...)

        def loss(params, x):
            return jnp.sum(nnx.merge(graphdef, params, rest)(x) * proj)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (l_fft, g_fft), (l_ref, g_ref) = forward_and_grads("xla"), forward_and_grads("reference")
    assert_close("loss fft vs direct", l_fft, l_ref, 1e-5)
    y_fft, y_ref = make(order=3, impl="xla")(x), make(order=3, impl="reference")(x)
    assert_close("output fft vs direct", y_fft, y_ref, 1e-5)
    flat_fft = jax.tree_util.tree_leaves_with_path(g_fft)
    flat_ref = jax.tree_util.tree_leaves(g_ref)
    assert len(flat_fft) == len(flat_ref) == 16  # x and 15 parameters
    for (path, a), b in zip(flat_fft, flat_ref):
        assert bool(jnp.isfinite(a).all()), jax.tree_util.keystr(path)
        assert float(jnp.abs(b).max()) > 0, jax.tree_util.keystr(path)
        assert_close(f"grad {jax.tree_util.keystr(path)}", a, b, 1e-4)


def test_causal_by_gradient(key):
    x = jax.random.normal(key, (1, 17, D))
    for impl in ("reference", "xla"):
        m = make(order=3, impl=impl)
        jac = np.asarray(jax.jit(jax.jacrev(lambda x: m(x)[0]))(x))[:, :, 0]  # (t, d_out, s, d_in)
        future = np.array([np.abs(jac[t, :, t + 1:]).max(initial=0.0) for t in range(17)]).max()
        past = np.abs(jac).max()
        print(f"{impl}: max |dy[t]/dx[s>t]| = {future:.3e} (relative {future / past:.3e})")
        assert all(np.abs(jac[t, :, :t + 1]).max() > 0 for t in range(17))
        if impl == "reference":
            assert future == 0.0
        else:  # the FFT path leaks rounding noise into the zero-padded half, nothing more
            assert future / past <= 1e-6


# --- decoding

@pytest.mark.parametrize("order", [2, 3])
def test_step_by_step_equals_forward(order, key):
    m = make(order=order)
    x = jax.random.normal(key, (2, L, D))
    y = m(x)
    state = m.init_state(2)
    step = jax.jit(lambda x_t, s: m.step(x_t, s))
    outs = []
    for t in range(L):
        y_t, state = step(x[:, t], state)
        outs.append(y_t)
    assert_close(f"order {order} step vs forward", jnp.stack(outs, 1), y, 1e-5)
    _, prefilled = m.prefill(x)
    assert int(state.pos) == int(prefilled.pos) == L
    for name in ("conv", "history", "k"):
        assert_close(f"order {order} state.{name} step vs prefill", getattr(state, name), getattr(prefilled, name),
                     1e-5)


@pytest.mark.parametrize("order", [2, 3])
def test_prefill_then_decode_equals_forward(order, key):
    m = make(order=order)
    x = jax.random.normal(key, (2, L, D))
    y = m(x)
    step = jax.jit(lambda x_t, s: m.step(x_t, s))
    y0, state = m.prefill(x[:, :13])
    outs = [y0]
    for t in range(13, L):
        y_t, state = step(x[:, t], state)
        outs.append(y_t[:, None])
    assert_close(f"order {order} prefill+step", jnp.concatenate(outs, 1), y, 1e-5)
    # Prefill continuing a state (also from a fresh init_state, and jitted) equals one long prefill.
    y_a, s = m.prefill(x[:, :6], m.init_state(2))
    y_b, s = jax.jit(lambda x, s: m.prefill(x, s))(x[:, 6:13], s)
    y_c, s = m.prefill(x[:, 13:], s)
    assert_close(f"order {order} chained prefill", jnp.concatenate([y_a, y_b, y_c], 1), y, 1e-5)
    # A cache sized for the sequence (max_len < l_max) decodes the same outputs.
    state = m.init_state(2, max_len=L)
    assert state.history.shape == (2, order - 1, L, D) and state.history.dtype == jnp.float32
    outs = []
    for t in range(L):
        y_t, state = step(x[:, t], state)
        outs.append(y_t)
    assert_close(f"order {order} step with max_len", jnp.stack(outs, 1), y, 1e-5)
    # A fresh prefill into a history of max_len positions, last position only, then decoding; and last_only when
    # continuing a state
    y_l, state = m.prefill(x[:, :13], max_len=L, last_only=True)
    assert y_l.shape == (2, 1, D) and state.history.shape == (2, order - 1, L, D)
    assert_close(f"order {order} fresh prefill last_only", y_l[:, 0], y[:, 12], 1e-5)
    y_t, _ = step(x[:, 13], state)
    assert_close(f"order {order} step after a max_len prefill", y_t, y[:, 13], 1e-5)
    y_l, _ = m.prefill(x[:, 6:13], m.prefill(x[:, :6], m.init_state(2))[1], last_only=True)
    assert_close(f"order {order} continuing prefill last_only", y_l[:, 0], y[:, 12], 1e-5)


def test_decoding_past_the_cache():
    m = make()
    x = jnp.ones((1, 4, D))
    _, state = m.prefill(x[:, :3], m.init_state(1, max_len=4))
    _, state = m.step(x[:, 3], state)
    with pytest.raises(ValueError, match=r"cannot decode past the cache: position 4 \+ 1 new token\(s\) > 4"):
        m.step(x[:, 0], state)
    with pytest.raises(ValueError, match=r"max_len=2 must hold the prompt \(l=3\) and be at most l_max"):
        m.prefill(x[:, :3], max_len=2)
    with pytest.raises(ValueError, match=r"max_len=\d+ must hold the prompt \(l=3\) and be at most l_max"):
        m.prefill(x[:, :3], max_len=m.l_max + 1)
    with pytest.raises(ValueError, match=r"position 2 \+ 3 new token\(s\) > 4"):
        m.prefill(x[:, :3], m.prefill(x[:, :2], m.init_state(1, max_len=4))[1])
    # Under jit the position is traced: the output is NaN instead of an error.
    y, _ = jax.jit(lambda x_t, s: m.step(x_t, s))(x[:, 0], state)
    assert bool(jnp.isnan(y).all())
    y, _ = jax.jit(lambda x, s: m.prefill(x, s))(x[:, :2], state._replace(pos=jnp.int32(3)))
    assert bool(jnp.isnan(y).all())


# --- dtypes, axes, interop

def test_bf16_compute_keeps_float32_filter_and_fft(key):
    m = make(order=3, dtype=jnp.bfloat16)
    x = jax.random.normal(key, (2, L, D)).astype(jnp.bfloat16)
    y, state = m.prefill(x)
    assert y.dtype == jnp.bfloat16
    assert state.history.dtype == jnp.float32 and state.k.dtype == jnp.float32
    assert m.filters(L)[0].dtype == jnp.float32
    jaxpr = jax.make_jaxpr(lambda x: m(x))(x)
    ffts = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "fft"]
    assert len(ffts) == 2 * 3  # rfft of the input and the filter, irfft, per long convolution
    assert all(v.aval.dtype in (jnp.float32, jnp.complex64) for e in ffts for v in e.invars)
    y32 = make(order=3)(x.astype(jnp.float32))
    err = float(jnp.abs(y.astype(jnp.float32) - y32).max() / jnp.abs(y32).max())
    print(f"bf16 vs fp32 max rel err {err:.3e}")
    assert err < 5e-2
    y_t, _ = m.step(x[:, 0], m.init_state(2))
    assert y_t.dtype == jnp.bfloat16


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_every_variable_carries_logical_axis_names():
    m = make(order=3, learn_pos_emb=True)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(m), is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert len(leaves) == 17  # 15 parameters + z (a Param here) + deltas
    for path, var in leaves:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, (jax.tree_util.keystr(path), names)
    specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
    assert tuple(specs["in_proj"]["kernel"].get_value()) == ("embed", "hyena_inner")
    assert tuple(specs["short_filter"]["weight"].get_value()) == ("conv_width", "hyena_inner")


def test_inside_a_linen_module_via_bridge(key):
    class LinenBlock(linen.Module):
        @linen.compact
        def __call__(self, x):
            mixer = nnx.bridge.to_linen(HyenaOperator, D, L_MAX, filter_order=F, emb_dim=EMB)
            return x + mixer(linen.LayerNorm()(x))

    x = jax.random.normal(key, (2, 13, D))
    block = LinenBlock()
    variables = jax.jit(block.init)(jax.random.PRNGKey(0), x)
    assert "buffers" in variables  # z and deltas travel as a non-trainable collection
    y = jax.jit(block.apply)(variables, x)
    assert y.shape == x.shape and bool(jnp.isfinite(y).all())
    grads = jax.jit(jax.grad(lambda p: block.apply({**variables, "params": p}, x).sum()))(variables["params"])
    freq = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if "freq" in jax.tree_util.keystr(path)]
    assert len(freq) == 1 and float(jnp.abs(freq[0]).max()) > 0


# --- errors

def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="emb_dim must be an odd int >= 3"):
        make(emb_dim=4)
    with pytest.raises(ValueError, match="emb_dim must be an odd int >= 3"):
        make(emb_dim=1)
    with pytest.raises(ValueError, match="order must be an int >= 2"):
        make(order=1)
    with pytest.raises(ValueError, match="activation must be one of"):
        make(activation="softmax")
    with pytest.raises(ValueError, match="impl must be"):
        make(impl="associative")
    with pytest.raises(ValueError, match="num_inner_mlps must be an int >= 0"):
        make(num_inner_mlps=-1)
    with pytest.raises(ValueError, match="need 0 < target < 1"):
        make(target=2.0)
    with pytest.raises(ValueError, match="filter_order must be a positive int"):
        make(filter_order=0)
    with pytest.raises(ValueError, match=r"max_len=32 exceeds l_max=31"):
        make().init_state(2, max_len=32)


def test_bad_inputs_raise():
    m = make()
    with pytest.raises(ValueError, match=r"sequence length l=32 exceeds l_max=31"):
        m(jnp.zeros((1, 32, D)))
    with pytest.raises(ValueError, match=r"sequence length l=32 exceeds l_max=31"):
        m.prefill(jnp.zeros((1, 32, D)))
    with pytest.raises(ValueError, match=r"x must have shape \(b, l, d_model=10\)"):
        m(jnp.zeros((1, 5, D + 1)))
    with pytest.raises(ValueError, match=r"step expects x of shape \(b, d_model=10\)"):
        m.step(jnp.zeros((1, 1, D)), m.init_state(1))
    with pytest.raises(ValueError, match=r"state.history must have shape \(b=2"):
        m.step(jnp.zeros((2, D)), m.init_state(1))
    seg = jnp.zeros((1, 5), jnp.int32)
    with pytest.raises(NotImplementedError, match="cannot reset at segment boundaries"):
        m(jnp.zeros((1, 5, D)), segment_ids=seg)
    with pytest.raises(NotImplementedError, match="cannot reset at segment boundaries"):
        m.prefill(jnp.zeros((1, 5, D)), segment_ids=seg)
