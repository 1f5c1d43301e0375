"""Shared benchmark harness: timing (JAX or plain Python), XLA temporary memory, tables, JSON results.

    row = bench("xla fwd", f, x, y)              # jit, lower+compile timed apart, median of n timed runs
    row = bench("torch fwd", g, a, jit=False, torch_no_grad=True)
    rows = bench_group([spec("a", f, x), spec("b", g, a, jit=False)])   # timed round-robin
    row = memory("xla fwd+bwd", fwd_bwd(f), *shape_structs)   # compile only, nothing runs
    Table([...columns...]).print(rows); write_json(path, rows, meta(args))

Timed runs call `block_until_ready` on every output leaf. Ratios belong between rows measured in the same
process (the development machine is a shared 2-core CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

RESULTS = Path(__file__).resolve().parent / "results"


def _block(out):
    for leaf in jax.tree_util.tree_leaves(out):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return out


def fwd_bwd(fn, argnums=None):
    """Gradient of sum(fn(*args)) with respect to every positional argument (or `argnums`)."""

    def g(*args):
        nums = tuple(range(len(args))) if argnums is None else argnums
        return jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=nums)(*args)

    return g


def temp_bytes(compiled):
    """XLA's temporary-buffer size for a compiled executable (None when the backend does not say)."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory analysis is optional per backend
        return None


def _time_runs(calls, n, warmup):
    """Round-robin: run i of every call before run i+1 of any, so a change in background load hits all alike.

    With several calls each timed run directly follows an untimed run of the same call: on the development VM
    a neighbour that allocates and frees gigabytes (the associative scan, the sequential reference's backward)
    otherwise slowed the next call's run by up to 1.5x (presumably fresh memory faulting in after a large free)."""
    for call in calls:
        for _ in range(warmup):
            _block(call())
    times = [[] for _ in calls]
    for _ in range(n):
        for call, ts in zip(calls, times):
            if len(calls) > 1:
                _block(call())
            t0 = time.perf_counter()
            _block(call())
            ts.append(time.perf_counter() - t0)
    return [{"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "runs": n, "times_s": ts}
            for ts in times]


def _prepare(name, fn, *args, jit=True, torch_no_grad=False, mem=True, **extra):
    row = {"name": name, **extra}
    if not jit:
        call = lambda: fn(*args)
        if torch_no_grad:
            import torch

            plain = call

            def call():
                with torch.no_grad():
                    return plain()
        return row, call
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    row["compile_s"] = time.perf_counter() - t0
    if mem:
        row["temp_bytes"] = temp_bytes(compiled)
    return row, lambda: compiled(*args)


def bench(name, fn, *args, n=5, warmup=1, jit=True, torch_no_grad=False, mem=True, **extra):
    """Time `fn(*args)`. With jit: lower+compile wall time apart (`compile_s`), optional temporary memory.

    Without jit `fn` is any Python callable (e.g. torch), run under `torch.no_grad()` if asked."""
    row, call = _prepare(name, fn, *args, jit=jit, torch_no_grad=torch_no_grad, mem=mem, **extra)
    row.update(_time_runs([call], n, warmup)[0])
    return row


def spec(name, fn, *args, **kw):
    """One entry of `bench_group`: the arguments of `bench` (without n, warmup)."""
    return name, fn, args, kw


def bench_group(specs, n=5, warmup=1):
    """`bench` for several callables, timed round-robin: their ratios are measured under the same load."""
    prepared = [_prepare(name, fn, *args, **kw) for name, fn, args, kw in specs]
    stats = _time_runs([call for _, call in prepared], n, warmup)
    return [dict(row, **st) for (row, _), st in zip(prepared, stats)]


def memory(name, fn, *args, **extra):
    """Compile only (args may be `jax.ShapeDtypeStruct`s) and report XLA's temporary memory."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return {"name": name, **extra, "compile_s": time.perf_counter() - t0, "temp_bytes": temp_bytes(compiled)}


def skipped(name, reason, **extra):
    return {"name": name, **extra, "skipped": reason}


# --- formatting ---------------------------------------------------------------------------------------------

def fmt_s(v):
    if v is None:
        return "-"
    if v < 1e-3:
        return f"{v * 1e6:.1f} us"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def fmt_bytes(v):
    if v is None:
        return "-"
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if v >= k:
            return f"{v / k:.1f} {unit}"
    return f"{v} B"


def fmt_x(v):
    return "-" if v is None else f"{v:.2f}x"


class Table:
    """Aligned text/markdown table. `columns`: (header, key or callable(row), formatter or None)."""

    def __init__(self, columns, title=None):
        self.columns, self.title = columns, title

    def cells(self, row):
        out = []
        for _, key, f in self.columns:
            v = key(row) if callable(key) else row.get(key)
            out.append("-" if v is None else f(v) if f else str(v))
        return out

    def render(self, rows):
        body = [[h for h, _, _ in self.columns]] + [self.cells(r) for r in rows]
        widths = [max(len(r[i]) for r in body) for i in range(len(self.columns))]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        text = [line(body[0]), sep] + [line(r) for r in body[1:]]
        return ("### " + self.title + "\n\n" if self.title else "") + "\n".join(text)

    def print(self, rows):
        print(self.render(rows), flush=True)


# --- results ------------------------------------------------------------------------------------------------

def meta(args=None, **extra):
    m = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()]},
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": _version("jaxlib"),
                     "torch": _version("torch")},
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    m["source"] = source_state()
    if args is not None:
        m["args"] = vars(args)
    m.update(extra)
    return m


def source_state(paths=("seqmix_jax/ops",)):
    """Git HEAD, files under `paths` that differ from it, and a hash of those sources: what was measured.

    Call `meta()` at start-up (the code under test is imported then); `write_json` records it again at the end."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", "--no-optional-locks", *a], cwd=root, capture_output=True,
                                    text=True).stdout.strip()
    digest = hashlib.sha256()
    for f in sorted(p for d in paths for p in (root / d).rglob("*.py")):
        digest.update(f.read_bytes())
    changed = git("diff", "--name-only", "HEAD", "--", *paths).split()
    return {"git_head": git("rev-parse", "HEAD"), "uncommitted": changed, "sha256": digest.hexdigest()[:16]}


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def write_json(path, rows, meta_):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_ = dict(meta_, load_avg_end=os.getloadavg() if hasattr(os, "getloadavg") else None,
                 source_end=source_state())
    path.write_text(json.dumps({"meta": meta_, "rows": rows}, indent=1, default=str) + "\n")
    print(f"wrote {path}", flush=True)


def parser(description, default_out):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=str(RESULTS / default_out), help="JSON results path")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one timed run: a smoke test")
    p.add_argument("-n", type=int, default=5, help="timed runs per measurement (median reported)")
    return p


def torch_mamba_ssm():
    """Import mamba_ssm's pure-torch references on CPU (the order matters; see tests/parity/torch_refs.py)."""
    import types

    import torch
    import transformers.models.mamba.modeling_mamba  # noqa: F401
    import transformers.models.mamba2.modeling_mamba2  # noqa: F401

    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    import mamba_ssm  # noqa: F401

    torch.set_default_dtype(torch.float32)
    return torch
