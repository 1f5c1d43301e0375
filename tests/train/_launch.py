"""Subprocess helpers for the end-to-end trainer tests: launch train.py with a given fake-device count, watch its
metrics, snapshot run directories.

Every child runs on CPU with `--xla_force_host_platform_device_count=N` (plus the test process's
`--xla_backend_optimization_level`, see tests/conftest.py) and shares one persistent XLA compilation
cache (a directory the caller owns): the cache only skips recompiling programs an earlier child already compiled
(same HLO, same executable), so it changes no number, and it cuts a child's start from ~20 s to ~6 s here.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "train.py"


def child_env(devices: int, cache_dir: str | os.PathLike | None = None, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["JAX_PLATFORMS"] = "cpu"
    # the test process's CPU backend optimization level (tests/conftest.py), if it set one; no other parent flag
    opt = re.findall(r"--xla_backend_optimization_level=\S+", os.environ.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}", *opt[-1:]])
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.update(extra or {})
    return env


def command(args: list[str]) -> list[str]:
    return [sys.executable, str(TRAIN), *args]


def start(args: list[str], *, devices: int = 1, cache_dir=None, extra_env: dict | None = None) -> subprocess.Popen:
    """Start `python train.py *args` (stdout/stderr captured as text)."""
    return subprocess.Popen(command(args), cwd=ROOT, env=child_env(devices, cache_dir, extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"train.py did not finish within {timeout} s\nstdout:\n{out}\nstderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(args: list[str], *, devices: int = 1, cache_dir=None, extra_env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    res = finish(start(args, devices=devices, cache_dir=cache_dir, extra_env=extra_env), timeout)
    print(f"[train.py on {devices} device(s): exit {res.returncode} in {time.perf_counter() - t0:.1f} s] "
          f"{res.stdout.strip()[-300:]}")
    return res


def check_ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr[-4000:]}"


# --- metrics -------------------------------------------------------------------------------------------------------

def records(run_dir: Path, split: str = "train") -> list[dict]:
    """Every record of `split` in file order (a resumed run re-logs the steps after its checkpoint)."""
    from seqmix_jax.train.metrics import read_metrics

    return [r for r in read_metrics(run_dir) if r["split"] == split]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss, the last record per step."""
    return {r["step"]: r["loss"] for r in records(run_dir)}


def last_logged_step(run_dir: Path) -> int:
    """The largest train step in the metrics file (0 if none); tolerates a half-written last line."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    best = 0
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("split") == "train":
            best = max(best, r["step"])
    return best


def wait_for_step(proc: subprocess.Popen, run_dir: Path, ready, timeout: float = 240) -> int:
    """Poll the metrics until `ready(last logged train step)` holds; return that step. Fails if the process ends
    first."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        step = last_logged_step(run_dir)
        if ready(step):
            return step
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"train.py ended (exit {proc.returncode}) at logged step {step} before the "
                                 f"signal could be sent\nstderr:\n{err[-3000:]}")
        time.sleep(0.003)
    proc.kill()
    raise AssertionError(f"no logged step satisfied the condition within {timeout} s")


def signal_at(proc, run_dir, ready, sig) -> int:
    step = wait_for_step(proc, run_dir, ready)
    os.kill(proc.pid, sig)
    return step


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def checkpoint_steps(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def compare(name: str, got: dict[int, float], want: dict[int, float], steps, *, rtol: float = 0.0) -> None:
    """Print both loss series side by side, then assert equality (rtol 0: bitwise) at every step of `steps`."""
    worst = 0.0
    for s in steps:
        g, w = got.get(s), want.get(s)
        rel = math.inf if g is None or w is None else abs(g - w) / max(abs(w), 1e-30)
        worst = max(worst, rel)
        print(f"  {name} step {s:3d}: got {g!r:>22}  want {w!r:>22}  rel {rel:.2e}")
    print(f"  {name}: max rel diff {worst:.3e} over {len(list(steps))} steps (rtol {rtol:g})")
    missing = [s for s in steps if s not in got or s not in want]
    assert not missing, f"{name}: steps {missing} missing"
    if rtol == 0.0:
        bad = [s for s in steps if got[s] != want[s]]
        assert not bad, f"{name}: losses differ (not bit-identical) at steps {bad}"
    else:
        assert worst <= rtol, f"{name}: max rel diff {worst:.3e} > {rtol:g}"


# --- files ---------------------------------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) for every file and directory under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

