"""Attention layer contracts: forward vs a float64 numpy loop, decode (step / chunked prefill / ragged rows) ==
forward, packed == separate sequences, causality by Jacobian, KV-cache capacity (eager error, NaN under jit), bf16,
logical axes, Linen interop, fused-qkv split, and the documented errors. Parity with transformers lives in
tests/parity/test_attention_parity.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from seqmix_jax.layers.attention import Attention, KVCache, split_fused_qkv
from tests.helpers import assert_close
from tests.ops.test_rotary import rope_numpy

D = 40
# (name, constructor kwargs): MHA with full RoPE, GQA with partial interleaved RoPE and a window smaller than l,
# MQA without RoPE with soft-cap, biases and a custom scale.
CONFIGS = {
    "mha": dict(num_heads=4),
    "gqa_partial_window": dict(num_heads=6, num_kv_heads=2, head_dim=10, rotary_dim=6, rope_interleaved=True,
                               window=5),
    "mqa_softcap_bias": dict(num_heads=4, num_kv_heads=1, rotary_dim=0, softcap=3.0, scale=0.7, qkv_bias=True,
                             out_bias=True),
}


def make(name="gqa_partial_window", **kw):
    return Attention(D, **{**CONFIGS[name], **kw}, rngs=nnx.Rngs(5))


class Jitted:
    """The layer's entry points under jax.jit (eager dispatch of a small layer is ~100x slower on CPU). Lengths are
    tracers here, so the eager capacity check is tested separately without this wrapper."""

    def __init__(self, m: Attention):
        self.m = m
        self.call = jax.jit(lambda x, segment_ids=None, positions=None: m(x, segment_ids=segment_ids,
                                                                         positions=positions))
        self.step = jax.jit(m.step)
        self.prefill = jax.jit(m.prefill, static_argnames=("max_len", "last_only"))

    def __call__(self, x, **kw):
        return self.call(x, **kw)

    def __getattr__(self, name):  # init_state, parameters and hyper-parameters come from the module
        return getattr(self.m, name)


def attention_numpy(m: Attention, x, positions=None, segments=None):
    """The layer written out in float64: projections, RoPE per pair, per-head masked softmax, output projection."""
    p = {n: (np.asarray(getattr(m, n).kernel[...], np.float64),
             None if getattr(m, n).bias is None else np.asarray(getattr(m, n).bias[...], np.float64))
         for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    lin = lambda a, n: a @ p[n][0] + (0 if p[n][1] is None else p[n][1])
    x = np.asarray(x, np.float64)
    b, l, _ = x.shape
    h, g, k = m.num_heads, m.num_kv_heads, m.head_dim
    q, kk, v = (lin(x, "q_proj").reshape(b, l, h, k), lin(x, "k_proj").reshape(b, l, g, k),
                lin(x, "v_proj").reshape(b, l, g, k))
    pos = np.arange(l) if positions is None else positions
    if m.rotary_dim:
        q = rope_numpy(q, pos, m.rotary_dim, m.rope_base, m.rope_interleaved, m.rope_position_scale)
        kk = rope_numpy(kk, pos, m.rotary_dim, m.rope_base, m.rope_interleaved, m.rope_position_scale)
    out = np.zeros((b, l, h, k))
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for i in range(l):
                s = m.scale * (kk[bi, :, gi] @ q[bi, i, hi])
                if m.softcap:
                    s = m.softcap * np.tanh(s / m.softcap)
                j = np.arange(l)
                ok = np.ones(l, bool)
                if m.causal:
                    ok &= j <= i
                if m.window:
                    ok &= j > i - m.window
                if segments is not None:
                    ok &= segments[bi] == segments[bi, i]
                w = np.where(ok, np.exp(s - s[ok].max()), 0.0)
                out[bi, i, hi] = (w / w.sum()) @ v[bi, :, gi]
    return lin(out.reshape(b, l, h * k), "o_proj")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_numpy(name, key):
    m = Jitted(make(name))
    x = jax.random.normal(key, (2, 13, D))
    assert_close(f"attention {name} vs numpy", m(x), attention_numpy(m, x), 1e-5)


def test_bidirectional_and_rope_scale_match_numpy(key):
    m = Jitted(make("mha", causal=False, rope_position_scale=4.0, rope_base=100.0))
    x = jax.random.normal(key, (2, 9, D))
    assert_close("non-causal, base 100, position scale 4", m(x), attention_numpy(m, x), 1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_by_step_equals_forward(name, key):
    m = Jitted(make(name))
    x = jax.random.normal(key, (2, 17, D))  # l > window
    y = m(x)
    state = m.init_state(2, 20)
    outs = []
    for t in range(x.shape[1]):
        yt, state = m.step(x[:, t], state)
        outs.append(yt)
    assert_close(f"{name} step vs forward", jnp.stack(outs, 1), y, 1e-5)
    np.testing.assert_array_equal(np.asarray(state.length), [17, 17])
    # The cache holds the rotated keys of the prompt: one prefill of the same tokens gives the same cache.
    _, pre = m.prefill(x, max_len=20)
    assert_close(f"{name} cache k: steps vs prefill", state.k, pre.k, 1e-6)
    assert_close(f"{name} cache v: steps vs prefill", state.v, pre.v, 1e-6)


def test_prefill_in_two_chunks_then_steps(key):
    m = Jitted(make())
    x = jax.random.normal(key, (2, 21, D))
    y = m(x)
    y0, state = m.prefill(x[:, :8], max_len=24)
    y1, state = m.prefill(x[:, 8:15], state)
    outs = [y0, y1]
    for t in range(15, 21):
        yt, state = m.step(x[:, t], state)
        outs.append(yt[:, None])
    assert_close("prefill 8 + prefill 7 + 6 steps", jnp.concatenate(outs, 1), y, 1e-5)
    # last_only: the last position's output alone, from a fresh cache and continuing one; the caches are the same
    yl0, sl = m.prefill(x[:, :8], max_len=24, last_only=True)
    assert yl0.shape == (2, 1, D)
    assert_close("fresh prefill last_only", yl0[:, 0], y[:, 7], 1e-5)
    _, s0 = m.prefill(x[:, :8], max_len=24)
    for a, e, n in zip(sl, s0, ("k", "v", "length")):
        assert_close(f"fresh cache {n}: last_only vs all positions", a, e, 1e-6)
    yl1, sl = m.prefill(x[:, 8:15], sl, last_only=True)
    assert_close("continuing prefill last_only", yl1[:, 0], y[:, 14], 1e-5)
    np.testing.assert_array_equal(np.asarray(sl.length), [15, 15])


def test_rows_at_different_lengths(key):
    """Rows of one cache may hold different numbers of tokens (q_offset per row)."""
    m = Jitted(make())
    x = jax.random.normal(key, (2, 12, D))
    _, s0 = m.prefill(x[:1, :4], max_len=16)
    _, s1 = m.prefill(x[1:, :9], max_len=16)
    state = KVCache(*(jnp.concatenate([a, b]) for a, b in zip(s0, s1)))
    yt, state = m.step(jnp.stack([x[0, 4], x[1, 9]]), state)
    assert_close("row 0 at position 4", yt[0], m(x[:1, :5])[0, 4], 1e-5)
    assert_close("row 1 at position 9", yt[1], m(x[1:, :10])[0, 9], 1e-5)


@pytest.mark.parametrize("name", ["mha", "gqa_partial_window"])
def test_packed_sequences_equal_separate_runs(name, key):
    m = Jitted(make(name))
    lens = [5, 11, 3, 9]
    x = jax.random.normal(key, (1, sum(lens), D))
    ids = np.repeat([3, 1, 3, 0], lens)  # id 3 reused by a non-adjacent document
    y = m(x, segment_ids=jnp.asarray(ids[None], jnp.int32))
    start = 0
    for i, n in enumerate(lens):
        assert_close(f"{name} segment {i}", y[:, start:start + n], m(x[:, start:start + n]), 1e-5)
        start += n


def test_explicit_positions_override(key):
    m = Jitted(make())
    x = jax.random.normal(key, (2, 7, D))
    pos = np.array([[3, 4, 5, 6, 7, 8, 9], [0, 2, 4, 6, 8, 10, 12]])
    assert_close("explicit (b, l) positions", m(x, positions=jnp.asarray(pos)), attention_numpy(m, x, pos), 1e-5)


@pytest.mark.parametrize("name", ["mha", "gqa_partial_window"])
def test_causal_by_jacobian(name, key):
    m = Jitted(make(name))
    l = 9
    x = jax.random.normal(key, (1, l, D))
    jac = np.asarray(jax.jit(jax.jacrev(lambda x: m.m(x)[0]))(x))[:, :, 0]  # (t, d_out, s, d_in)
    block = np.abs(jac).max(axis=(1, 3))  # (t, s)
    t, s = np.meshgrid(np.arange(l), np.arange(l), indexing="ij")
    visible = s <= t
    if m.window:
        visible &= s > t - m.window
    assert block[~visible].max() == 0.0  # exactly zero: future (and out-of-window) tokens cannot leak
    assert block[visible].min() > 0.0


def test_cache_overflow_raises_eagerly():
    m = make()
    state = m.init_state(2, 6)._replace(length=jnp.array([2, 6], jnp.int32))  # row 1 is full
    with pytest.raises(ValueError, match=r"KV cache overflow: row 1 has length=6 cached tokens \+ 1 new tokens > "
                                         r"max_len=6"):
        m.step(jnp.zeros((2, D)), state)
    with pytest.raises(ValueError, match=r"length=0 cached tokens \+ 7 new tokens > max_len=5"):
        m.prefill(jnp.zeros((1, 7, D)), m.init_state(1, 5))
    with pytest.raises(ValueError, match=r"KV cache overflow: a prompt of 7 tokens does not fit max_len=5 slots"):
        m.prefill(jnp.zeros((1, 7, D)), max_len=5)


def test_cache_overflow_gives_nan_under_jit(key):
    m = Jitted(make())
    x = jax.random.normal(key, (2, 8, D))
    _, s0 = m.prefill(x[:1, :5], max_len=6)  # room for one more token
    _, s1 = m.prefill(x[1:, :6], max_len=6)  # full
    state = KVCache(*(jnp.concatenate([a, b]) for a, b in zip(s0, s1)))
    yt, state2 = m.step(x[:, 6], state)
    assert bool(jnp.isfinite(yt[0]).all()) and bool(jnp.isnan(yt[1]).all())
    assert_close("non-overflowing row under jit", yt[0], m(jnp.concatenate([x[:1, :5], x[:1, 6:7]], 1))[0, 5], 1e-5)
    # The overflowing write was dropped: row 1's cache is unchanged.
    np.testing.assert_array_equal(np.asarray(state2.k[1]), np.asarray(state.k[1]))
    yt, _ = m.step(x[:, 7], state2)  # now both rows are full, and stay NaN
    assert bool(jnp.isnan(yt).all())


def test_bf16_compute(key):
    m = Jitted(make(dtype=jnp.bfloat16))
    x = jax.random.normal(key, (2, 11, D))
    y = m(x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and m.q_proj.kernel[...].dtype == jnp.float32
    state = m.init_state(2, 12)
    assert state.k.dtype == jnp.bfloat16 and state.length.dtype == jnp.int32
    yt, state = m.step(x[:, 0].astype(jnp.bfloat16), state)
    assert yt.dtype == jnp.bfloat16 and state.k.dtype == jnp.bfloat16
    y32 = Jitted(make())(x)
    assert_close("bf16 vs fp32 forward", y.astype(jnp.float32), y32, 3e-2)
    assert_close("bf16 first step vs fp32", yt.astype(jnp.float32), y32[:, 0], 3e-2)


def test_parameters_carry_logical_axis_names():
    specs = nnx.get_partition_spec(nnx.state(make("mqa_softcap_bias"), nnx.Param))
    expected = {("q_proj", "kernel"): ("embed", "heads"), ("q_proj", "bias"): ("heads",),
                ("k_proj", "kernel"): ("embed", "kv_heads"), ("k_proj", "bias"): ("kv_heads",),
                ("v_proj", "kernel"): ("embed", "kv_heads"), ("v_proj", "bias"): ("kv_heads",),
                ("o_proj", "kernel"): ("heads", "embed"), ("o_proj", "bias"): ("embed",)}
    flat = {tuple(map(str, path)): tuple(v.get_value()) for path, v in nnx.to_flat_state(specs)}
    assert flat == expected
    m = Jitted(make())
    assert m.q_proj.kernel[...].shape == (D, 60) and m.k_proj.kernel[...].shape == (D, 20)
    assert m.o_proj.kernel[...].shape == (60, D) and m.q_proj.bias is None


def test_inside_a_linen_module_via_bridge(key):
    class LinenBlock(linen.Module):
        @linen.compact
        def __call__(self, x):
            attn = nnx.bridge.to_linen(Attention, D, 4, num_kv_heads=2, window=4)
            return x + attn(linen.LayerNorm()(x))

    x = jax.random.normal(key, (2, 10, D))
    block = LinenBlock()
    variables = jax.jit(block.init)(jax.random.PRNGKey(0), x)
    y = jax.jit(block.apply)(variables, x)
    assert y.shape == x.shape and bool(jnp.isfinite(y).all())
    grads = jax.jit(jax.grad(lambda v: block.apply(v, x).sum()))(variables)
    kq = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if "q_proj" in jax.tree_util.keystr(path)]
    assert len(kq) == 1 and float(jnp.abs(kq[0]).max()) > 0


def test_split_fused_qkv(rng):
    h, g, k, d = 6, 2, 5, 7
    wq, wk, wv = rng.standard_normal((h * k, d)), rng.standard_normal((g * k, d)), rng.standard_normal((g * k, d))
    parts = split_fused_qkv(np.concatenate([wq, wk, wv]), h, g, k)
    for a, b in zip(parts, (wq, wk, wv)):
        np.testing.assert_array_equal(a, b)
    bias = np.arange((h + 2 * g) * k)
    bq, bk, bv = split_fused_qkv(bias, h, g, k)
    assert (bq[-1], bk[0], bv[0], bv[-1]) == (h * k - 1, h * k, (h + g) * k, (h + 2 * g) * k - 1)
    with pytest.raises(ValueError,
                       match=r"fused qkv must have 50 = head_dim 5 \* \(num_heads 6 \+ 2 \* num_kv_heads 2\)"):
        split_fused_qkv(np.zeros((49, d)), h, g, k)
    with pytest.raises(ValueError, match="num_heads=6 must be divisible by num_kv_heads=4"):
        split_fused_qkv(np.zeros((70, d)), 6, 4, 5)


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_heads=6 must be divisible by num_kv_heads=4"):
        Attention(D, 6, num_kv_heads=4, head_dim=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_model=40 must be divisible by num_heads=6 when head_dim is None"):
        Attention(D, 6, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rotary_dim must be an even int in \[0, head_dim=10\], got 5"):
        Attention(D, 4, rotary_dim=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rotary_dim must be an even int in \[0, head_dim=10\], got 12"):
        Attention(D, 4, rotary_dim=12, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        Attention(D, 4, window=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="window=3 needs causal=True"):
        Attention(D, 4, window=3, causal=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        Attention(D, 4, softcap=-1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rope_position_scale must be a positive number"):
        Attention(D, 4, rope_position_scale=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="base must be a positive number"):
        Attention(D, 4, rope_base=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int"):
        Attention(D, 4, num_kv_heads=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        Attention(0, 4, rngs=nnx.Rngs(0))


def test_call_and_decode_errors():
    m = make()
    with pytest.raises(ValueError, match=r"x must have shape \(b, l, d_model=40\)"):
        m(jnp.zeros((2, 5, 39)))
    with pytest.raises(ValueError, match=r"step expects x of shape \(b, d_model=40\)"):
        m.step(jnp.zeros((2, 1, D)), m.init_state(2, 4))
    with pytest.raises(ValueError, match="segment_ids"):
        m(jnp.zeros((2, 5, D)), segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="positions must have shape"):
        m(jnp.zeros((2, 5, D)), positions=jnp.arange(4))
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        m.init_state(2, 0)
    with pytest.raises(ValueError, match=r"state does not fit this layer and batch 3"):
        m.step(jnp.zeros((3, D)), m.init_state(2, 4))
    with pytest.raises(NotImplementedError, match="prefill does not take segment_ids"):
        m.prefill(jnp.zeros((1, 4, D)), segment_ids=jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(NotImplementedError, match="needs causal=True"):
        make("mha", causal=False).init_state(1, 4)


def test_forward_and_fresh_prefill_carry_constant_rope_tables(key):
    """The default positions (a forward, a fresh prefill) are numpy: the RoPE cos / sin tables are constants of the
    compiled program, not cosines evaluated per element; a prefill continuing a cache (traced positions) computes
    them."""
    m = make()
    x = jax.random.normal(key, (2, 9, D))
    assert m.rotary_dim
    for name, fn, args in [("forward", lambda x: m(x), (x,)),
                           ("fresh prefill", lambda x: m.prefill(x, max_len=12), (x,)),
                           ("fresh prefill last_only", lambda x: m.prefill(x, max_len=12, last_only=True), (x,))]:
        assert "cosine" not in jax.jit(fn).lower(*args).as_text(), name
    assert "cosine" in jax.jit(lambda x, s: m.prefill(x, s)).lower(x, m.init_state(2, 12)).as_text()
