"""GPU check for pallas_kernels.selective_scan (Mamba-1): correctness on the device, then bf16 timings against the
op's xla path, with GB/s against the HBM floor and the backward/forward ratio.

    from benchmarks.gpu.selective_scan import run; rows = run()          # on the GPU machine (<= ~90 s)
    python -c "from benchmarks.gpu.selective_scan import run; print(run(quick=True))"   # CPU, interpret mode

Bytes (the HBM floor of the forward; A, D, dt_bias are negligible): per token read x, dt, z (d each) and B, C
(n each per group), write y (d):  b * l * (4 d + 2 g n) * itemsize.  GB/s = floor bytes / forward time.
Targets (issue 7): forward >= 50% of the floor at the device's bandwidth; backward <= 3x the forward.
Timings: jit, one warm-up call, median of 5 (block_until_ready). The backward is timed alone: the vjp closure of
a forward computed beforehand, fed a fixed cotangent. Cases "b2 l4096 d2048 n64 bf16" line up with the SSD rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu._common import (bf16_row, case_str, chip, failure, fp32_row, join_notes, median_ms, rel_err, row,
                                    scan_fwd_grads, segment_ids, vjp_ms)
from seqmix_jax.ops import selective_scan

KERNEL = "selective_scan"


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
    """([y, final state, grads of a fixed projection of both w.r.t. every input], names), jitted."""
    return scan_fwd_grads(lambda a: _call(a, impl, segment_ids=seg, return_final_state=True), args, grads)


def _correctness(quick: bool) -> list[dict]:
    rows = []
    shapes = [(1, 37, 12, 7, 2)] if quick else [(2, 1037, 264, 16, 2), (2, 517, 128, 64, None)]
    for b, l, d, n, g in shapes:
        case = case_str("z+D+bias+init+seg", b=b, l=l, d=d, n=n, g=g or 1, dtype=jnp.float32)
        try:  # float32: fwd 1e-5, grads 1e-4 against the op's reference path (sequential lax.scan)
            args = _inputs(b, l, d, n, g)
            seg = segment_ids(np.random.default_rng(1), b, l)
            (ours, names), (ref, _) = _fwd_grads(args, "pallas", seg), _fwd_grads(args, "reference", seg)
            rows.append(fp32_row(KERNEL, case, [rel_err(o, r) for o, r in zip(ours, ref)], names, n_fwd=2))
        except Exception as e:  # noqa: BLE001 - one failing row must not stop the script
            rows.append(row(KERNEL, case, "correctness", ok=False, note=failure(e)))
    b, l, d, n = (1, 37, 12, 16) if quick else (2, 1037, 264, 16)
    case = case_str("rule", b=b, l=l, d=d, n=n, dtype=jnp.bfloat16)
    try:  # bf16 inputs: error vs the float32 reference at most 2x that of the xla path in bf16
        a32 = _inputs(b, l, d, n, init=False)
        a16 = {k: v.astype(jnp.bfloat16) if k in ("x", "dt", "B", "C", "z") else v for k, v in a32.items()}
        ref, names = _fwd_grads(a32, "reference", None, grads=not quick)  # quick: forward only (CPU compile time)
        (ours, _), (xla, _) = _fwd_grads(a16, "pallas", None, not quick), _fwd_grads(a16, "xla", None, not quick)
        rows.append(bf16_row(KERNEL, case, ours, xla, ref))
    except Exception as e:  # noqa: BLE001
        rows.append(row(KERNEL, case, "correctness", ok=False, note=failure(e)))
    return rows


def _timing(b, l, d, n, quick: bool) -> dict:
    case = case_str(b=b, l=l, d=d, n=n, dtype=jnp.bfloat16)
    args = _inputs(b, l, d, n, dtype=jnp.bfloat16, init=False)
    args = {k: v if k in ("A", "D", "dt_bias") else v.astype(jnp.bfloat16) for k, v in args.items()}
    floor_bytes = b * l * (4 * d + 2 * n) * 2 + 4 * d * (n + 2)
    reps = 2 if quick else 5
    ms, note = {}, []
    for impl in ("pallas",) if quick else ("pallas", "xla"):
        try:
            fn = lambda a, impl=impl: _call(a, impl)
            ms[impl, "fwd"] = median_ms(jax.jit(fn), args, n=reps)
            ms[impl, "bwd"] = vjp_ms(fn, (args,), n=reps)
        except Exception as e:  # noqa: BLE001
            note.append(f"{impl}: {failure(e, 200)}")
    fwd, bwd = ms.get(("pallas", "fwd")), ms.get(("pallas", "bwd"))
    gbps = None if fwd is None else floor_bytes / (fwd * 1e-3) / 1e9
    target = None
    if gbps is not None:
        limits = chip()
        frac = gbps * 1e9 / limits.hbm
        target = f"fwd >= 50% HBM floor: {100 * frac:.0f}% {'ok' if frac >= 0.5 else 'MISSED'}"
        if bwd is not None:
            target += f"; bwd/fwd {bwd / fwd:.1f} {'ok' if bwd <= 3 * fwd else 'MISSED'} (<= 3)"
        note.append(limits.note())
    if quick:
        note.append("interpret mode on CPU: timings meaningless")
    return row(KERNEL, case, "timing", ms_fwd=fwd, ms_bwd=bwd, ms_xla_fwd=ms.get(("xla", "fwd")),
               ms_xla_bwd=ms.get(("xla", "bwd")), gbps=gbps, target=target, note=join_notes(*note))


def run(quick: bool = False) -> list[dict]:
    """Correctness rows, then timing rows (bf16, z + D + dt_bias + softplus)."""
    rows = _correctness(quick)
    cases = [(1, 64, 16, 16)] if quick else [(2, 4096, 2048, n) for n in (16, 64, 128)]
    for b, l, d, n in cases:
        try:
            rows.append(_timing(b, l, d, n, quick))
        except Exception as e:  # noqa: BLE001
            rows.append(row(KERNEL, case_str(b=b, l=l, d=d, n=n, dtype=jnp.bfloat16), "timing", note=failure(e)))
    return rows
