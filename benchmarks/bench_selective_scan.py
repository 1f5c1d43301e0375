"""Mamba-1 selective scan: our `xla` path vs mamba_ssm's torch reference, the associative-scan formulation
and our sequential reference (b=2, l=2048, d=1536, n=16, z gate, dt_bias + softplus; float32 on CPU).

    python benchmarks/bench_selective_scan.py [--quick] [--out benchmarks/results/selective_scan.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from seqmix_jax.ops.selective_scan import selective_scan  # noqa: E402


def make_inputs(b, l, d, n, seed=0):
    """Mamba-like values: A = -[1..n] per channel, dt_bias = softplus^-1 of dt in [1e-3, 0.1]."""
    r = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: (scale * r.standard_normal(s)).astype(np.float32)
    dt0 = np.exp(r.uniform(np.log(1e-3), np.log(0.1), d)).astype(np.float32)
    return dict(x=f(b, l, d), dt=f(b, l, d, scale=0.5), A=-np.tile(np.arange(1, n + 1, dtype=np.float32), (d, 1)),
                B=f(b, l, n), C=f(b, l, n), D=f(d), z=f(b, l, d), dt_bias=np.log(np.expm1(dt0)).astype(np.float32))


ORDER = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def ours(impl, chunk_size=32):
    def f(x, dt, A, B, C, D, z, dt_bias):
        return selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias, impl=impl, chunk_size=chunk_size)
    return f


def torch_ref(inp):
    """mamba_ssm `selective_scan_ref`, channel-first (b, d, l) inputs prepared outside the timing."""
    torch = H.torch_mamba_ssm()
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    cf = lambda a: t(np.swapaxes(a, 1, 2))  # (b, l, c) -> (b, c, l)
    args = (cf(inp["x"]), cf(inp["dt"]), t(inp["A"]), cf(inp["B"]), cf(inp["C"]), t(inp["D"]), cf(inp["z"]),
            t(inp["dt_bias"]))

    def run():
        u, delta, A, B, C, D, z, bias = args
        return selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)
    return run, torch


def report(rows, meta):
    """Markdown tables of the main comparison and the chunk_size sweep."""
    cols = [("what", "name", None), ("median", "median_s", H.fmt_s), ("min", "min_s", H.fmt_s),
            ("max", "max_s", H.fmt_s), ("compile", "compile_s", H.fmt_s), ("temp memory", "temp_bytes", H.fmt_bytes),
            ("xla speedup", "xla_speedup", H.fmt_x), ("temp / xla's", "temp_vs_xla", H.fmt_x)]
    sh, err = meta["shape"], meta["parity_max_rel_err"]
    head = (f"selective_scan b={sh['b']} l={sh['l']} d={sh['d']} n={sh['d_state']}, z gate, dt_bias+softplus, "
            f"float32. Max relative error of xla vs reference / torch: {err['xla_vs_reference']:.1e} / "
            f"{err.get('xla_vs_torch', float('nan')):.1e}")
    return "\n\n".join([head, H.Table(cols).render([r for r in rows if not r.get("sweep")]),
                         H.Table(cols[:6], title="xla chunk_size sweep").render([r for r in rows if r.get("sweep")])])


def main():
    p = H.parser(__doc__.splitlines()[0], "selective_scan.json")
    p.add_argument("--skip-torch", action="store_true")
    args = p.parse_args()
    meta = H.meta(args)
    b, l, d, n = (2, 256, 128, 16) if args.quick else (2, 2048, 1536, 16)
    reps = 1 if args.quick else args.n
    inp = make_inputs(b, l, d, n)
    jargs = [jnp.asarray(inp[k]) for k in ORDER]
    shape = dict(b=b, l=l, d=d, d_state=n)
    rows = []

    def add(row):
        rows.append(row)
        print(f"  {row['name']:<34} {H.fmt_s(row.get('median_s')):>10}  compile {H.fmt_s(row.get('compile_s')):>9}"
              f"  temp {H.fmt_bytes(row.get('temp_bytes'))}", flush=True)

    # Parity first: a benchmark of a wrong answer is worthless.
    y_xla = jax.jit(ours("xla"))(*jargs)
    y_ref = jax.jit(ours("reference"))(*jargs)
    y_asc = jax.jit(ours("associative"))(*jargs)
    rel = lambda a, c: float(jnp.max(jnp.abs(a - c)) / jnp.max(jnp.abs(c)))
    parity = {"xla_vs_reference": rel(y_xla, y_ref), "associative_vs_reference": rel(y_asc, y_ref)}

    # Timed in groups, round-robin inside each group: the ratios are measured under the same background load.
    spec = lambda name, fn, impl, mode, **kw: H.spec(name, fn, *jargs, impl=impl, mode=mode, **shape, **kw)
    names = {"xla": "xla", "associative": "associative", "reference": "reference (lax.scan)"}
    fwd = [spec(f"{names[i]} fwd", ours(i), i, "fwd") for i in names]
    bwd = [spec(f"{names[i]} fwd+bwd", H.fwd_bwd(ours(i)), i, "fwd+bwd") for i in names]
    if args.skip_torch:
        add(H.skipped("torch selective_scan_ref fwd", "--skip-torch", impl="torch", mode="fwd", **shape))
    else:
        run, torch = torch_ref(inp)
        y_t = run().numpy()
        parity["xla_vs_torch"] = float(np.max(np.abs(np.asarray(y_xla) - np.swapaxes(y_t, 1, 2)))
                                       / np.max(np.abs(y_t)))
        fwd.append(H.spec("torch selective_scan_ref fwd", run, jit=False, torch_no_grad=True, impl="torch",
                          mode="fwd", torch_threads=torch.get_num_threads(), **shape))
    sweep = [spec(f"xla chunk={T} {m}", f(ours("xla", T)), "xla", m, chunk_size=T, sweep=True)
             for T in (16, 32, 64) for m, f in (("fwd", lambda g: g), ("fwd+bwd", H.fwd_bwd))]
    for group in (fwd, bwd, sweep):
        for row in H.bench_group(group, n=reps, warmup=1):
            add(row)

    get = lambda name: next(r for r in rows if r["name"] == name)
    xf, xb = get("xla fwd"), get("xla fwd+bwd")
    for r in rows:
        base = xf if r.get("mode") == "fwd" else xb
        if "median_s" in r and not r.get("sweep"):
            r["xla_speedup"] = r["median_s"] / base["median_s"]
        if r.get("temp_bytes") and base.get("temp_bytes"):
            r["temp_vs_xla"] = r["temp_bytes"] / base["temp_bytes"]

    print()
    print(report(rows, dict(shape=shape, parity_max_rel_err=parity)))
    H.write_json(args.out, rows, dict(meta, shape=shape, parity_max_rel_err=parity))


if __name__ == "__main__":
    main()
