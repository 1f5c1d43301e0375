"""GPU check for pallas_kernels.ssd (Mamba-2 SSD): correctness on the device, then bf16 timings against the op's xla
path, with TFLOP/s, GB/s and the backward/forward ratio.

    from benchmarks.gpu.ssd import run; rows = run()          # on the GPU machine (<= ~90 s)
    python -c "from benchmarks.gpu.ssd import run; print(run(quick=True))"   # CPU, interpret mode

FLOPs (the algorithm's matmuls, forward; per (batch, head) and chunk of Q steps, n the state, p the head dim):
G = C B^T 2 Q^2 n, M xbar 2 Q^2 p, C S^T 2 Q n p, the state update 2 Q p n, i.e. per step and head
2 Q (n + p) + 4 n p. The kernel's hi/lo operand splits (BlockSizes.split_operands) add matmuls not counted here.
Bytes (the forward's HBM floor): read x (h p), dt (h), B, C (g n each), write y (h p) per step, 2 bytes each.
Targets (issue 7): backward within 3x the forward; SSD faster than the Mamba-1 selective-scan kernel at
n = 64-128 (benchmarks/gpu_check.py pairs the rows by case: "b2 l4096 d2048 n64 bf16" = b 2, l 4096, h 32 x p 64).
Timings: jit, one warm-up call, median of 5 (block_until_ready); the backward alone is the vjp closure of a
forward computed beforehand, fed a fixed cotangent. Rows besides the defaults: "no-split" (split_operands=False)
and "two-pass" (the state walk, then y chunk-parallel) per n, and "saved-states" at n = 128 (save_states=True: the
backward does not recompute the chunk-start states).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu._common import (bf16_row, case_str, failure, fp32_row, join_notes, median_ms, optional_rows,
                                    rel_err, row, scan_fwd_grads, segment_ids, vjp_ms)
from pallas_kernels.ssd import BlockSizes
from pallas_kernels.ssd import ssd as ssd_kernel
from seqmix_jax.ops import ssd

KERNEL = "ssd"
HALF = ("x", "dt", "B", "C", "z")  # bf16 activations; A, D, dt_bias stay float32 parameters


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
    """([y, final state, grads of a fixed projection of both w.r.t. every input], names), jitted."""
    return scan_fwd_grads(lambda a: _call(a, impl, segment_ids=seg, return_final_state=True), args, grads)


def _correctness(quick: bool) -> list[dict]:
    rows = []
    # float32 (odd l, n below the 16-wide padding, p not a power of two, 2-3 groups, packed): fwd 1e-5, grads 1e-4
    shapes = [(1, 37, 4, 12, 7, 2)] if quick else [(2, 1037, 8, 72, 7, 2), (2, 517, 6, 64, 16, 3)]
    for b, l, h, p, n, g in shapes:
        case = case_str("z+D+bias+init+seg", b=b, l=l, h=h, p=p, n=n, g=g, dtype=jnp.float32)
        try:
            args = _inputs(b, l, h, p, n, g)
            seg = segment_ids(np.random.default_rng(1), b, l)
            (ours, names), (ref, _) = _fwd_grads(args, "pallas", seg), _fwd_grads(args, "reference", seg)
            rows.append(fp32_row(KERNEL, case, [rel_err(o, r) for o, r in zip(ours, ref)], names, n_fwd=2))
        except Exception as e:  # noqa: BLE001 - one failing row must not stop the script
            rows.append(row(KERNEL, case, "correctness", ok=False, note=failure(e)))
    b, l, h, p, n, g = (1, 37, 4, 16, 16, 1) if quick else (2, 1037, 8, 64, 64, 1)
    case = case_str("rule", b=b, l=l, h=h, p=p, n=n, g=g, dtype=jnp.bfloat16)
    try:  # bf16 inputs: error vs the float32 reference at most 2x that of the xla path in bf16
        a32 = _inputs(b, l, h, p, n, g, init=False)
        a16 = {k: v.astype(jnp.bfloat16) if k in HALF else v for k, v in a32.items()}
        ref, names = _fwd_grads(a32, "reference", grads=not quick)  # quick: forward only (CPU compile time)
        (ours, _), (xla, _) = _fwd_grads(a16, "pallas", grads=not quick), _fwd_grads(a16, "xla", grads=not quick)
        rows.append(bf16_row(KERNEL, case, ours, xla, ref))
    except Exception as e:  # noqa: BLE001
        rows.append(row(KERNEL, case, "correctness", ok=False, note=failure(e)))
    return rows


# Timing rows besides the defaults: BlockSizes for the kernel entry, by the label its row carries.
VARIANTS = {"no-split": dict(split_operands=False), "two-pass": dict(two_pass=True),
            "saved-states": dict(save_states=True)}


def _case(b, l, h, p, n, blocks):
    """The timing case; d = h p so the row pairs with the selective-scan row of the same (b, l, d, n). `blocks`:
    a key of VARIANTS, or "" for the op's defaults."""
    return case_str(blocks, b=b, l=l, d=h * p, n=n, dtype=jnp.bfloat16)


def _timing(b, l, h, p, n, quick: bool, blocks: str = "") -> dict:
    g = 1
    args = _inputs(b, l, h, p, n, g, gate=False, init=False)  # Mamba-2's call: D, dt_bias, softplus; z in the norm
    args = {k: v.astype(jnp.bfloat16) if k in HALF else v for k, v in args.items()}
    Q = 64
    flops = b * l * h * (2 * Q * (n + p) + 4 * n * p)
    floor_bytes = 2 * b * l * (2 * h * p + h + 2 * g * n)
    impls = [("kernel", dict(block_sizes=BlockSizes(**VARIANTS[blocks])))] if blocks else [("pallas", {})]
    if not quick and not blocks:
        impls.append(("xla", dict(chunk_size=256)))
    reps = 2 if quick else 5
    ms, note = {}, []
    for impl, kw in impls:
        try:
            fn = lambda a, impl=impl, kw=kw: _call(a, impl, **kw)
            ms[impl, "fwd"] = median_ms(jax.jit(fn), args, n=reps)
            ms[impl, "bwd"] = vjp_ms(fn, (args,), n=reps)
        except Exception as e:  # noqa: BLE001
            note.append(f"{impl}: {failure(e, 200)}")
    ours = "kernel" if blocks else "pallas"
    fwd, bwd = ms.get((ours, "fwd")), ms.get((ours, "bwd"))
    target = None
    if fwd is not None and bwd is not None:
        target = f"bwd/fwd {bwd / fwd:.1f} {'ok' if bwd <= 3 * fwd else 'MISSED'} (<= 3)"
    if quick:
        note.append("interpret mode on CPU: timings meaningless")
    return row(KERNEL, _case(b, l, h, p, n, blocks), "timing", ms_fwd=fwd, ms_bwd=bwd,
               ms_xla_fwd=ms.get(("xla", "fwd")), ms_xla_bwd=ms.get(("xla", "bwd")),
               tflops=None if fwd is None else flops / (fwd * 1e-3) / 1e12,
               gbps=None if fwd is None else floor_bytes / (fwd * 1e-3) / 1e9, target=target, note=join_notes(*note))


def run(quick: bool = False) -> list[dict]:
    """Correctness rows, then timing rows with the op's defaults (bf16; D + dt_bias + softplus; xla path at its
    chunk 256)."""
    rows = _correctness(quick)
    cases = [(1, 64, 4, 16, 16)] if quick else [(2, 4096, 32, 64, n) for n in (64, 128)]
    for b, l, h, p, n in cases:
        try:
            rows.append(_timing(b, l, h, p, n, quick))
        except Exception as e:  # noqa: BLE001
            rows.append(row(KERNEL, _case(b, l, h, p, n, ""), "timing", note=failure(e)))
    return rows


def variants(quick: bool = False, deadline: float | None = None) -> list[dict]:
    """The VARIANTS rows (gpu_check runs them after every part's defaults), skipped once time.perf_counter() passes
    `deadline`; the saved-states row is what recomputing the chunk-start states (the default) costs."""
    cases = [] if quick else [(2, 4096, 32, 64, n, False, blocks) for blocks in ("two-pass", "no-split")
                              for n in (128, 64)] + [(2, 4096, 32, 64, 128, False, "saved-states")]
    return optional_rows(KERNEL, cases, _timing, lambda b, l, h, p, n, _, blocks: _case(b, l, h, p, n, blocks),
                         deadline)
