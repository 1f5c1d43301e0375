"""What the four GPU-check parts share: the row dict, the case string, errors, timings and the chip's limits.

    row(KERNEL, case_str(b=2, l=4096, d=2048, n=64, dtype=jnp.bfloat16), "timing", ms_fwd=1.2)
    err = rel_err(ours, ref)                    # max |ours - ref| / max |ref|, float64 on the host
    ms = median_ms(jax.jit(f), x)               # one compile + warm-up call, then the median of n timed calls
    ms_f, ms_b = fwd_bwd_ms(f, (x, w))          # forward, and the backward alone (the vjp closure)
    limits = chip()                             # the chip's dense bf16 TFLOP/s and HBM bytes/s (by device kind)

Case strings have one format in every part: the dims glued to their letters, then the dtype, then flags,
space-separated, no '=' ("b2 l4096 d2048 n64 bf16", "b1 h4 g2 l67 k72 bf16 causal window30 softcap5").
benchmarks/gpu_check.py pairs the SSD and selective-scan timing rows by that exact string.
"""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KEYS = ("kernel", "case", "check", "max_rel_err", "tol", "ok", "ms_fwd", "ms_bwd", "ms_xla_fwd", "ms_xla_bwd",
        "tflops", "gbps", "target", "note")
# Dense bf16 TFLOP/s and HBM bytes/s per chip (the numbers benchmarks/gpu_check.py reads the rows against).
CHIPS = {"H100": (989.0, 3.35e12), "H200": (989.0, 4.8e12)}
ASSUMED_CHIP = "H200"  # the device pool's machine: used, and said so in the notes, when the kind is unknown


def row(kernel: str, case: str, check: str, **kw) -> dict:
    """One result row with every key of kernel_conventions.md; keys not given are None."""
    unknown = sorted(set(kw) - set(KEYS))
    if unknown:
        raise TypeError(f"unknown row keys {unknown}; a row has {KEYS}")
    out = dict.fromkeys(KEYS)
    out.update(kernel=kernel, case=case, check=check, **kw)
    return out


def case_str(*flags: str, dtype=None, **dims) -> str:
    """"b2 l4096 d2048 n64 bf16 flag ...": dims in the order given, glued to their letters; then dtype and flags."""
    words = [f"{k}{v}" for k, v in dims.items()]
    if dtype is not None:
        name = jnp.dtype(dtype).name
        words.append({"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name))
    return " ".join(words + [f for f in flags if f])


def failure(e: BaseException, limit: int = 300) -> str:
    """The note for a row whose computation raised."""
    return f"{type(e).__name__}: {str(e)[:limit]}"


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| in float64 (the normalization tests.helpers.assert_close uses)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def err_ratios(ours, xla, ref) -> list[float]:
    """Per output: the kernel's error against the float32 reference over the xla path's (bf16 rule: <= 2)."""
    return [rel_err(o, r) / max(rel_err(x, r), 1e-6) for o, x, r in zip(ours, xla, ref)]


def segment_ids(rng: np.random.Generator, b: int, l: int):
    """(b, l) int32 packed-sequence ids with a few segments per row."""
    return jnp.asarray(np.cumsum(rng.random((b, l)) < 4.0 / l, axis=1), jnp.int32)


def median_ms(fn, *args, n: int = 5) -> float:
    """Milliseconds of fn(*args) (fn jitted by the caller): one call to compile and warm up, then the median of
    n calls, each waited for with block_until_ready."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def vjp_ms(fn, args: tuple, ct=None, *, n: int = 5) -> float:
    """Milliseconds of the backward alone of y = fn(*args): the vjp closure of a forward computed beforehand,
    jitted and fed the cotangent ct (ones like y when None)."""
    y, vjp = jax.vjp(fn, *args)
    return median_ms(jax.jit(lambda f, g: f(g)), vjp, jnp.ones_like(y) if ct is None else ct, n=n)


def fwd_bwd_ms(fn, args: tuple, ct=None, *, n: int = 5) -> tuple[float, float]:
    """(ms forward, ms backward alone) for y = fn(*args); see median_ms and vjp_ms."""
    return median_ms(jax.jit(fn), *args, n=n), vjp_ms(fn, args, ct, n=n)


class Chip(NamedTuple):
    name: str
    tflops: float  # dense bf16 TFLOP/s
    hbm: float  # HBM bytes per second
    assumed: bool  # the device kind is not in CHIPS: the numbers are the ASSUMED_CHIP's

    def note(self) -> str | None:
        """What a row using these limits should say when they are assumed, else None."""
        if not self.assumed:
            return None
        return f"limits assume an {self.name} (device kind {jax.devices()[0].device_kind!r})"


def chip() -> Chip:
    """The default device's limits by its device_kind ("NVIDIA H100 80GB HBM3", "NVIDIA H200", ...)."""
    kind = jax.devices()[0].device_kind.upper()
    for name, (tflops, hbm) in CHIPS.items():
        if name in kind:
            return Chip(name, tflops, hbm, False)
    return Chip(ASSUMED_CHIP, *CHIPS[ASSUMED_CHIP], True)


def optional_rows(kernel: str, cases, timing, case_of, deadline: float | None) -> list[dict]:
    """timing(*case) for each case, in order, until time.perf_counter() passes `deadline`; the cases left are rows
    "skipped", and a case that raises is a row with the error (the others still run). case_of(*case): its label."""
    rows = []
    for case in cases:
        if deadline is not None and time.perf_counter() > deadline:
            rows.append(row(kernel, case_of(*case), "skipped", note="gpu_check time budget spent"))
            continue
        try:
            rows.append(timing(*case))
        except Exception as e:  # noqa: BLE001 - one failing row must not stop the script
            rows.append(row(kernel, case_of(*case), "timing", note=failure(e)))
    return rows


def join_notes(*notes: str | None) -> str | None:
    """The non-empty notes joined with "; " (None when there are none)."""
    return "; ".join(n for n in notes if n) or None


# --- correctness rows ---------------------------------------------------------------------------------------

def fp32_row(kernel: str, case: str, errs, names, n_fwd: int) -> dict:
    """float32 against the op's reference: the first n_fwd errors (outputs) within 1e-5, the rest (gradients)
    within 1e-4; the note names the output or gradient furthest over its tolerance."""
    fwd_err, grad_err = max(errs[:n_fwd]), max(errs[n_fwd:])
    worst = names[int(np.argmax([e / (1e-5 if i < n_fwd else 1e-4) for i, e in enumerate(errs)]))]
    return row(kernel, case, "correctness", max_rel_err=max(fwd_err, grad_err), tol=1e-4,
               ok=fwd_err <= 1e-5 and grad_err <= 1e-4,
               note=f"fwd {fwd_err:.1e} (tol 1e-5), grads {grad_err:.1e} (tol 1e-4); worst {worst}")


def bf16_row(kernel: str, case: str, ours, xla, ref, names=None, **kw) -> dict:
    """bf16 inputs: each output's error against the float32 reference at most 2x the xla path's in bf16."""
    ratios = err_ratios(ours, xla, ref)
    note = f"worst pallas/xla error ratio {max(ratios):.2f} (<= 2)"
    if names is not None:
        note += ": " + ", ".join(f"{nm} {q:.2f}" for nm, q in zip(names, ratios))
    return row(kernel, case, "correctness", max_rel_err=max(rel_err(o, r) for o, r in zip(ours, ref)), tol=None,
               ok=max(ratios) <= 2.0, note=note, **kw)


SCAN_INPUTS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def scan_fwd_grads(fn, args: dict, grads: bool = True) -> tuple[list, list[str]]:
    """For the two scan parts, fn(args) -> (y, final state): ([y, state, then the gradient of a fixed projection
    of both w.r.t. each of SCAN_INPUTS present in args], their names), jitted; grads=False: y and state only."""
    def loss(a):
        y, s = fn(a)
        w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
        return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(jnp.sin(s)), (y, s)
    if not grads:
        return list(jax.jit(loss)(args)[1]), ["y", "state"]
    (_, (y, s)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
    present = [k for k in SCAN_INPUTS if k in args]
    return [y, s] + [g[k] for k in present], ["y", "state"] + [f"d{k}" for k in present]
