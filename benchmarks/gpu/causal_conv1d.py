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

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels.causal_conv1d as kern
from benchmarks.gpu._common import (bf16_row, case_str, chip, failure, fp32_row, fwd_bwd_ms, join_notes, median_ms,
                                    rel_err, row, segment_ids)
from seqmix_jax.ops import causal_conv1d, causal_conv1d_update

KERNEL = "causal_conv1d"


def _inputs(b, l, c, w, dtype, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    seg = segment_ids(rng, b, l)
    return dict(x=f(b, l, c), weight=f(w, c) / np.sqrt(w), bias=f(c), initial_state=f(b, w - 1, c)), seg, f(b, l, c)


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
    pallas = lambda **kw: kern.causal_conv1d(**kw)
    case = case_str("silu+bias+seg+init", b=b, l=l, c=c, w=w, dtype=jnp.float32)
    try:  # float32: fwd 1e-5, grads 1e-4 against the op's reference path
        args, seg, proj = _inputs(b, l, c, w, jnp.float32)
        ours = _fwd_grads(pallas, args, seg, proj)
        ref = _fwd_grads(lambda **kw: causal_conv1d(**kw, impl="reference"), args, seg, proj)
        rows.append(fp32_row(KERNEL, case, [rel_err(o, r) for o, r in zip(ours, ref)], NAMES, n_fwd=1))
    except Exception as e:  # noqa: BLE001 - one failing row must not stop the script
        rows.append(row(KERNEL, case, "correctness", ok=False, note=failure(e)))
    case = case_str("silu+bias+seg+init", b=b, l=l, c=c, w=w, dtype=jnp.bfloat16)
    try:  # bf16: the kernel's error at most 2x the op's xla path in bf16, both against float32
        args, seg, proj = _inputs(b, l, c, w, jnp.bfloat16)
        ref = _fwd_grads(lambda **kw: causal_conv1d(**kw, impl="reference"),
                         {k: v.astype(jnp.float32) for k, v in args.items()}, seg, proj)
        ours = _fwd_grads(pallas, args, seg, proj)
        xla = _fwd_grads(lambda **kw: causal_conv1d(**kw, impl="xla"), args, seg, proj)
        rows.append(bf16_row(KERNEL, case, ours, xla, ref, NAMES, target="bf16 err <= 2x xla bf16"))
    except Exception as e:  # noqa: BLE001
        rows.append(row(KERNEL, case, "correctness", ok=False, note=failure(e)))
    case = case_str("update", b=b, c=c, w=w, dtype=jnp.float32)
    try:  # decode update: y close to the op's update, the new state an exact shift
        args, _, _ = _inputs(b, 2, c, w, jnp.float32)
        st, x = args["initial_state"], args["x"][:, 0]
        y, new = jax.jit(lambda *a: kern.causal_conv1d_update(*a, activation="silu"))(st, x, args["weight"],
                                                                                       args["bias"])
        y_ref, new_ref = causal_conv1d_update(st, x, args["weight"], args["bias"], activation="silu",
                                              impl="reference")
        err = rel_err(y, y_ref)
        exact = bool(np.array_equal(new, new_ref))
        rows.append(row(KERNEL, case, "correctness", max_rel_err=err, tol=1e-5, ok=err <= 1e-5 and exact,
                        note=f"state exact: {exact}"))
    except Exception as e:  # noqa: BLE001
        rows.append(row(KERNEL, case, "correctness", ok=False, note=failure(e)))
    return rows


def _timing(quick: bool) -> list[dict]:
    rows = []
    limits = chip()
    b, l, c, w = (1, 64, 128, 4) if quick else (2, 4096, 4096, 4)
    case = case_str("silu+bias", b=b, l=l, c=c, w=w, dtype=jnp.bfloat16)
    try:
        args, _, dy = _inputs(b, l, c, w, jnp.bfloat16)
        xwb = (args["x"], args["weight"], args["bias"])
        ms_f, ms_b = fwd_bwd_ms(lambda x, wt, bi: kern.causal_conv1d(x, wt, bi, activation="silu"), xwb, dy)
        ms_xf, ms_xb = fwd_bwd_ms(lambda x, wt, bi: causal_conv1d(x, wt, bi, activation="silu", impl="xla"), xwb,
                                  dy)
        nbytes = b * l * c * 2
        gbps = 2 * nbytes / (ms_f * 1e-3) / 1e9
        gbps_b = 3 * nbytes / (ms_b * 1e-3) / 1e9
        frac = gbps * 1e9 / limits.hbm
        ratio = ms_b / ms_f
        rows.append(row(KERNEL, case, "timing", ms_fwd=ms_f, ms_bwd=ms_b, ms_xla_fwd=ms_xf, ms_xla_bwd=ms_xb,
                        gbps=gbps, ok=None if quick else ratio <= 3.0,  # interpret-mode times say nothing
                        target=f"fwd {100 * frac:.0f}% of HBM floor; bwd/fwd {ratio:.2f}x "
                               f"(<= 3x {'ok' if ratio <= 3 else 'MISSED'})",
                        note=join_notes(f"bwd {gbps_b:.0f} GB/s ({100 * gbps_b * 1e9 / limits.hbm:.0f}%); "
                                        f"xla fwd {ms_xf / ms_f:.2f}x kernel time, xla bwd {ms_xb / ms_b:.2f}x",
                                        limits.note())))
    except Exception as e:  # noqa: BLE001
        rows.append(row(KERNEL, case, "timing", ok=False, note=failure(e)))
    bu, cu = (4, 128) if quick else (64, 4096)
    case = case_str("update", "silu+bias", b=bu, c=cu, w=w, dtype=jnp.bfloat16)
    try:
        args, _, _ = _inputs(bu, 2, cu, w, jnp.bfloat16)
        a = (args["initial_state"], args["x"][:, 0], args["weight"], args["bias"])
        ms = median_ms(jax.jit(lambda *a: kern.causal_conv1d_update(*a, activation="silu")), *a)
        ms_x = median_ms(jax.jit(lambda *a: causal_conv1d_update(*a, activation="silu", impl="xla")), *a)
        gbps = 2 * bu * w * cu * 2 / (ms * 1e-3) / 1e9
        rows.append(row(KERNEL, case, "timing", ms_fwd=ms, ms_xla_fwd=ms_x, gbps=gbps,
                        target=f"{100 * gbps * 1e9 / limits.hbm:.1f}% of HBM floor (launch-bound size)",
                        note=join_notes(f"xla {ms_x / ms:.2f}x kernel time", limits.note())))
    except Exception as e:  # noqa: BLE001
        rows.append(row(KERNEL, case, "timing", ok=False, note=failure(e)))
    return rows


def run(quick: bool = False) -> list[dict]:
    """Rows for benchmarks/gpu_check.py: correctness first, then timings (quick: tiny shapes, interpret on CPU)."""
    return _correctness(quick) + _timing(quick)


if __name__ == "__main__":
    for r in run(quick=jax.default_backend() == "cpu"):
        print(r)
