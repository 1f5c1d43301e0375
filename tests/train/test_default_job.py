"""The main job: `python train.py` with no arguments (configs/tiny.yaml) learns MQAR to >= 0.9 test recall and
leaves a checkpoint, metrics and the plot. Its wall time (<= 3 minutes on the 2-core CI machine, including
compilation) is measured in BENCHMARKS.md, not asserted here. It runs with the default compiler flags (~70-90 s
here): the job a user runs first, end to end, in every CI run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_default_job_learns_mqar(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), f"logging.run_dir={tmp_path}", "logging.progress=false"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    print(r.stdout[-500:], r.stderr[-2000:], f"wall {wall:.1f} s", sep="\n")
    assert r.returncode == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    print("summary:", summary)
    assert summary["status"] == "finished" and summary["step"] == 500
    assert summary["eval"]["accuracy"] >= 0.9
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run_dir / "checkpoints").iterdir())
