"""Pallas selective scan (pallas_kernels.selective_scan) in interpret mode against the op's reference path.

Forward, final state and the gradient of every input for both variants ("gpu": Triton semantics, interpreted;
"tpu": under the TPU interpreter, small), odd sizes that exercise every padding (l = 97 / 257 against chunks of
64, d per group not a multiple of the channel block, n = 7 padded to 8), with and without z / D / dt_bias /
initial_state / segment_ids; the bf16 rule; that impl="pallas" reaches the kernel; every validation error.
Sizes are distinct per axis (b 3, l 97, d 20, n 7, g 2) so a transposed axis cannot pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import selective_scan as kernel
from pallas_kernels.selective_scan import BlockSizes, entry
from seqmix_jax.ops import selective_scan
from tests.helpers import assert_close, call_scan, rel_err, scan_forward_and_grads

ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def make_inputs(rng, b=3, l=97, d=20, n=7, g=2, dtype=jnp.float32, options=True):
    """dt + dt_bias ~ -1 (delta ~ 0.3) and A in [-2, -0.05]: the state remembers tens of steps, across chunks."""
    bc = (b, l, n) if g is None else (b, l, g, n)
    args = dict(x=rng.standard_normal((b, l, d)), dt=rng.normal(-1.0, 0.5, (b, l, d)),
                A=-np.exp(rng.uniform(np.log(0.05), np.log(2.0), (d, n))), B=rng.standard_normal(bc),
                C=rng.standard_normal(bc))
    if options:
        args.update(D=rng.standard_normal(d), z=rng.standard_normal((b, l, d)), dt_bias=rng.normal(0.0, 0.3, d),
                    initial_state=rng.standard_normal((b, d, n)))
    return {k: jnp.asarray(v, dtype) for k, v in args.items()}


def packed_ids(rng, b, l):
    """Segment ids with a few documents per row (starts at random steps)."""
    return jnp.asarray(np.cumsum(rng.random((b, l)) < 0.04, axis=1), jnp.int32)


def check_against_reference(args, key, segment_ids=None, tol=(1e-5, 1e-4), **kernel_kw):
    """y, final state and every gradient of the kernel (via the op, or the entry with kernel_kw) vs reference."""
    common = dict(segment_ids=segment_ids, dt_softplus=kernel_kw.pop("dt_softplus", True))
    if kernel_kw:
        y, h, grads = scan_forward_and_grads(kernel.selective_scan, args, key, **common, **kernel_kw)
    else:
        y, h, grads = scan_forward_and_grads(selective_scan, args, key, impl="pallas", **common)
    y_ref, h_ref, g_ref = scan_forward_and_grads(selective_scan, args, key, impl="reference", **common)
    assert_close("y", y, y_ref, tol[0])
    assert_close("final state", h, h_ref, tol[0])
    for name in args:
        assert_close(f"d/d{name}", grads[name], g_ref[name], tol[1])


# ------------------------------------------------------------------------------------ GPU variant (default)

def test_gpu_every_option_packed_grouped(rng, key):
    """z, D, dt_bias, initial_state, segment_ids, g = 2; defaults: block_d 8 (d per group 10 -> 16), chunk 64
    (l 97 -> 128, two chunks, 31 inert steps), n 7 -> 8."""
    args = make_inputs(rng)
    check_against_reference(args, key, segment_ids=packed_ids(rng, 3, 97))


def test_gpu_no_options_ungrouped_no_softplus_small_blocks(rng, key):
    """Only x, dt, A, B, C with B, C (b, l, n) and delta = dt (no softplus); n = 16; 4-channel blocks (2 in the
    backward), chunks of 16 split in sub-chunks of 2, two steps written out per loop iteration."""
    args = make_inputs(rng, b=2, d=9, n=16, g=None, options=False)
    args["dt"] = 0.3 * jnp.abs(args["dt"])  # used as delta directly: positive
    check_against_reference(args, key, dt_softplus=False,
                            block_sizes=BlockSizes(block_d=4, block_d_bwd=2, chunk=16, unroll=2, sub_chunk=2))


@pytest.mark.parametrize("l, n", [(257, 16), (97, 16), (257, 7)])
def test_gpu_sweep(rng, key, l, n):
    args = make_inputs(rng, b=2, l=l, n=n)
    check_against_reference(args, key, segment_ids=packed_ids(rng, 2, l))


# ---------------------------------------------------------------------------------------------- TPU variant

def test_tpu_every_option_packed_grouped(rng, key):
    """Mosaic layout under the TPU interpreter (slow, so small): 128-lane channel blocks (d per group 6 -> 128),
    chunks of 16 (l 29 -> 32), 4 steps written out per loop iteration."""
    args = make_inputs(rng, b=1, l=29, d=12, n=7)
    check_against_reference(args, key, segment_ids=packed_ids(rng, 1, 29), variant="tpu",
                            block_sizes=BlockSizes(chunk=16, unroll=4))


def test_tpu_no_options_n16(rng, key):
    args = make_inputs(rng, b=1, l=257, d=20, n=16, g=None, options=False)
    check_against_reference(args, key, variant="tpu")


# ------------------------------------------------------------------------------------ bf16, dispatch, memory

def test_bf16_error_at_most_twice_xla(rng, key):
    """bf16 inputs: the kernel's error vs the float32 reference is at most 2x (+1e-6) that of the xla path in bf16."""
    args32 = make_inputs(rng, b=2, l=97, d=12, n=16)
    args16 = {k: v.astype(jnp.bfloat16) if k in ("x", "dt", "B", "C", "z") else v for k, v in args32.items()}
    y_ref, h_ref, g_ref = scan_forward_and_grads(selective_scan, args32, key, impl="reference")
    results = {impl: scan_forward_and_grads(selective_scan, args16, key, impl=impl) for impl in ("pallas", "xla")}
    for i, name in enumerate(["y", "final state"]):
        ref = (y_ref, h_ref)[i]
        ours, xla = rel_err(results["pallas"][i], ref)[0], rel_err(results["xla"][i], ref)[0]
        print(f"bf16 {name}: pallas {ours:.3e}, xla {xla:.3e}")
        assert ours <= 2 * xla + 1e-6
    for name in ARGS:
        ours, xla = (rel_err(results[impl][2][name], g_ref[name])[0] for impl in ("pallas", "xla"))
        print(f"bf16 d/d{name}: pallas {ours:.3e}, xla {xla:.3e}")
        assert ours <= 2 * xla + 1e-6
        assert results["pallas"][2][name].dtype == args16[name].dtype


def test_op_pallas_reaches_the_kernel_and_saves_no_per_step_state(rng, monkeypatch):
    calls = []
    real = entry.selective_scan
    monkeypatch.setattr(entry, "selective_scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    b, l, d, n = 2, 300, 12, 16
    args = make_inputs(rng, b=b, l=l, d=d, n=n)
    loss = lambda a: jnp.sum(call_scan(selective_scan, a, impl="pallas"))
    jaxpr = jax.make_jaxpr(jax.grad(loss))(args)
    assert calls == [1]
    sizes = [v.aval.size for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "size")]
    print(f"largest array in the fwd+bwd program: {max(sizes)} elements; b*l*d*n = {b * l * d * n}")
    assert max(sizes) < b * l * d * n  # one state per chunk is saved, never one per step


# --------------------------------------------------------------------------------------------- validation

def test_supports_and_dispatch_reasons(rng):
    args = make_inputs(rng, b=2, l=9, d=4, n=3)
    assert kernel.supports(**args) is None
    wide = dict(args, A=jnp.zeros((4, 300)), B=jnp.zeros((2, 9, 300)), C=jnp.zeros((2, 9, 300)),
                initial_state=None)
    assert kernel.supports(**wide) == "d_state n=300 is larger than the kernel takes (256)"
    with pytest.raises(ValueError, match=r"^impl='pallas' cannot run selective_scan: d_state n=300 is larger"):
        call_scan(selective_scan, wide, impl="pallas")


@pytest.mark.parametrize("change, message", [
    (dict(x=jnp.zeros((2, 9))), r"^x must have shape \(b, l, d\), got \(2, 9\)$"),
    (dict(x=jnp.zeros((2, 9, 4), jnp.int32)), r"^x has dtype int32; the kernel takes float32, bfloat16, float16$"),
    (dict(dt=jnp.zeros((2, 9, 5))), r"^dt must have shape \(b, l, d\) = \(2, 9, 4\), got \(2, 9, 5\)$"),
    (dict(A=jnp.zeros((5, 3))), r"^A must have shape \(d, n\) with d=4 \(from x\), got \(5, 3\)$"),
    (dict(B=jnp.zeros((2, 9))), r"^B must have shape \(b, l, n\) or \(b, l, g, n\), got \(2, 9\)$"),
    (dict(B=jnp.zeros((2, 9, 3, 3)), C=jnp.zeros((2, 9, 3, 3))), r"^ngroups g=3 \(B.shape\[2\]\) must divide d=4$"),
    (dict(C=jnp.zeros((2, 9, 3))), r"^C must have shape \(b, l, g, n\) = \(2, 9, 2, 3\), got \(2, 9, 3\)$"),
    (dict(D=jnp.zeros(5)), r"^D must have shape \(d,\) = \(4,\), got \(5,\)$"),
    (dict(z=jnp.zeros((2, 9, 4), jnp.int8)), r"^z has dtype int8; the kernel takes"),
    (dict(dt_bias=jnp.zeros(3)), r"^dt_bias must have shape \(d,\) = \(4,\), got \(3,\)$"),
    (dict(initial_state=jnp.zeros((2, 4, 4))), r"^initial_state must have shape \(b, d, n\) = \(2, 4, 3\)"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.int32)), r"^segment_ids must have shape \(b, l\) = \(2, 9\), got"),
    (dict(segment_ids=jnp.zeros((2, 9))), r"^segment_ids must be an integer array, got dtype float32$"),
])
def test_input_errors(rng, change, message):
    args = make_inputs(rng, b=2, l=9, d=4, n=3, g=2)
    with pytest.raises(ValueError, match=message):
        call_scan(kernel.selective_scan, dict(args, **change))


@pytest.mark.parametrize("variant, bs, message", [
    ("gpu", BlockSizes(block_d=12), r"^block_d=12 must be a power of two$"),
    ("gpu", BlockSizes(block_d_bwd=0), r"^block_d_bwd must be a positive int, got 0$"),
    ("gpu", BlockSizes(chunk=48), r"^chunk=48 must be a power of two$"),
    ("gpu", BlockSizes(chunk=4, unroll=8), r"^chunk=4 must be a multiple of unroll=8$"),
    ("gpu", BlockSizes(chunk=8, unroll=8, sub_chunk=16), r"^chunk=8 must be a multiple of sub_chunk=16$"),
    ("gpu", BlockSizes(num_warps=3), r"^num_warps=3 must be a power of two$"),
    ("tpu", BlockSizes(block_d=64), r"^block_d=64 must be a multiple of 128$"),
    ("tpu", BlockSizes(block_d_bwd=200), r"^block_d_bwd=200 must be a multiple of 128$"),
    ("tpu", BlockSizes(chunk=12), r"^chunk=12 must be a multiple of 8$"),
])
def test_block_size_errors(rng, variant, bs, message):
    args = make_inputs(rng, b=2, l=9, d=4, n=3)
    with pytest.raises(ValueError, match=message):
        call_scan(kernel.selective_scan, args, block_sizes=bs, variant=variant)


def test_variant_and_interpret_errors(rng):
    args = make_inputs(rng, b=2, l=9, d=4, n=3)
    with pytest.raises(ValueError, match=r"^variant must be one of \('gpu', 'tpu'\) or None, got 'cuda'$"):
        call_scan(kernel.selective_scan, args, variant="cuda")
    with pytest.raises(ValueError, match=r"^interpret=False needs a GPU backend"):
        call_scan(kernel.selective_scan, args, interpret=False)
