"""Mixture of experts on CPU: tokens/s of the three dispatch paths, drop fraction vs capacity factor, buffer memory.

    python benchmarks/bench_moe.py [--quick] [-n 3] [--tokens 4096] [--out benchmarks/results/moe.json]

1. Tokens/s of `seqmix_jax.ops.moe_ffn` (route + experts, jitted; float32) for dispatch "reference" (every expert on
   every token), "capacity" (capacity_factor 1.25) and "dropless" (sort, grouped matmul, unsort: on CPU its
   "blocked" grouped matmul; "dropless ragged_dot" is the same path forced onto `jax.lax.ragged_dot`, which XLA:CPU
   runs as a masked dense matmul per expert, GPU/TPU as a real grouped matmul), e in {8, 64},
   k in {1, 2}, t tokens of width d = 256, expert hidden f = 512, random router (near-uniform load); forward and
   forward + backward (gradient of sum(y) w.r.t. x, router and expert weights). In the same round-robin group:
   transformers' `MixtralSparseMoeBlock` (eager loop over the experts hit, torch threads = CPU count) with the
   same e, k, d, f, forward (no_grad) and forward + backward. Reported with the drop fraction of the capacity path.
2. Drop fraction of the capacity path vs capacity factor, t tokens, e = 8, k = 2, for a uniform router and a
   skewed one (router logits get a bias log(z_i) with z_i ~ 1 / (i + 1), a Zipf-like expert popularity: the most
   popular expert is chosen by ~60% of the tokens), and the fraction of experts overflowing.
3. Memory: XLA's temporary buffers of the compiled forward + backward (harness.memory, compile only) for each path
   vs the number of tokens, e = 64, k = 2; beside it the size of the dispatch buffers by formula: capacity
   (e, c, d) with c = ceil(t k / e * 1.25), dropless (t k, d) sorted copies, reference (e, t, 2f) hidden states
   (dropless ragged_dot on CPU: its dense fallback holds (e, t k, d) masked copies).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from seqmix_jax.ops.moe import dropless_ffn, expert_capacity, moe_ffn, route  # noqa: E402

D, F = 256, 512
PATHS = ("reference", "capacity", "dropless", "dropless ragged_dot")
CF = 1.25


def weights(e, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((D, e)).astype(np.float32) * D ** -0.5,
            rng.standard_normal((e, D, 2 * F)).astype(np.float32) * D ** -0.5,
            rng.standard_normal((e, F, D)).astype(np.float32) * F ** -0.5)


def ours(dispatch, k, cf=CF):
    def f(x, wr, wi, wo):
        routing = route(x, wr, top_k=k)
        if dispatch == "dropless ragged_dot":
            valid = jnp.ones(routing.experts.shape, bool)
            y = dropless_ffn(x, routing.weights, routing.experts, valid, wi, wo, "silu", grouped_impl="ragged_dot")
            return y.astype(x.dtype), jnp.float32(0)
        y, stats = moe_ffn(x, routing, wi, wo, dispatch=dispatch, capacity_factor=cf)
        return y, stats.drop_fraction
    return f


def ours_grad(dispatch, k):
    fwd = ours(dispatch, k)
    return jax.grad(lambda *a: jnp.sum(fwd(*a)[0]), argnums=(0, 1, 2, 3))


def torch_block(e, k, wr, wi, wo):
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=e, num_experts_per_tok=k,
                        router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(torch.from_numpy(wr.T.copy()))
        block.experts.gate_up_proj.copy_(torch.from_numpy(np.transpose(wi, (0, 2, 1)).copy()))
        block.experts.down_proj.copy_(torch.from_numpy(np.transpose(wo, (0, 2, 1)).copy()))
    return block


def measure_throughput(t, n, es, ks):
    import torch

    rows = []
    x = np.random.default_rng(1).standard_normal((t, D)).astype(np.float32)
    for e in es:
        wr, wi, wo = weights(e)
        args = tuple(jnp.asarray(a) for a in (x, wr, wi, wo))
        for k in ks:
            block = torch_block(e, k, wr, wi, wo)
            tx = torch.from_numpy(x).reshape(1, t, D)

            def torch_fwd():
                with torch.no_grad():
                    return block(tx)

            def torch_fwd_bwd():
                xx = tx.clone().requires_grad_(True)
                block.zero_grad(set_to_none=True)
                block(xx).sum().backward()
                return xx.grad

            for mode in ("fwd", "fwd+bwd"):
                specs = [H.spec(p, ours(p, k) if mode == "fwd" else ours_grad(p, k), *args, mem=False) for p in PATHS]
                specs.append(H.spec("torch Mixtral block", torch_fwd if mode == "fwd" else torch_fwd_bwd, jit=False))
                runs = H.bench_group(specs, n=n, warmup=1)
                drop = float(jax.jit(ours("capacity", k))(*args)[1])
                ref = {r["name"]: r["median_s"] for r in runs}
                for r in runs:
                    rows.append({"kind": "throughput", "e": e, "k": k, "t": t, "mode": mode, "path": r["name"],
                                 "median_s": r["median_s"], "min_s": r["min_s"], "max_s": r["max_s"],
                                 "tok_s": t / r["median_s"], "vs_torch": ref["torch Mixtral block"] / r["median_s"],
                                 "compile_s": r.get("compile_s"),
                                 "capacity_drop_fraction": drop if r["name"] == "capacity" else None})
                print(f"  e={e:<3} k={k} {mode:<8} " + "  ".join(f"{r['name']} {t / r['median_s']:9.0f} tok/s"
                                                              for r in runs), flush=True)
    return rows


def skewed_kernel(e, skew):
    """Router kernel over inputs whose last feature is 1: the last row adds a bias log(z_i), z_i ~ 1/(i+1)."""
    wr = weights(e)[0].copy()
    if skew:
        z = 1.0 / np.arange(1, e + 1)
        wr[-1] = np.log(z / z.sum()) * 3.0
    return wr


def measure_drops(t, factors=(0.5, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0), e=8, k=2):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((t, D)).astype(np.float32)
    x[:, -1] = 1.0
    _, wi, wo = weights(e)
    rows = []
    for skew in (False, True):
        wr = jnp.asarray(skewed_kernel(e, skew))
        routing = jax.jit(lambda a, w: route(a, w, top_k=k))(jnp.asarray(x), wr)
        load = np.bincount(np.asarray(routing.experts).ravel(), minlength=e) / t
        for cf in factors:
            _, stats = jax.jit(lambda a, r, i, o, cf=cf: moe_ffn(a, r, i, o, dispatch="capacity",
                                                                  capacity_factor=cf))(jnp.asarray(x), routing,
                                                                                       jnp.asarray(wi), jnp.asarray(wo))
            c = expert_capacity(t, e, k, cf)
            rows.append({"kind": "drops", "router": "skewed" if skew else "uniform", "capacity_factor": cf,
                         "capacity": c, "drop_fraction": float(stats.drop_fraction),
                         "experts_overflowing": int(np.sum(load * t > c)), "e": e, "k": k, "t": t,
                         "max_expert_share": float(load.max())})
        print(f"  {'skewed' if skew else 'uniform'} router: most popular expert chosen by {load.max():.0%} of tokens;"
              " drops " + ", ".join(f"cf {r['capacity_factor']:g}: {r['drop_fraction']:.3f}" for r in rows
                                     if r["router"] == ("skewed" if skew else "uniform")), flush=True)
    return rows


def measure_memory(tokens, e=64, k=2):
    rows = []
    wr, wi, wo = weights(e)
    for t in tokens:
        shapes = (jax.ShapeDtypeStruct((t, D), jnp.float32), jax.ShapeDtypeStruct(wr.shape, jnp.float32),
                  jax.ShapeDtypeStruct(wi.shape, jnp.float32), jax.ShapeDtypeStruct(wo.shape, jnp.float32))
        c = expert_capacity(t, e, k, CF)
        formula = {"reference": e * t * 2 * F * 4, "capacity": e * c * D * 4, "dropless": t * k * D * 4,
                   "dropless ragged_dot": e * t * k * D * 4}
        for p in PATHS:
            r = H.memory(p, ours_grad(p, k), *shapes)
            rows.append({"kind": "memory", "path": p, "t": t, "e": e, "k": k, "temp_bytes": r["temp_bytes"],
                         "buffer_bytes": formula[p], "compile_s": r["compile_s"]})
        print(f"  t={t}: " + ", ".join(f"{r['path']} {H.fmt_bytes(r['temp_bytes'])}" for r in rows if r["t"] == t),
              flush=True)
    return rows


def main():
    p = H.parser(__doc__.splitlines()[0], "moe.json")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per call (t = batch x length)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count())
    t = 512 if args.quick else args.tokens
    n = 1 if args.quick else args.n
    meta = H.meta(args, d=D, f=F, capacity_factor=CF, torch_threads=torch.get_num_threads(),
                  source_models=H.source_state(("seqmix_jax/ops",)))
    print(f"1. tokens/s, t={t}, d={D}, f={F}, {n} timed run(s)", flush=True)
    rows = measure_throughput(t, n, (8,) if args.quick else (8, 64), (1, 2))
    print("2. drop fraction vs capacity factor (capacity path)", flush=True)
    rows += measure_drops(t)
    print("3. memory of forward + backward vs tokens (e=64, k=2)", flush=True)
    rows += measure_memory((512, 2048) if args.quick else (1024, 4096, 16384))
    print(report(rows))
    H.write_json(args.out, rows, meta)


def report(rows, meta=None):
    out = []
    thr = [r for r in rows if r["kind"] == "throughput"]
    if thr:
        cols = [("e", "e", None), ("k", "k", None), ("mode", "mode", None), ("path", "path", None),
                ("tok/s", "tok_s", lambda v: f"{v:,.0f}"), ("median", "median_s", H.fmt_s),
                ("vs torch", "vs_torch", H.fmt_x),
                ("capacity drops", "capacity_drop_fraction", lambda v: "" if v is None else f"{v:.3f}")]
        out.append(H.Table(cols).render(thr))
    drops = [r for r in rows if r["kind"] == "drops"]
    if drops:
        cols = [("router", "router", None), ("capacity factor", "capacity_factor", lambda v: f"{v:g}"),
                ("slots / expert", "capacity", None), ("drop fraction", "drop_fraction", lambda v: f"{v:.3f}"),
                ("experts overflowing", "experts_overflowing", None),
                ("top expert share", "max_expert_share", lambda v: f"{v:.2f}")]
        out.append(H.Table(cols).render(drops))
    mem = [r for r in rows if r["kind"] == "memory"]
    if mem:
        cols = [("tokens", "t", None), ("path", "path", None), ("XLA temp (fwd+bwd)", "temp_bytes", H.fmt_bytes),
                ("dispatch buffers (formula)", "buffer_bytes", H.fmt_bytes)]
        out.append(H.Table(cols).render(mem))
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
