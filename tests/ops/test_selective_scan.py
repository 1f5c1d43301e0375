"""selective_scan (Mamba-1): the three paths agree, packed == per-segment, causality, decode == forward,
the xla path's memory bound, dtypes and every validation error.

Sizes are distinct and prime-ish per axis (b 3, l 97, d 40, n 7, g 2) so a transposed axis cannot pass."""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix_jax.ops import selective_scan, selective_scan_reference, selective_state_update
from tests.helpers import assert_close, call_scan, scan_forward_and_grads

PATHS = ("reference", "associative", "xla")
ARG_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def make_inputs(rng, b=3, l=97, d=40, n=7, g=2, dtype=jnp.float32):
    """Every input of selective_scan; g=None gives ungrouped (b, l, n) B and C.

    dt + dt_bias ~ -1 keeps delta ~ 0.3 and A spans [-2, -0.05]: decays between 0.5 and 0.98 per step,
    so the state carries information across tens of steps (and across xla chunks)."""
    bc = (b, l, n) if g is None else (b, l, g, n)
    arrays = dict(
        x=rng.standard_normal((b, l, d)),
        dt=rng.normal(-1.0, 0.5, (b, l, d)),
        A=-np.exp(rng.uniform(np.log(0.05), np.log(2.0), (d, n))),
        B=rng.standard_normal(bc),
        C=rng.standard_normal(bc),
        D=rng.standard_normal(d),
        z=rng.standard_normal((b, l, d)),
        dt_bias=rng.normal(0.0, 0.3, d),
        initial_state=rng.standard_normal((b, d, n)),
    )
    return {k: jnp.asarray(v, dtype) for k, v in arrays.items()}


call = functools.partial(call_scan, selective_scan)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "dt_softplus"))
def run(args, segment_ids=None, *, impl, chunk_size=16, dt_softplus=True):
    """(y, final_state), jitted: compiling once beats dispatching the associative scan op by op."""
    return call(args, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size, dt_softplus=dt_softplus,
                return_final_state=True)


def forward_and_grads(args, impl, chunk_size, key, segment_ids=None):
    return scan_forward_and_grads(selective_scan, args, key, impl=impl, chunk_size=chunk_size, segment_ids=segment_ids)


@pytest.mark.parametrize("l", [97, 7, 1], ids=["chunk_not_dividing_l", "l_shorter_than_chunk", "l_1"])
def test_paths_agree_outputs_states_and_every_gradient(rng, key, l):
    args = make_inputs(rng, l=l)
    y_ref, h_ref, g_ref = forward_and_grads(args, "reference", 16, key)
    for impl in ("associative", "xla"):
        y, h, grads = forward_and_grads(args, impl, 16, key)
        assert_close(f"{impl} y", y, y_ref, 1e-5)
        assert_close(f"{impl} final state", h, h_ref, 1e-5)
        for name in ARG_NAMES:
            assert_close(f"{impl} d/d{name}", grads[name], g_ref[name], 1e-4)


def test_xla_forward_and_its_vjp_layouts_agree_with_reference_at_batch_1(rng, key):
    """The xla path runs its primal with the state as (b, n, d) and differentiates a (b, d, n) program, with the
    batch axis dropped inside the loop when b = 1 (see `_scan_chunked_block`; b > 1 is every other test here): both
    agree with the reference, and differentiating only some inputs (the others symbolic zeros) gives the same
    gradients as differentiating all."""
    b = 1
    args = make_inputs(rng, b=b, l=37)
    y_ref, h_ref, g_ref = forward_and_grads(args, "reference", 8, key)
    y, h = run(args, impl="xla", chunk_size=8)  # primal only: the channels-last program
    assert_close(f"b={b} xla primal y", y, y_ref, 1e-5)
    assert_close(f"b={b} xla primal final state", h, h_ref, 1e-5)
    _, _, grads = forward_and_grads(args, "xla", 8, key)
    for name in ARG_NAMES:
        assert_close(f"b={b} xla d/d{name}", grads[name], g_ref[name], 1e-4)
    for subset in (("x",), ("initial_state", "A")):
        def loss(part):
            y, s = call({**args, **part}, impl="xla", chunk_size=8, return_final_state=True)
            return jnp.sum(y * jnp.cos(y)) + jnp.sum(s ** 2)
        part_grads = jax.jit(jax.grad(loss))({k: args[k] for k in subset})
        ref_grads = jax.jit(jax.grad(lambda a: loss(a)))(args)
        for name in subset:
            assert_close(f"b={b} xla d/d{name} (only {subset} differentiated)", part_grads[name], ref_grads[name],
                         1e-5)


def test_xla_channel_blocks_agree_with_reference(rng, key, monkeypatch):
    """A state wider than STATE_BLOCK_ELEMENTS is scanned in blocks of channels (each inside one B/C group):
    outputs, states and every gradient are unchanged."""
    module = sys.modules["seqmix_jax.ops.selective_scan"]  # the package re-exports a function of that name
    monkeypatch.setattr(module, "STATE_BLOCK_ELEMENTS", 3 * 5 * 7)  # 20 channels per group -> blocks of 5
    args = make_inputs(rng, l=23)
    y_ref, h_ref, g_ref = forward_and_grads(args, "reference", 8, key)
    y, h, grads = forward_and_grads(args, "xla", 8, key)
    assert_close("blocked xla y", y, y_ref, 1e-5)
    assert_close("blocked xla final state", h, h_ref, 1e-5)
    for name in ARG_NAMES:
        assert_close(f"blocked xla d/d{name}", grads[name], g_ref[name], 1e-4)


def test_xla_memory_does_not_grow_with_state_size():
    """Forward+backward temporaries (b 2, l 256, d 512) for n = 64 (a state of exactly STATE_BLOCK_ELEMENTS)
    and n = 256: channel blocking keeps the per-chunk state buffers at the block size, so a 4x larger state
    costs almost no extra memory (without blocking it grew ~linearly in n)."""
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    b, l, d = 2, 256, 512
    temp = {}
    for n in (64, 256):
        loss = lambda x, dt, A, B, C: jnp.sum(selective_scan(x, dt, A, B, C, impl="xla") ** 2)
        shapes = (spec(b, l, d), spec(b, l, d), spec(d, n), spec(b, l, n), spec(b, l, n))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*shapes).compile()
        temp[n] = compiled.memory_analysis().temp_size_in_bytes
    print(f"temp n=64: {temp[64]} B, n=256: {temp[256]} B, ratio {temp[256] / temp[64]:.2f}")
    assert temp[256] < 1.25 * temp[64]


@pytest.mark.parametrize("chunk_size", [1, 5, 29, 64])
def test_xla_matches_reference_for_any_chunk_size(rng, chunk_size):
    """Chunk of one step, chunks not dividing l, exactly l, longer than l."""
    args = make_inputs(rng, l=29, d=10)
    y_ref, h_ref = run(args, impl="reference")
    y, h = run(args, impl="xla", chunk_size=chunk_size)
    assert_close("xla y", y, y_ref, 1e-5)
    assert_close("xla final state", h, h_ref, 1e-5)


def test_paths_agree_ungrouped_without_optional_inputs(rng):
    """B, C as (b, l, n), no D / z / dt_bias / initial_state, no softplus."""
    full = make_inputs(rng, l=53, g=None)
    args = {k: full[k] for k in ("x", "A", "B", "C")}
    args["dt"] = jax.nn.softplus(full["dt"])  # already positive: dt_softplus=False uses it as delta
    y_ref, h_ref = run(args, impl="reference", dt_softplus=False)
    for impl in ("associative", "xla"):
        y, h = run(args, impl=impl, dt_softplus=False, chunk_size=8)
        assert_close(f"{impl} y", y, y_ref, 1e-5)
        assert_close(f"{impl} final state", h, h_ref, 1e-5)


def test_reference_matches_explicit_loop(rng):
    """The reference path is the recurrence written in the module docstring (numpy float64 loop)."""
    b, l, d, n, g = 2, 9, 6, 5, 3
    a = {k: np.asarray(v, np.float64) for k, v in make_inputs(rng, b, l, d, n, g).items()}
    y_ref, h_ref = run({k: jnp.asarray(v, jnp.float32) for k, v in a.items()}, impl="reference")
    delta = np.log1p(np.exp(a["dt"] + a["dt_bias"]))
    group = np.arange(d) // (d // g)  # channel -> its B/C group, contiguous blocks
    h = a["initial_state"].copy()
    ys = np.zeros((b, l, d))
    for t in range(l):
        Bt, Ct = a["B"][:, t, group], a["C"][:, t, group]  # (b, d, n)
        h = np.exp(delta[:, t, :, None] * a["A"]) * h + (delta[:, t] * a["x"][:, t])[..., None] * Bt
        ys[:, t] = (h * Ct).sum(-1) + a["D"] * a["x"][:, t]
    ys *= a["z"] / (1 + np.exp(-a["z"]))
    assert_close("reference y vs loop", y_ref, ys, 1e-5)
    assert_close("reference state vs loop", h_ref, h, 1e-5)


# --- packed sequences ---------------------------------------------------------------------------------

def per_segment(args, segment_ids):
    """Run every segment of every row separately with the reference; initial_state feeds only the first.

    Segment boundaries come from where the id changes: a reused, non-adjacent id is a new segment."""
    ys, hs = [], []
    for i, row in enumerate(np.asarray(segment_ids)):
        starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]] + [len(row)]
        row_y = []
        for s, e in zip(starts[:-1], starts[1:]):
            seg = {k: (v[i:i + 1, s:e] if v.ndim >= 3 else v) for k, v in args.items() if k != "initial_state"}
            if s == 0:
                seg["initial_state"] = args["initial_state"][i:i + 1]
            y, h = run(seg, impl="reference")
            row_y.append(y)
        ys.append(jnp.concatenate(row_y, axis=1))
        hs.append(h)
    return jnp.concatenate(ys), jnp.concatenate(hs)


# One row per layout, l = 17, xla chunk_size = 4.
PACKED = np.asarray([
    [0] * 4 + [1] * 7 + [2] * 5 + [3],  # boundaries on and off chunk edges, a length-1 last segment
    [0, 0, 1, 1, 0, 0] + [1] * 11,  # ids reused non-adjacently: four segments, not two
    [5] * 17,  # one segment: the initial state flows through to the end
], np.int32)


@pytest.mark.parametrize("impl", PATHS)
def test_packed_equals_per_segment(rng, impl):
    args = make_inputs(rng, b=3, l=17, d=10, n=3, g=2)
    y_loop, h_loop = per_segment(args, PACKED)
    y, h = run(args, jnp.asarray(PACKED), impl=impl, chunk_size=4)
    assert_close(f"{impl} packed y", y, y_loop, 1e-5)
    assert_close(f"{impl} packed final state", h, h_loop, 1e-5)


def test_packed_gradients_agree_across_paths(rng, key):
    """Training on packed batches: every gradient of the associative and xla paths matches the reference."""
    args = make_inputs(rng, b=3, l=17, d=10, n=3, g=2)
    segment_ids = jnp.asarray(PACKED)
    _, _, g_ref = forward_and_grads(args, "reference", 4, key, segment_ids)
    for impl in ("associative", "xla"):
        _, _, grads = forward_and_grads(args, impl, 4, key, segment_ids)
        for name in ARG_NAMES:
            assert_close(f"{impl} packed d/d{name}", grads[name], g_ref[name], 1e-4)


# --- causality, decode, memory, dtypes ------------------------------------------------------------------

def test_causality_by_gradient_xla(rng):
    """d y[t] / d input[s] is exactly 0 for s > t, for every sequence input, across chunk edges."""
    b, l, d, n, g = 2, 13, 6, 5, 3
    args = make_inputs(rng, b, l, d, n, g)
    seq = ("x", "dt", "B", "C", "z")

    def f(*seq_args):
        return run({**args, **dict(zip(seq, seq_args))}, impl="xla", chunk_size=4)[0]

    y, vjp = jax.vjp(f, *(args[k] for k in seq))
    proj = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    onehot = jnp.eye(l)[:, None, :, None]  # (t, 1, l, 1)
    grads = jax.vmap(vjp)(onehot * proj)  # each (t, b, s, ...)
    future = np.triu(np.ones((l, l), bool), 1)  # [t, s]: s > t
    for name, gr in zip(seq, grads):
        per_ts = np.abs(np.asarray(gr)).reshape(l, b, l, -1).max(axis=(1, 3))
        assert np.all(per_ts[future] == 0), f"{name}: y[t] depends on {name}[s > t]"
        # the check can fail: y[t] does depend on the past through x, dt, B, and on C[t], z[t] directly
        reached = ~future if name in ("x", "dt", "B") else np.eye(l, dtype=bool)
        assert np.all(per_ts[reached] > 0), f"{name}: gradient vanished where y[t] must depend on it"


def test_decode_step_by_step_equals_forward(rng):
    b, l, d, n, g = 2, 13, 10, 7, 2
    args = make_inputs(rng, b, l, d, n, g)
    step = jax.jit(selective_state_update)
    state = args["initial_state"]
    ys = []
    for t in range(l):
        y_t, state = step(state, args["x"][:, t], args["dt"][:, t], args["A"], args["B"][:, t], args["C"][:, t],
                          args["D"], z=args["z"][:, t], dt_bias=args["dt_bias"])
        assert y_t.shape == (b, d) and state.shape == (b, d, n)
        ys.append(y_t)
    for impl in PATHS:
        y, h = run(args, impl=impl, chunk_size=4)
        assert_close(f"decode y vs {impl}", jnp.stack(ys, 1), y, 1e-5)
        assert_close(f"decode state vs {impl}", state, h, 1e-5)


def test_xla_path_memory_below_one_bldn_array_associative_above():
    """Forward+backward temporaries (XLA's own accounting, not timing): the chunked, rematerialized xla
    path never holds a (b, l, d, n) float32 array; the associative path holds several."""
    b, l, d, n = 1, 512, 64, 64
    one_bldn = b * l * d * n * 4
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    shapes = (spec(b, l, d), spec(b, l, d), spec(d, n), spec(b, l, n), spec(b, l, n))
    temp = {}
    for impl in ("xla", "associative"):
        loss = lambda x, dt, A, B, C, impl=impl: jnp.sum(selective_scan(x, dt, A, B, C, impl=impl) ** 2)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*shapes).compile()
        temp[impl] = compiled.memory_analysis().temp_size_in_bytes
    print(f"one (b, l, d, n) f32 array: {one_bldn} B; temp xla: {temp['xla']} B, "
          f"associative: {temp['associative']} B")
    assert temp["xla"] < one_bldn < temp["associative"]


@pytest.mark.parametrize("impl", PATHS)
def test_bf16_inputs_give_bf16_output_and_f32_state(rng, impl):
    args = make_inputs(rng, b=2, l=19, d=10, n=3, g=2, dtype=jnp.bfloat16)
    y, h = run(args, impl=impl, chunk_size=8)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    # Inside runs in float32: the same inputs upcast give the same state and y up to y's final rounding.
    y32, h32 = run({k: v.astype(jnp.float32) for k, v in args.items()}, impl=impl, chunk_size=8)
    assert_close("bf16 state vs f32", h, h32, 1e-5)
    assert_close("bf16 y vs f32", y, y32, 2 ** -8)


def test_reference_function_is_reference_path(rng):
    args = make_inputs(rng, b=2, l=7, d=6, n=3, g=3)
    pos = [args[k] for k in ("x", "dt", "A", "B", "C", "D")]
    kw = {k: args[k] for k in ("z", "dt_bias", "initial_state")}
    y, h = selective_scan_reference(*pos, **kw, return_final_state=True)
    y2, h2 = selective_scan(*pos, **kw, return_final_state=True, impl="reference")
    assert np.array_equal(y, y2) and np.array_equal(h, h2)


# --- validation ---------------------------------------------------------------------------------------

def _valid(rng):
    return make_inputs(rng, b=2, l=5, d=6, n=3, g=2)


def _i32(a):
    return a.astype(jnp.int32)


# (case id, function of the valid inputs -> changed inputs, extra kwargs, message regex naming the argument)
BAD = [
    ("x_rank", lambda a: {"x": a["x"][0]}, {}, r"^x must have rank 3"),
    ("x_int", lambda a: {"x": _i32(a["x"])}, {}, r"^x must be float32, bfloat16, float16 or float64, got dtype int32"),
    ("dt_shape", lambda a: {"dt": a["dt"][:, :, :5]}, {}, r"^dt must have shape \(b, l, d\) = \(2, 5, 6\)"),
    ("dt_int", lambda a: {"dt": _i32(a["dt"])}, {}, r"^dt must be float"),
    ("A_rank", lambda a: {"A": a["A"][:, 0]}, {}, r"^A must have rank 2"),
    ("A_d", lambda a: {"A": a["A"][:5]}, {}, r"^A must have shape \(d, n\) with d=6"),
    ("A_int", lambda a: {"A": _i32(a["A"])}, {}, r"^A must be float"),
    ("B_rank", lambda a: {"B": a["B"][0, 0]}, {}, r"^B must have rank 3 or 4"),
    ("B_n", lambda a: {"B": a["B"][..., :2]}, {}, r"^B must have shape \(b, l, g, n\)"),
    ("B_int", lambda a: {"B": _i32(a["B"])}, {}, r"^B must be float"),
    ("C_l", lambda a: {"C": a["C"][:, :4]}, {}, r"^C must have shape \(b, l, g, n\)"),
    ("C_int", lambda a: {"C": _i32(a["C"])}, {}, r"^C must be float"),
    ("B_C_groups", lambda a: {"C": jnp.concatenate([a["C"], a["C"][:, :, :1]], 2)}, {},
     r"^B and C must have the same shape"),
    ("B_C_rank", lambda a: {"C": a["C"][:, :, 0]}, {}, r"^B and C must have the same shape"),
    ("groups_not_dividing_d", lambda a: {"B": jnp.tile(a["B"], (1, 1, 2, 1)), "C": jnp.tile(a["C"], (1, 1, 2, 1))},
     {}, r"^ngroups \(B\.shape\[2\]\)=4 must be positive and divide d=6"),
    ("D_shape", lambda a: {"D": a["D"][:5]}, {}, r"^D must have shape \(d,\)"),
    ("D_int", lambda a: {"D": _i32(a["D"])}, {}, r"^D must be float"),
    ("z_shape", lambda a: {"z": a["z"][:1]}, {}, r"^z must have shape \(b, l, d\)"),
    ("dt_bias_shape", lambda a: {"dt_bias": a["dt_bias"][None]}, {}, r"^dt_bias must have shape \(d,\)"),
    ("initial_state_shape", lambda a: {"initial_state": a["initial_state"][..., :2]}, {},
     r"^initial_state must have shape \(b, d, n\) = \(2, 6, 3\)"),
    ("initial_state_int", lambda a: {"initial_state": _i32(a["initial_state"])}, {}, r"^initial_state must be float"),
    ("segment_ids_float", lambda a: {}, {"segment_ids": jnp.zeros((2, 5), jnp.float32)},
     r"^segment_ids must be an integer array, got dtype float32"),
    ("segment_ids_shape", lambda a: {}, {"segment_ids": jnp.zeros((2, 4), jnp.int32)},
     r"^segment_ids must have shape \(b, l\) = \(2, 5\)"),
    ("chunk_size_0", lambda a: {}, {"chunk_size": 0}, r"^chunk_size must be a positive int, got 0"),
    ("chunk_size_negative", lambda a: {}, {"chunk_size": -4}, r"^chunk_size must be a positive int"),
    ("chunk_size_float", lambda a: {}, {"chunk_size": 2.5}, r"^chunk_size must be a positive int"),
    ("chunk_size_bool", lambda a: {}, {"chunk_size": True}, r"^chunk_size must be a positive int"),
    ("impl_unknown", lambda a: {}, {"impl": "nope"}, r"^impl='nope' is not one of"),
    ("impl_pallas_n", lambda a: {"A": -jnp.ones((6, 300)), "B": jnp.ones((2, 5, 300)), "C": jnp.ones((2, 5, 300)),
                                 "initial_state": None}, {"impl": "pallas"},
     r"^impl='pallas' cannot run selective_scan: d_state n=300 is larger than the kernel takes \(256\)"),
]


@pytest.mark.parametrize("change, kwargs, match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_validation_errors(rng, change, kwargs, match):
    args = _valid(rng)
    call(args, impl="reference")  # the unchanged inputs are valid
    with pytest.raises(ValueError, match=match):
        call({**args, **change(args)}, **kwargs)


def test_state_update_validates_like_the_scan(rng):
    a = _valid(rng)
    with pytest.raises(ValueError, match=r"^initial_state must have shape"):
        selective_state_update(a["initial_state"][:, :5], a["x"][:, 0], a["dt"][:, 0], a["A"], a["B"][:, 0],
                               a["C"][:, 0])
