"""GPU check for pallas_kernels.causal_conv1d: correctness on the device, then bf16 timings against the op's xla
path (forward, backward, decode update) with GB/s against the HBM floor.

    from benchmarks.gpu.causal_conv1d import run; rows = run()          # on the GPU machine (<= ~90 s)
    python -c "from benchmarks.gpu.causal_conv1d import run; print(run(quick=True))"   # CPU, interpret mode

Bytes (the bandwidth floor; weights, bias and segment ids are negligible):
  forward   read x, write y                        2 * b * l * c * itemsize
  backward  read x and dy, write dx                3 * b * l * c * itemsize   (pre-activation recomputed)
  update    read state and x, write y and state    2 * b * w * c * itemsize
Timings: jit, one warm-up call, median of 5 (block_until_ready). The backward is timed alone as the vjp
closure of a forward computed beforehand, fed a fixed cotangent.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels.causal_conv1d as kern
from seqmix_jax.ops import causal_conv1d, causal_conv1d_update

HBM_BYTES_PER_S = 4.8e12  # H200
KERNEL = "causal_conv1d"


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


def _inputs(b, l, c, w, dtype, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    ids = np.cumsum(rng.random((b, l)) < 4.0 / l, axis=1)  # a few segments per row
    return dict(x=f(b, l, c), weight=f(w, c) / np.sqrt(w), bias=f(c), initial_state=f(b, w - 1, c)), \
        jnp.asarray(ids, jnp.int32), f(b, l, c)


def _fwd_grads(fn, args, seg, proj):
    def loss(a):
        y, s = fn(**a, segment_ids=seg, activation="silu", return_final_state=True)
        return jnp.sum(y.astype(jnp.float32) * proj.astype(jnp.float32)) + jnp.sum(s.astype(jnp.float32)), y
    (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
    return [y] + [g[k] for k in ("x", "weight", "bias", "initial_state")]


NAMES = ("y", "dx", "dweight", "dbias", "dinitial_state")


def _correctness(quick: bool) -> list[dict]:
    rows = []
    b, l, c, w = (1, 37, 40, 4) if quick else (2, 1000, 520, 4)
    case = f"b={b} l={l} c={c} w={w} silu+bias+seg+init"
    pallas = lambda **kw: kern.causal_conv1d(**kw)
    try:  # float32: fwd 1e-5, grads 1e-4 against the op's reference path
        args, seg, proj = _inputs(b, l, c, w, jnp.float32)
        ours = _fwd_grads(pallas, args, seg, proj)
        ref = _fwd_grads(lambda **kw: causal_conv1d(**kw, impl="reference"), args, seg, proj)
        errs = [_rel(o, r) for o, r in zip(ours, ref)]
        ok = errs[0] <= 1e-5 and max(errs[1:]) <= 1e-4
        rows.append(_row(f"{case} fp32", "correctness", max_rel_err=max(errs), tol=1e-4, ok=ok,
                         note=", ".join(f"{n} {e:.1e}" for n, e in zip(NAMES, errs))))
    except Exception as e:  # noqa: BLE001 - one failing row must not stop the script
        rows.append(_row(f"{case} fp32", "correctness", ok=False, note=f"{type(e).__name__}: {e}"[:300]))
    try:  # bf16: the kernel's error at most 2x the op's xla path in bf16, both against float32
        args, seg, proj = _inputs(b, l, c, w, jnp.bfloat16)
        ref = _fwd_grads(lambda **kw: causal_conv1d(**kw, impl="reference"),
                         {k: v.astype(jnp.float32) for k, v in args.items()}, seg, proj)
        ours = _fwd_grads(pallas, args, seg, proj)
        xla = _fwd_grads(lambda **kw: causal_conv1d(**kw, impl="xla"), args, seg, proj)
        ratios = [_rel(o, r) / max(_rel(x, r), 1e-6) for o, x, r in zip(ours, xla, ref)]
        rows.append(_row(f"{case} bf16", "correctness", max_rel_err=max(_rel(o, r) for o, r in zip(ours, ref)),
                         tol=None, ok=max(ratios) <= 2.0, target="bf16 err <= 2x xla bf16",
                         note="err/xla_err: " + ", ".join(f"{n} {q:.2f}" for n, q in zip(NAMES, ratios))))
    except Exception as e:  # noqa: BLE001
        rows.append(_row(f"{case} bf16", "correctness", ok=False, note=f"{type(e).__name__}: {e}"[:300]))
    try:  # decode update: y close to the op's update, the new state an exact shift
        args, _, _ = _inputs(b, 2, c, w, jnp.float32)
        st, x = args["initial_state"], args["x"][:, 0]
        y, new = jax.jit(lambda *a: kern.causal_conv1d_update(*a, activation="silu"))(st, x, args["weight"],
                                                                                       args["bias"])
        y_ref, new_ref = causal_conv1d_update(st, x, args["weight"], args["bias"], activation="silu",
                                              impl="reference")
        err = _rel(y, y_ref)
        exact = bool(np.array_equal(new, new_ref))
        rows.append(_row(f"update b={b} c={c} w={w} fp32", "correctness", max_rel_err=err, tol=1e-5,
                         ok=err <= 1e-5 and exact, note=f"state exact: {exact}"))
    except Exception as e:  # noqa: BLE001
        rows.append(_row(f"update b={b} c={c} w={w}", "correctness", ok=False, note=f"{type(e).__name__}: {e}"[:300]))
    return rows


def _fwd_bwd_ms(fn, args, dy):
    """(ms forward, ms backward alone) for fn(x, weight, bias) -> y."""
    f = jax.jit(fn)
    ms_f = _ms(f, *args)
    _, vjp = jax.vjp(fn, *args)
    ms_b = _ms(jax.jit(lambda v, g: v(g)), vjp, dy)
    return ms_f, ms_b


def _timing(quick: bool) -> list[dict]:
    rows = []
    b, l, c, w = (1, 64, 128, 4) if quick else (2, 4096, 4096, 4)
    case = f"b={b} l={l} c={c} w={w} bf16 silu+bias"
    try:
        args, _, dy = _inputs(b, l, c, w, jnp.bfloat16)
        xwb = (args["x"], args["weight"], args["bias"])
        ms_f, ms_b = _fwd_bwd_ms(lambda x, wt, bi: kern.causal_conv1d(x, wt, bi, activation="silu"), xwb, dy)
        ms_xf, ms_xb = _fwd_bwd_ms(lambda x, wt, bi: causal_conv1d(x, wt, bi, activation="silu", impl="xla"),
                                   xwb, dy)
        nbytes = b * l * c * 2
        gbps = 2 * nbytes / (ms_f * 1e-3) / 1e9
        gbps_b = 3 * nbytes / (ms_b * 1e-3) / 1e9
        frac = gbps * 1e9 / HBM_BYTES_PER_S
        ratio = ms_b / ms_f
        rows.append(_row(case, "timing", ms_fwd=ms_f, ms_bwd=ms_b, ms_xla_fwd=ms_xf, ms_xla_bwd=ms_xb, gbps=gbps,
                         ok=ratio <= 3.0,
                         target=f"fwd {100 * frac:.0f}% of HBM floor; bwd/fwd {ratio:.2f}x "
                                f"(<= 3x {'ok' if ratio <= 3 else 'MISSED'})",
                         note=f"bwd {gbps_b:.0f} GB/s ({100 * gbps_b * 1e9 / HBM_BYTES_PER_S:.0f}%); "
                              f"xla fwd {ms_xf / ms_f:.2f}x kernel time, xla bwd {ms_xb / ms_b:.2f}x"))
    except Exception as e:  # noqa: BLE001
        rows.append(_row(case, "timing", ok=False, note=f"{type(e).__name__}: {e}"[:300]))
    bu, cu = (4, 128) if quick else (64, 4096)
    case = f"update b={bu} c={cu} w={w} bf16 silu+bias"
    try:
        args, _, _ = _inputs(bu, 2, cu, w, jnp.bfloat16)
        a = (args["initial_state"], args["x"][:, 0], args["weight"], args["bias"])
        ms = _ms(jax.jit(lambda *a: kern.causal_conv1d_update(*a, activation="silu")), *a)
        ms_x = _ms(jax.jit(lambda *a: causal_conv1d_update(*a, activation="silu", impl="xla")), *a)
        gbps = 2 * bu * w * cu * 2 / (ms * 1e-3) / 1e9
        rows.append(_row(case, "timing", ms_fwd=ms, ms_xla_fwd=ms_x, gbps=gbps,
                         target=f"{100 * gbps * 1e9 / HBM_BYTES_PER_S:.1f}% of HBM floor (launch-bound size)",
                         note=f"xla {ms_x / ms:.2f}x kernel time"))
    except Exception as e:  # noqa: BLE001
        rows.append(_row(case, "timing", ok=False, note=f"{type(e).__name__}: {e}"[:300]))
    return rows


def run(quick: bool = False) -> list[dict]:
    """Rows for benchmarks/gpu_check.py: correctness first, then timings (quick: tiny shapes, interpret on CPU)."""
    return _correctness(quick) + _timing(quick)


if __name__ == "__main__":
    for r in run(quick=jax.default_backend() == "cpu"):
        print(r)
