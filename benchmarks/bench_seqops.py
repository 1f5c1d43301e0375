"""Attention and long convolution vs sequence length: time and compiled temporary memory, forward and forward+backward.

    python benchmarks/bench_seqops.py [--quick] [--lengths 1024 4096 16384] [--out benchmarks/results/seqops_cpu.json]

attention: `reference` (materialized scores) vs `xla` (blockwise, online softmax) at b=1, h=4 query heads, g=2 kv
heads, head dim 64, causal, float32. fftconv: `xla` (float32 FFT of size 2l) vs `reference` (direct O(l^2)
convolution) at b=1, d=256, filter length l, with the D skip. Forward+backward is the gradient of sum(output) with
respect to every input.

Not run (memory measured from the compiled executable only, time "not run", reason in the JSON): a config whose
temporaries exceed --max-temp-gib, and one whose single call, extrapolated quadratically from the previous length,
would exceed --max-call-s. A slow config that is run gets fewer timed runs (as many as fit in --budget-s, at
least one). Rows of one op and mode at one length are timed round-robin (harness.bench_group), so the xla /
reference ratio is measured under the same background load. The slope is the least-squares log-log slope of the
median time vs l over the lengths that ran.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from seqmix_jax.ops import attention, fftconv  # noqa: E402

ATTN = dict(b=1, h=4, g=2, k=64)
CONV = dict(b=1, d=256)


def attention_case(l, impl):
    b, h, g, k = ATTN["b"], ATTN["h"], ATTN["g"], ATTN["k"]
    shapes = ((b, l, h, k), (b, l, g, k), (b, l, g, k))
    fn = lambda q, k_, v: attention(q, k_, v, causal=True, impl=impl)
    return fn, shapes, dict(op="attention", impl=impl, l=l, **ATTN, causal=True)


def fftconv_case(l, impl):
    b, d = CONV["b"], CONV["d"]
    shapes = ((b, l, d), (l, d), (d,))
    fn = lambda u, h, D: fftconv(u, h, D, impl=impl)
    return fn, shapes, dict(op="fftconv", impl=impl, l=l, **CONV)


CASES = {"attention": attention_case, "fftconv": fftconv_case}


def arrays(shapes, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.standard_normal(s), jnp.float32) for s in shapes]


def structs(shapes):
    return [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]


def plan(op, impl, mode, l, fn, shapes, info, rows, args):
    """Memory from the compiled executable; then the number of timed runs, or the reason it is not run."""
    mem = H.memory("", fn, *structs(shapes))  # jax caches this executable: the timed call reuses it
    row = dict(name=f"{op} {impl} {mode}", mode=mode, **info, temp_bytes=mem["temp_bytes"],
               compile_s=mem["compile_s"])
    if mem["temp_bytes"] and mem["temp_bytes"] > args.max_temp_gib * 2**30:
        return row, None, (f"not run: {H.fmt_bytes(mem['temp_bytes'])} temporary (compiled memory analysis) > "
                           f"--max-temp-gib {args.max_temp_gib:g}")
    prev = [r for r in rows if r["op"] == op and r["impl"] == impl and r["mode"] == mode and "median_s" in r]
    n = args.n
    if prev:
        p = max(prev, key=lambda r: r["l"])
        est = p["median_s"] * (l / p["l"]) ** 2  # the quadratic paths set the limits; generous for the others
        if est > args.max_call_s:
            return row, None, (f"not run: ~{est:.0f} s per call (extrapolated as l^2 from {H.fmt_s(p['median_s'])} "
                               f"at l={p['l']}) > --max-call-s {args.max_call_s:g}")
        if est * (2 * n + 1) > args.budget_s:  # round-robin costs a warm-up and an untimed run per timed run
            n = max(1, min(n - 1, int(args.budget_s // est)))  # alone, without warm-up: at most budget_s
        row["est_call_s"] = est
    return row, n, None


def run_length(l, args, rows, notes):
    for op, make in CASES.items():
        for mode in ("fwd", "fwd+bwd"):
            group, slow, compile_s = [], [], {}
            for impl in ("xla", "reference"):
                fn, shapes, info = make(l, impl)
                fn = fn if mode == "fwd" else H.fwd_bwd(fn)
                row, n, why = plan(op, impl, mode, l, fn, shapes, info, rows, args)
                if why:
                    notes.append(f"l={l}: {row['name']} {why}")
                    add(rows, dict(row, skipped=why))
                    continue
                extra = {k: v for k, v in row.items() if k not in ("name", "temp_bytes", "compile_s")}
                compile_s[row["name"]] = row["compile_s"]
                entry = (H.spec(row["name"], fn, *arrays(shapes), **extra), n)
                (group if n == args.n else slow).append(entry)
            if group:  # round-robin: the ratio of xla to reference under the same load
                for r in H.bench_group([s for s, _ in group], n=args.n, warmup=1):
                    add(rows, dict(r, compile_s=compile_s[r["name"]]))
            for s, n in slow:  # too slow to repeat args.n times next to the others: on its own, fewer runs
                name, fn, a, kw = s
                add(rows, dict(H.bench(name, fn, *a, n=n, warmup=0, **kw), compile_s=compile_s[name]))


def add(rows, row):
    rows.append(row)
    msg = row.get("skipped") or (f"{H.fmt_s(row['median_s']):>10} ({row['runs']} runs)  compile "
                                 f"{H.fmt_s(row.get('compile_s')):>9}")
    print(f"  l={row['l']:<6} {row['name']:<28} temp {H.fmt_bytes(row.get('temp_bytes')):>10}  {msg}", flush=True)


def summarize(rows):
    """Slopes per (op, impl, mode), xla / reference ratios, and the three targets."""
    slopes = {}
    for key in sorted({(r["op"], r["impl"], r["mode"]) for r in rows}):
        pts = sorted((r["l"], r["median_s"]) for r in rows
                     if (r["op"], r["impl"], r["mode"]) == key and "median_s" in r)
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            slopes[" ".join(key)] = {"slope": float(np.polyfit(x, y, 1)[0]), "lengths": [p[0] for p in pts],
                                     "pairwise": [float((y[i + 1] - y[i]) / (x[i + 1] - x[i]))
                                                  for i in range(len(pts) - 1)]}
    for r in rows:
        ref = next((x for x in rows if x["op"] == r["op"] and x["l"] == r["l"] and x["mode"] == r["mode"]
                    and x["impl"] == "reference"), None)
        if r["impl"] == "xla" and ref:
            if "median_s" in r and "median_s" in ref:
                r["time_vs_reference"] = r["median_s"] / ref["median_s"]
            if r.get("temp_bytes") and ref.get("temp_bytes"):
                r["temp_vs_reference"] = r["temp_bytes"] / ref["temp_bytes"]
    targets = []
    attn = [r for r in rows if r["op"] == "attention" and r["impl"] == "xla" and r["mode"] == "fwd+bwd"]
    if attn:
        top = max(attn, key=lambda r: r["l"])
        ratio = top.get("temp_vs_reference")
        targets.append({"target": f"attention xla fwd+bwd temp at l={top['l']} <= 1/8 of the materialized reference",
                        "value": ratio, "met": ratio is not None and ratio <= 1 / 8})
    s = slopes.get("fftconv xla fwd+bwd")
    if s:
        targets.append({"target": "fftconv xla fwd+bwd time slope <= 1.2", "value": s["slope"],
                        "met": s["slope"] <= 1.2})
    both = [r for r in rows if r["op"] == "attention" and "time_vs_reference" in r]
    if both:
        worst = max(r["time_vs_reference"] for r in both)
        targets.append({"target": "attention xla time <= 1.5x reference where both ran (worst l, mode)",
                        "value": worst, "met": worst <= 1.5})
    return slopes, targets


def report(rows, meta=None):
    cols = [("op", "op", None), ("impl", "impl", None), ("mode", "mode", None), ("l", "l", None),
            ("median", "median_s", H.fmt_s), ("min", "min_s", H.fmt_s), ("runs", "runs", None),
            ("compile", "compile_s", H.fmt_s), ("temp memory", "temp_bytes", H.fmt_bytes),
            ("time / reference", "time_vs_reference", H.fmt_x),
            ("temp / reference", "temp_vs_reference", lambda v: f"{v:.4f}"),
            ("note", lambda r: r.get("skipped") and "not run (memory only; see notes)", None)]
    rows = sorted(rows, key=lambda r: (r["op"], r["impl"] != "xla", r["mode"], r["l"]))
    out = [H.Table(cols).render(rows)]
    meta = meta or {}
    if meta.get("slopes"):
        out.append(H.Table([("time vs l", "key", None), ("log-log slope", "slope", lambda v: f"{v:.2f}"),
                            ("pairwise", "pairwise", lambda v: ", ".join(f"{x:.2f}" for x in v)),
                            ("lengths", "lengths", lambda v: ", ".join(map(str, v)))]).render(
            [dict(key=k, **v) for k, v in meta["slopes"].items()]))
    if meta.get("targets"):
        out.append("\n".join(f"- {t['target']}: {t['value'] if t['value'] is None else round(t['value'], 4)} "
                             f"({'met' if t['met'] else 'NOT met'})" for t in meta["targets"]))
    if meta.get("notes"):
        out.append("Notes:\n" + "\n".join(f"- {n}" for n in meta["notes"]))
    return "\n\n".join(out)


def main():
    p = H.parser(__doc__.splitlines()[0], "seqops_cpu.json")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--max-temp-gib", type=float, default=4.0, help="do not run a config needing more temporaries")
    p.add_argument("--max-call-s", type=float, default=120.0, help="do not run a config whose one call takes longer")
    p.add_argument("--budget-s", type=float, default=60.0, help="timed-run budget of a slow config")
    args = p.parse_args()
    if args.quick:
        args.lengths, args.n = [128, 256, 512], 1
    meta = H.meta(args)
    rows, notes = [], []
    for l in args.lengths:
        run_length(l, args, rows, notes)
    slopes, targets = summarize(rows)
    meta = dict(meta, notes=notes, slopes=slopes, targets=targets)
    print()
    print(report(rows, meta))
    H.write_json(args.out, rows, meta)


if __name__ == "__main__":
    main()
