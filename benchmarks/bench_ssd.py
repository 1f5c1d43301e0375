"""Mamba-2 SSD: our `xla` path vs our sequential reference, mamba_ssm's torch references and the JAX peer
package mamba2-jax (b=2, 24 heads x 64, n=128, g=1, chunk 256, D and dt_bias + softplus, no z; float32 CPU).

    python benchmarks/bench_ssd.py [--quick] [--lengths 512 2048 8192] [--out benchmarks/results/ssd.json]

mamba2-jax (`pip install --no-deps mamba2-jax==1.1.2`) is benchmarked only; it is not a project dependency.
Its `ssd_forward` takes B/C per head (b, l, h, n): the g=1 B/C are broadcast inside the jitted function,
as its own `Mamba2Mixer` does, and its dt clamp is set to (0, inf) (a no-op, as ours with dt_limit=None).
Skipped, with the reason in the JSON: our sequential reference above l=2048 when it would take > 60 s (its
backward keeps one (b, h, p, n) state per step: 6 GiB at l=2048), and mamba_ssm's ssd_chunk_scan_combined_ref
above --combined-max-l (6.2 GiB peak RSS at l=2048; OOM-killed at l=8192 on the 23 GiB machine).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from seqmix_jax.ops.ssd import ssd  # noqa: E402

ORDER = ("x", "dt", "A", "B", "C", "D", "dt_bias")
REF_LIMIT_S = 60.0  # above l=2048, skip our sequential reference where it would take longer than this


def make_inputs(b, l, h, p, g, n, seed=0):
    """Mamba-2-like values: A = -U[1, 16] per head, dt_bias = softplus^-1 of dt in [1e-3, 0.1]."""
    r = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: (scale * r.standard_normal(s)).astype(np.float32)
    dt0 = np.exp(r.uniform(np.log(1e-3), np.log(0.1), h))
    return dict(x=f(b, l, h, p), dt=f(b, l, h, scale=0.5), A=-r.uniform(1, 16, h).astype(np.float32),
                B=f(b, l, g, n), C=f(b, l, g, n), D=f(h), dt_bias=np.log(np.expm1(dt0)).astype(np.float32))


def ours(impl, Q):
    def f(x, dt, A, B, C, D, dt_bias):
        return ssd(x, dt, A, B, C, chunk_size=Q, D=D, dt_bias=dt_bias, impl=impl)
    return f


def peer(Q):
    """mamba2-jax `ssd_forward`, or the reason it cannot be used."""
    try:
        from mamba2_jax import ssd_forward
    except Exception as err:  # noqa: BLE001
        return None, f"import mamba2_jax failed: {type(err).__name__}: {err}"

    def f(x, dt, A, B, C, D, dt_bias):
        shape = x.shape[:3] + B.shape[-1:]
        y, _ = ssd_forward(x, dt, A, jnp.broadcast_to(B, shape), jnp.broadcast_to(C, shape), Q, D, dt_bias,
                           0.0, float("inf"))
        return y
    return f, None


def torch_refs(inp, Q):
    torch = H.torch_mamba_ssm()
    import torch.nn.functional as F
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete
    from mamba_ssm.ops.triton.ssd_combined import ssd_chunk_scan_combined_ref

    x, dt, A, B, C, D, bias = (torch.from_numpy(inp[k]) for k in ORDER)
    h = x.shape[2]

    def combined():
        return ssd_chunk_scan_combined_ref(x, dt, A, B, C, Q, D=D, dt_bias=bias, dt_softplus=True)

    def minimal():  # ssd_minimal_discrete takes x*dt, A*dt and per-head B/C; D is added here
        delta = F.softplus(dt + bias)
        rep = lambda t: t.expand(*t.shape[:2], h, t.shape[-1])
        y, _ = ssd_minimal_discrete(x * delta[..., None], A * delta, rep(B), rep(C), Q)
        return y + x * D[:, None]
    return {"combined_ref": combined, "minimal_discrete": minimal}


def rel_err(a, ref):
    a, ref = np.asarray(a), np.asarray(ref)
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def run_length(l, args, rows, notes):
    b, h, p, g, n, Q = (2, 4, 16, 1, 32, 64) if args.quick else (2, 24, 64, 1, 128, 256)
    reps = 1 if args.quick else args.n
    inp = make_inputs(b, l, h, p, g, n)
    ja = [jnp.asarray(inp[k]) for k in ORDER]
    shape = dict(b=b, l=l, heads=h, headdim=p, groups=g, d_state=n, chunk=Q)

    def add(row):
        rows.append(row)
        msg = row.get("skipped") or (f"{H.fmt_s(row['median_s']):>10}  compile {H.fmt_s(row.get('compile_s')):>9}"
                                     f"  temp {H.fmt_bytes(row.get('temp_bytes'))}")
        print(f"  l={l:<5} {row['name']:<30} {msg}", flush=True)

    spec = lambda name, fn, impl, mode, **kw: H.spec(name, fn, *ja, impl=impl, mode=mode, **shape, **kw)
    y_xla = np.asarray(jax.jit(ours("xla", Q))(*ja))
    fwd = [spec("xla fwd", ours("xla", Q), "xla", "fwd")]
    bwd = [spec("xla fwd+bwd", H.fwd_bwd(ours("xla", Q)), "xla", "fwd+bwd")]

    pf, why = peer(Q)
    if pf is None:
        for mode in ("fwd", "fwd+bwd"):
            add(H.skipped(f"mamba2-jax {mode}", why, impl="mamba2-jax", mode=mode, **shape))
    else:
        err = rel_err(jax.jit(lambda *a: pf(*a))(*ja), y_xla)  # a fresh function: no cache hit later
        fwd.append(spec("mamba2-jax ssd_forward fwd", pf, "mamba2-jax", "fwd", rel_err_vs_xla=err))
        bwd.append(spec("mamba2-jax ssd_forward fwd+bwd", H.fwd_bwd(pf), "mamba2-jax", "fwd+bwd"))

    done = [r for r in rows if r["impl"] == "reference" and "median_s" in r]
    lp = max((r["l"] for r in done), default=None)  # extrapolate linearly from the longest measured length
    est = lp and sum(r["median_s"] for r in done if r["l"] == lp) * l / lp
    runs = 2 * reps + 1  # warm-up, then each timed run after an untimed one (harness round-robin)
    if l > 2048 and est and est * runs > REF_LIMIT_S:
        mem = max(r["temp_bytes"] for r in done if r["l"] == lp) * l / lp
        why = (f"skipped: extrapolated from l={lp}, one fwd + one fwd+bwd would take ~{est:.0f} s, "
               f"x{runs} runs > {REF_LIMIT_S:.0f} s; fwd+bwd would need ~{H.fmt_bytes(mem)} temporary")
        notes.append(f"l={l}: reference {why}")
        for mode in ("fwd", "fwd+bwd"):
            add(H.skipped(f"reference {mode}", why, impl="reference", mode=mode, **shape))
    else:
        err = rel_err(y_xla, jax.jit(ours("reference", Q))(*ja))
        fwd.append(spec("reference fwd", ours("reference", Q), "reference", "fwd", rel_err_vs_xla=err))
        bwd.append(spec("reference fwd+bwd", H.fwd_bwd(ours("reference", Q)), "reference", "fwd+bwd"))

    for key, fn in ({} if args.skip_torch else torch_refs(inp, Q)).items():
        if key == "combined_ref" and l > args.combined_max_l:
            why = (f"skipped above l={args.combined_max_l}: peak RSS ~6.2 GiB at l=2048 (measured), linear in l, "
                   f"so ~{6.2 * l / 2048:.0f} GiB here; at l=8192 it was OOM-killed on the 23 GiB machine")
            notes.append(f"l={l}: torch {key} {why}")
            add(H.skipped(f"torch {key} fwd", why, impl=f"torch {key}", mode="fwd", **shape))
            continue
        err = rel_err(fn().numpy(), y_xla)
        fwd.append(H.spec(f"torch {key} fwd", fn, jit=False, torch_no_grad=True, impl=f"torch {key}", mode="fwd",
                          rel_err_vs_xla=err, **shape))
    for group in (fwd, bwd):  # round-robin inside a group: ratios measured under the same background load
        for row in H.bench_group(group, n=reps, warmup=1):
            add(row)


def report(rows, meta=None):
    cols = [("l", "l", None), ("what", "name", None), ("median", "median_s", H.fmt_s), ("min", "min_s", H.fmt_s),
            ("max", "max_s", H.fmt_s), ("compile", "compile_s", H.fmt_s), ("temp memory", "temp_bytes", H.fmt_bytes),
            ("xla speedup", "xla_speedup", H.fmt_x), ("temp / xla's", "temp_vs_xla", H.fmt_x),
            ("rel. err vs xla", "rel_err_vs_xla", lambda v: f"{v:.1e}"),
            ("note", lambda r: r.get("skipped") and "skipped (see notes)", None)]
    notes = "".join(f"\n- {note}" for note in (meta or {}).get("notes", []))
    rows = sorted(rows, key=lambda r: (r["l"], r.get("mode") != "fwd"))
    return H.Table(cols).render(rows) + ("\n\nNotes:" + notes if notes else "")


def main():
    p = H.parser(__doc__.splitlines()[0], "ssd.json")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--combined-max-l", type=int, default=2048, help="longest l for ssd_chunk_scan_combined_ref")
    args = p.parse_args()
    meta = H.meta(args)
    lengths = [128, 256] if args.quick else args.lengths
    rows, notes = [], []
    for l in lengths:
        run_length(l, args, rows, notes)

    for r in rows:
        base = next((x for x in rows if x["l"] == r["l"] and x["impl"] == "xla" and x["mode"] == r["mode"]), None)
        if base and "median_s" in r:
            r["xla_speedup"] = r["median_s"] / base["median_s"]
            if r.get("temp_bytes") and base.get("temp_bytes"):
                r["temp_vs_xla"] = r["temp_bytes"] / base["temp_bytes"]

    print()
    print(report(rows, dict(notes=notes)))
    H.write_json(args.out, rows, dict(meta, notes=notes))


if __name__ == "__main__":
    main()
