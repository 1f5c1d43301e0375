"""pallas_kernels.ssd (Mamba-2 SSD) in interpret mode: forward, final state and every gradient against the op's
`reference` path (a sequential lax.scan), both variants, the bf16 rule, the op's pallas branch, every validation
error.

Sizes are distinct and prime-ish per axis (b 2, l 97 / 257, h 6, p 20, n 7, g 2) so a transposed axis cannot
pass; p = 20 with 16-wide head-dim blocks (padded to 32), n = 7 (padded to 16 / 128), chunks that do not divide l.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import importlib
from pallas_kernels.ssd import BlockSizes, ssd_reference, supports
from pallas_kernels.ssd import ssd as ssd_kernel
from seqmix_jax.ops import ssd
from tests.helpers import assert_close, rel_err, scan_forward_and_grads

ssd_op = importlib.import_module("seqmix_jax.ops.ssd")  # the module (the package re-exports the function)
ARG_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")
HALF = ("x", "dt", "B", "C", "z", "initial_state")  # bf16 in the bf16 test; A, D, dt_bias stay float32 params


def make_inputs(rng, b=2, l=97, h=6, p=20, n=7, g=2, D_shape="h"):
    """dt + dt_bias ~ -1 and A in [-2, -0.05]: per-step decays between 0.5 and 0.98 (state spans chunks)."""
    arrays = dict(
        x=rng.standard_normal((b, l, h, p)), dt=rng.normal(-1.0, 0.5, (b, l, h)),
        A=-np.exp(rng.uniform(np.log(0.05), np.log(2.0), h)), B=rng.standard_normal((b, l, g, n)),
        C=rng.standard_normal((b, l, g, n)), D=rng.standard_normal((h,) if D_shape == "h" else (h, p)),
        z=rng.standard_normal((b, l, h, p)), dt_bias=rng.normal(0.0, 0.3, h),
        initial_state=rng.standard_normal((b, h, p, n)))
    return {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}


def packed_ids(b, lengths):
    """(b, l) segment ids; each row reuses an id later (0, 1, 2, 0): only changes may reset the state."""
    ids = np.concatenate([np.full(m, [0, 1, 2, 0][i % 4]) for i, m in enumerate(lengths)])
    return jnp.asarray(np.repeat(ids[None], b, 0), jnp.int32)


def check_against_reference(args, key, seg=None, dt_limit=None, **kernel_kw):
    y_ref, s_ref, g_ref = scan_forward_and_grads(ssd, args, key, impl="reference", segment_ids=seg,
                                                 dt_limit=dt_limit)
    y, s, grads = scan_forward_and_grads(ssd_kernel, args, key, segment_ids=seg, dt_limit=dt_limit, **kernel_kw)
    assert_close("y", y, y_ref, 1e-5)
    assert_close("final state", s, s_ref, 1e-5)
    for name in ARG_NAMES:
        assert grads[name].dtype == args[name].dtype
        assert_close(f"d/d{name}", grads[name], g_ref[name], 1e-4)


GPU_CASES = {  # id: (make_inputs kwargs, segment lengths or None, dt_limit, BlockSizes)
    # packed, clamped, D per channel, 2 head-dim blocks forward and backward, 7 chunks of 16 (l = 97)
    "l97_packed_Dhp_dtlimit": (dict(l=97, D_shape="hp"), (13, 40, 27, 17), (0.2, 0.5),
                               BlockSizes(chunk=16, block_p=16, block_p_bwd=16)),
    "l257_Dh_defaults": (dict(l=257), None, None, None),  # default blocks: Q = 64, one head-dim block
    "l257_packed_chunk32": (dict(l=257, b=1), (100, 1, 80, 76), None, BlockSizes(chunk=32)),  # length-1 segment
    "l1": (dict(l=1, b=1), None, None, None),
    # the forward saves its chunk-start states instead of the backward recomputing them
    "l97_packed_saved_states": (dict(l=97, b=1), (50, 47), None, BlockSizes(chunk=16, save_states=True)),
    # the forward as the state walk, then chunk-parallel y (2 head-dim blocks), states saved from it
    "l97_packed_two_pass": (dict(l=97, b=1), (30, 67), None,
                            BlockSizes(chunk=16, block_p_bwd=16, two_pass=True, save_states=True)),
}


@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_variant_matches_reference_outputs_state_and_every_gradient(rng, key, case):
    shape_kw, lengths, dt_limit, bs = GPU_CASES[case]
    args = make_inputs(rng, **shape_kw)
    seg = None if lengths is None else packed_ids(args["x"].shape[0], lengths)
    check_against_reference(args, key, seg, dt_limit, block_sizes=bs, variant="gpu")


def test_gpu_backward_is_a_state_walk_then_chunk_parallel_kernels(monkeypatch):
    """The GPU backward's layout (the point of its design): only the forward and the state and dS walks loop
    over chunks, with b * h * (p blocks) programs; the two kernels holding a chunk's tiles run one program per
    (head and p block, chunk, batch row). Recorded from the pallas_calls that jax.grad traces (no compile)."""
    from jax.experimental import pallas as pl
    calls, real = [], pl.pallas_call

    def recording(kernel, **kw):
        calls.append((kw["name"], tuple(kw["grid"])))
        return real(kernel, **kw)

    monkeypatch.setattr(pl, "pallas_call", recording)
    b, l, h, p, g, n = 2, 1000, 6, 40, 2, 100  # Q = 64: 16 chunks; p 40 in 64-wide blocks; n padded to 128
    bs = BlockSizes(block_p_bwd=32)  # 2 head-dim blocks in the backward
    x = jax.ShapeDtypeStruct((b, l, h, p), jnp.bfloat16)
    B = jax.ShapeDtypeStruct((b, l, g, n), jnp.bfloat16)
    loss = lambda x, dt, A, B, C: jnp.sum(ssd_kernel(x, dt, A, B, C, block_sizes=bs, variant="gpu")
                                          .astype(jnp.float32))
    jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), x, jax.ShapeDtypeStruct((b, l, h), jnp.float32),
                   jax.ShapeDtypeStruct((h,), jnp.float32), B, B)
    print(calls)
    grids = dict(calls)
    # the backward first recomputes the chunk-start states (BlockSizes.save_states=False), then walks dS
    assert [name for name, _ in calls] == ["ssd_fwd", "ssd_states", "ssd_bwd_state", "ssd_bwd_bc", "ssd_bwd_x"]
    # the forward's block is halved down to 16 (b * h = 12 programs are too few): Pp = 64 in 4 blocks
    assert grids["ssd_bwd_state"] == grids["ssd_states"] == grids["ssd_fwd"] == (b, h, 4)
    assert grids["ssd_bwd_bc"] == grids["ssd_bwd_x"] == (h * 2, 16, b)
    calls.clear()  # the two-pass forward: the state walk, then y chunk-parallel
    jax.eval_shape(lambda x, dt, A, B: ssd_kernel(x, dt, A, B, B, variant="gpu",
                                                  block_sizes=BlockSizes(block_p_bwd=32, two_pass=True)),
                   x, jax.ShapeDtypeStruct((b, l, h), jnp.float32), jax.ShapeDtypeStruct((h,), jnp.float32), B)
    assert calls == [("ssd_states", (b, h, 4)), ("ssd_y", (h * 2, 16, b))]


@pytest.mark.parametrize("save_states", [False, True])
def test_tpu_variant_matches_reference_outputs_state_and_every_gradient(rng, key, save_states):
    """Mosaic semantics under the TPU interpreter (slow: small sizes); 3 chunks of 16, n padded to 128."""
    args = make_inputs(rng, b=1, l=37, h=4, p=12, n=7, g=2)
    check_against_reference(args, key, packed_ids(1, (9, 20, 8)), (0.05, 2.0),
                            block_sizes=BlockSizes(chunk=16, save_states=save_states), variant="tpu")


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("save_states", [False, True])
def test_what_the_backward_keeps_from_the_forward(rng, variant, save_states):
    """By default the forward's residuals hold no chunk-start states (b, h, l / Q, p, n): the backward recomputes
    them. With BlockSizes(save_states=True) they are saved, float32. Without an initial state, no (b, h, p, n) zero
    state is kept."""
    b, l, h, p, n, Q = 1, 40, 2, 16, 16, 16
    args = make_inputs(rng, b=b, l=l, h=h, p=p, n=n, g=1)
    fn = lambda x, B, C: ssd_kernel(x, args["dt"], args["A"], B, C, variant=variant,
                                    block_sizes=BlockSizes(chunk=Q, save_states=save_states))
    _, vjp = jax.vjp(fn, args["x"], args["B"], args["C"])
    shapes = [tuple(r.shape) for r in jax.tree.leaves(vjp)]
    print(shapes)
    Np = 16 if variant == "gpu" else 128
    states = [s for s in shapes if s == (b, h, 3, p, Np)]
    assert len(states) == (1 if save_states else 0)
    assert not any(len(s) == 5 for s in shapes if s not in states)
    assert (b, h, p, Np) not in shapes  # no initial state given: no zero state is kept either
    # and the backward built from these residuals is right
    ref = lambda x, B, C: ssd(x, args["dt"], args["A"], B, C, impl="reference")
    y, ref_vjp = jax.vjp(ref, args["x"], args["B"], args["C"])
    dy = jax.random.normal(jax.random.key(1), y.shape, y.dtype)
    for name, ours, want in zip("xBC", vjp(dy), ref_vjp(dy)):
        assert_close(f"d/d{name}", ours, want, 1e-4)


def test_bf16_error_at_most_twice_the_xla_paths(rng, key):
    """bf16 x, dt, B, C, z, initial_state: the kernel's error against the float32 reference on the unrounded inputs
    is at most 2x (+ 1e-4) that of the op's xla path given the same bf16 inputs, for y, the state and every
    gradient. (Against a reference on the rounded inputs the xla path, which computes in float32, would carry only
    the output rounding, while the kernel's bf16 matmul operands are by design rounded.)"""
    a32 = make_inputs(rng, l=61)
    a16 = {k: v.astype(jnp.bfloat16) if k in HALF else v for k, v in a32.items()}
    ref = scan_forward_and_grads(ssd, a32, key, impl="reference")
    ours = scan_forward_and_grads(ssd_kernel, a16, key, block_sizes=BlockSizes(chunk=16))
    xla = scan_forward_and_grads(ssd, a16, key, impl="xla", chunk_size=16)
    assert ours[0].dtype == jnp.bfloat16 and ours[1].dtype == jnp.float32
    pairs = [("y", 0, None), ("final state", 1, None)] + [(f"d/d{k}", 2, k) for k in ARG_NAMES]
    for name, i, k in pairs:
        pick = (lambda r: r[i]) if k is None else (lambda r: r[i][k])
        e_ours, e_xla = rel_err(pick(ours), pick(ref))[0], rel_err(pick(xla), pick(ref))[0]
        print(f"{name}: kernel {e_ours:.2e}, xla {e_xla:.2e}, ratio {e_ours / e_xla:.2f}")
        assert e_ours <= 2 * e_xla + 1e-4, name
        if k is not None:
            assert pick(ours).dtype == a16[k].dtype


def test_op_pallas_branch_runs_the_kernel_forward_only(rng, monkeypatch):
    """ssd(impl="pallas") calls the kernel entry (counted) with the op's arguments; the undifferentiated forward
    (no chunk states saved) equals the reference, with and without return_final_state; dt_softplus=False."""
    calls = []

    def counting(*a, **kw):
        calls.append(kw)
        return ssd_kernel(*a, **kw)

    monkeypatch.setattr(ssd_op, "ssd_pallas", counting)
    args = make_inputs(rng, b=2, l=29, h=6, p=20, n=7, g=3)
    pos = [args.pop(k) for k in ("x", "dt", "A", "B", "C")]
    y, s = ssd(*pos, **args, return_final_state=True, impl="pallas")
    y_only = ssd(*pos, **args, impl="pallas")
    y_ref, s_ref = ssd(*pos, **args, return_final_state=True, impl="reference")
    assert len(calls) == 2 and calls[0]["D"] is args["D"] and calls[0]["return_final_state"]
    assert_close("op pallas y", y, y_ref, 1e-5)
    assert_close("op pallas final state", s, s_ref, 1e-5)
    assert np.array_equal(y, y_only)
    # dt used as delta directly (no softplus), and a gradient of y alone (the final state's cotangent is zero)
    pos[1] = jnp.abs(pos[1])
    grad = lambda impl: jax.grad(lambda x: jnp.sum(jnp.sin(ssd(x, *pos[1:], **args, dt_softplus=False, impl=impl))))
    assert_close("op pallas d/dx, dt_softplus=False", grad("pallas")(pos[0]), grad("reference")(pos[0]), 1e-4)


def test_kernel_reference_is_the_op_reference(rng):
    """pallas_kernels.ssd.ssd_reference (jax only, for readers) restates the op's definition."""
    args = make_inputs(rng, l=23)
    seg = packed_ids(2, (5, 11, 7))
    pos = [args.pop(k) for k in ("x", "dt", "A", "B", "C")]
    y, s = ssd_reference(*pos, **args, segment_ids=seg, dt_limit=(0.2, 0.6), return_final_state=True)
    y_op, s_op = ssd(*pos, **args, segment_ids=seg, dt_limit=(0.2, 0.6), return_final_state=True, impl="reference")
    assert_close("kernel reference y", y, y_op, 1e-6)
    assert_close("kernel reference state", s, s_op, 1e-6)


# --- validation ----------------------------------------------------------------------------------------------

def _good(b=2, l=9, h=4, p=8, n=5, g=2):
    z = lambda *s: jnp.zeros(s, jnp.float32)
    return dict(x=z(b, l, h, p), dt=z(b, l, h), A=z(h), B=z(b, l, g, n), C=z(b, l, g, n))


def _call_kernel(args, **kw):
    a = dict(args)
    return ssd_kernel(a.pop("x"), a.pop("dt"), a.pop("A"), a.pop("B"), a.pop("C"), **a, **kw)


BAD = [  # (change to the good call, keyword arguments, message)
    (dict(x=jnp.zeros((2, 9, 4))), {}, r"x must have rank 4 \(b, l, h, p\), got shape \(2, 9, 4\)"),
    (dict(B=jnp.zeros((2, 9, 5))), {}, r"B must have rank 4 \(b, l, g, n\), got shape \(2, 9, 5\)"),
    (dict(dt=jnp.zeros((2, 9, 3))), {}, r"dt must have shape \(b, l, h\) = \(2, 9, 4\), got \(2, 9, 3\)"),
    (dict(A=jnp.zeros((3,))), {}, r"A must have shape \(h,\) = \(4,\), got \(3,\)"),
    (dict(C=jnp.zeros((2, 9, 2, 6))), {}, r"C must have shape \(b, l, g, n\) like B = \(2, 9, 2, 5\)"),
    (dict(B=jnp.zeros((2, 9, 3, 5)), C=jnp.zeros((2, 9, 3, 5))), {}, r"ngroups g=3 .* must divide the heads h=4"),
    ({}, dict(D=jnp.zeros((4, 7))), r"D must have shape \(h,\) = \(4,\) or \(h, p\) = \(4, 8\), got \(4, 7\)"),
    ({}, dict(z=jnp.zeros((2, 9, 4, 7))), r"z must have shape \(b, l, h, p\)"),
    ({}, dict(dt_bias=jnp.zeros((5,))), r"dt_bias must have shape \(h,\)"),
    ({}, dict(initial_state=jnp.zeros((2, 4, 8, 6))), r"initial_state must have shape \(b, h, p, n\)"),
    (dict(x=jnp.zeros((2, 9, 4, 8), jnp.int32)), {}, r"x has dtype int32; the kernel takes float32, bfloat16"),
    ({}, dict(dt_limit=(0.5, 0.1)), r"dt_limit must be a pair \(lo, hi\) with lo <= hi"),
    ({}, dict(segment_ids=jnp.zeros((2, 9))), r"segment_ids must be an integer array, got dtype float32"),
    ({}, dict(segment_ids=jnp.zeros((2, 8), jnp.int32)), r"segment_ids must have shape \(b, l\) = \(2, 9\)"),
    (dict(x=jnp.zeros((2, 0, 4, 8)), dt=jnp.zeros((2, 0, 4)), B=jnp.zeros((2, 0, 2, 5)), C=jnp.zeros((2, 0, 2, 5))),
     {}, r"the sequence length l=0 must be >= 1"),
    ({}, dict(block_sizes=BlockSizes(chunk=48)), r"block_sizes.chunk=48 must be a power of two"),
    ({}, dict(block_sizes=BlockSizes(chunk=8)), r"block_sizes.chunk=8 must be >= 16 on the GPU variant"),
    ({}, dict(block_sizes=BlockSizes(block_p_bwd=0)), r"block_sizes.block_p_bwd must be a positive int, got 0"),
    ({}, dict(block_sizes=BlockSizes(save_states=1)), r"block_sizes.save_states must be a bool, got 1"),
    ({}, dict(block_sizes=BlockSizes(two_pass=1)), r"block_sizes.two_pass must be a bool, got 1"),
    ({}, dict(block_sizes=BlockSizes(two_pass=True), variant="tpu"), r"block_sizes.two_pass=True is GPU-only"),
    ({}, dict(block_sizes=BlockSizes(num_warps=0)), r"block_sizes.num_warps must be a positive int"),
    ({}, dict(block_sizes=(64, 64)), r"block_sizes must be a BlockSizes or None, got tuple"),
    ({}, dict(block_sizes=BlockSizes(chunk=12), variant="tpu"), r"block_sizes.chunk=12 must be a multiple of 8"),
    ({}, dict(block_sizes=BlockSizes(block_p=16), variant="tpu"), r"block_sizes.block_p=16 is GPU-only"),
    ({}, dict(block_sizes=BlockSizes(block_p_bwd=16), variant="tpu"), r"block_sizes.block_p_bwd=16 is GPU-only"),
    (dict(B=jnp.zeros((2, 9, 2, 300)), C=jnp.zeros((2, 9, 2, 300))), {},
     r"d_state n=300 \(padded to 512\) exceeds the gpu variant's limit 256"),
    (dict(x=jnp.zeros((2, 9, 4, 600))), dict(variant="tpu"), r"head dim p=600 exceeds the TPU variant's limit 512"),
    ({}, dict(variant="cuda"), r"variant must be one of \('gpu', 'tpu'\) or None, got 'cuda'"),
    ({}, dict(interpret=False), r"interpret=False needs a GPU backend"),
]


@pytest.mark.parametrize("change, kw, match", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_validation_errors_name_the_argument_and_values(change, kw, match):
    with pytest.raises(ValueError, match=match):
        _call_kernel({**_good(), **change}, **kw)


def test_supports_and_the_ops_dispatch():
    good = _good()
    assert supports(good["x"], good["B"]) is None
    assert supports(good["x"], good["B"], variant="tpu") is None
    big_n = jnp.zeros((2, 9, 2, 300))
    assert "exceeds the gpu variant's limit 256" in supports(good["x"], big_n)
    assert "x has dtype int32" in supports(good["x"].astype(jnp.int32), good["B"])
    with pytest.raises(ValueError, match=r"^impl='pallas' cannot run ssd: d_state n=300"):
        ssd(good["x"], good["dt"], good["A"], big_n, big_n, impl="pallas")
