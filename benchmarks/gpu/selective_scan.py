"""GPU check for pallas_kernels.selective_scan (Mamba-1): correctness on the device, then bf16 timings against the
op's xla path, with GB/s against the HBM floor and the backward/forward ratio.

    from benchmarks.gpu.selective_scan import run; rows = run()          # on the GPU machine (<= ~90 s)
    python -c "from benchmarks.gpu.selective_scan import run; print(run(quick=True))"   # CPU, interpret mode

Bytes (the HBM floor of the forward; A, D, dt_bias are negligible): per token read x, dt, z (d each) and B, C
(n each per group), write y (d):  b * l * (4 d + 2 g n) * itemsize.  GB/s = floor bytes / forward time.
Targets (issue 7): forward >= 50% of the floor at the device's bandwidth; backward <= 3x the forward.
Timings: jit, one warm-up call, median of 5 (block_until_ready). The backward is timed alone: the vjp closure of
a forward computed beforehand, fed a fixed cotangent. Cases "b2 l4096 d2048 n64" line up with the SSD rows.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from seqmix_jax.ops import selective_scan

KERNEL = "selective_scan"
GRAD_ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _bandwidth() -> float:
    kind = jax.devices()[0].device_kind.lower()
    return 3.35e12 if "h100" in kind else 4.8e12  # H200 (the pool's machine) unless told otherwise


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


def _inputs(b, l, d, n, g=None, dtype=jnp.float32, seed=0, init=True):
    """Mamba-like values: A = -[1..n] per channel, delta = softplus(dt + dt_bias) in ~[1e-3, 0.1]."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    bc = (b, l, n) if g is None else (b, l, g, n)
    dt0 = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), d))
    args = dict(x=f(b, l, d), dt=f(b, l, d) * 0.5, A=-jnp.tile(jnp.arange(1, n + 1, dtype=jnp.float32), (d, 1)),
                B=f(*bc), C=f(*bc), D=jnp.ones((d,), jnp.float32), z=f(b, l, d),
                dt_bias=jnp.asarray(np.log(np.expm1(dt0)), jnp.float32))
    if init:
        args["initial_state"] = jnp.asarray(rng.standard_normal((b, d, n)), jnp.float32)
    return args


def _call(args, impl, **kw):
    a = dict(args)
    return selective_scan(a.pop("x"), a.pop("dt"), a.pop("A"), a.pop("B"), a.pop("C"), a.pop("D"), **a, impl=impl, **kw)


def _fwd_grads(args, impl, seg, grads=True):
    """(y, final state, grads of a fixed projection of both w.r.t. every input), jitted."""
    def loss(a):
        y, h = _call(a, impl, segment_ids=seg, return_final_state=True)
        w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
        return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(jnp.sin(h)), (y, h)
    if not grads:
        return list(jax.jit(loss)(args)[1])
    (_, (y, h)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
    return [y, h] + [g[k] for k in GRAD_ARGS if k in args]


def _correctness(quick: bool) -> list[dict]:
    rows = []
    shapes = [(1, 37, 12, 7, 2)] if quick else [(2, 1037, 264, 16, 2), (2, 517, 128, 64, None)]
    for b, l, d, n, g in shapes:
        case = f"b{b} l{l} d{d} n{n} g{g or 1} fp32 z+D+bias+init+seg"
        try:  # float32: fwd 1e-5, grads 1e-4 against the op's reference path (sequential lax.scan)
            args = _inputs(b, l, d, n, g)
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
    b, l, d, n = (1, 37, 12, 16) if quick else (2, 1037, 264, 16)
    case = f"b{b} l{l} d{d} n{n} bf16 rule"
    try:  # bf16 inputs: error vs the float32 reference at most 2x that of the xla path in bf16
        a32 = _inputs(b, l, d, n, init=False)
        a16 = {k: v.astype(jnp.bfloat16) if k in ("x", "dt", "B", "C", "z") else v for k, v in a32.items()}
        ref = _fwd_grads(a32, "reference", None, grads=not quick)  # quick: forward only (CPU compile time)
        ours, xla = _fwd_grads(a16, "pallas", None, not quick), _fwd_grads(a16, "xla", None, not quick)
        ratios = [_rel(o, r) / max(_rel(x, r), 1e-6) for o, x, r in zip(ours, xla, ref)]
        rows.append(_row(case, "correctness", max_rel_err=max(_rel(o, r) for o, r in zip(ours, ref)), tol=None,
                         ok=max(ratios) <= 2.0, note=f"worst pallas/xla error ratio {max(ratios):.2f} (<= 2)"))
    except Exception as e:  # noqa: BLE001
        rows.append(_row(case, "correctness", ok=False, note=f"{type(e).__name__}: {str(e)[:300]}"))
    return rows


def _timing(b, l, d, n, quick: bool) -> dict:
    case = f"b{b} l{l} d{d} n{n}"
    args = _inputs(b, l, d, n, dtype=jnp.bfloat16, init=False)
    args = {k: v if k in ("A", "D", "dt_bias") else v.astype(jnp.bfloat16) for k, v in args.items()}
    floor_bytes = b * l * (4 * d + 2 * n) * 2 + 4 * d * (n + 2)
    ms, note = {}, []
    for impl in ("pallas",) if quick else ("pallas", "xla"):
        try:
            fwd = jax.jit(lambda a, impl=impl: _call(a, impl))
            ms[impl, "fwd"] = _ms(fwd, args, n=2 if quick else 5)
            y, vjp = jax.vjp(lambda a, impl=impl: _call(a, impl), args)
            ms[impl, "bwd"] = _ms(jax.jit(lambda f, ct: f(ct)), vjp, jnp.ones_like(y), n=2 if quick else 5)
        except Exception as e:  # noqa: BLE001
            note.append(f"{impl}: {type(e).__name__}: {str(e)[:200]}")
    fwd, bwd = ms.get(("pallas", "fwd")), ms.get(("pallas", "bwd"))
    gbps = None if fwd is None else floor_bytes / (fwd * 1e-3) / 1e9
    target = None
    if gbps is not None:
        frac = gbps * 1e9 / _bandwidth()
        target = f"fwd >= 50% HBM floor: {100 * frac:.0f}% {'ok' if frac >= 0.5 else 'MISSED'}"
        if bwd is not None:
            target += f"; bwd/fwd {bwd / fwd:.1f} {'ok' if bwd <= 3 * fwd else 'MISSED'} (<= 3)"
    if quick:
        note.append("interpret mode on CPU: timings meaningless")
    return _row(case, "timing", ms_fwd=fwd, ms_bwd=bwd, ms_xla_fwd=ms.get(("xla", "fwd")),
                ms_xla_bwd=ms.get(("xla", "bwd")), gbps=gbps, target=target, note="; ".join(note) or None)


def run(quick: bool = False) -> list[dict]:
    """Correctness rows, then timing rows (bf16, z + D + dt_bias + softplus)."""
    rows = _correctness(quick)
    cases = [(1, 64, 16, 16)] if quick else [(2, 4096, 2048, n) for n in (16, 64, 128)]
    for b, l, d, n in cases:
        try:
            rows.append(_timing(b, l, d, n, quick))
        except Exception as e:  # noqa: BLE001
            rows.append(_row(f"b{b} l{l} d{d} n{n}", "timing", note=f"{type(e).__name__}: {str(e)[:300]}"))
    return rows
