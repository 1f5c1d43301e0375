"""causal_conv1d (definition, packed == per-segment, causality, decode == prefill) and the RMSNorms, against
numpy float64 definitions kept in this file.

Sizes are distinct per axis (b 3, l 97 / 17, c 10, w 4; norms: 3 x 7 x 40 with groups of 8)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix_jax.ops import (causal_conv1d, causal_conv1d_reference, causal_conv1d_update, rms_norm, rms_norm_gated,
                            rms_norm_gated_reference, rms_norm_reference)
from tests.helpers import assert_close

W = 4  # conv width: the state holds w - 1 = 3 inputs


def conv_inputs(rng, b=3, l=97, c=10, w=W, dtype=jnp.float32):
    arrays = dict(x=rng.standard_normal((b, l, c)), weight=rng.standard_normal((w, c)), bias=rng.standard_normal(c),
                  initial_state=rng.standard_normal((b, w - 1, c)))
    return {k: jnp.asarray(v, dtype) for k, v in arrays.items()}


def conv_loop(x, weight, bias, initial_state, silu):
    """y[t, c] = bias[c] + sum_j weight[j, c] x[t - (w - 1) + j, c], x before t = 0 from initial_state; float64."""
    x, weight, bias, prefix = (np.asarray(a, np.float64) for a in (x, weight, bias, initial_state))
    w, l = weight.shape[0], x.shape[1]
    xp = np.concatenate([prefix, x], axis=1)
    y = np.stack([bias + sum(weight[j] * xp[:, t + j] for j in range(w)) for t in range(l)], axis=1)
    return y / (1 + np.exp(-y)) if silu else y


@functools.partial(jax.jit, static_argnames=("activation", "impl"))
def conv(args, segment_ids=None, *, activation="silu", impl="xla"):
    """(y, final_state), jitted."""
    return causal_conv1d(**args, segment_ids=segment_ids, activation=activation, return_final_state=True, impl=impl)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_matches_definition_and_both_impls_agree(rng, activation):
    args = conv_inputs(rng)
    y, state = conv(args, activation=activation, impl="xla")
    assert_close("conv y vs loop", y, conv_loop(**args, silu=activation is not None), 1e-6)
    assert np.array_equal(state, args["x"][:, -(W - 1):]), "final state is the last w - 1 inputs"
    y_ref, state_ref = conv(args, activation=activation, impl="reference")
    assert np.array_equal(y, y_ref) and np.array_equal(state, state_ref)
    # eager vs jitted: XLA may fuse into FMAs differently, so close rather than equal
    assert_close("causal_conv1d_reference", causal_conv1d_reference(**args, activation=activation), y, 1e-6)


def test_conv_shorter_than_width_keeps_initial_state_in_final_state(rng):
    """l = 2 < w - 1: the final state is the last initial_state input followed by both inputs."""
    args = conv_inputs(rng, l=2)
    y, state = conv(args)
    assert_close("conv y vs loop", y, conv_loop(**args, silu=True), 1e-6)
    assert np.array_equal(state, jnp.concatenate([args["initial_state"][:, -1:], args["x"]], axis=1))


# --- packed sequences ---------------------------------------------------------------------------------

# One row per layout, l = 17, w = 4.
PACKED = np.asarray([
    [0] * 3 + [1] * 10 + [2] * 3 + [3],  # last segment of length 1: two zeros in the final state
    [0, 0, 1, 1, 0, 0] + [1] * 11,  # ids reused non-adjacently: position 4 must not reach back to 0 and 1
    [4] * 15 + [5] * 2,  # last segment of length 2: one zero in the final state
    [5] * 17,  # one segment: initial_state feeds it
], np.int32)


def per_segment(args, segment_ids):
    """Run every segment of every row separately; initial_state feeds only the first."""
    ys, states = [], []
    for i, row in enumerate(np.asarray(segment_ids)):
        starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]] + [len(row)]
        row_y = []
        for s, e in zip(starts[:-1], starts[1:]):
            prefix = args["initial_state"][i:i + 1] if s == 0 else jnp.zeros_like(args["initial_state"][i:i + 1])
            y, state = conv({**args, "x": args["x"][i:i + 1, s:e], "initial_state": prefix})
            row_y.append(y)
        ys.append(jnp.concatenate(row_y, axis=1))
        states.append(state)
    return jnp.concatenate(ys), jnp.concatenate(states)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_conv_packed_equals_per_segment(rng, impl):
    args = conv_inputs(rng, b=4, l=17)
    y_loop, state_loop = per_segment(args, PACKED)
    y, state = conv(args, jnp.asarray(PACKED), impl=impl)
    assert_close(f"{impl} packed y", y, y_loop, 1e-6)
    assert np.array_equal(state, state_loop)
    # state positions before the last segment start are zero, the rest are the inputs
    assert np.all(state[0, :2] == 0) and np.array_equal(state[0, 2], args["x"][0, -1])
    assert np.all(state[2, :1] == 0) and np.array_equal(state[2, 1:], args["x"][2, -2:])
    assert np.array_equal(state[1], args["x"][1, -3:]) and np.array_equal(state[3], args["x"][3, -3:])


def test_conv_packed_short_last_segment_decodes_like_a_fresh_sequence(rng):
    """Decoding after a packed prefill continues the last segment only: the zeros in the state matter."""
    args = conv_inputs(rng, b=4, l=17)
    _, state = conv(args, jnp.asarray(PACKED))
    x_next = jnp.asarray(rng.standard_normal((4, 10)), jnp.float32)
    y_next, _ = causal_conv1d_update(state, x_next, args["weight"], args["bias"], activation="silu")
    # row 0: the last segment is x[16] alone, so the step sees [0, 0, x[16], x_next]
    fresh, _ = conv({**args, "x": jnp.stack([args["x"][:, 16], x_next], 1), "initial_state": 0 * args["initial_state"]})
    assert_close("decode after packed prefill", y_next[0], fresh[0, 1], 1e-6)


# --- causality and decode -------------------------------------------------------------------------------

def test_conv_causality_by_gradient(rng):
    """d y[t] / d x[s] is exactly 0 for s > t (and for s <= t - w: the receptive field is w steps)."""
    b, l, c = 2, 13, 10
    args = conv_inputs(rng, b=b, l=l, c=c)
    y, vjp = jax.vjp(lambda x: conv({**args, "x": x})[0], args["x"])
    proj = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    (grads,) = jax.vmap(vjp)(jnp.eye(l)[:, None, :, None] * proj)  # (t, b, s, c)
    per_ts = np.abs(np.asarray(grads)).max(axis=(1, 3))
    t, s = np.indices((l, l))
    assert np.all(per_ts[s > t] == 0), "y[t] depends on x[s > t]"
    assert np.all(per_ts[s <= t - W] == 0), "y[t] reaches further back than w taps"
    assert np.all(per_ts[(s <= t) & (s > t - W)] > 0), "y[t] must depend on its w taps: the check can fail"


@pytest.mark.parametrize("prefill", [0, 2, 9], ids=["no_prefill", "prefill_shorter_than_width", "prefill_9"])
def test_conv_decode_step_by_step_equals_forward(rng, prefill):
    args = conv_inputs(rng, l=17)
    y_full, state_full = conv(args)
    y_pre, state = conv({**args, "x": args["x"][:, :prefill]})
    step = jax.jit(functools.partial(causal_conv1d_update, activation="silu"))
    ys = [y_pre]
    for t in range(prefill, 17):
        y_t, state = step(state, args["x"][:, t], args["weight"], args["bias"])
        ys.append(y_t[:, None])
    assert_close("decode y vs forward", jnp.concatenate(ys, 1), y_full, 1e-6)
    # the update's state is an exact shift: bit for bit the prefill's return_final_state
    assert np.array_equal(state, state_full)


def test_conv_bf16_output_and_state_dtype(rng):
    """y in x.dtype; the conv state holds raw inputs, so it stays in x.dtype (exact), unlike the SSM states."""
    args = conv_inputs(rng, l=19, dtype=jnp.bfloat16)
    y, state = conv(args)
    assert y.dtype == jnp.bfloat16 and state.dtype == jnp.bfloat16
    y32, _ = conv({k: v.astype(jnp.float32) for k, v in args.items()})
    assert_close("bf16 y vs f32", y, y32, 2 ** -8)
    assert np.array_equal(state, args["x"][:, -(W - 1):])
    y_t, new_state = causal_conv1d_update(state, args["x"][:, 0], args["weight"], args["bias"], activation="silu")
    assert y_t.dtype == jnp.bfloat16 and new_state.dtype == jnp.bfloat16


# --- conv validation ------------------------------------------------------------------------------------

BAD_CONV = [
    ("x_rank", lambda a: {"x": a["x"][0]}, {}, r"^x must have rank 3 "),
    ("x_int", lambda a: {"x": a["x"].astype(jnp.int32)}, {}, r"^x must be float32.*got dtype int32"),
    ("weight_rank", lambda a: {"weight": a["weight"][0]}, {}, r"^weight must have rank 2 "),
    ("weight_c", lambda a: {"weight": a["weight"][:, :9]}, {}, r"^weight must have shape \(w, c\) with c=10"),
    ("bias_shape", lambda a: {"bias": a["bias"][:9]}, {}, r"^bias must have shape \(c,\)"),
    ("initial_state_shape", lambda a: {"initial_state": a["initial_state"][:, :2]}, {},
     r"^initial_state must have shape \(b, w - 1, c\) = \(2, 3, 10\)"),
    ("activation", lambda a: {}, {"activation": "relu"}, r"^activation must be None or 'silu', got 'relu'"),
    ("segment_ids_float", lambda a: {}, {"segment_ids": jnp.zeros((2, 5), jnp.float32)},
     r"^segment_ids must be an integer array"),
    ("segment_ids_shape", lambda a: {}, {"segment_ids": jnp.zeros((2, 6), jnp.int32)},
     r"^segment_ids must have shape \(b, l\) = \(2, 5\)"),
    ("impl_unknown", lambda a: {}, {"impl": "nope"}, r"^impl='nope' is not one of"),
    ("impl_associative", lambda a: {}, {"impl": "associative"},
     r"^impl='associative' is not available for causal_conv1d"),
    ("impl_pallas_width", lambda a: {"weight": jnp.ones((17, 10)), "initial_state": None}, {"impl": "pallas"},
     r"^impl='pallas' cannot run causal_conv1d: weight has width w=17; the kernel takes 1 <= w <= 16"),
]


@pytest.mark.parametrize("change, kwargs, match", [c[1:] for c in BAD_CONV], ids=[c[0] for c in BAD_CONV])
def test_conv_validation_errors(rng, change, kwargs, match):
    args = conv_inputs(rng, b=2, l=5)
    causal_conv1d(**args)  # the unchanged inputs are valid
    with pytest.raises(ValueError, match=match):
        causal_conv1d(**{**args, **change(args)}, **kwargs)


def test_conv_update_validation_errors(rng):
    a = conv_inputs(rng, b=2, l=5)
    state, x = a["initial_state"], a["x"][:, 0]
    with pytest.raises(ValueError, match=r"^x must have rank 2 "):
        causal_conv1d_update(state, a["x"], a["weight"])
    with pytest.raises(ValueError, match=r"^weight must have rank 2 "):
        causal_conv1d_update(state, x, a["weight"][None])
    with pytest.raises(ValueError, match=r"^state must have shape \(b, w - 1, c\) = \(2, 3, 10\)"):
        causal_conv1d_update(state[:, 1:], x, a["weight"])


# causal_conv1d_update validates its arguments like causal_conv1d (these were gaps once: silu applied for any
# activation, int32 passed through, einsum/broadcast errors that named no argument).
UPDATE_GAPS = [
    ("activation", lambda kw: {"activation": "relu"}, r"^activation must be None or 'silu'"),  # applies silu
    ("x_int", lambda kw: {"x": kw["x"].astype(jnp.int32)}, r"^x must be float"),  # returns int32
    ("weight_c", lambda kw: {"weight": kw["weight"][:, :9]}, r"^weight"),  # einsum's error names no argument
    ("bias_shape", lambda kw: {"bias": kw["bias"][:9]}, r"^bias"),  # a broadcasting error naming no argument
]


@pytest.mark.parametrize("change, match", [c[1:] for c in UPDATE_GAPS], ids=[c[0] for c in UPDATE_GAPS])
def test_conv_update_validates_like_conv(rng, change, match):
    a = conv_inputs(rng, b=2, l=5)
    kw = dict(state=a["initial_state"], x=a["x"][:, 0], weight=a["weight"], bias=a["bias"], activation="silu")
    causal_conv1d_update(**kw)  # the unchanged inputs are valid
    with pytest.raises(ValueError, match=match):
        causal_conv1d_update(**{**kw, **change(kw)})


# --- RMSNorm --------------------------------------------------------------------------------------------

def rms_loop(x, weight, bias, z, group_size, norm_before_gate, eps=1e-5):
    """mamba_ssm's rms_norm_ref in float64: per-group statistics, gate before or after the norm."""
    x, weight, bias = (np.asarray(a, np.float64) for a in (x, weight, bias))
    silu_z = None if z is None else np.asarray(z, np.float64) / (1 + np.exp(-np.asarray(z, np.float64)))
    if silu_z is not None and not norm_before_gate:
        x = x * silu_z
    xg = x.reshape(*x.shape[:-1], -1, group_size)
    y = (xg / np.sqrt((xg ** 2).mean(-1, keepdims=True) + eps)).reshape(x.shape) * weight + bias
    return y * silu_z if silu_z is not None and norm_before_gate else y


def norm_inputs(rng, dtype=jnp.float32):
    shape = (3, 7, 40)
    arrays = dict(x=rng.standard_normal(shape), weight=rng.normal(1.0, 0.3, 40), bias=rng.normal(0.0, 0.3, 40),
                  z=rng.standard_normal(shape))
    return {k: jnp.asarray(v, dtype) for k, v in arrays.items()}


def test_rms_norm_matches_definition(rng):
    a = norm_inputs(rng)
    y = rms_norm(a["x"], a["weight"], bias=a["bias"])
    assert_close("rms_norm", y, rms_loop(a["x"], a["weight"], a["bias"], None, 40, False), 1e-6)
    assert rms_norm_reference is rms_norm


@pytest.mark.parametrize("group_size", [40, 8])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_rms_norm_gated_matches_definition(rng, group_size, norm_before_gate):
    a = norm_inputs(rng)
    y = rms_norm_gated(a["x"], a["weight"], a["z"], group_size=group_size, norm_before_gate=norm_before_gate,
                       bias=a["bias"])
    want = rms_loop(a["x"], a["weight"], a["bias"], a["z"], group_size, norm_before_gate)
    assert_close(f"rms_norm_gated group {group_size}", y, want, 1e-6)
    assert rms_norm_gated_reference is rms_norm_gated


def test_rms_norm_groups_are_independent(rng):
    """Scaling one group of 8 features leaves the other groups' outputs unchanged (to rounding)."""
    a = norm_inputs(rng)
    y = rms_norm_gated(a["x"], group_size=8)
    y2 = rms_norm_gated(a["x"].at[..., 8:16].multiply(100.0), group_size=8)
    assert_close("other groups", jnp.concatenate([y2[..., :8], y2[..., 16:]], -1),
                 jnp.concatenate([y[..., :8], y[..., 16:]], -1), 1e-6)


def test_rms_norm_bf16_in_bf16_out(rng):
    a = norm_inputs(rng, dtype=jnp.bfloat16)
    y = rms_norm_gated(a["x"], a["weight"], a["z"], group_size=8)
    assert y.dtype == jnp.bfloat16
    y32 = rms_norm_gated(*(a[k].astype(jnp.float32) for k in ("x", "weight", "z")), group_size=8)
    assert_close("bf16 vs f32", y, y32, 2 ** -8)


BAD_NORM = [
    ("x_int", lambda a: {"x": a["x"].astype(jnp.int32)}, r"^x must be float32.*got dtype int32"),
    ("x_scalar", lambda a: {"x": a["x"][0, 0, 0]}, r"^x must have at least one axis"),
    ("weight_shape", lambda a: {"weight": a["weight"][:39]}, r"^weight must have shape \(d,\) = \(40,\)"),
    ("bias_shape", lambda a: {"bias": a["bias"][None]}, r"^bias must have shape \(d,\)"),
    ("z_shape", lambda a: {"z": a["z"][:1]}, r"^z must have shape like x"),
    ("group_size_not_dividing_d", lambda a: {"group_size": 7}, r"^group_size=7 must be positive and divide d=40"),
    ("group_size_0", lambda a: {"group_size": 0}, r"^group_size=0 must be positive"),
    ("eps_negative", lambda a: {"eps": -1e-5}, r"^eps must be >= 0"),
]


@pytest.mark.parametrize("change, match", [c[1:] for c in BAD_NORM], ids=[c[0] for c in BAD_NORM])
def test_rms_norm_validation_errors(rng, change, match):
    a = norm_inputs(rng)
    rms_norm_gated(**a)  # the unchanged inputs are valid
    with pytest.raises(ValueError, match=match):
        rms_norm_gated(**{**a, **change(a)})
