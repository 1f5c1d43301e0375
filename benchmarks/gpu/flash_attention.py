"""GPU check for pallas_kernels.flash_attention: correctness on the device, then timing against the op's xla
path and cuDNN (jax.nn.dot_product_attention(implementation="cudnn")).

    from benchmarks.gpu.flash_attention import run; rows = run()          # on a GPU (~60-90 s)
    run(quick=True)                                                        # CPU: tiny shapes, interpret mode

FLOPs (causal halves them): forward 4 * b * h * l^2 * k (two matmuls, 2 FLOPs per multiply-add), backward
2.5x the forward's (five matmuls); TFLOP/s = FLOPs / time. Issue targets (H100/H200, bf16, head dim 128, causal,
l = 4k-16k): forward >= 60% of cuDNN's throughput, backward <= 3x the forward's time.

Besides the default backward (separate dK/dV and dQ kernels, dS as two bf16 terms -> bf16 dots), the rows tagged
"bwd-..." time the BlockSizes options at l = 8192 (fused: dQ by atomic adds, 5 matmuls per tile instead of 7;
ds16: dS rounded to bf16 for the dQ / dK dots), with their bf16 error checked at l = 999, so the defaults can be
chosen from one run.

`variants` (run by gpu_check after every part's defaults) times head dim 256's backward with the default dK/dV
tiles (wgmma, spilling) and with 32 x 32 tiles ("dkv32x32": mma.sync, no spill), then two peers that ship with jax
against ours, back to back at the same shapes: its Pallas Triton kernel (`pallas.ops.gpu.attention.mha`, forward
and backward, bf16) and its Mosaic GPU Hopper kernel (`pallas.ops.gpu.attention_mgpu`, warp-specialized, TMA +
WGMMA; causal forward only, in float16 because its shared-memory buffers are float16). The second says whether a
Mosaic GPU variant of ours would pay (issue 7: "Mosaic GPU where it pays").
"""

from __future__ import annotations

import math
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu._common import case_str, failure, median_ms, optional_rows, rel_err, row
from pallas_kernels.flash_attention import BlockSizes, flash_attention
from seqmix_jax.ops import attention

KERNEL = "flash_attention"
BUDGET_S = 80  # optional comparisons (xla, cuDNN, backward options) are skipped past this
BWD_OPTIONS = {"default": BlockSizes(), "fused": BlockSizes(fused_bwd=True),
               "fused+ds16": BlockSizes(fused_bwd=True, ds_in_input_dtype=True),
               "ds16": BlockSizes(ds_in_input_dtype=True),
               # head dim 256: dK/dV tiles of 32 x 32, no spill but mma.sync, against the default's 32 x 64 (wgmma,
               # 428 B spilled per thread; benchmarks/triton_ptx_check.py)
               "dkv32x32": BlockSizes(block_q_dkv=32, block_k_dkv=32)}


def _inputs(b, l, h, g, k, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (b, l, h, k), jnp.float32).astype(dtype)
    kk = jax.random.normal(keys[1], (b, l, g, k), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, l, g, k), jnp.float32).astype(dtype)
    ct = jax.random.normal(keys[3], (b, l, h, k), jnp.float32)
    return q, kk, v, ct


def _forward_and_grads(fn, q, k, v, ct):
    """(out, dq, dk, dv) on the host for the loss sum(fn(q, k, v) * ct)."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return jax.device_get((out, *grads))


def _fmt(errs):
    return " / ".join(f"{e:.1e}" for e in errs)


def _flag(name, value):
    """An op keyword option as a case flag: causal=True -> "causal", window=30 -> "window30", softcap=5.0 ->
    "softcap5"."""
    if isinstance(value, bool):
        return name if value else f"no-{name}"
    return f"{name}{value:g}" if isinstance(value, float) else f"{name}{value}"


def _bwd_flag(option):
    return "" if option == "default" else f"bwd-{option}"


def _correctness(shape, dtype, kw, option, quick, cache):
    """Kernel vs the float32 reference on the same inputs; bf16 within 2x the xla path's bf16 error (3x for the
    ds16 options, which round dS on purpose)."""
    b, l, h, g, k = shape
    case = case_str(*(_flag(nm, v) for nm, v in kw.items()), _bwd_flag(option), b=b, h=h, g=g, l=l, k=k, dtype=dtype)
    try:
        q, kk, v, ct = _inputs(b, l, h, g, k, dtype)
        key = (shape, jnp.dtype(dtype).name, tuple(sorted(kw.items())))
        if key not in cache:  # the float32 reference (true float32, not TF32) and the xla path, shared by options
            with jax.default_matmul_precision("highest"):
                ref = _forward_and_grads(lambda *a: attention(*a, impl="reference", **kw),
                                         *(x.astype(jnp.float32) for x in (q, kk, v)), ct)
            xla = None
            if jnp.dtype(dtype) != jnp.float32:
                xla = _forward_and_grads(lambda *a: attention(*a, impl="xla", **kw), q, kk, v, ct)
            cache[key] = ref, xla
        ref, xla = cache[key]
        ours = _forward_and_grads(lambda *a: flash_attention(*a, block_sizes=BWD_OPTIONS[option], **kw), q, kk, v, ct)
        errs = [rel_err(o, r) for o, r in zip(ours, ref)]
        if xla is None:
            tols, note = [1e-5, 1e-4, 1e-4, 1e-4], f"out / dq / dk / dv max rel err {_fmt(errs)}"
        else:
            xla_errs = [rel_err(x, r) for x, r in zip(xla, ref)]
            factor = 3 if "ds16" in option else 2
            tols = [factor * e + 1e-4 for e in xla_errs]
            note = (f"out / dq / dk / dv ours {_fmt(errs)}; xla bf16 {_fmt(xla_errs)} (tol {factor}x xla + 1e-4); "
                    "ratios " + " / ".join(f"{e / max(x, 1e-30):.2f}" for e, x in zip(errs, xla_errs)))
        worst = int(np.argmax([e / t for e, t in zip(errs, tols)]))
        return row(KERNEL, case, "correctness", max_rel_err=errs[worst], tol=tols[worst],
                   ok=all(e <= t for e, t in zip(errs, tols)), note=note + (" [interpret]" if quick else ""))
    except Exception as e:  # noqa: BLE001 - report and go on
        return row(KERNEL, case, "correctness", ok=False, note=failure(e))


def _fwd_and_bwd_ms(fn, q, k, v, n, ms_fwd=None):
    """(ms forward, ms backward = ms(forward + backward) - ms(forward)); a known ms_fwd skips its timing."""
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
    if ms_fwd is None:
        ms_fwd = median_ms(jax.jit(fn), q, k, v, n=n)
    return ms_fwd, median_ms(grad, q, k, v, n=n) - ms_fwd


def _timing_case(b, l, h, k, option="default"):
    return case_str("causal", _bwd_flag(option), b=b, h=h, l=l, k=k, dtype=jnp.bfloat16)


def _timing(b, l, h, k, n, quick, deadline, option="default", ms_fwd=None, compare=True):
    """Ours (the BWD_OPTIONS entry) forward and backward; for the default with `compare`, also the xla path and
    cuDNN (skipped past `deadline`)."""
    flops_fwd = 4 * b * h * l * l * k / 2
    out, notes, targets, met = row(KERNEL, _timing_case(b, l, h, k, option), "timing"), [], [], []
    try:
        q, kk, v, _ = _inputs(b, l, h, h, k, jnp.bfloat16)
        ours = lambda *a: flash_attention(*a, causal=True, block_sizes=BWD_OPTIONS[option])
        ms_fwd, ms_bwd = _fwd_and_bwd_ms(ours, q, kk, v, n, ms_fwd)
        out.update(ms_fwd=ms_fwd, ms_bwd=ms_bwd, tflops=flops_fwd / ms_fwd / 1e9)
        notes.append(f"bwd {2.5 * flops_fwd / ms_bwd / 1e9:.0f} TFLOP/s")
    except Exception as e:  # noqa: BLE001
        out.update(ok=False, note=f"pallas failed: {failure(e)}")
        return out
    if option == "default" and compare:
        if time.perf_counter() < deadline:
            try:
                out["ms_xla_fwd"], out["ms_xla_bwd"] = _fwd_and_bwd_ms(
                    lambda *a: attention(*a, causal=True, impl="xla"), q, kk, v, n)
            except Exception as e:  # noqa: BLE001
                notes.append(f"xla failed: {failure(e, 200)}")
        try:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"skipped, past the {BUDGET_S} s budget")
            cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
            ms_cudnn_fwd, ms_cudnn_bwd = _fwd_and_bwd_ms(cudnn, q, kk, v, n)
            share = ms_cudnn_fwd / ms_fwd
            met.append(share >= 0.6)
            targets.append(f"fwd >= 60% cuDNN: {100 * share:.0f}% {'ok' if met[-1] else 'MISSED'}")
            notes.append(f"cuDNN fwd {ms_cudnn_fwd:.2f} ms ({flops_fwd / ms_cudnn_fwd / 1e9:.0f} TFLOP/s), "
                         f"bwd {ms_cudnn_bwd:.2f} ms; ours/cuDNN bwd speed {ms_cudnn_bwd / ms_bwd:.0%}")
        except Exception as e:  # noqa: BLE001 - cuDNN missing (CPU), refusing the shape, or no time left
            targets.append("fwd >= 60% cuDNN: n/a")
            notes.append(f"cuDNN failed: {failure(e, 200)}")
    ratio = ms_bwd / ms_fwd
    met.append(ratio <= 3)
    targets.append(f"bwd <= 3x fwd: {ratio:.2f}x {'ok' if met[-1] else 'MISSED'}")
    out.update(target="; ".join(targets), ok=None if quick else all(met),
               note="; ".join(notes) + (" [interpret]" if quick else ""))
    return out


def run(quick: bool = False) -> list[dict]:
    deadline = time.perf_counter() + BUDGET_S
    if quick:  # CPU: the GPU variant interpreted, tiny shapes
        checks = [((1, 67, 4, 2, 72), jnp.bfloat16, dict(causal=True, window=30, softcap=5.0), "default")]
        timings, options_at, n = [(1, 64, 1, 128)], None, 1
    else:  # l odd and not a block multiple, GQA, head dims 80 (padded to 128) and 128, and the range's ends
        bf16 = jnp.bfloat16
        checks = [((2, 999, 8, 2, 80), bf16, dict(causal=True), "default"),
                  ((1, 999, 4, 2, 64), bf16, dict(causal=True), "default"),
                  ((1, 999, 4, 2, 256), bf16, dict(causal=True), "default"),
                  ((1, 999, 4, 2, 256), bf16, dict(causal=True), "dkv32x32"),
                  ((1, 999, 6, 3, 128), bf16, dict(causal=True, window=256, softcap=30.0), "default"),
                  ((2, 999, 8, 2, 128), bf16, dict(causal=True), "default"),
                  ((2, 999, 8, 2, 128), bf16, dict(causal=True), "fused"),
                  ((2, 999, 8, 2, 128), bf16, dict(causal=True), "fused+ds16"),
                  ((1, 999, 8, 2, 80), jnp.float32, dict(causal=True), "default")]
        timings, options_at, n = [(16, 4096, 16, 128), (8, 8192, 16, 128), (4, 16384, 16, 128)], 1, 5  # b*h*l=2^20
    cache = {}
    rows = [_correctness(*c, quick, cache) for c in checks]
    rows += [_timing(*t, n, quick, deadline) for t in timings]
    if options_at is not None:  # the backward options at l = 8192, reusing the default's forward time
        base = rows[len(checks) + options_at]
        for option in ("fused", "fused+ds16", "ds16"):
            if time.perf_counter() > deadline or base["ms_fwd"] is None:
                rows.append(row(KERNEL, _timing_case(*timings[options_at], option), "timing",
                                note="skipped (time budget or no fwd)"))
                continue
            rows.append(_timing(*timings[options_at], n, quick, deadline, option, base["ms_fwd"]))
    return rows


# --- peers: jax's own attention kernels, timed back to back with ours --------------------------------------------

def _pallas_triton(q, k, v, interpret=False):
    """jax's Pallas Triton flash attention (deprecated in jax in favour of tokamax, so imported here, quietly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as peer
    return peer.mha(q, k, v, None, sm_scale=1 / math.sqrt(q.shape[-1]), causal=True, interpret=interpret)


def _mosaic_gpu(q, k, v):
    """jax's Mosaic GPU attention for Hopper, in its own benchmark's configuration (block_q 64, block_kv 128). It
    applies no softmax scale, so _mosaic_gpu_inputs scales q beforehand (outside the timed call)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu as peer
    return peer.attention(q, k, v, peer.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True))


def _mosaic_gpu_inputs(q, k, v):
    q = q.astype(jnp.float32) / math.sqrt(q.shape[-1])
    return tuple(x.astype(jnp.float16) for x in (q, k, v))


PEERS = {  # name: (fn(q, k, v), its inputs from ours, times its backward, what the note says of it)
    "pallas-triton": (_pallas_triton, lambda *a: a, True,
                      "jax.experimental.pallas.ops.gpu.attention.mha (Triton, bf16, blocks 128 x 128 forward, 32 "
                      "backward)"),
    "mosaic-gpu": (_mosaic_gpu, _mosaic_gpu_inputs, False,
                   "jax.experimental.pallas.ops.gpu.attention_mgpu (Mosaic GPU, fp16, block_q 64, block_kv 128; "
                   "it has no causal backward)")}


def _peer_case(peer, b, l, h, k):
    return _timing_case(b, l, h, k) + f" peer-{peer}"


def _peer_timing(peer, b, l, h, k, n, quick):
    """Ours and `peer` at one shape, causal, bf16 (the peer's inputs as it takes them, prepared outside the timed
    calls); the xla columns hold the peer's times, the note how far its output is from ours."""
    fn, prepare, with_bwd, what = PEERS[peer]
    if quick:
        fn = lambda q, kk, v, fn=fn: fn(q, kk, v, interpret=True)
    ours = lambda *a: flash_attention(*a, causal=True)
    args = _inputs(b, l, h, h, k, jnp.bfloat16)[:3]
    peer_args = jax.block_until_ready(prepare(*args))
    times = lambda f, a: _fwd_and_bwd_ms(f, *a, n) if with_bwd else (median_ms(jax.jit(f), *a, n=n), None)
    ms, ms_peer = times(ours, args), times(fn, peer_args)
    diff = rel_err(jax.jit(fn)(*peer_args).astype(jnp.float32), jax.jit(ours)(*args).astype(jnp.float32))
    speed = [f"{kind} {p / o:.0%}" for kind, o, p in zip(("fwd", "bwd"), ms, ms_peer) if o is not None]
    return row(KERNEL, _peer_case(peer, b, l, h, k), "timing", ms_fwd=ms[0], ms_bwd=ms[1],
               ms_xla_fwd=ms_peer[0], ms_xla_bwd=ms_peer[1], tflops=2 * b * h * l * l * k / ms[0] / 1e9,
               note=f"xla columns hold the peer's times: {what}; ours/peer speed {', '.join(speed)}; the peer's "
                    f"output vs ours: max rel diff {diff:.1e}" + (" [interpret]" if quick else ""))


def variants(quick: bool = False, deadline: float | None = None) -> list[dict]:
    """Head dim 256's backward with the default dK/dV tiles and with "dkv32x32"; then the peer rows: jax's Mosaic
    GPU kernel at the three target lengths (forward), its Pallas Triton kernel at l = 8192 (forward and backward).
    On a CPU (quick) only the Triton peer, interpreted at a tiny shape."""
    if quick:
        cases = [("pallas-triton", 1, 128, 1, 64, 1)]
    else:
        cases = [("default", 4, 4096, 16, 256, 5), ("dkv32x32", 4, 4096, 16, 256, 5),
                 ("mosaic-gpu", 16, 4096, 16, 128, 5), ("mosaic-gpu", 8, 8192, 16, 128, 5),
                 ("mosaic-gpu", 4, 16384, 16, 128, 5), ("pallas-triton", 8, 8192, 16, 128, 5)]

    def timing(name, b, l, h, k, n):
        if name in PEERS:
            return _peer_timing(name, b, l, h, k, n, quick)
        return _timing(b, l, h, k, n, quick, deadline, option=name, compare=False)

    def case_of(name, b, l, h, k, _):
        return _peer_case(name, b, l, h, k) if name in PEERS else _timing_case(b, l, h, k, name)

    return optional_rows(KERNEL, cases, timing, case_of, deadline)


if __name__ == "__main__":
    for r in run(quick=jax.default_backend() == "cpu"):
        print(r)
