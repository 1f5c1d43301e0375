"""The accelerator check for the Pallas kernels: correctness on the device, then timings, in one run.

    python benchmarks/gpu_check.py                      # on one H100/H200: all kernels, <= 8 minutes
    python benchmarks/gpu_check.py --only ssd,selective_scan
    python benchmarks/gpu_check.py --quick              # tiny shapes, interpret mode: runs on a CPU

Each kernel's part lives in benchmarks/gpu/<kernel>.py (`run(quick) -> rows`): first its correctness against
the op's reference on the device (forward and gradients), then its forward and forward+backward times against the
op's xla path (and, for attention, cuDNN) at the sizes of issue 7's targets, in bf16. This script runs the parts in
turn within a time budget (a part that would start after the budget is reported as skipped), then the parts'
optional rows (`variants(quick, deadline) -> rows`: other block sizes, then jax's own attention kernels as peers;
skipped once the budget is spent, so they never crowd out another part's defaults), lines up the SSD and
selective-scan rows that share a shape (the "SSD faster than the Mamba-1 scan at n = 64-128" target), prints one
table and writes JSON (benchmarks/report.py renders it into BENCHMARKS.md).
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from benchmarks.gpu._common import chip  # noqa: E402
from benchmarks.harness import Table, meta, parser, write_json  # noqa: E402

KERNELS = ("flash_attention", "selective_scan", "ssd", "causal_conv1d")


def chip_limits() -> tuple[str, float, float] | None:
    """(name, dense bf16 TFLOP/s, HBM TB/s) of the device the rows are read against; None when it is not known."""
    c = chip()
    return None if c.assumed else (c.name, c.tflops, c.hbm / 1e12)


def run_part(kernel: str, quick: bool, deadline: float | None = None, phase: str = "run") -> list[dict]:
    """The part's rows for one phase: "run" (correctness, then timings with the op's defaults) or "variants" (the
    optional timing rows, which the part skips once time.perf_counter() passes `deadline`); [] when the part has
    no such phase."""
    try:
        fn = getattr(importlib.import_module(f"benchmarks.gpu.{kernel}"), phase, None)
        if fn is None:
            return []
        rows = fn(quick=quick) if phase == "run" else fn(quick=quick, deadline=deadline)
    except Exception as e:  # noqa: BLE001 - one broken part must not hide the others' results
        traceback.print_exc()
        return [{"kernel": kernel, "case": "-", "check": "error", "ok": False, "note": f"{type(e).__name__}: {e}"}]
    for row in rows:
        row.setdefault("kernel", kernel)
    return rows


def ssd_vs_scan(rows: list[dict]) -> list[dict]:
    """One row per shape that both the SSD and the selective-scan parts timed: the time ratios."""
    timed = {(r["kernel"], r["case"]): r for r in rows if r.get("check") == "timing" and r.get("ms_fwd")}
    out = []
    for (kernel, case), ssd in timed.items():
        scan = timed.get(("selective_scan", case))
        if kernel != "ssd" or scan is None:
            continue
        fwd = scan["ms_fwd"] / ssd["ms_fwd"]
        both = (scan["ms_fwd"] + scan["ms_bwd"]) / (ssd["ms_fwd"] + ssd["ms_bwd"]) if ssd.get("ms_bwd") and \
            scan.get("ms_bwd") else None
        out.append({"kernel": "ssd vs selective_scan", "case": case, "check": "comparison", "ok": fwd > 1,
                    "ms_fwd": ssd["ms_fwd"], "ms_bwd": ssd.get("ms_bwd"), "ms_xla_fwd": scan["ms_fwd"],
                    "ms_xla_bwd": scan.get("ms_bwd"),
                    "target": f"SSD faster than the Mamba-1 kernel: fwd {fwd:.2f}x" +
                              (f", fwd+bwd {both:.2f}x" if both else ""),
                    "note": "ms_xla_* columns hold the selective-scan kernel's times here"})
    return out


def _f(digits):
    return lambda v: f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v)


TABLE = Table([("kernel", "kernel", None), ("case", "case", None), ("check", "check", None),
               ("ok", "ok", lambda v: "yes" if v else "NO"), ("max rel err", "max_rel_err", lambda v: f"{v:.1e}"),
               ("tol", "tol", lambda v: f"{v:.0e}"), ("fwd ms", "ms_fwd", _f(3)), ("bwd ms", "ms_bwd", _f(3)),
               ("xla fwd ms", "ms_xla_fwd", _f(3)), ("xla bwd ms", "ms_xla_bwd", _f(3)),
               ("TFLOP/s", "tflops", _f(1)), ("GB/s", "gbps", _f(0)), ("target", "target", None),
               ("note", "note", None)])


def report(rows, meta_):
    limits = meta_.get("chip")
    head = (f"Chip limits used: {limits[0]}, {limits[1]:.0f} TFLOP/s dense bf16, {limits[2]:.2f} TB/s HBM.\n\n"
            if limits else "")
    return head + TABLE.render(rows)


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0], "gpu_check.json")
    p.add_argument("--only", default=",".join(KERNELS), help=f"comma-separated subset of {', '.join(KERNELS)}")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="no part starts after this many seconds (the issue's limit is 8 minutes in all)")
    args = p.parse_args(argv)
    if args.quick and "--out" not in " ".join(sys.argv if argv is None else argv):
        # the smoke test must not overwrite the device results that BENCHMARKS.md is rendered from
        args.out = str(Path(tempfile.gettempdir()) / "gpu_check_quick.json")
    only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = sorted(set(only) - set(KERNELS))
    if unknown:
        print(f"gpu_check: unknown kernel(s) {', '.join(unknown)}; choose from {', '.join(KERNELS)}", file=sys.stderr)
        return 2
    if not args.quick and jax.default_backend() not in ("gpu", "cuda", "rocm", "tpu"):
        print(f"gpu_check: the default backend is {jax.default_backend()!r}; run on a GPU/TPU, or pass --quick for "
              "the interpret-mode smoke test", file=sys.stderr)
        return 2
    info = meta(args, chip=chip_limits())
    info["source"] = __import__("benchmarks.harness", fromlist=["source_state"]).source_state(
        ("seqmix_jax/ops", "pallas_kernels"))
    start, rows = time.perf_counter(), []
    for kernel in only:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            rows.append({"kernel": kernel, "case": "-", "check": "skipped", "ok": None,
                         "note": f"time budget {args.budget_s:.0f} s spent ({elapsed:.0f} s)"})
            continue
        t0 = time.perf_counter()
        part = run_part(kernel, args.quick)
        print(f"{kernel}: {len(part)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        rows += part
        write_json(args.out, rows, dict(info, partial=True))  # a run killed by a timeout keeps what it measured
    broken = {r["kernel"] for r in rows if r.get("check") in ("error", "skipped") and r.get("case") == "-"}
    # the optional rows, once every part's defaults are in; attention's peer rows last: they inform, the others
    # (SSD's two-pass and saved-states rows) choose defaults
    for kernel in sorted((k for k in only if k not in broken), key=lambda k: k == "flash_attention"):
        t0 = time.perf_counter()
        part = run_part(kernel, args.quick, deadline=start + args.budget_s, phase="variants")
        if part:
            print(f"{kernel} variants: {len(part)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
            rows += part
            write_json(args.out, rows, dict(info, partial=True))
    rows += ssd_vs_scan(rows)
    info["wall_s"] = round(time.perf_counter() - start, 1)
    print(report(rows, info))
    write_json(args.out, rows, info)
    failed = [r for r in rows if r.get("check") in ("correctness", "error") and r.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
