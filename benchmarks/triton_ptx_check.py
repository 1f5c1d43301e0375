"""Registers, spills and shared memory of the Pallas-Triton kernels on sm_90a (H100/H200), measured on a CPU.

    pip install --target /tmp/tritonpkg triton==3.9.0          # once; outside the repo (~1 GB, bundles ptxas)
    PYTHONPATH=/tmp/tritonpkg python benchmarks/triton_ptx_check.py [--quick] [--only ssd,selective_scan]
                                                               [--jobs 2] [--out benchmarks/results/triton_ptx.json]

For each kernel's GPU variant at the issue's bf16 shapes this lowers the forward and `jax.grad` of it for CUDA
(`jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",))`, with `pallas_kernels._common.platform` patched to
say "gpu" so the entries pick the compiled Triton path, as tests/pallas/test_lowering.py does), takes every Triton
kernel out of the lowered module and compiles it with the pip `triton` package to PTX and a cubin for sm_90a. One
row per Triton kernel: its launch parameters, ptxas's registers per thread, spill stores / loads and stack frame,
Triton's shared memory, whether it compiled (or the error), and for kernels with exp2 in a loop the instructions
per exp2 of the innermost such loop in the SASS (cuobjdump -sass; see `sass_stats`: above 8 the loop is bound by
instruction issue rather than by the exp unit). Block sizes are the entries' defaults (what the ops use: they pass
none); attention also runs with BlockSizes(fused_bwd=True), with and without ds_in_input_dtype=True, SSD at n = 128
with BlockSizes(two_pass=True), and the selective scan's forward with wider channel blocks (block_d 16; 32 at
n = 16).

Where the kernel is: jaxlib <= 0.10.2 lowers a GPU pallas_call to `stablehlo.custom_call @__gpu$xla.gpu.triton`
whose `mhlo.backend_config` dictionary holds `name`, `num_warps`, `num_stages`, `grid_x/y/z` and `ir`: the Triton
module (tt dialect) as MLIR bytecode. That bytecode does not load into pip triton's MLIR (the dialects' attributes
differ between the two Triton versions), so jaxlib's own MLIR bindings print it as text first. Newer jaxlib
compiles the kernel during lowering and emits `triton_kernel_call_ffi` with a zlib-compressed TritonKernelCall
proto (jaxlib/gpu/triton.proto) in `opaque`; from that the PTX jaxlib produced is run through ptxas (that path is
untested here). jax 0.11.2 still emits the first form, but asks the device for its compute capability while
lowering: `pallas_kernels._common.lowering_for("cuda")` names an abstract H200 so this runs on a CPU-only host.

The compile runs Triton's full NVIDIA pipeline (TTIR passes, TTGIR, LLVM, PTX, ptxas with -v) in a subprocess
per kernel, so a compiler crash becomes a row with the error. XLA compiles these kernels with the Triton that
jaxlib bundles, not 3.9.0: the numbers are close to, not identical with, what runs on the GPU. Nothing here
needs a GPU; about 2-4 minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPABILITY = 90  # sm_90a: Triton picks the "a" (wgmma / TMA) features for capability 90
SMEM_LIMIT = 227 * 1024  # sm_90's largest shared memory (opt-in dynamic) one block may use, bytes
MAX_REGISTERS = 255  # registers one thread may use; at the cap, ptxas spills what does not fit
INSTALL_HINT = ("triton is not importable: run `pip install --target /tmp/tritonpkg triton==3.9.0`, then "
                "`PYTHONPATH=/tmp/tritonpkg python benchmarks/triton_ptx_check.py`")
KERNELS = ("flash_attention", "selective_scan", "ssd", "causal_conv1d")


# --- the compile worker (a subprocess per kernel; imports triton only) ----------------------------------------

class _CaptureFds:
    """Send fds 1 and 2 (Python prints, ptxas's log, MLIR's C++ diagnostics) to a file while compiling."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        sys.stdout.flush(), sys.stderr.flush()
        self.saved = [os.dup(1), os.dup(2)]
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(self.fd, 1), os.dup2(self.fd, 2)

    def __exit__(self, *exc):
        sys.stdout.flush(), sys.stderr.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        os.close(self.fd)


def _ptxas_stats(log: str) -> dict:
    """ptxas -v: 'Used R registers', 'S bytes stack frame, A bytes spill stores, B bytes spill loads'."""
    out = {}
    if m := re.search(r"Used (\d+) registers", log):
        out["registers"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    return out


def _triton_pipeline(path: str, num_warps: int, num_stages: int, res: dict) -> None:
    """TTIR text -> every stage of Triton's NVIDIA backend (the TTIR passes included), as `triton.compile` runs an
    ASTSource; records the stage reached in res["stage"]."""
    from triton import knobs
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget, Language
    from triton.compiler.compiler import make_backend

    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's log (captured to the log file)
    target = GPUTarget("cuda", CAPABILITY, 32)
    backend = make_backend(target)
    # enable_fp_fusion: Triton 3.9's default, given so it does not warn that the default will change.
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages, "num_ctas": 1,
                                     "enable_fp_fusion": True})
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    res["stage"] = "parse"
    module = ir.parse_mlir_module(path, ctx)
    module.context = ctx
    metadata = {"target": target, **options.__dict__}
    stages = {}
    backend.add_stages(stages, options, Language.TRITON)
    for ext, run in stages.items():
        res["stage"] = ext
        module = run(module, metadata)
        if ext == "ptx":
            res["ptx_lines"] = module.count("\n")
    res.update(stage="done", compiled=True, smem_bytes=metadata.get("shared"), triton_name=metadata.get("name"),
               cubin_bytes=len(module))
    Path(path + ".cubin").write_bytes(module)
    res.update(_sass_stats(path + ".cubin"))


_SASS_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_SASS_BRANCH = re.compile(r"\bBRA\s+(?:`\()?(0x[0-9a-f]+)")


def _sass_stats(cubin: str) -> dict:
    """The cubin's SASS (cuobjdump -sass, next to ptxas) through `sass_stats`."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = Path(get_ptxas(CAPABILITY).path).with_name("cuobjdump")
    out = subprocess.run([str(tool), "-sass", cubin], capture_output=True, text=True)
    return sass_stats(out.stdout) if out.returncode == 0 else {"sass_error": out.stderr.strip()[-200:]}


def sass_stats(sass: str) -> dict:
    """The instruction count of a SASS listing, and for the innermost loop with the most MUFU.EX2 (one per exp2; of
    equals, the shortest: attention's key blocks without the element mask) its instructions and ex2s along the path
    that takes its forward branches (a lazy rescale left out). loop_instrs / loop_ex2 is what one thread issues per
    exp: the SM issues 4 warp instructions a clock and 16 ex2 lanes a clock, so above 128 / 16 = 8 instructions per
    ex2 the loop is bound by instruction issue, not by the exp unit. Also the loop's tensor-core instructions along
    that path: HGMMA (Hopper's warpgroup MMA, wgmma) and HMMA (the warp-level mma.sync of earlier chips, which Triton
    falls back to where a tile or layout does not suit wgmma, at a fraction of the rate)."""
    ops, index, branches = [], {}, []
    for line in sass.splitlines():
        if m := _SASS_INSTR.match(line):
            index[int(m.group(1), 16)] = len(ops)
            ops.append(m.group(2))
            if t := _SASS_BRANCH.search(m.group(2)):
                branches.append((len(ops) - 1, int(t.group(1), 16)))
    jumps = [(i, index[t]) for i, t in branches if t in index]
    loops = [(t, i) for i, t in jumps if t <= i]  # backward branches
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]

    def path(a, b):  # the loop's instructions minus those its forward branches jump over
        skipped = {k for i, t in jumps if a <= i < t <= b for k in range(i + 1, t)}
        return [op for k, op in enumerate(ops[a:b + 1], a) if k not in skipped]

    stats = {"sass_instrs": len(ops)}
    paths = [p for p in (path(a, b) for a, b in inner) if any("MUFU.EX2" in op for op in p)]
    if paths:
        ex2 = lambda p: sum("MUFU.EX2" in op for op in p)
        best = min(paths, key=lambda p: (-ex2(p), len(p)))
        count = lambda name: sum(name in op for op in best)  # "in", as for EX2: an op may carry a predicate (@P0)
        stats.update(loop_instrs=len(best), loop_ex2=ex2(best), loop_hgmma=count("HGMMA."), loop_hmma=count("HMMA."))
    return stats


def _ptxas_only(path: str, res: dict) -> None:
    """A PTX file jaxlib compiled: ptxas -v for sm_90a (the flags Triton's make_cubin passes)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    res["stage"] = "cubin"
    cmd = [get_ptxas(CAPABILITY).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
           f"--gpu-name={sm_arch_from_capability(CAPABILITY)}", path, "-o", path + ".cubin"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    print(out.stderr)
    if out.returncode:
        raise RuntimeError(f"ptxas exited with {out.returncode}")
    res.update(stage="done", compiled=True, ptx_lines=Path(path).read_text().count("\n"))


def _compile_one(path: str, num_warps: int, num_stages: int) -> None:
    """Worker entry: compile one kernel file, write the result next to it as JSON."""
    res = {"compiled": False}
    log_path = path + ".log"
    t0 = time.perf_counter()
    with _CaptureFds(log_path):
        try:
            (_ptxas_only(path, res) if path.endswith(".ptx") else _triton_pipeline(path, num_warps, num_stages, res))
        except BaseException as e:  # noqa: BLE001 - every failure is a result row
            res["error"] = f"at stage {res.get('stage')}: {type(e).__name__}: {str(e).strip()[:400]}"
    res["compile_s"] = round(time.perf_counter() - t0, 2)
    log = Path(log_path).read_text(errors="replace")
    res.update(_ptxas_stats(log))
    if not res["compiled"]:
        diag = [ln.strip() for ln in log.splitlines() if re.search(r"error|Assert|failed", ln, re.I)]
        if diag:
            res["error"] = (res.get("error", "") + " | " + " / ".join(diag[:3]))[:700]
    Path(path + ".json").write_text(json.dumps(res))


# --- taking the Triton kernels out of a lowered module ----------------------------------------------------------

_CALL = re.compile(r"stablehlo\.custom_call @(__gpu\$xla\.gpu\.triton|triton_kernel_call_ffi)\(")


def _unescape(s: str) -> bytes:
    """An MLIR string literal's body to bytes (the printer writes \\\\ and \\XX hex pairs)."""
    out, i = bytearray(), 0
    while i < len(s):
        if s[i] != "\\":
            j = s.find("\\", i)
            j = len(s) if j < 0 else j
            out += s[i:j].encode()
            i = j
            continue
        nxt = s[i + 1]
        if nxt in '\\"':
            out += nxt.encode()
            i += 2
        elif nxt in "nt":
            out += b"\n" if nxt == "n" else b"\t"
            i += 2
        else:
            out.append(int(s[i + 1:i + 3], 16))
            i += 3
    return bytes(out)


def _attr_dict(text: str, start: int) -> dict:
    """The MLIR attribute dictionary whose '{' is at text[start]: strings as bytes, 'N : iK' as int, bools."""
    entries, depth, i, item_start = [], 0, start, start + 1
    while True:
        c = text[i]
        if c == '"':
            i += 1
            while text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c in "{[(<":
            depth += 1
        elif c in "}])>":
            depth -= 1
            if depth == 0:
                entries.append(text[item_start:i])
                break
        elif c == "," and depth == 1:
            entries.append(text[item_start:i])
            item_start = i + 1
        i += 1
    out = {}
    for entry in entries:
        key, _, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        if value.startswith('"'):
            out[key] = _unescape(value[1:-1])
        elif m := re.match(r"(-?\d+)\s*:", value):
            out[key] = int(m.group(1))
        elif value in ("true", "false"):
            out[key] = value == "true"
    return out


def _proto_fields(buf: bytes) -> list[tuple[int, object]]:
    """Protobuf wire format, one level: [(field number, int or bytes)]; raises on malformed input."""
    out, i = [], 0

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            out.append((field, varint()))
        elif wire == 2:
            n = varint()
            out.append((field, buf[i:i + n]))
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated")
    return out


def _find_triton_kernel(buf: bytes, depth: int = 0) -> dict | None:
    """The TritonKernel message (name 1, num_warps 2, shared 3, ptx 4, ttir 5) nested in a TritonAnyKernelCall."""
    try:
        fields = _proto_fields(buf)
    except (ValueError, IndexError):
        return None
    d = dict(fields)
    if isinstance(d.get(4), bytes) and b".entry" in d[4]:
        return {"name": d.get(1, b"?").decode(), "num_warps": d.get(2), "smem_bytes": d.get(3), "ptx": d[4]}
    for _, v in fields:
        if isinstance(v, bytes) and depth < 4 and (k := _find_triton_kernel(v, depth + 1)):
            return k
    return None


_JAX_MLIR_CTX = []


def _ttir_text(bytecode: bytes) -> str:
    """Triton-dialect MLIR bytecode (as jaxlib wrote it) printed as text by jaxlib's own MLIR bindings."""
    from jax._src.interpreters import mlir as jax_mlir  # jaxlib's MLIR with the tt dialect: no public API for it
    from jax._src.lib.mlir import ir as jax_ir
    from jax._src.lib.triton import dialect as tt_dialect

    if not _JAX_MLIR_CTX:
        ctx = jax_mlir.make_ir_context()
        tt_dialect.register_dialect(ctx)
        _JAX_MLIR_CTX.append(ctx)
    with _JAX_MLIR_CTX[0]:
        module = jax_ir.Module.parse(bytecode)
        return module.operation.get_asm(enable_debug_info=False)


def triton_calls(text: str) -> list[dict]:
    """Every Triton kernel in a lowered module's text: name, launch parameters and its source ("ttir" text or
    jaxlib's "ptx")."""
    calls = []
    for m in _CALL.finditer(text):
        line_end = text.find("\n", m.end())
        at = text.find("mhlo.backend_config = {", m.end(), line_end if line_end >= 0 else len(text))
        if at < 0:
            raise ValueError(f"custom_call @{m.group(1)} without an mhlo.backend_config dictionary")
        cfg = _attr_dict(text, text.index("{", at))
        if m.group(1) == "__gpu$xla.gpu.triton":
            calls.append({"name": cfg["name"].decode(), "num_warps": cfg.get("num_warps"),
                          "num_stages": cfg.get("num_stages"),
                          "grid": [cfg.get(f"grid_{a}", 1) for a in "xyz"], "ttir": _ttir_text(cfg["ir"])})
        else:
            import zlib

            kernel = _find_triton_kernel(zlib.decompress(cfg["opaque"]))
            if kernel is None:
                raise ValueError("triton_kernel_call_ffi: no TritonKernel with PTX in the opaque proto")
            calls.append({"name": kernel["name"], "num_warps": kernel["num_warps"], "num_stages": None,
                          "grid": None, "ptx": kernel["ptx"].decode(), "smem_bytes": kernel["smem_bytes"]})
    return calls


# --- the cases -------------------------------------------------------------------------------------------------

def _cases(quick: bool):
    """(kernel, case string, blocks label, fn(*avals), avals, differentiable argnums: none = the forward only)."""
    import jax.numpy as jnp

    from benchmarks.gpu._common import case_str
    from pallas_kernels import causal_conv1d as conv
    from pallas_kernels import flash_attention as fa
    from pallas_kernels import selective_scan as sscan
    from pallas_kernels import ssd as ssd_k

    S, bf, f32, i32 = _struct, jnp.bfloat16, jnp.float32, jnp.int32
    out = []
    fused = fa.BlockSizes(fused_bwd=True, ds_in_input_dtype=True)
    two_pass = ssd_k.BlockSizes(two_pass=True)
    # head dims: the check's 128, 80 with a window and segments, then the rest of the range (64-256) with
    # the default blocks only (above 128 the defaults shrink to 64 x 64 tiles to stay within shared memory)
    attn = [(128, None, False), (80, 1024, True), (64, None, False), (96, None, False), (256, None, False)]
    for k, window, segs in attn[:1] if quick else attn:
        b, h, l = 1, 16, 8192
        case = case_str("causal", f"window{window}" if window else "", "segments" if segs else "",
                        b=b, h=h, l=l, k=k, dtype=bf)
        avals = [S((b, l, h, k), bf)] * 3 + ([S((b, l), i32)] if segs else [])
        options = [("fused_bwd", fa.BlockSizes(fused_bwd=True)), ("fused_bwd ds_in_input_dtype", fused)]
        for label, blocks in [("default", None)] + ([] if quick or k not in (80, 128) else options):
            def f(q, kk, v, seg=None, window=window, blocks=blocks):
                return fa.flash_attention(q, kk, v, causal=True, window=window, segment_ids=seg, block_sizes=blocks)
            out.append(("flash_attention", case, label, f, avals, (0, 1, 2)))
    for n in (16,) if quick else (16, 64):
        b, l, d = 2, 4096, 2048
        avals = [S((b, l, d), bf), S((b, l, d), bf), S((d, n), f32), S((b, l, n), bf), S((b, l, n), bf),
                 S((d,), f32), S((b, l, d), bf), S((d,), f32)]
        case = case_str("z D dt_bias", b=b, l=l, d=d, n=n, dtype=bf)
        # channels per program in the forward, to see whether wider blocks spread the per-step loads and reductions
        # over more state elements (forward only: block_d does not change the backward)
        widths = [] if quick else [16, 32] if n == 16 else [16]
        for label, blocks, argnums in [("default", None, tuple(range(8)))] + [
                (f"block_d={w}", sscan.BlockSizes(block_d=w), ()) for w in widths]:
            def f(x, dt, A, B, C, D, z, dtb, blocks=blocks):
                return sscan.selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dtb, block_sizes=blocks)
            out.append(("selective_scan", case, label, f, avals, argnums))
    for n in (64,) if quick else (64, 128):
        b, l, h, p, g = 2, 4096, 32, 64, 1
        avals = [S((b, l, h, p), bf), S((b, l, h), bf), S((h,), f32), S((b, l, g, n), bf), S((b, l, g, n), bf),
                 S((h,), f32), S((h,), f32)]
        case = case_str("D dt_bias", b=b, l=l, h=h, p=p, g=g, n=n, dtype=bf)
        for label, blocks in [("default", None)] + ([] if quick or n != 128 else [("two_pass", two_pass)]):
            def f(x, dt, A, B, C, D, dtb, blocks=blocks):
                return ssd_k.ssd(x, dt, A, B, C, D=D, dt_bias=dtb, block_sizes=blocks)
            out.append(("ssd", case, label, f, avals, tuple(range(7))))
    b, l, c, w = 2, 4096, 4096, 4
    f = lambda x, wt, bias: conv.causal_conv1d(x, wt, bias, activation="silu")
    out.append(("causal_conv1d", case_str("silu bias", b=b, l=l, c=c, w=w, dtype=bf), "default", f,
                [S((b, l, c), bf), S((w, c), bf), S((c,), bf)], (0, 1, 2)))
    return out


def _struct(shape, dtype):
    import jax

    return jax.ShapeDtypeStruct(shape, dtype)


def _lowered_text(fn, avals, argnums, grad: bool) -> str:
    import jax
    import jax.numpy as jnp

    if grad:
        primal = fn
        fn = jax.grad(lambda *a: jnp.sum(primal(*a).astype(jnp.float32)), argnums=argnums)
    from pallas_kernels._common import lowering_for

    with lowering_for("cuda"):
        return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


# --- the driver ------------------------------------------------------------------------------------------------

class Compiler:
    """Compiles each distinct kernel once (same source and launch parameters), `jobs` subprocesses at a time."""

    def __init__(self, workdir: Path, jobs: int, timeout_s: float):
        self.workdir, self.timeout_s = workdir, timeout_s
        self.pool = ThreadPoolExecutor(max(1, jobs))
        self.futures: dict[tuple, object] = {}
        self.env = dict(os.environ, TMPDIR=str(workdir), TRITON_CACHE_DIR=str(workdir / "cache"),
                        TRITON_DEFAULT_FP_FUSION="1")

    def submit(self, call: dict):
        src = call.get("ttir") or call["ptx"]
        key = (src, call["num_warps"], call["num_stages"])
        if key not in self.futures:
            path = self.workdir / f"k{len(self.futures)}_{call['name'][:60]}.{'ttir' if 'ttir' in call else 'ptx'}"
            path.write_text(src)
            self.futures[key] = self.pool.submit(self._run, str(path), call["num_warps"] or 4,
                                                 call["num_stages"] or 3)
        return self.futures[key]

    def _run(self, path: str, num_warps: int, num_stages: int) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-one", path, str(num_warps), str(num_stages)]
        try:
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            return {"compiled": False, "error": f"compile timed out after {self.timeout_s:g} s"}
        result = Path(path + ".json")
        if result.exists():
            return json.loads(result.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"compiled": False, "error": f"compile worker exited with {proc.returncode}: {' / '.join(tail)}"}


def _rows_for_case(kernel, case, label, fn, avals, argnums, compiler) -> list[dict]:
    """Lower forward and grad; one pending row per distinct Triton kernel (the compile result is filled later)."""
    base = {"kernel": kernel, "case": case, "blocks": label}
    seen: dict[tuple, dict] = {}
    rows = []
    for stage in ("fwd", "grad") if argnums else ("fwd",):
        t0 = time.perf_counter()
        try:
            calls = triton_calls(_lowered_text(fn, avals, argnums, stage == "grad"))
        except Exception as e:  # noqa: BLE001 - a failed lowering is a result row
            rows.append(dict(base, lowered=stage, triton_kernel="-", compiled=False,
                             error=f"lowering failed: {type(e).__name__}: {str(e)[:400]}"))
            continue
        lower_s = round(time.perf_counter() - t0, 2)
        if not calls:
            rows.append(dict(base, lowered=stage, triton_kernel="-", compiled=False,
                             error="no Triton kernel in the lowered module"))
        for call in calls:
            key = (call.get("ttir") or call["ptx"], call["num_warps"], call["num_stages"])
            if key in seen:  # the same kernel again: in the other lowering, or called twice
                row = seen[key]
                if stage not in row["lowered"]:
                    row["lowered"] += "+" + stage
                row["calls"][stage] = row["calls"].get(stage, 0) + 1
                continue
            row = dict(base, lowered=stage, triton_kernel=call["name"], calls={stage: 1}, grid=call["grid"],
                       num_warps=call["num_warps"], num_stages=call["num_stages"], lower_s=lower_s,
                       _future=compiler.submit(call))
            if call.get("smem_bytes") is not None:
                row["smem_bytes"] = call["smem_bytes"]
            seen[key] = row
            rows.append(row)
    return rows


def _finish(row: dict) -> dict:
    future = row.pop("_future", None)
    if future is not None:
        res = future.result()
        res.pop("triton_name", None)
        row.update({k: v for k, v in res.items() if v is not None or k not in row})
    notes = []
    if (row.get("registers") or 0) >= MAX_REGISTERS:
        notes.append(f"at the {MAX_REGISTERS}-register cap")
    if (row.get("smem_bytes") or 0) > SMEM_LIMIT:
        notes.append(f"smem above sm_90's {SMEM_LIMIT // 1024} KiB a block: will not launch")
    row["note"] = "; ".join(notes) or None
    return row


def _fmt_spills(row):
    if row.get("spill_stores") is None:
        return None
    return f"{row['spill_stores']}/{row['spill_loads']}"


def _fmt_loop(row):
    """The exp loop: its instructions / its ex2s = instructions one thread issues per exp2 (see sass_stats)."""
    if not row.get("loop_ex2"):
        return None
    return f"{row['loop_instrs']}/{row['loop_ex2']} = {row['loop_instrs'] / row['loop_ex2']:.1f}"


def _fmt_mma(row):
    """The exp loop's tensor-core instructions: "wgmma 12", "mma.sync 64" (see sass_stats)."""
    if not row.get("loop_ex2") or "loop_hgmma" not in row:
        return None
    return ", ".join(f"{name} {row[key]}" for name, key in (("wgmma", "loop_hgmma"), ("mma.sync", "loop_hmma"))
                     if row[key]) or "none"


def report(rows, meta_) -> str:
    """The table (also what benchmarks/report.py prints into BENCHMARKS.md)."""
    from benchmarks.harness import Table

    return Table([("kernel", "kernel", None), ("case", "case", None), ("blocks", "blocks", None),
                  ("in", "lowered", None), ("triton kernel", "triton_kernel", None), ("grid", "grid", None),
                  ("warps", "num_warps", None), ("stages", "num_stages", None), ("regs", "registers", None),
                  ("spill st/ld B", _fmt_spills, None), ("stack B", "stack_bytes", None),
                  ("smem B", "smem_bytes", None), ("exp loop instrs/ex2", _fmt_loop, None),
                  ("MMAs in loop", _fmt_mma, None),
                  ("compiled", "compiled", lambda v: "yes" if v else "NO"),
                  ("note", "note", None), ("error", "error", lambda v: v[:160])],
                 title=f"Triton kernels for sm_90a (triton {meta_.get('triton')}; {meta_.get('ptxas')})").render(rows)


def main() -> int:
    try:
        import triton
    except ImportError:
        print(INSTALL_HINT)
        return 2
    sys.path.insert(0, str(ROOT))
    import jax

    import pallas_kernels._common as common
    from benchmarks.harness import meta, parser, source_state, write_json

    p = parser("Triton kernels of the Pallas GPU variants compiled for sm_90a on a CPU: registers, spills, smem",
               "triton_ptx.json")
    p.add_argument("--only", default=",".join(KERNELS), help="comma-separated kernels")
    p.add_argument("--jobs", type=int, default=2, help="compile subprocesses at a time")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per kernel compile")
    args = p.parse_args()
    only = set(args.only.split(","))
    if only - set(KERNELS):
        p.error(f"--only takes {KERNELS}, got {sorted(only - set(KERNELS))}")

    try:
        from triton.backends.nvidia.compiler import get_ptxas_version
        ptxas = get_ptxas_version(CAPABILITY).strip().splitlines()[-1]
    except Exception as e:  # noqa: BLE001
        ptxas = f"unknown ({type(e).__name__}: {e})"
    m = meta(args, triton=triton.__version__, ptxas=ptxas, target=f"cuda capability {CAPABILITY} (sm_90a)",
             kernels_source=source_state(("pallas_kernels",)))
    print(f"triton {triton.__version__} ({Path(triton.__file__).parent}), ptxas: {ptxas}, jax {jax.__version__}",
          flush=True)

    common.platform = lambda: "gpu"  # the entries now take interpret=None as compiled Triton (cf. test_lowering.py)
    workdir = Path(tempfile.mkdtemp(prefix="triton_ptx_"))
    compiler = Compiler(workdir, args.jobs, args.timeout)
    t0 = time.perf_counter()
    rows = []
    try:
        for kernel, case, label, fn, avals, argnums in _cases(args.quick):
            if kernel in only:
                print(f"lowering {kernel} {case} [{label}]", flush=True)
                rows += _rows_for_case(kernel, case, label, fn, avals, argnums, compiler)
        rows = [_finish(r) for r in rows]
    finally:
        compiler.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(workdir, ignore_errors=True)
    m["wall_s"] = round(time.perf_counter() - t0, 1)

    print(report(rows, m), flush=True)
    failed = [r for r in rows if not r.get("compiled")]
    spilling = [r for r in rows if r.get("spill_stores") or r.get("spill_loads")]
    print(f"{len(rows)} kernels, {len(failed)} failed, {len(spilling)} spill; {m['wall_s']} s", flush=True)
    write_json(args.out, rows, m)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--compile-one":
        _compile_one(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
