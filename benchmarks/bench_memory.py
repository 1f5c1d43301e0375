"""Peak temporary memory (XLA compiled memory analysis) of forward+backward: compile only, nothing runs.

selective_scan xla vs associative over l (n=16) and over n (l=2048) at b=2, d=1536; ssd xla (and the
mamba2-jax peer, when installed) over l at b=2, 24 heads x 64, n=128, chunk 256.

    python benchmarks/bench_memory.py [--quick] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from benchmarks.bench_selective_scan import ours as ss_ours  # noqa: E402
from benchmarks.bench_ssd import ours as ssd_ours, peer as ssd_peer  # noqa: E402

F32 = jnp.float32
S = lambda *shape: jax.ShapeDtypeStruct(shape, F32)


def ss_args(b, l, d, n):  # x, dt, A, B, C, D, z, dt_bias
    return S(b, l, d), S(b, l, d), S(d, n), S(b, l, n), S(b, l, n), S(d), S(b, l, d), S(d)


def ssd_args(b, l, h, p, g, n):  # x, dt, A, B, C, D, dt_bias
    return S(b, l, h, p), S(b, l, h), S(h), S(b, l, g, n), S(b, l, g, n), S(h), S(h)


def io_bytes(args):
    """Bytes of the inputs (= bytes of their gradients): the floor a fwd+bwd must hold besides temporaries."""
    return sum(4 * int(jnp.prod(jnp.array(a.shape))) for a in args)


def report(rows, meta=None):
    cols = [("sweep", "sweep", None), ("what", "name", None), ("temp memory", "temp_bytes", H.fmt_bytes),
            ("inputs (=grads)", "io_bytes", H.fmt_bytes), ("temp / inputs", "temp_per_io", lambda v: f"{v:.2f}"),
            ("xla temp / this", "xla_fraction", lambda v: f"{v:.3f}"), ("compile", "compile_s", H.fmt_s)]
    return H.Table(cols).render(rows)


def main():
    args = H.parser(__doc__.splitlines()[0], "memory.json").parse_args()
    meta = H.meta(args)
    q = args.quick
    b, d = 2, (128 if q else 1536)
    ls = [128, 256] if q else [512, 1024, 2048, 4096]
    ns = [16, 32] if q else [16, 32, 64, 128]
    l_n = 256 if q else 2048
    rows = []

    def add(sweep, name, fn, a, **kw):
        row = H.memory(name, H.fwd_bwd(fn), *a, sweep=sweep, io_bytes=io_bytes(a), **kw)
        rows.append(row)
        print(f"  {sweep:<18} {name:<34} temp {H.fmt_bytes(row['temp_bytes']):>10}  "
              f"(compile {H.fmt_s(row['compile_s'])})", flush=True)

    for sweep, grid in (("selective_scan/l", [(l, 16) for l in ls]), ("selective_scan/n", [(l_n, n) for n in ns])):
        for l, n in grid:
            for impl in ("xla", "associative"):
                add(sweep, f"{impl} b={b} l={l} d={d} n={n}", ss_ours(impl), ss_args(b, l, d, n), impl=impl,
                    b=b, l=l, d=d, d_state=n)

    h, p, g, n, Q = (4, 16, 1, 32, 64) if q else (24, 64, 1, 128, 256)
    peer, why = ssd_peer(Q)
    for l in ([128, 256] if q else [512, 2048, 8192, 32768]):
        a = ssd_args(b, l, h, p, g, n)
        kw = dict(b=b, l=l, heads=h, headdim=p, d_state=n, chunk=Q)
        add("ssd/l", f"ssd xla l={l}", ssd_ours("xla", Q), a, impl="xla", **kw)
        if peer is not None:
            add("ssd/l", f"mamba2-jax ssd_forward l={l}", peer, a, impl="mamba2-jax", **kw)
        else:
            rows.append(H.skipped(f"mamba2-jax ssd_forward l={l}", why, sweep="ssd/l", impl="mamba2-jax", **kw))

    for r in rows:
        twin = next((x for x in rows if x is not r and x["sweep"] == r["sweep"] and x["impl"] == "xla"
                     and x.get("l") == r.get("l") and x.get("d_state") == r.get("d_state")), None)
        if r["impl"] != "xla" and twin and r.get("temp_bytes"):
            r["xla_fraction"] = twin["temp_bytes"] / r["temp_bytes"]
        if r.get("temp_bytes"):
            r["temp_per_io"] = r["temp_bytes"] / r["io_bytes"]

    print()
    print(report(rows, meta))
    H.write_json(args.out, rows, meta)


if __name__ == "__main__":
    main()
