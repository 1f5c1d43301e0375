"""seqmix_jax.ops.moe: the router and the three dispatch paths against a numpy float64 restatement kept here.

Checks: routing (softmax / sigmoid, renormalized or not, the selection-only bias) and outputs of every path vs
per-token float64 loops; the capacity rule vs a hand-built routing whose overflow is known, and vs a slot-filling
loop on random routing; capacity == dropless when nothing can drop; dropless drops nothing on fully skewed
routing; statistics vs their formulas; padding tokens (token_mask) == the same call without them; gradients of
every path (input, router, experts, through the output and the auxiliary losses) equal; bfloat16; every
ValueError. The dropless path's two grouped matmuls ("ragged_dot" and "blocked", both run on CPU) vs float64 and
the reference path, in outputs and gradients, with empty experts, every token on one expert, groups spanning
several blocks, padding tokens, a non-SiLU activation and bfloat16; which one "auto" picks per backend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix_jax.ops.moe import (Routing, block_rows_for, dropless_ffn, expert_capacity, moe_ffn, moe_ffn_reference,
                                resolve_grouped_impl, route)
from tests.helpers import assert_close, rel_err

OUT_TOL, GRAD_TOL = 1e-5, 1e-4
T, D, E, F, K = 37, 13, 7, 11, 2  # distinct primes-ish: a transposed axis cannot pass


# --- the float64 restatement ----------------------------------------------------------------------------------------

def np_route(x, wr, k, scoring="softmax", renormalize=True, bias=None):
    logits = np.asarray(x, np.float64) @ np.asarray(wr, np.float64)
    if scoring == "softmax":
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
    else:
        p = 1.0 / (1.0 + np.exp(-logits))
    score = p if bias is None else p + np.asarray(bias, np.float64)
    experts = np.argsort(-score, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, experts, 1)
    if renormalize:
        w = w / w.sum(1, keepdims=True)
    return logits, p, w, experts


def np_expert(h, wi, wo):
    a = np.asarray(h, np.float64) @ np.asarray(wi, np.float64)
    f = a.shape[-1] // 2
    g = a[:f]
    return (g / (1.0 + np.exp(-g)) * a[f:]) @ np.asarray(wo, np.float64)


def np_moe(x, weights, experts, wi, wo, keep=None):
    """y_t = sum over t's kept choices j of weights[t, j] * expert_{experts[t, j]}(x_t), one token at a time."""
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            if keep is None or keep[t, j]:
                i = int(experts[t, j])
                y[t] += float(weights[t, j]) * np_expert(x[t], wi[i], wo[i])
    return y


def np_capacity_keep(experts, capacity, valid_tokens=None):
    """Fill each expert's slots: first choices of tokens 0..t-1, then second choices, ...; full -> dropped."""
    t, k = experts.shape
    fill = {}
    keep = np.zeros((t, k), bool)
    for j in range(k):
        for tok in range(t):
            if valid_tokens is not None and not valid_tokens[tok]:
                continue
            i = int(experts[tok, j])
            if fill.get(i, 0) < capacity:
                keep[tok, j] = True
                fill[i] = fill.get(i, 0) + 1
    return keep


def np_stats(logits, p, experts, e, valid_tokens=None):
    valid = np.ones(len(logits), bool) if valid_tokens is None else np.asarray(valid_tokens)
    n = valid.sum()
    counts = np.array([sum(i in experts[t] for t in range(len(logits)) if valid[t]) for i in range(e)], np.float64)
    lb = e * np.sum(counts / n * p[valid].mean(0))
    m = logits[valid].max(1)
    lse = m + np.log(np.exp(logits[valid] - m[:, None]).sum(1))
    return lb, np.mean(lse ** 2), counts


def make(rng, t=T, d=D, e=E, f=F, scale=1.0):
    x = rng.normal(size=(t, d)).astype(np.float32)
    wr = (rng.normal(size=(d, e)) * scale).astype(np.float32)
    wi = (rng.normal(size=(e, d, 2 * f)) / np.sqrt(d)).astype(np.float32)
    wo = (rng.normal(size=(e, f, d)) / np.sqrt(f)).astype(np.float32)
    return x, wr, wi, wo


def run(x, wr, wi, wo, *, top_k=K, scoring="softmax", renormalize=True, router_bias=None, **kw):
    def fn(x, wr, wi, wo):
        r = route(x, wr, top_k=top_k, scoring=scoring, renormalize=renormalize, router_bias=router_bias)
        return r, *moe_ffn(x, r, wi, wo, **kw)

    return jax.jit(fn)(x, wr, wi, wo)


# --- routing and outputs vs float64 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scoring,renormalize", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_paths_vs_numpy(rng, scoring, renormalize):
    x, wr, wi, wo = make(rng)
    logits, p, w, experts = np_route(x, wr, K, scoring, renormalize)
    want = np_moe(x, w, experts, wi, wo)
    for dispatch, cf in [("reference", 1.25), ("dropless", 1.25), ("capacity", E / K)]:
        r, y, stats = run(x, wr, wi, wo, scoring=scoring, renormalize=renormalize, dispatch=dispatch,
                          capacity_factor=cf)
        np.testing.assert_array_equal(np.asarray(r.experts), experts)
        assert_close(f"{dispatch} logits", r.logits, logits, OUT_TOL)
        assert_close(f"{dispatch} probs", r.probs, p, OUT_TOL)
        assert_close(f"{dispatch} weights", r.weights, w, OUT_TOL)
        assert_close(f"{dispatch} y ({scoring}, renormalize={renormalize})", y, want, OUT_TOL)
        assert float(stats.drop_fraction) == 0.0
    if renormalize:
        np.testing.assert_allclose(np.asarray(r.weights).sum(1), 1.0, rtol=1e-6)


def test_router_bias_selects_only(rng):
    """DeepSeek-V3: the bias moves the choice, the weights stay the unbiased probabilities."""
    x, wr, wi, wo = make(rng)
    bias = np.zeros(E, np.float32)
    bias[3] = 10.0  # expert 3 is always chosen
    logits, p, w, experts = np_route(x, wr, K, "sigmoid", False, bias)
    r, y, _ = run(x, wr, wi, wo, scoring="sigmoid", renormalize=False, router_bias=jnp.asarray(bias))
    assert (np.asarray(r.experts)[:, 0] == 3).all()
    np.testing.assert_array_equal(np.asarray(r.experts), experts)
    assert_close("biased-route weights", r.weights, w, OUT_TOL)
    assert_close("biased-route y", y, np_moe(x, w, experts, wi, wo), OUT_TOL)


def test_stats_vs_formulas(rng):
    x, wr, wi, wo = make(rng)
    logits, p, w, experts = np_route(x, wr, K)
    lb, z, counts = np_stats(logits, p, experts, E)
    for dispatch in ("reference", "dropless", "capacity"):
        _, _, s = run(x, wr, wi, wo, dispatch=dispatch)
        assert_close(f"{dispatch} load_balance_loss", s.load_balance_loss, lb, OUT_TOL)
        assert_close(f"{dispatch} z_loss", s.z_loss, z, OUT_TOL)
        np.testing.assert_array_equal(np.asarray(s.tokens_per_expert), counts)
        assert s.load_balance_loss.dtype == jnp.float32 and s.tokens_per_expert.shape == (E,)


# --- capacity -------------------------------------------------------------------------------------------------------

def test_capacity_hand_built_overflow(rng):
    """e 3, k 2, t 6, capacity_factor 0.5 -> c = ceil(6 * 2 / 3 * 0.5) = 2 slots per expert.

    first choices  0 0 0 1 2 2   -> expert 0 takes tokens 0, 1 and drops token 2; expert 1 takes 3; expert 2 4, 5
    second choices 1 2 1 0 0 1   -> token 0 takes expert 1's last slot; everything else finds its expert full
    Kept: (0,0) (1,0) (3,0) (4,0) (5,0) (0,1); dropped 6 of 12 pairs. Token 2 loses both choices: y_2 = 0."""
    e, t, d, f = 3, 6, 5, 4
    x, _, wi, wo = make(rng, t=t, d=d, e=e, f=f)
    experts = np.array([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0], [2, 1]], np.int32)
    weights = rng.uniform(0.2, 1.0, size=(t, 2)).astype(np.float32)
    logits = rng.normal(size=(t, e)).astype(np.float32)
    routing = Routing(jnp.asarray(logits), jax.nn.softmax(jnp.asarray(logits)), jnp.asarray(weights),
                      jnp.asarray(experts))
    assert expert_capacity(t, e, 2, 0.5) == 2
    keep = np.zeros((t, 2), bool)
    keep[[0, 1, 3, 4, 5], 0] = True
    keep[0, 1] = True
    y, s = jax.jit(lambda x, r: moe_ffn(x, r, wi, wo, dispatch="capacity", capacity_factor=0.5))(x, routing)
    print("drop_fraction", float(s.drop_fraction))
    assert float(s.drop_fraction) == 0.5
    assert_close("hand-built capacity y", y, np_moe(x, weights, experts, wi, wo, keep), OUT_TOL)
    assert np.abs(np.asarray(y)[2]).max() == 0.0
    np.testing.assert_array_equal(np.asarray(s.tokens_per_expert), [5, 4, 3])  # counted before dropping
    # A padding token takes no slot: with token 0 masked, token 2 gets expert 0's second slot, and token 2's
    # second choice (expert 1) takes the slot token 0 had; experts 0 and 2 are full for the other second choices.
    mask = np.ones(t, bool)
    mask[0] = False
    y, s = moe_ffn(x, routing, wi, wo, dispatch="capacity", capacity_factor=0.5, token_mask=jnp.asarray(mask))
    keep = np.zeros((t, 2), bool)
    keep[[1, 2, 3, 4, 5], 0] = True
    keep[2, 1] = True
    np.testing.assert_array_equal(np_capacity_keep(experts, 2, mask), keep)
    assert_close("masked capacity y", y, np_moe(x, weights, experts, wi, wo, keep), OUT_TOL)
    assert math.isclose(float(s.drop_fraction), 4 / 10, rel_tol=1e-6)  # 10 valid pairs, 4 dropped


@pytest.mark.parametrize("cf", [0.6, 1.0, pytest.param(1.3, marks=pytest.mark.slow)])
def test_capacity_vs_slot_filling_loop(rng, cf):
    x, wr, wi, wo = make(rng, scale=2.0)
    logits, p, w, experts = np_route(x, wr, K)
    c = math.ceil(T * K / E * cf)
    assert expert_capacity(T, E, K, cf) == c
    keep = np_capacity_keep(experts, c)
    _, y, s = run(x, wr, wi, wo, dispatch="capacity", capacity_factor=cf)
    print(f"cf {cf}: capacity {c}, dropped {(~keep).sum()} of {keep.size}")
    assert (~keep).sum() > 0  # the cases are chosen to overflow
    assert math.isclose(float(s.drop_fraction), (~keep).sum() / keep.size, rel_tol=1e-6)
    assert_close(f"capacity y (cf {cf})", y, np_moe(x, w, experts, wi, wo, keep), OUT_TOL)


def test_skewed_routing_dropless_keeps_everything(rng):
    """Every token's top-2 is (expert 0, expert 1): dropless and reference drop nothing; capacity keeps c of the
    t pairs of each of the two experts."""
    x, wr, wi, wo = make(rng)
    x[:, 0] = np.abs(x[:, 0]) + 1.0
    wr[:] = 0.0
    wr[0, 0], wr[0, 1] = 20.0, 10.0
    logits, p, w, experts = np_route(x, wr, K)
    assert (experts == [0, 1]).all()
    want = np_moe(x, w, experts, wi, wo)
    for dispatch in ("dropless", "reference"):
        _, y, s = run(x, wr, wi, wo, dispatch=dispatch)
        assert float(s.drop_fraction) == 0.0
        assert_close(f"skewed {dispatch} y", y, want, OUT_TOL)
    _, y, s = run(x, wr, wi, wo, dispatch="capacity", capacity_factor=1.0)
    c = math.ceil(T * K / E)
    assert math.isclose(float(s.drop_fraction), 2 * (T - c) / (2 * T), rel_tol=1e-6)
    keep = np.zeros((T, K), bool)
    keep[:c] = True
    assert_close("skewed capacity y", y, np_moe(x, w, experts, wi, wo, keep), OUT_TOL)


def test_expert_capacity():
    assert expert_capacity(6, 3, 2, 0.5) == 2
    assert expert_capacity(37, 7, 2, 1.25) == math.ceil(37 * 2 / 7 * 1.25)
    assert expert_capacity(10, 2, 2, 5.0) == 10  # capped at t
    assert expert_capacity(1, 64, 1, 0.01) == 1


# --- padding, gradients, bf16 ---------------------------------------------------------------------------------------

def test_token_mask_equals_dropping_the_tokens(rng):
    x, wr, wi, wo = make(rng)
    mask = rng.uniform(size=T) < 0.7
    logits, p, w, experts = np_route(x, wr, K)
    lb, z, counts = np_stats(logits, p, experts, E, mask)
    for dispatch, cf in [("reference", 1.0), ("dropless", 1.0), ("capacity", E / K)]:
        _, y, s = run(x, wr, wi, wo, dispatch=dispatch, capacity_factor=cf, token_mask=jnp.asarray(mask))
        _, y_sub, s_sub = run(x[mask], wr, wi, wo, dispatch=dispatch, capacity_factor=cf)
        assert np.abs(np.asarray(y)[~mask]).max() == 0.0
        assert_close(f"{dispatch} masked y", np.asarray(y)[mask], y_sub, OUT_TOL)
        assert_close(f"{dispatch} masked lb", s.load_balance_loss, lb, OUT_TOL)
        assert_close(f"{dispatch} masked z", s.z_loss, z, OUT_TOL)
        np.testing.assert_array_equal(np.asarray(s.tokens_per_expert), counts)
        np.testing.assert_array_equal(np.asarray(s.tokens_per_expert), np.asarray(s_sub.tokens_per_expert))


def _grads(dispatch, cf, args, ct):
    def loss(x, wr, wi, wo):
        r = route(x, wr, top_k=K)
        y, s = moe_ffn(x, r, wi, wo, dispatch=dispatch, capacity_factor=cf)
        return jnp.sum(y * ct) + 0.3 * s.load_balance_loss + 0.05 * s.z_loss

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)


def test_gradients_of_all_paths_equal(rng):
    args = make(rng)
    ct = rng.normal(size=(T, D)).astype(np.float32)
    ref = _grads("reference", 1.0, args, ct)
    assert np.abs(np.asarray(ref[1])).max() > 0  # the router learns
    for dispatch, cf in [("dropless", 1.0), ("capacity", E / K)]:
        got = _grads(dispatch, cf, args, ct)
        for name, g, r in zip(("x", "router_kernel", "wi", "wo"), got, ref):
            assert_close(f"{dispatch} d{name}", g, r, GRAD_TOL)


def test_bfloat16(rng):
    """bf16 tokens and experts: every path within bf16 rounding of the float32 result on the same (bf16-rounded)
    values (identical routing: the router runs in float32 either way)."""
    x, wr, wi, wo = (jnp.asarray(a).astype(jnp.bfloat16) for a in make(rng))
    f32 = [a.astype(jnp.float32) for a in (x, wr, wi, wo)]
    _, want, _ = run(*f32, dispatch="reference")
    errs = {}
    for dispatch in ("reference", "dropless", "capacity"):
        r, y, s = run(x, wr, wi, wo, dispatch=dispatch, capacity_factor=E / K)
        assert y.dtype == jnp.bfloat16 and r.logits.dtype == jnp.float32 and s.z_loss.dtype == jnp.float32
        errs[dispatch] = assert_close(f"bf16 {dispatch} y", y, want, 2e-2)
    # The sparse paths are no worse than twice the plain bf16 computation (the dense reference in bf16).
    assert max(errs["dropless"], errs["capacity"]) <= 2 * errs["reference"], errs
    g = _grads("dropless", 1.0, (x, wr, wi, wo), np.ones((T, D), np.float32))
    assert all(bool(jnp.isfinite(a.astype(jnp.float32)).all()) for a in g)


def test_reference_function_is_the_reference_dispatch(rng):
    x, wr, wi, wo = make(rng)
    r = route(jnp.asarray(x), jnp.asarray(wr), top_k=K)
    a, _ = moe_ffn_reference(x, r, wi, wo)
    b, _ = moe_ffn(x, r, wi, wo, dispatch="reference")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- the dropless path's grouped matmuls: ragged_dot and blocked ----------------------------------------------------

GROUPED = ("ragged_dot", "blocked")


def hand_routing(rng, experts, t=T, e=E):
    """A Routing with the given (t, k) expert choices and random positive combine weights."""
    logits = rng.normal(size=(t, e)).astype(np.float32)
    weights = rng.uniform(0.2, 1.0, size=experts.shape).astype(np.float32)
    return Routing(jnp.asarray(logits), jax.nn.softmax(jnp.asarray(logits)), jnp.asarray(weights),
                   jnp.asarray(experts, jnp.int32))


def dropless_value_and_grads(impl, x, routing, wi, wo, mask, ct, activation="silu", block_rows=None):
    """y and d sum(y * ct) / d (x, combine weights, wi, wo) of `dropless_ffn` (impl) or the reference path."""
    t, k = routing.experts.shape

    def loss(x, w, wi, wo):
        if impl == "reference":
            y, _ = moe_ffn_reference(x, routing._replace(weights=w), wi, wo, activation=activation,
                                     token_mask=jnp.asarray(mask))
        else:
            valid = jnp.broadcast_to(jnp.asarray(mask)[:, None], (t, k))
            y = dropless_ffn(x, w, routing.experts, valid, wi, wo, activation, grouped_impl=impl,
                             block_rows=block_rows)
        return jnp.sum(y.astype(jnp.float32) * ct), y

    (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, routing.weights, wi, wo)
    return y, g


def _one_expert(rng, t, k):  # every token on the last expert (k = 1), the searchsorted edge
    return np.full((t, k), E - 1)


def _two_experts(rng, t, k):  # experts 0, 2, 3, 5, 6 empty; 1 and 4 take every token
    return np.where(rng.uniform(size=(t, 1)) < 0.5, [[1, 4]], [[4, 1]])


def _random(rng, t, k):
    return np.argsort(rng.uniform(size=(t, E)), axis=1)[:, :k]


@pytest.mark.parametrize("choose,k,masked,block_rows", [
    pytest.param(_random, 2, True, 4, id="random-masked-B4"),  # groups span several blocks, partial last block
    pytest.param(_two_experts, 2, False, None, id="empty-experts"),
    pytest.param(_one_expert, 1, True, 8, id="one-expert-B8"),
    pytest.param(_random, 3, False, 1, id="random-k3-B1", marks=pytest.mark.slow),
    pytest.param(_random, 2, False, 128, id="random-B128", marks=pytest.mark.slow),  # one block per expert
])
def test_grouped_impls_vs_numpy_and_reference(rng, choose, k, masked, block_rows):
    x, _, wi, wo = make(rng)
    experts = choose(rng, T, k)
    routing = hand_routing(rng, experts)
    mask = rng.uniform(size=T) < 0.7 if masked else np.ones(T, bool)
    ct = rng.normal(size=(T, D)).astype(np.float32)
    want = np_moe(x, np.asarray(routing.weights), experts, wi, wo, np.broadcast_to(mask[:, None], experts.shape))
    _, g_ref = dropless_value_and_grads("reference", x, routing, wi, wo, mask, ct)
    got = {}
    for impl in GROUPED:
        y, g = got[impl] = dropless_value_and_grads(impl, x, routing, wi, wo, mask, ct, block_rows=block_rows)
        assert y.dtype == jnp.float32
        assert_close(f"{impl} y", y, want, OUT_TOL)
        assert np.abs(np.asarray(y)[~mask]).max(initial=0.0) == 0.0
        for name, a, b in zip(("x", "weights", "wi", "wo"), g, g_ref):
            assert_close(f"{impl} d{name}", a, b, GRAD_TOL)
        np.testing.assert_array_equal(np.asarray(g[1])[~mask], 0.0)  # padding tokens get no gradient
    for name, a, b in zip(("y", "dx", "dweights", "dwi", "dwo"), (got["blocked"][0], *got["blocked"][1]),
                          (got["ragged_dot"][0], *got["ragged_dot"][1])):
        assert_close(f"blocked vs ragged_dot {name}", a, b, GRAD_TOL if name != "y" else OUT_TOL)
    unused = np.setdiff1d(np.arange(E), experts[mask])
    for impl in GROUPED:  # an expert nothing reaches gets exactly zero gradient
        np.testing.assert_array_equal(np.asarray(got[impl][1][2])[unused], 0.0)
        np.testing.assert_array_equal(np.asarray(got[impl][1][3])[unused], 0.0)


def test_grouped_impls_gelu_and_all_masked(rng):
    """Another activation (its derivative comes from jax.vjp in the blocked backward), and a batch with no valid
    token (no block runs: y and every gradient 0)."""
    x, _, wi, wo = make(rng)
    routing = hand_routing(rng, _random(rng, T, K))
    ct = rng.normal(size=(T, D)).astype(np.float32)
    for mask in (rng.uniform(size=T) < 0.8, np.zeros(T, bool)):
        y_ref, g_ref = dropless_value_and_grads("reference", x, routing, wi, wo, mask, ct, "gelu_tanh")
        for impl in GROUPED:
            y, g = dropless_value_and_grads(impl, x, routing, wi, wo, mask, ct, "gelu_tanh", block_rows=8)
            if not mask.any():
                assert not np.asarray(y).any() and not any(np.asarray(a).any() for a in g)
                continue
            assert_close(f"gelu_tanh {impl} y", y, y_ref, OUT_TOL)
            for name, a, b in zip(("x", "weights", "wi", "wo"), g, g_ref):
                assert_close(f"gelu_tanh {impl} d{name}", a, b, GRAD_TOL)


def test_grouped_impls_bfloat16(rng):
    """bf16 tokens and experts: each grouped matmul within 2x the error of the plain bf16 computation (the dense
    reference in bf16) of the float32 result on the same bf16-rounded values, outputs and gradients."""
    x, _, wi, wo = (jnp.asarray(a).astype(jnp.bfloat16) for a in make(rng))
    routing = hand_routing(rng, _random(rng, T, K))
    mask = rng.uniform(size=T) < 0.8
    ct = rng.normal(size=(T, D)).astype(np.float32)
    f32 = [a.astype(jnp.float32) for a in (x, wi, wo)]
    y_want, g_want = dropless_value_and_grads("reference", f32[0], routing, *f32[1:], mask, ct)
    y_bf, g_bf = dropless_value_and_grads("reference", x, routing, wi, wo, mask, ct)
    for impl in GROUPED:
        y, g = dropless_value_and_grads(impl, x, routing, wi, wo, mask, ct, block_rows=8)
        assert [a.dtype for a in g] == [jnp.bfloat16, jnp.float32, jnp.bfloat16, jnp.bfloat16]
        for name, a, b, plain in zip(("y", "dx", "dweights", "dwi", "dwo"), (y, *g), (y_want, *g_want),
                                     (y_bf, *g_bf)):
            bound = 2 * max(rel_err(plain, b)[0], 2.0 ** -9)
            assert_close(f"bf16 {impl} {name}", a, b, bound)


def test_grouped_impl_auto_and_block_rows(monkeypatch):
    if jax.default_backend() == "cpu":  # the dense ragged_dot fallback is avoided where the tests run
        assert resolve_grouped_impl("auto") == "blocked"
    for backend, impl in [("cpu", "blocked"), ("gpu", "ragged_dot"), ("cuda", "ragged_dot"), ("rocm", "ragged_dot"),
                          ("tpu", "ragged_dot")]:
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert resolve_grouped_impl("auto") == impl
        assert resolve_grouped_impl("blocked") == "blocked" and resolve_grouped_impl("ragged_dot") == "ragged_dot"
    # B: the power of two >= the mean group size n / e, clipped to [8, 128].
    assert [block_rows_for(n, e) for n, e in [(74, 7), (4096, 64), (8192, 64), (8192, 8), (1, 64), (0, 3)]] == \
        [16, 64, 128, 128, 8, 8]


def test_block_count_bound(rng):
    """The static number of blocks, (n + min(e, n) (B - 1)) // B, is never below sum_i ceil(g_i / B) (a cheap
    check of the inequality the blocked path relies on) and is reached by the worst case."""
    for _ in range(2000):
        e, b = int(rng.integers(1, 20)), int(rng.integers(1, 40))
        n = int(rng.integers(0, 200))
        g = np.bincount(rng.integers(0, e, size=n) if rng.uniform() < 0.5 else np.zeros(n, int), minlength=e)
        assert np.sum(-(-g // b)) <= (n + min(e, n) * (b - 1)) // b
    assert np.sum(-(-np.array([1] * 6 + [94]) // 8)) == (100 + 7 * 7) // 8  # six singletons and one big group


def test_moe_ffn_dropless_is_the_auto_grouped_path(rng):
    x, wr, wi, wo = make(rng)
    r, y, _ = run(x, wr, wi, wo, dispatch="dropless")
    y_auto = jax.jit(lambda x, r: dropless_ffn(x, r.weights, r.experts, jnp.ones((T, K), bool), wi, wo, "silu",
                                               grouped_impl=resolve_grouped_impl("auto")))(x, r)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_auto.astype(y.dtype)))


# --- errors ---------------------------------------------------------------------------------------------------------

def test_errors(rng):
    x, wr, wi, wo = (jnp.asarray(a) for a in make(rng))
    r = route(x, wr, top_k=K)
    with pytest.raises(ValueError, match=r"top_k=8 must be <= num_experts=7"):
        route(x, wr, top_k=8)
    with pytest.raises(ValueError, match=r"top_k must be a positive int, got 0"):
        route(x, wr, top_k=0)
    with pytest.raises(ValueError, match=r"scoring must be one of .* got 'relu'"):
        route(x, wr, top_k=K, scoring="relu")
    with pytest.raises(ValueError, match=r"router_kernel must have shape \(d=13, e\), got \(12, 7\)"):
        route(x, wr[:12], top_k=K)
    with pytest.raises(ValueError, match=r"router_bias must have shape \(e,\) = \(7,\), got \(6,\)"):
        route(x, wr, top_k=K, router_bias=jnp.zeros(6))
    with pytest.raises(ValueError, match=r"x must have rank 2 \(t, d\)"):
        route(x[None], wr, top_k=K)
    with pytest.raises(ValueError, match=r"dispatch must be one of .* got 'sparse'"):
        moe_ffn(x, r, wi, wo, dispatch="sparse")
    for cf in (0, -1.0, 0.0):
        with pytest.raises(ValueError, match=rf"capacity_factor must be a finite number > 0 .* got {cf!r}"):
            moe_ffn(x, r, wi, wo, dispatch="capacity", capacity_factor=cf)
    moe_ffn(x, r, wi, wo, dispatch="dropless", capacity_factor=0)  # ignored off the capacity path
    with pytest.raises(ValueError, match=r"wi must have shape \(e, d=13, 2f\) with an even last dimension, "
                                         r"got \(7, 13, 21\)"):
        moe_ffn(x, r, wi[..., :21], wo)
    with pytest.raises(ValueError, match=r"wi must have shape \(e, d=13, 2f\) .* got \(7, 12, 22\)"):
        moe_ffn(x, r, wi[:, :12], wo)
    with pytest.raises(ValueError, match=r"wo must have shape \(e, f, d\) = \(7, 11, 13\), got \(7, 10, 13\)"):
        moe_ffn(x, r, wi, wo[:, :10])
    with pytest.raises(ValueError, match=r"routing.logits must have shape \(t, e\) = \(36, 7\), got \(37, 7\)"):
        moe_ffn(x[:36], r, wi, wo)
    with pytest.raises(ValueError, match=r"routing.logits must have shape \(t, e\) = \(37, 6\), got \(37, 7\)"):
        moe_ffn(x, r, wi[:6], wo[:6])
    with pytest.raises(ValueError, match=r"routing.weights must have shape \(t, k\) = \(37, 2\), got \(37, 3\)"):
        moe_ffn(x, r._replace(weights=jnp.zeros((T, 3))), wi, wo)
    with pytest.raises(ValueError, match=r"routing.experts must be an integer array, got dtype float32"):
        moe_ffn(x, r._replace(experts=r.experts.astype(jnp.float32)), wi, wo)
    with pytest.raises(ValueError, match=r"routing must be a Routing"):
        moe_ffn(x, tuple(r), wi, wo)
    with pytest.raises(ValueError, match=r"token_mask must have shape \(t,\) = \(37,\), got \(36,\)"):
        moe_ffn(x, r, wi, wo, token_mask=jnp.ones(36, bool))
    with pytest.raises(ValueError, match=r"token_mask must be bool, got dtype int32"):
        moe_ffn(x, r, wi, wo, token_mask=jnp.ones(T, jnp.int32))
    with pytest.raises(ValueError, match=r"activation must be one of .* got 'relu'"):
        moe_ffn(x, r, wi, wo, activation="relu")
    with pytest.raises(ValueError, match=r"x must be float32, bfloat16, float16 or float64, got dtype int32"):
        moe_ffn(x.astype(jnp.int32), r, wi, wo)
    valid = jnp.ones((T, K), bool)
    with pytest.raises(ValueError, match=r"grouped_impl must be one of \('auto', 'ragged_dot', 'blocked'\), "
                                         r"got 'megablox'"):
        dropless_ffn(x, r.weights, r.experts, valid, wi, wo, "silu", grouped_impl="megablox")
    for bad in (0, -8, 4.0):
        with pytest.raises(ValueError, match=rf"block_rows must be a positive int, got {bad!r}"):
            dropless_ffn(x, r.weights, r.experts, valid, wi, wo, "silu", grouped_impl="blocked", block_rows=bad)
