"""Where the ssd `xla` time goes (l=2048, 24 heads x 64, n=128): chunk sizes, and two process-local variants
made by monkeypatching seqmix_jax internals in this process only (no file is changed): the cumsum-difference
segsum that mamba2-jax uses instead of our masked cumsum, and no `jax.checkpoint` on the chunk body.
The variants touch private names (`ssd._segsum`, `jax.checkpoint` as seen from ssd.py): a diagnosis, not a test.

    python benchmarks/probe_ssd.py [--quick] [--out benchmarks/results/probe_ssd.json]
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from benchmarks.bench_ssd import ORDER, make_inputs, ours, peer  # noqa: E402

M = importlib.import_module("seqmix_jax.ops.ssd")


def segsum_diff(a):  # cumsum[q] - cumsum[s]: cheaper, less accurate (mamba2-jax, ssd_minimal "unstable")
    Q = a.shape[-1]
    c = jnp.cumsum(a, -1)
    return jnp.where(jnp.tril(jnp.ones((Q, Q), bool)), c[..., :, None] - c[..., None, :], -jnp.inf)


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def main():
    args = H.parser(__doc__.splitlines()[0], "probe_ssd.json").parse_args()
    meta = H.meta(args)
    l, h, p, n = (256, 4, 16, 32) if args.quick else (2048, 24, 64, 128)
    big = 64 if args.quick else 256
    ja = [jnp.asarray(v) for v in map(make_inputs(2, l, h, p, 1, n).get, ORDER)]
    none = contextlib.nullcontext
    variants = [(f"xla Q={Q}", ours("xla", Q), none) for Q in (big, big // 2, big // 4)] + [
        (f"xla Q={big} segsum=cumsum-diff", ours("xla", big), lambda: patched(M, "_segsum", segsum_diff)),
        (f"xla Q={big} no checkpoint", ours("xla", big), lambda: patched(M.jax, "checkpoint", lambda f, **k: f)),
        (f"mamba2-jax Q={big}", peer(big)[0], none)]
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        specs = []
        for name, f, ctx in variants:
            g = f if mode == "fwd" else H.fwd_bwd(f)
            with ctx():  # trace and compile under the patch; the compiled executable keeps it
                compiled = jax.jit(g).lower(*ja).compile()
            specs.append(H.spec(f"{name} {mode}", compiled, *ja, jit=False, temp_bytes=H.temp_bytes(compiled),
                                mode=mode, l=l))
        rows += H.bench_group(specs, n=1 if args.quick else args.n)
    print(report(rows))
    H.write_json(args.out, rows, meta)


def report(rows, meta=None):
    cols = [("what", "name", None), ("median", "median_s", H.fmt_s), ("min", "min_s", H.fmt_s),
            ("max", "max_s", H.fmt_s), ("temp memory", "temp_bytes", H.fmt_bytes)]
    return H.Table(cols).render(rows)


if __name__ == "__main__":
    main()
