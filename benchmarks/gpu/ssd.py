"""GPU check for pallas_kernels.ssd (Mamba-2 SSD): correctness on the device, then bf16 timings against the op's xla
path, with TFLOP/s, GB/s and the backward/forward ratio.

    from benchmarks.gpu.ssd import run; rows = run()          # on the GPU machine (<= ~90 s)
    python -c "from benchmarks.gpu.ssd import run; print(run(quick=True))"   # CPU, interpret mode

FLOPs (the algorithm's matmuls, forward; per (batch, head) and chunk of Q steps, n the state, p the head dim):
G = C B^T 2 Q^2 n, M xbar 2 Q^2 p, C S^T 2 Q n p, the state update 2 Q p n, i.e. per step and head
2 Q (n + p) + 4 n p. The kernel's hi/lo operand splits (BlockSizes.split_operands) add matmuls not counted here.
Bytes (the forward's HBM floor): read x (h p), dt (h), B, C (g n each), write y (h p) per step, 2 bytes each.
Targets (issue 7): backward within 3x the forward; SSD faster than the Mamba-1 selective-scan kernel at
n = 64-128 (benchmarks/gpu_check.py pairs the rows by case: "b2 l4096 d2048 n64" = b 2, l 4096, h 32 x p 64).
Timings: jit, one warm-up call, median of 5 (block_until_ready); the backward alone is the vjp closure of a
forward computed beforehand, fed a fixed cotangent. A "fast" row per n shows split_operands=False.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ssd import BlockSizes
from pallas_kernels.ssd import ssd as ssd_kernel
from seqmix_jax.ops import ssd

KERNEL = "ssd"
GRAD_ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")
HALF = ("x", "dt", "B", "C", "z")  # bf16 activations; A, D, dt_bias stay float32 parameters


def _row(case, check, **kw):
    row = dict(kernel=KERNEL, case=case, check=check, max_rel_err=None, tol=None, ok=None, ms_fwd=None,
               ms_bwd=None, ms_xla_fwd=None, ms_xla_bwd=None, tflops=None, gbps=None, target=None, note=None)
    row.update(kw)
    return row


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def _ms(fn, *args, n: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _inputs(b, l, h, p, n, g, *, gate=True, init=True, seed=0):
    """Mamba-2-like float32 values: A = -U[1, 16], delta = softplus(dt + dt_bias) in ~[1e-3, 0.1]."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    dt0 = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), h))
    args = dict(x=f(b, l, h, p), dt=0.5 * f(b, l, h), A=jnp.asarray(-rng.uniform(1, 16, h), jnp.float32),
                B=f(b, l, g, n), C=f(b, l, g, n), D=f(h), dt_bias=jnp.asarray(np.log(np.expm1(dt0)), jnp.float32))
    if gate:
        args["z"] = f(b, l, h, p)
    if init:
        args["initial_state"] = f(b, h, p, n)
    return args


def _call(args, impl, **kw):
    a = dict(args)
    pos = [a.pop(k) for k in ("x", "dt", "A", "B", "C")]
    if impl == "kernel":  # the entry itself, for block sizes the op does not pass
        return ssd_kernel(*pos, **a, **kw)
    return ssd(*pos, **a, impl=impl, **kw)


def _fwd_grads(args, impl, seg=None, grads=True):
    """[y, final state, grads of a fixed projection of both w.r.t. every input], jitted."""
    def loss(a):
        y, s = _call(a, impl, segment_ids=seg, return_final_state=True)
        w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
        return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(jnp.sin(s)), (y, s)
    if not grads:
        return list(jax.jit(loss)(args)[1])
    (_, (y, s)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
    return [y, s] + [g[k] for k in GRAD_ARGS if k in args]


def _correctness(quick: bool) -> list[dict]:
    rows = []
    # float32 (odd l, n below the 16-wide padding, p not a power of two, 2-3 groups, packed): fwd 1e-5, grads 1e-4
    shapes = [(1, 37, 4, 12, 7, 2)] if quick else [(2, 1037, 8, 72, 7, 2), (2, 517, 6, 64, 16, 3)]
    for b, l, h, p, n, g in shapes:
        case = f"b{b} l{l} h{h} p{p} n{n} g{g} fp32 z+D+bias+init+seg"
        try:
            args = _inputs(b, l, h, p, n, g)
            seg = jnp.asarray(np.cumsum(np.random.default_rng(1).random((b, l)) < 4.0 / l, axis=1), jnp.int32)
            ours, ref = _fwd_grads(args, "pallas", seg), _fwd_grads(args, "reference", seg)
            errs = [_rel(o, r) for o, r in zip(ours, ref)]
            fwd_err, grad_err = max(errs[:2]), max(errs[2:])
            names = ["y", "state"] + [f"d{k}" for k in GRAD_ARGS]
            worst = names[int(np.argmax([e / (1e-5 if i < 2 else 1e-4) for i, e in enumerate(errs)]))]
            rows.append(_row(case, "correctness", max_rel_err=max(fwd_err, grad_err), tol=1e-4,
                             ok=fwd_err <= 1e-5 and grad_err <= 1e-4,
                             note=f"fwd {fwd_err:.1e} (tol 1e-5), grads {grad_err:.1e} (tol 1e-4); worst {worst}"))
        except Exception as e:  # noqa: BLE001 - one failing row must not stop the script
            rows.append(_row(case, "correctness", ok=False, note=f"{type(e).__name__}: {str(e)[:300]}"))
    b, l, h, p, n, g = (1, 37, 4, 16, 16, 1) if quick else (2, 1037, 8, 64, 64, 1)
    case = f"b{b} l{l} h{h} p{p} n{n} g{g} bf16 rule"
    try:  # bf16 inputs: error vs the float32 reference at most 2x that of the xla path in bf16
        a32 = _inputs(b, l, h, p, n, g, init=False)
        a16 = {k: v.astype(jnp.bfloat16) if k in HALF else v for k, v in a32.items()}
        ref = _fwd_grads(a32, "reference", grads=not quick)  # quick: forward only (CPU compile time)
        ours, xla = _fwd_grads(a16, "pallas", grads=not quick), _fwd_grads(a16, "xla", grads=not quick)
        ratios = [_rel(o, r) / max(_rel(x, r), 1e-6) for o, x, r in zip(ours, xla, ref)]
        rows.append(_row(case, "correctness", max_rel_err=max(_rel(o, r) for o, r in zip(ours, ref)), tol=None,
                         ok=max(ratios) <= 2.0, note=f"worst pallas/xla error ratio {max(ratios):.2f} (<= 2)"))
    except Exception as e:  # noqa: BLE001
        rows.append(_row(case, "correctness", ok=False, note=f"{type(e).__name__}: {str(e)[:300]}"))
    return rows


def _timing(b, l, h, p, n, quick: bool, fast: bool = False) -> dict:
    g = 1
    case = f"b{b} l{l} d{h * p} n{n}" + (" split_operands=False" if fast else "")
    args = _inputs(b, l, h, p, n, g, gate=False, init=False)  # Mamba-2's call: D, dt_bias, softplus; z in the norm
    args = {k: v.astype(jnp.bfloat16) if k in HALF else v for k, v in args.items()}
    Q = 64
    flops = b * l * h * (2 * Q * (n + p) + 4 * n * p)
    floor_bytes = 2 * b * l * (2 * h * p + h + 2 * g * n)
    impls = [("kernel", dict(block_sizes=BlockSizes(split_operands=False)))] if fast else [("pallas", {})]
    if not quick and not fast:
        impls.append(("xla", dict(chunk_size=256)))
    ms, note = {}, []
    for impl, kw in impls:
        try:
            fwd = jax.jit(lambda a, impl=impl, kw=kw: _call(a, impl, **kw))
            ms[impl, "fwd"] = _ms(fwd, args, n=2 if quick else 5)
            y, vjp = jax.vjp(lambda a, impl=impl, kw=kw: _call(a, impl, **kw), args)
            ms[impl, "bwd"] = _ms(jax.jit(lambda f, ct: f(ct)), vjp, jnp.ones_like(y), n=2 if quick else 5)
        except Exception as e:  # noqa: BLE001
            note.append(f"{impl}: {type(e).__name__}: {str(e)[:200]}")
    ours = "kernel" if fast else "pallas"
    fwd, bwd = ms.get((ours, "fwd")), ms.get((ours, "bwd"))
    target = None
    if fwd is not None and bwd is not None:
        target = f"bwd/fwd {bwd / fwd:.1f} {'ok' if bwd <= 3 * fwd else 'MISSED'} (<= 3)"
    if quick:
        note.append("interpret mode on CPU: timings meaningless")
    return _row(case, "timing", ms_fwd=fwd, ms_bwd=bwd, ms_xla_fwd=ms.get(("xla", "fwd")),
                ms_xla_bwd=ms.get(("xla", "bwd")), tflops=None if fwd is None else flops / (fwd * 1e-3) / 1e12,
                gbps=None if fwd is None else floor_bytes / (fwd * 1e-3) / 1e9, target=target,
                note="; ".join(note) or None)


def run(quick: bool = False) -> list[dict]:
    """Correctness rows, then timing rows (bf16; D + dt_bias + softplus; xla path at its chunk 256)."""
    rows = _correctness(quick)
    cases = [(1, 64, 4, 16, 16, False)] if quick else [(2, 4096, 32, 64, n, fast) for n in (64, 128)
                                                           for fast in (False, True)]
    for b, l, h, p, n, fast in cases:
        try:
            rows.append(_timing(b, l, h, p, n, quick, fast))
        except Exception as e:  # noqa: BLE001
            rows.append(_row(f"b{b} l{l} d{h * p} n{n}", "timing", note=f"{type(e).__name__}: {str(e)[:300]}"))
    return rows
