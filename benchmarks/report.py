"""Render benchmarks/results/*.json as markdown (the tables of BENCHMARKS.md).

    python benchmarks/report.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_decode, bench_generate, bench_memory, bench_selective_scan, bench_seqops, bench_ssd, probe_ssd  # noqa: E402
from benchmarks import bench_moe, bench_train, gpu_check, triton_ptx_check  # noqa: E402
from benchmarks.harness import RESULTS  # noqa: E402

SECTIONS = (("selective_scan.json", bench_selective_scan, "Mamba-1 selective scan (bench_selective_scan.py)"),
            ("ssd.json", bench_ssd, "Mamba-2 SSD (bench_ssd.py)"),
            ("memory.json", bench_memory, "Training memory vs l and n (bench_memory.py, compile only)"),
            ("probe_ssd.json", probe_ssd, "Where the SSD time goes (probe_ssd.py)"),
            ("seqops_cpu.json", bench_seqops, "Attention and long convolutions vs l (bench_seqops.py, CPU)"),
            ("seqops_gpu.json", bench_seqops, "Attention and long convolutions vs l (bench_seqops.py, H200 GPU)"),
            ("decode.json", bench_decode, "Decode step vs context (bench_decode.py)"),
            ("generate.json", bench_generate, "Generation vs transformers (bench_generate.py)"),
            ("train.json", bench_train, "Training vs a PyTorch loop, 1 vs 8 devices, checkpoints (bench_train.py)"),
            ("moe.json", bench_moe, "Mixture of experts: dispatch paths, drops, memory (bench_moe.py)"),
            ("gpu_check.json", gpu_check, "Pallas kernels on the device (gpu_check.py)"),
            ("triton_ptx.json", triton_ptx_check, "Pallas GPU kernels compiled for sm_90a on the CPU (triton_ptx_check.py)"))


def describe(meta):
    m, v, src = meta["machine"], meta["versions"], meta.get("source", {})
    load = lambda k: "/".join(f"{x:.1f}" for x in meta[k]) if meta.get(k) else "?"
    dirty = f", uncommitted: {', '.join(src['uncommitted'])}" if src.get("uncommitted") else ""
    changed = " (the sources changed during the run)" if meta.get("source_end", src) != src else ""
    return "\n".join([
        f"- machine: {m['cpu_count']}-core CPU ({m['processor']}), {m['platform']}, jax backend {m['jax_backend']}",
        f"- date: {meta['date']}; jax {v['jax']}, torch {v['torch']}, python {v['python']}",
        f"- command: `{meta['command']}`",
        f"- code measured: seqmix_jax/ops at {src.get('git_head', '?')[:8]}{dirty}{changed}",
        f"- load average (1/5/15 min) at start {load('load_avg')}, at end {load('load_avg_end')} "
        f"({m['cpu_count']} cores; on the 2-core VM the run itself accounts for up to ~2, more means other jobs "
        "shared the machine)"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    for name, module, title in SECTIONS:
        path = Path(args.results) / name
        if not path.exists():
            print(f"## {title}\n\n{path} is missing.\n")
            continue
        data = json.loads(path.read_text())
        print(f"## {title}\n\n{describe(data['meta'])}\n\n{module.report(data['rows'], data['meta'])}\n")


if __name__ == "__main__":
    main()
