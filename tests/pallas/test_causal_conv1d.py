"""pallas_kernels.causal_conv1d in interpret mode: forward, final state and every gradient against the op's
reference path (and a numpy float64 loop kept here), both variants (GPU/Triton semantics; TPU under the TPU
interpreter at small sizes), the decode-update kernel against the op's update and the full forward, the bf16 rule,
dispatch, lowering for cuda/tpu, and every validation error.

Sizes are odd and distinct per axis (b 2-3, l 97 / 257 / 37, c 37 / 200 / 130, w 1-4), with block sizes chosen so
that l and c span several blocks, the last one partial."""

from __future__ import annotations

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels._common as common
import pallas_kernels.causal_conv1d as kern
from pallas_kernels.causal_conv1d import BlockSizes
from seqmix_jax.ops import causal_conv1d, causal_conv1d_update, dispatch
from seqmix_jax.ops import conv as conv_op
from tests.helpers import assert_close, rel_err

GRADS = ("x", "weight", "bias", "initial_state")


def make_inputs(rng, b, l, c, w, *, dtype=jnp.float32, segments=True):
    """Inputs plus segment ids with short segments (length 1 included) and an id reused non-adjacently."""
    arrays = dict(x=rng.standard_normal((b, l, c)), weight=rng.standard_normal((w, c)) / np.sqrt(w),
                  bias=rng.standard_normal(c), initial_state=rng.standard_normal((b, w - 1, c)))
    args = {k: jnp.asarray(v, dtype) for k, v in arrays.items()}
    ids = np.cumsum(rng.random((b, l)) < 0.15, axis=1) % 3  # ids 0, 1, 2 recur: changes mark the starts
    if l >= 8:
        ids[0, 5:7] = [7, 8]  # two length-1 segments
    return args, (jnp.asarray(ids, jnp.int32) if segments else None)


def conv_loop(x, weight, bias, initial_state, segment_ids, silu):
    """y[t] = bias + sum_j weight[j] x[t - (w - 1) + j] over taps in t's segment (initial_state in the first)."""
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    b, l, _ = x.shape
    w = weight.shape[0]
    prefix = np.zeros((b, w - 1, x.shape[2])) if initial_state is None else np.asarray(initial_state, np.float64)
    xp = np.concatenate([prefix, x], axis=1)
    ids = np.zeros((b, l), np.int64) if segment_ids is None else np.asarray(segment_ids)
    y = np.zeros_like(x) + (0.0 if bias is None else np.asarray(bias, np.float64))
    for i in range(b):
        start = 0  # the first segment also owns the prefix: it reaches back to -(w - 1)
        for t in range(l):
            if t > 0 and ids[i, t] != ids[i, t - 1]:
                start = t
            for j in range(w):
                s = t - (w - 1) + j
                if s >= start or start == 0:
                    y[i, t] += weight[j] * xp[i, s + w - 1]
    return y / (1 + np.exp(-y)) if silu else y


def forward_and_grads(fn, args, segment_ids, activation, key):
    """(y, final_state, grads of a fixed random projection of both w.r.t. x, weight, bias, initial_state), jitted.
    The projections are drawn in numpy from `key`'s seed: jax.random inside the jit costs seconds of compile."""
    b, l, c = args["x"].shape
    w = args["weight"].shape[0]
    gen = np.random.default_rng(int(jax.random.key_data(key).ravel()[-1]))
    ry = jnp.asarray(gen.standard_normal((b, l, c)), jnp.float32)
    rs = jnp.asarray(gen.standard_normal((b, w - 1, c)), jnp.float32)

    def loss(a, ry, rs):
        y, s = fn(**a, segment_ids=segment_ids, activation=activation, return_final_state=True)
        return jnp.sum(y.astype(jnp.float32) * ry) + jnp.sum(s.astype(jnp.float32) * rs), (y, s)

    (_, (y, s)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(args, ry, rs)
    return y, s, grads


def reference(**kw):
    return causal_conv1d(**kw, impl="reference")


# (id, variant, b, l, c, w, activation, bias, initial_state, segments, block sizes)
CASES = [
    ("gpu_silu_bias_init_segments", "gpu", 2, 97, 37, 4, "silu", True, True, True,
     BlockSizes(block_l=16, block_c=16, block_l_bwd=16, block_c_bwd=32, chunks_bwd=3)),
    ("tpu_silu_bias_init_segments", "tpu", 2, 37, 130, 4, "silu", True, True, True,
     BlockSizes(block_l=16, block_l_bwd=16, block_c=128, block_c_bwd=128)),
    ("gpu_plain_w2", "gpu", 3, 257, 200, 2, None, False, False, False, None),
    ("gpu_w3_segments_no_init", "gpu", 2, 257, 37, 3, "silu", False, False, True, BlockSizes(block_l_bwd=64)),
    ("gpu_w1", "gpu", 2, 97, 37, 1, "silu", True, True, True, None),
    ("tpu_plain_w2", "tpu", 2, 97, 37, 2, None, False, False, False, None),
    ("tpu_w3_init_no_bias", "tpu", 1, 41, 200, 3, "silu", False, True, True, BlockSizes(block_l=8, block_l_bwd=16)),
    ("gpu_w16_max_width", "gpu", 1, 41, 37, 16, "silu", True, True, True, None),
    ("tpu_w16_max_width", "tpu", 1, 41, 37, 16, "silu", True, True, True, BlockSizes(block_l=16, block_l_bwd=32)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_state_and_grads_match_reference(rng, key, case):
    name, variant, b, l, c, w, activation, use_bias, use_init, use_seg, blocks = case
    args, seg = make_inputs(rng, b, l, c, w, segments=use_seg)
    if not use_bias:
        args["bias"] = None
    if not use_init:
        args["initial_state"] = None
    pallas = functools.partial(kern.causal_conv1d, variant=variant, block_sizes=blocks)
    y, s, g = forward_and_grads(pallas, args, seg, activation, key)
    y_ref, s_ref, g_ref = forward_and_grads(reference, args, seg, activation, key)
    assert y.dtype == jnp.float32 and s.shape == (b, w - 1, c)
    assert_close(f"{name} y", y, y_ref, 1e-5)
    assert_close(f"{name} y vs float64 loop", y, conv_loop(**args, segment_ids=seg, silu=activation is not None),
                 1e-5)
    assert np.array_equal(s, s_ref), "the final state is a copy of inputs: exact"
    for k in GRADS:
        if args[k] is None or args[k].size == 0:
            continue
        assert g[k].dtype == args[k].dtype
        assert_close(f"{name} d{k}", g[k], g_ref[k], 1e-4)


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_bf16_error_at_most_twice_the_xla_paths(rng, key, variant):
    """Against the float32 reference on the same (bf16-representable) inputs, the kernel's error in y and every
    gradient is at most 2x the op's xla path run in bf16 (plus a 1e-4 floor). Segment masking is
    dtype-independent (covered in float32), so it is left out here to keep the interpret-mode compile short."""
    args16, seg = make_inputs(rng, 2, 97, 37, 4, dtype=jnp.bfloat16, segments=False)
    args32 = {k: v.astype(jnp.float32) for k, v in args16.items()}
    pallas = functools.partial(kern.causal_conv1d, variant=variant)
    xla = lambda **kw: causal_conv1d(**kw, impl="xla")
    y_k, s_k, g_k = forward_and_grads(pallas, args16, seg, "silu", key)
    y_x, s_x, g_x = forward_and_grads(xla, args16, seg, "silu", key)
    y_r, s_r, g_r = forward_and_grads(reference, args32, seg, "silu", key)
    assert y_k.dtype == s_k.dtype == jnp.bfloat16 and np.array_equal(s_k, s_x)
    for name, ours, xla_out, ref in [("y", y_k, y_x, y_r)] + [(f"d{k}", g_k[k], g_x[k], g_r[k]) for k in GRADS]:
        assert ours.dtype == xla_out.dtype
        err, err_xla = rel_err(ours, ref)[0], rel_err(xla_out, ref)[0]
        print(f"bf16 {variant} {name}: kernel {err:.2e}, xla {err_xla:.2e}")
        assert err <= 2 * err_xla + 1e-4, f"{name}: {err:.2e} > 2 x {err_xla:.2e}"


# --- decode update ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_update_matches_op_update_and_forward_step_by_step(rng, variant):
    b, l, c, w, prefill = 3, 9, 37, 4, 4
    args, _ = make_inputs(rng, b, l, c, w, segments=False)
    ref = jax.jit(functools.partial(causal_conv1d, activation="silu", return_final_state=True, impl="reference"))
    y_full, state_full = ref(**args)
    _, state = ref(**{**args, "x": args["x"][:, :prefill]})
    step = jax.jit(functools.partial(kern.causal_conv1d_update, activation="silu", variant=variant))
    step_op = jax.jit(functools.partial(causal_conv1d_update, activation="silu", impl="xla"))
    ys = []
    for t in range(prefill, l):
        x_t = args["x"][:, t]
        y_t, new = step(state, x_t, args["weight"], args["bias"])
        y_op, new_op = step_op(state, x_t, args["weight"], args["bias"])
        assert_close(f"update y at t={t} vs the op's update", y_t, y_op, 1e-6)
        assert np.array_equal(new, new_op), "the new state is an exact shift"
        ys.append(y_t[:, None])
        state = new
    assert_close("update y step by step vs forward", jnp.concatenate(ys, 1), y_full[:, prefill:], 1e-5)
    assert np.array_equal(state, state_full)


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_update_bf16_copies_state_exactly_and_w1(rng, variant):
    """bf16: the new state is a bit-exact shift, y within bf16 rounding of the op's update; w = 1 has no state."""
    args, _ = make_inputs(rng, 3, 2, 37, 3, dtype=jnp.bfloat16, segments=False)
    state, x = args["initial_state"], args["x"][:, 0]

    @jax.jit
    def both(state, x, weight, bias):
        return (kern.causal_conv1d_update(state, x, weight, bias, variant=variant),
                kern.causal_conv1d_update(state[:, :0], x, weight[:1], bias, variant=variant),
                causal_conv1d_update(state, x, weight, bias, impl="xla"),
                causal_conv1d_update(state[:, :0], x, weight[:1], bias, impl="xla"))

    (y, new), (y1, new1), (y_op, _), (y1_op, _) = both(state, x, args["weight"], args["bias"])
    assert y.dtype == new.dtype == jnp.bfloat16
    assert np.array_equal(new, jnp.concatenate([state[:, 1:], x[:, None]], axis=1))
    assert rel_err(y, y_op)[0] <= 2 ** -8
    assert new1.shape == (3, 0, 37) and rel_err(y1, y1_op)[0] <= 2 ** -8


def test_update_gradient_is_the_references(rng):
    """The update's custom_vjp differentiates the reference step (decoding rarely needs gradients)."""
    args, _ = make_inputs(rng, 2, 2, 37, 4, segments=False)
    proj = jnp.asarray(rng.standard_normal((2, 37)), jnp.float32)

    def loss(fn):
        def f(*a):
            y, new = fn(*a, activation="silu")
            return jnp.sum(y * proj) + jnp.sum(new ** 2)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

    inputs = (args["initial_state"], args["x"][:, 0], args["weight"], args["bias"])
    g = loss(kern.causal_conv1d_update)(*inputs)
    g_ref = loss(functools.partial(causal_conv1d_update, impl="reference"))(*inputs)
    for name, a, r in zip(("state", "x", "weight", "bias"), g, g_ref):
        assert_close(f"update d{name}", a, r, 1e-5)


# --- dispatch and lowering ----------------------------------------------------------------------------------

def test_op_pallas_reaches_the_kernels(rng, monkeypatch):
    calls = []
    for name in ("causal_conv1d", "causal_conv1d_update"):
        fn = getattr(kern, name)
        monkeypatch.setattr(kern, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    args, _ = make_inputs(rng, 2, 11, 7, 4, segments=False)
    y = causal_conv1d(**args, impl="pallas")
    assert_close("op pallas vs reference", y, causal_conv1d(**args, impl="reference"), 1e-5)
    causal_conv1d_update(args["initial_state"], args["x"][:, 0], args["weight"], impl="pallas")
    assert calls == ["causal_conv1d", "causal_conv1d_update"]


def test_auto_on_an_accelerator_picks_the_kernel_or_warns_and_falls_back(rng, monkeypatch):
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(dispatch, "_WARNED", set())
    args, _ = make_inputs(rng, 2, 11, 7, 4)
    call = dict(x=args["x"], weight=args["weight"], bias=args["bias"], initial_state=args["initial_state"])
    assert dispatch.resolve_impl("causal_conv1d", "auto", ("reference", "xla", "pallas"), **call) == "pallas"
    wide = dict(x=args["x"], weight=jnp.zeros((17, 7)))
    with pytest.warns(UserWarning, match=r"causal_conv1d: falling back .*w=17; the kernel takes 1 <= w <= 16"):
        assert dispatch.resolve_impl("causal_conv1d", "auto", ("reference", "xla", "pallas"), **wide) == "xla"
    upd = dict(state=args["initial_state"], x=args["x"][:, 0], weight=args["weight"])
    assert dispatch.resolve_impl("causal_conv1d_update", "auto", ("reference", "xla", "pallas"), **upd) == "pallas"


@pytest.mark.parametrize("variant, platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernels_lower_for_the_accelerator(monkeypatch, variant, platform):
    """Pallas -> Triton / Mosaic lowering of forward, backward and update at the benchmark's block sizes (bf16),
    exported on CPU; compiling the lowered kernel needs the device."""
    from pallas_kernels.causal_conv1d import entry
    monkeypatch.setattr(entry, "resolve_interpret", lambda interpret, v: False)
    b, l, c, w = 2, 1024, 1024, 4
    S = jax.ShapeDtypeStruct
    shapes = (S((b, l, c), jnp.bfloat16), S((w, c), jnp.bfloat16), S((c,), jnp.bfloat16),
              S((b, w - 1, c), jnp.bfloat16), S((b, l), jnp.int32))
    fwd = lambda x, wt, bi, init, seg: kern.causal_conv1d(x, wt, bi, activation="silu", segment_ids=seg,
                                                          initial_state=init, variant=variant)
    bwd = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
    upd = lambda s, x, wt, bi: kern.causal_conv1d_update(s, x, wt, bi, activation="silu", variant=variant)
    checks = [jax.export.DisabledSafetyCheck.custom_call(n) for n in ("__gpu$xla.gpu.triton", "tpu_custom_call")]
    for fn, avals in [(fwd, shapes), (bwd, shapes), (upd, (S((8, w - 1, c), jnp.bfloat16), S((8, c), jnp.bfloat16),
                                                           shapes[1], shapes[2]))]:
        with common.lowering_for(platform):
            text = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*avals).mlir_module()
        assert ("xla.gpu.triton" if variant == "gpu" else "tpu_custom_call") in text


# --- validation ---------------------------------------------------------------------------------------------

def _base(rng):
    args, seg = make_inputs(rng, 2, 5, 10, 4)
    return {**args, "segment_ids": seg}


BAD = [
    ("x_rank", lambda a: {"x": a["x"][0]}, r"^x must have rank 3 \(b, l, c\), got shape \(5, 10\)"),
    ("x_float64", lambda a: {"x": np.zeros((2, 5, 10))}, r"^x has dtype float64; the kernel takes float32, bfloat16"),
    ("x_int", lambda a: {"x": a["x"].astype(jnp.int32)}, r"^x has dtype int32"),
    ("weight_c", lambda a: {"weight": a["weight"][:, :9]}, r"^weight must have shape \(w, c\) with c=10, got \(4, 9\)"),
    ("weight_wide", lambda a: {"weight": jnp.zeros((17, 10)), "initial_state": None},
     r"^weight has width w=17; the kernel takes 1 <= w <= 16"),
    ("weight_int", lambda a: {"weight": a["weight"].astype(jnp.int32)}, r"^weight has dtype int32"),
    ("bias_shape", lambda a: {"bias": a["bias"][:9]}, r"^bias must have shape \(c,\) = \(10,\), got \(9,\)"),
    ("initial_state_shape", lambda a: {"initial_state": a["initial_state"][:, :2]},
     r"^initial_state must have shape \(b, w - 1, c\) = \(2, 3, 10\), got \(2, 2, 10\)"),
    ("segment_ids_float", lambda a: {"segment_ids": jnp.zeros((2, 5))}, r"^segment_ids must be an integer array"),
    ("segment_ids_shape", lambda a: {"segment_ids": jnp.zeros((2, 6), jnp.int32)},
     r"^segment_ids must have shape \(b, l\) = \(2, 5\), got \(2, 6\)"),
    ("activation", lambda a: {"activation": "relu"}, r"^activation must be None or 'silu', got 'relu'"),
    ("gpu_block_not_power_of_two", lambda a: {"block_sizes": BlockSizes(block_c=48)},
     r"^block_sizes.block_c=48 must be a power of two"),
    ("gpu_block_not_positive", lambda a: {"block_sizes": BlockSizes(block_l=-8)},
     r"^block_sizes.block_l must be a positive int, got -8"),
    ("gpu_chunks_zero", lambda a: {"block_sizes": BlockSizes(chunks_bwd=0)},
     r"^block_sizes.chunks_bwd must be a positive int, got 0"),
    ("tpu_block_c_lanes", lambda a: {"variant": "tpu", "block_sizes": BlockSizes(block_c=64)},
     r"^block_sizes.block_c=64 must be a multiple of 128"),
    ("tpu_block_l_halo_bf16", lambda a: {"variant": "tpu", "x": a["x"].astype(jnp.bfloat16),
                                         "block_sizes": BlockSizes(block_l=8)},
     r"^block_sizes.block_l=8 must be a multiple of 16"),
    ("tpu_block_b_update", lambda a: {"variant": "tpu", "block_sizes": BlockSizes(block_b_update=4)},
     r"^block_sizes.block_b_update=4 must be a multiple of 8"),
    ("variant", lambda a: {"variant": "cuda"}, r"^variant must be one of \('gpu', 'tpu'\) or None, got 'cuda'"),
    ("interpret_false_on_cpu", lambda a: {"interpret": False}, r"^interpret=False needs a GPU backend"),
]


@pytest.mark.parametrize("change, match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_validation_errors(rng, change, match):
    a = _base(rng)
    assert kern.supports(a["x"], a["weight"], a["bias"], segment_ids=a["segment_ids"],
                         initial_state=a["initial_state"]) is None
    kw = {**a, **change(a)}
    with pytest.raises(ValueError, match=match):
        kern.causal_conv1d(**kw)
    if "interpret" not in kw:  # supports() gives the dispatcher the same reason without raising
        reason = kern.supports(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), **kw)
        assert reason is not None and re.search(match, reason), reason


BAD_UPDATE = [
    ("x_rank", lambda a: {"x": a["x"][None]}, r"^x must have rank 2 \(b, c\), got shape \(1, 2, 10\)"),
    ("state_shape", lambda a: {"state": a["state"][:, 1:]},
     r"^state must have shape \(b, w - 1, c\) = \(2, 3, 10\), got \(2, 2, 10\)"),
    ("state_int", lambda a: {"state": a["state"].astype(jnp.int32)}, r"^state has dtype int32"),
    ("weight_wide", lambda a: {"weight": jnp.zeros((17, 10)), "state": jnp.zeros((2, 16, 10))},
     r"^weight has width w=17"),
    ("activation", lambda a: {"activation": "gelu"}, r"^activation must be None or 'silu', got 'gelu'"),
]


@pytest.mark.parametrize("change, match", [c[1:] for c in BAD_UPDATE], ids=[c[0] for c in BAD_UPDATE])
def test_update_validation_errors(rng, change, match):
    args, _ = make_inputs(rng, 2, 5, 10, 4)
    a = dict(state=args["initial_state"], x=args["x"][:, 0], weight=args["weight"], bias=args["bias"])
    assert kern.supports_update(**a) is None
    kw = {**a, **change(a)}
    with pytest.raises(ValueError, match=match):
        kern.causal_conv1d_update(**kw)
    assert kern.supports_update(**kw) is not None


def test_op_explicit_pallas_that_cannot_run_raises_the_reason(rng):
    args, _ = make_inputs(rng, 2, 5, 10, 4)
    with pytest.raises(ValueError, match=r"^impl='pallas' cannot run causal_conv1d: x has dtype float64"):
        causal_conv1d(**{**args, "x": np.zeros((2, 5, 10))}, impl="pallas")
    with pytest.raises(ValueError, match=r"^impl='pallas' cannot run causal_conv1d_update: weight has width w=17"):
        causal_conv1d_update(jnp.zeros((2, 16, 10)), args["x"][:, 0], jnp.zeros((17, 10)), impl="pallas")
    with pytest.raises(ValueError, match=r"^impl='associative' is not available for causal_conv1d_update"):
        causal_conv1d_update(args["initial_state"], args["x"][:, 0], args["weight"], impl="associative")
    with warnings.catch_warnings():  # on CPU, auto is the xla path, silently
        warnings.simplefilter("error")
        y, _ = causal_conv1d_update(args["initial_state"], args["x"][:, 0], args["weight"])
    assert np.array_equal(y, causal_conv1d_update(args["initial_state"], args["x"][:, 0], args["weight"],
                                                  impl="xla")[0])
    assert conv_op._pallas_supports(x=args["x"], weight=args["weight"]) is None
