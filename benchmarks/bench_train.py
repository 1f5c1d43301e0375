"""Training on CPU: the trainer's jitted step vs a PyTorch loop over the transformers models; 1 vs 8 devices; checkpoints.

Models (float32; random weights built by transformers with a fixed seed, written with `save_pretrained` and read into
seqmix_jax with `from_pretrained`, as bench_generate.py): MambaForCausalLM (d_model 256, 4 layers, state 16, expand 2,
vocab 1024, tied head) and LlamaForCausalLM (hidden 256, 4 layers, 4 heads x 64, SwiGLU 688, vocab 1024, untied head).
Batches: random tokens (b, l + 1) -> inputs (b, l), next-token targets (b, l), weights all ones, segment ids all ones
(unpacked rows: the trainer then passes no segment_ids to the model). The same batch every step. batch 8 x seq 512
(--quick: 4 x 128).

1. Tokens/s = b * l / median step time.
   ours      `seqmix_jax.train.loop.make_train_step`, the function `train()` runs: jit with explicit in/out
             shardings on a 1-device mesh (this process pins XLA to one CPU device), donated state {params, rest,
             opt_state, step, rng} placed as `_build_state` does for `checkpoint.init_from`, the optax transformation
             of `seqmix_jax.train.optimizer.make_optimizer` (global-norm clip 1.0, AdamW b1 0.9, b2 0.95, eps 1e-8,
             weight decay 0.1 under the trainer's decay mask; warmup 0 and min_lr_ratio 1: a constant lr 1e-3), the
             token-weighted cross-entropy, the accuracy metric and the non-finite guard. Each call is the real
             per-step call (Python dispatch included) on a batch already placed with `shard_batch`; the cost of
             `shard_batch` itself is reported apart. `compile` = lower + compile of that jitted step.
   ours bare a diagnostic, not a contestant: value_and_grad of the mean CE + tx.update + apply_updates, jitted with
             the same shardings and donation, without the trainer's metrics and non-finite guard. ours / bare shows
             what those cost.
   torch     transformers model in train mode, torch threads = CPU count: logits = model(inputs).logits, explicit
             mean cross-entropy over all b * l positions, loss.backward(), clip_grad_norm_(1.0),
             torch.optim.AdamW(lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight_decay 0.1; torch's default
             implementation for CPU tensors) with the same decay mask as ours (param groups: no decay on norms,
             biases, embeddings, A_log, D), opt.step(), opt.zero_grad(). Its Mamba runs the pure-torch path
             (no CUDA kernels on CPU).
   The three are timed round-robin (harness.bench_group), so their ratios are measured under the same load. Before
   timing, the first two steps' losses of ours and torch are compared: the same weights and batch give the same
   step-1 loss, and the same optimizer gives (nearly) the same step-2 loss. Target (issue 5): ours >= 2x torch.
2. Step time of the tiny Llama on 1 vs 8 fake CPU devices (mesh data=2, fsdp=2, tensor=2), each in a subprocess
   with XLA_FLAGS=--xla_force_host_platform_device_count=N, same shapes as 1 (random init from the config: the
   cost does not depend on the values). Reported, not a target: 8 fake devices share the same cores.
3. `seqmix_jax.train.checkpoint.Checkpointer` (async, orbax) on the tiny Llama's train state after part 1 (params,
   Adam moments, step, rng): `save` = the blocking part of `Checkpointer.save` (integrity checksums + copy off the
   device), `commit` = from the start of `save` until `wait()` returns (written and committed), `restore` =
   `Checkpointer.restore(abstract_state)` (reads, places, verifies checksums). One untimed warm-up save + restore,
   then n repeats (a new step each) in a temporary directory; medians.
4. The machine's float32 matmul rate, jit'd jnp.matmul and torch.matmul round-robin, on the Llama step's weight-matmul
   shapes and a 2048^3 one; with the step's analytic FLOP count (and XLA's cost analysis of our compiled step) this
   gives the fastest any implementation could run the step here, hence the largest ratio over torch possible.

    python benchmarks/bench_train.py [--quick] [-n 5] [--shape BxL] [--torch-threads N] [--out benchmarks/results/train.json]

The default 8 x 512 did not finish in 21 min on the quiet 2-core VM (the pure-torch Mamba step, a Python loop over
the sequence forward and backward, dominates); `--shape 4x256 -n 3` is what BENCHMARKS.md records.
--quick (4 x 128, one run): ~3-6 min. Torch's OpenMP threads degrade badly when the cores are busy (on the
shared VM at load ~7, torch Llama at 4 x 128 took 6.3 s/step with 2 threads, 0.25 s with 1): measure on a quiet
machine, and compare --torch-threads 1 if torch's numbers look off.
"""

from __future__ import annotations

import os
import re
import sys


def _pin_devices() -> None:
    """Exactly N CPU devices for this process (N = --worker-devices, default 1). Must run before JAX starts."""
    n = "1"
    if "--worker-devices" in sys.argv:
        n = sys.argv[sys.argv.index("--worker-devices") + 1]
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
    _pin_devices()

import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from seqmix_jax.models import LM, from_pretrained, llama_preset  # noqa: E402
from seqmix_jax.train import sharding as sh  # noqa: E402
from seqmix_jax.train.checkpoint import Checkpointer  # noqa: E402
from seqmix_jax.train.data import token_accuracy  # noqa: E402
from seqmix_jax.train.loop import make_train_step  # noqa: E402
from seqmix_jax.train.optimizer import make_optimizer  # noqa: E402

TARGET = 2.0
VOCAB, D_MODEL, LAYERS = 1024, 256, 4
LR, BETAS, EPS, WD, CLIP = 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
MESH_8 = {"data": 2, "fsdp": 2, "tensor": 2}
RESULT_TAG = "BENCH_TRAIN_RESULT "


# --- shared pieces --------------------------------------------------------------------------------------------------

def make_tx():
    return make_optimizer(lr=LR, warmup_steps=0, total_steps=10**6, min_lr_ratio=1.0, b1=BETAS[0], b2=BETAS[1],
                          eps=EPS, weight_decay=WD, clip_norm=CLIP)


def make_batch(b, l, seed=0):
    ids = np.random.default_rng(seed).integers(0, VOCAB, (b, l + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1].copy(), "targets": ids[:, 1:].copy(), "weights": np.ones((b, l), np.float32),
            "segment_ids": np.ones((b, l), np.int32)}


def llama_config():
    return llama_preset(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=688, num_hidden_layers=LAYERS,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                        tie_word_embeddings=False)


def state_of(model, tx, seed=0):
    """The trainer's state layout (loop._build_state)."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {"params": params, "rest": rest, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed))}


def trainer_step(graphdef, tx, mesh, shardings):
    return make_train_step(graphdef, tx, accum=1, use_segments=False, acc_fn=token_accuracy, mesh=mesh,
                           in_shardings=shardings, out_shardings=shardings, batch_sharding=sh.batch_sharding(mesh))


def bare_step(graphdef, tx, mesh, shardings):
    """Loss, gradient, optimizer update; nothing else (a diagnostic for the trainer step's own overhead)."""
    from seqmix_jax import parallel

    def step(params, rest, opt_state, batch):
        with parallel.use_rules(mesh):
            def f(p):
                logits = nnx.merge(graphdef, p, rest)(batch["inputs"])[..., :VOCAB]
                return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]))
            loss, grads = jax.value_and_grad(f)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

    s = (shardings["params"], shardings["rest"], shardings["opt_state"])
    return jax.jit(step, in_shardings=(*s, sh.batch_sharding(mesh)), out_shardings=(s[0], s[2], None),
                   donate_argnums=(0, 2))


def _timed(fn):
    t0 = time.perf_counter()
    out = H._block(fn())
    return out, time.perf_counter() - t0


# --- 1. tokens/s vs torch ---------------------------------------------------------------------------------------------

def torch_decays(name: str) -> bool:
    """The trainer's decay mask (seqmix_jax.train.optimizer.decays) in transformers' parameter names."""
    leaf = name.split(".")[-1]
    if leaf == "bias" or leaf in ("A_log", "D") or "norm" in name or "embed" in name:
        return False
    return True


def torch_loop(model, batch):
    import torch
    import torch.nn.functional as F

    model.train()
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if torch_decays(n)], "weight_decay": WD},
              {"params": [p for n, p in named if not torch_decays(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    inputs = torch.tensor(batch["inputs"], dtype=torch.long)
    targets = torch.tensor(batch["targets"], dtype=torch.long)

    def step():
        logits = model(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, sum(p.numel() for _, p in named)


def measure_vs_torch(kind, b, l, n, tmp):
    from benchmarks.bench_generate import build_torch

    ref = build_torch(kind)
    ref.save_pretrained(Path(tmp) / kind)
    model = from_pretrained(Path(tmp) / kind)
    batch = make_batch(b, l)
    mesh = sh.make_mesh({})
    tx = make_tx()

    graphdef = nnx.split(model, nnx.Param, ...)[0]
    host_state = state_of(model, tx)
    shardings = sh.param_shardings(host_state, mesh)
    # Two independent copies (both are donated; device_put alone may alias the model's own buffers).
    state = jax.device_put(jax.tree.map(jnp.copy, host_state), shardings)
    bare_state = jax.device_put(jax.tree.map(jnp.copy, host_state), shardings)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    gbatch = sh.shard_batch(batch, mesh, b)
    step = trainer_step(graphdef, tx, mesh, shardings)
    bare = bare_step(graphdef, tx, mesh, shardings)

    t0 = time.perf_counter()
    compiled = step.lower(state, gbatch, None).compile()
    compile_s = time.perf_counter() - t0
    xla_flops = _xla_flops(compiled)
    t0 = time.perf_counter()
    bare.lower(bare_state["params"], bare_state["rest"], bare_state["opt_state"], gbatch).compile()
    bare_compile_s = time.perf_counter() - t0

    # Steps 1 and 2 of each, untimed except for our first call (after the compile above; a large value means the
    # jitted function compiled again instead of reusing it).
    ours_losses = []
    (state, m), first_call_s = _timed(lambda: step(state, gbatch, None))
    ours_losses.append(float(m["loss"]))
    state, m = step(state, gbatch, None)
    ours_losses.append(float(m["loss"]))
    torch_step, torch_params = torch_loop(ref, batch)
    torch_losses = [torch_step(), torch_step()]

    holder = {"state": state, "bare": (bare_state["params"], bare_state["rest"], bare_state["opt_state"])}
    del state, bare_state, host_state

    def ours_call():
        holder["state"], metrics = step(holder["state"], gbatch, None)
        return holder["state"], metrics

    def bare_call():
        p, r, o = holder["bare"]
        p, o, loss = bare(p, r, o, gbatch)
        holder["bare"] = (p, r, o)
        return p, o, loss

    runs = H.bench_group([H.spec("ours", ours_call, jit=False), H.spec("ours bare", bare_call, jit=False),
                          H.spec("torch", torch_step, jit=False)], n=n, warmup=1)
    shard = H.bench("shard_batch", lambda: sh.shard_batch(batch, mesh, b), jit=False, n=max(n, 5))
    t = {r["name"]: r["median_s"] for r in runs}
    row = {"kind": "throughput", "name": f"{kind} b={b} l={l}", "model": kind, "batch": b, "seq": l,
           "tokens_per_step": b * l, "n_params": n_params, "torch_n_params": torch_params,
           "ours_compile_s": compile_s, "ours_first_call_s": first_call_s, "bare_compile_s": bare_compile_s,
           "ours_step_s": t["ours"], "bare_step_s": t["ours bare"], "torch_step_s": t["torch"],
           "shard_batch_s": shard["median_s"], "xla_flops_per_step": xla_flops,
           "ours_tok_s": b * l / t["ours"], "bare_tok_s": b * l / t["ours bare"], "torch_tok_s": b * l / t["torch"],
           "ours_losses": ours_losses, "torch_losses": torch_losses,
           "loss1_rel_err": abs(ours_losses[0] - torch_losses[0]) / abs(torch_losses[0]),
           "loss2_rel_err": abs(ours_losses[1] - torch_losses[1]) / abs(torch_losses[1]),
           "runs": runs}
    row["ratio"] = row["ours_tok_s"] / row["torch_tok_s"]
    row["overhead"] = t["ours"] / t["ours bare"]
    row["meets_target"] = row["ratio"] >= TARGET
    print(f"  {kind:<5} b={b} l={l}: ours {row['ours_tok_s']:8.0f} tok/s ({H.fmt_s(t['ours'])}/step), torch "
          f"{row['torch_tok_s']:8.0f} tok/s ({H.fmt_s(t['torch'])}/step) = {row['ratio']:.2f}x; bare step "
          f"{H.fmt_s(t['ours bare'])} (trainer/bare {row['overhead']:.2f}x); compile {H.fmt_s(compile_s)}, "
          f"first call {H.fmt_s(first_call_s)}; losses ours {ours_losses} torch {torch_losses}", flush=True)
    return row, (holder["state"], mesh)


def _xla_flops(compiled):
    """XLA's own count of the floating-point operations of one compiled step (None where not reported)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- a diagnostic: some backends / versions do not implement it
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


# --- 4. the machine's matmul rate: how fast any step of a given FLOP count can be ----------------------------------

def llama_flops(b, l):
    """Analytic float32 FLOPs of one Llama training step (forward + backward = 3x forward): 2 per multiply-add of
    every weight matmul on every token, plus the two (l x l) attention matmuls per layer and head dimension,
    counted in full (no causal skipping) -- elementwise work (norms, RoPE, softmax, AdamW) is left out."""
    f = 688
    per_token = LAYERS * (4 * D_MODEL * D_MODEL + 3 * D_MODEL * f) + D_MODEL * VOCAB
    fwd = 2 * per_token * b * l + LAYERS * 2 * 2 * b * l * l * D_MODEL
    return 3 * fwd


def measure_matmul_rate(b, l, n):
    """GFLOP/s of jnp.matmul (jit) and torch.matmul on this machine for the step's weight-matmul shapes and a
    large square one, timed round-robin. The best of them bounds how fast any implementation can run a step."""
    import torch

    f, t = 688, b * l
    shapes = [(t, D_MODEL, f), (t, f, D_MODEL), (t, D_MODEL, D_MODEL), (t, D_MODEL, VOCAB), (2048, 2048, 2048)]
    rows = []
    for m, k, nn in shapes:
        rng = np.random.default_rng(0)
        a, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, nn), np.float32)
        ja, jw = jnp.asarray(a), jnp.asarray(w)
        ta, tw = torch.from_numpy(a), torch.from_numpy(w)
        mm = jax.jit(jnp.matmul)
        runs = H.bench_group([H.spec("jax", lambda: mm(ja, jw), jit=False),
                              H.spec("torch", lambda: torch.matmul(ta, tw), jit=False)], n=max(n, 5), warmup=2)
        flops = 2 * m * k * nn
        rows.append({"shape": f"{m}x{k} @ {k}x{nn}", "flops": flops,
                     **{f"{r['name']}_gflops": flops / r["median_s"] / 1e9 for r in runs}})
    best = max(max(r["jax_gflops"], r["torch_gflops"]) for r in rows)
    print("  matmul GFLOP/s: " + "; ".join(f"{r['shape']} jax {r['jax_gflops']:.0f} torch {r['torch_gflops']:.0f}"
                                           for r in rows), flush=True)
    return {"kind": "floor", "name": "matmul rate", "matmuls": rows, "best_gflops": best,
            "llama_flops_per_step": llama_flops(b, l), "batch": b, "seq": l}


# --- 2. 1 vs 8 devices (subprocess workers) ------------------------------------------------------------------------------

def worker(n_devices, b, l, n):
    """Runs in a subprocess pinned to n_devices CPU devices; prints one tagged JSON line."""
    assert jax.device_count() == n_devices, (jax.device_count(), n_devices)
    mesh_sizes = {} if n_devices == 1 else MESH_8
    mesh = sh.make_mesh(mesh_sizes)
    tx = make_tx()
    config = llama_config()
    make_model = lambda: LM(config, rngs=nnx.Rngs(0))
    graphdef = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)[0]
    shardings = sh.param_shardings(jax.eval_shape(lambda: state_of(make_model(), tx)), mesh)
    state = jax.jit(lambda: state_of(make_model(), tx), out_shardings=shardings)()
    batch = make_batch(b, l)
    gbatch = sh.shard_batch(batch, mesh, b)
    step = trainer_step(graphdef, tx, mesh, shardings)
    t0 = time.perf_counter()
    compiled = step.lower(state, gbatch, None).compile()
    compile_s = time.perf_counter() - t0
    xla_flops = _xla_flops(compiled)
    losses = []
    for _ in range(2):
        state, m = step(state, gbatch, None)
        losses.append(float(m["loss"]))
    holder = {"state": state}

    def call():
        holder["state"], metrics = step(holder["state"], gbatch, None)
        return holder["state"], metrics

    row = H.bench(f"{n_devices} device(s)", call, jit=False, n=n, warmup=1)
    row.update(kind="devices", devices=n_devices, mesh=dict(mesh.shape), batch=b, seq=l, compile_s=compile_s,
               tok_s=b * l / row["median_s"], losses=losses)
    print(RESULT_TAG + json.dumps(row), flush=True)


def measure_devices(b, l, n, quick):
    rows = []
    for n_dev in (1, 8):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-devices", str(n_dev), "-n", str(n)]
        cmd += ["--quick"] if quick else []
        cmd += ["--shape", f"{b}x{l}"]
        env = dict(os.environ)
        flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n_dev}".strip()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
        if proc.returncode or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            print(f"  {n_dev} device(s): worker failed (exit {proc.returncode}): {' | '.join(tail)}", flush=True)
            rows.append(H.skipped(f"{n_dev} device(s)", f"worker exit {proc.returncode}: {' | '.join(tail)[-500:]}",
                                  kind="devices", devices=n_dev))
            continue
        row = json.loads(found[-1][len(RESULT_TAG):])
        row["process_wall_s"] = wall
        rows.append(row)
        print(f"  llama {n_dev} device(s) mesh {row['mesh']}: step {H.fmt_s(row['median_s'])} "
              f"({row['tok_s']:.0f} tok/s), compile {H.fmt_s(row['compile_s'])}, losses {row['losses']}", flush=True)
    ok = [r for r in rows if "skipped" not in r]
    if len(ok) == 2:
        base = ok[0]
        for r in ok:
            r["vs_1_device"] = r["median_s"] / base["median_s"]
            r["loss_rel_err_vs_1"] = max(abs(a - c) / abs(c) for a, c in zip(r["losses"], base["losses"]))
    return rows


# --- 3. checkpoints ----------------------------------------------------------------------------------------------------

def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure_checkpoint(state, mesh, reps):
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    target = sh.abstract_state(state, mesh)
    config = {"model": {"name": "llama-tiny", "d_model": D_MODEL, "layers": LAYERS, "vocab": VOCAB}}
    saves, commits, restores = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(Path(tmp) / "ckpt", keep=None, async_save=True)
        try:
            for i in range(reps + 1):  # i = 0: warm-up (orbax set-up, the checksum jit), not reported
                step = i + 1
                t0 = time.perf_counter()
                ckpt.save(step, state=state, data_state={"next_index": step}, config=config, force=True)
                t_save = time.perf_counter() - t0
                ckpt.wait()
                t_commit = time.perf_counter() - t0
                restored, t_restore = _timed(lambda: ckpt.restore(target, step=step).state)
                if i == 0:
                    ok = all(bool(jnp.array_equal(a, c)) for a, c in
                             zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
                    warm = (t_save, t_commit, t_restore)
                    continue
                saves.append(t_save)
                commits.append(t_commit)
                restores.append(t_restore)
            disk = _dir_bytes(Path(tmp) / "ckpt" / "1")
        finally:
            ckpt.close()
    stat = lambda ts: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "times_s": ts}
    row = {"kind": "checkpoint", "name": "llama train state", "state_bytes": state_bytes, "disk_bytes": disk,
           "n_leaves": len(jax.tree.leaves(state)), "repeats": reps, "restored_equal": ok,
           "warmup_save_s": warm[0], "warmup_commit_s": warm[1], "warmup_restore_s": warm[2],
           "save": stat(saves), "commit": stat(commits), "restore": stat(restores)}
    print(f"  checkpoint {H.fmt_bytes(state_bytes)} ({H.fmt_bytes(disk)} on disk): save (blocking) "
          f"{H.fmt_s(row['save']['median_s'])}, save to commit {H.fmt_s(row['commit']['median_s'])}, restore "
          f"{H.fmt_s(row['restore']['median_s'])}; restored equal: {ok}", flush=True)
    return row


# --- main -------------------------------------------------------------------------------------------------------------

def shapes(quick):
    return (4, 128) if quick else (8, 512)


def main():
    p = H.parser(__doc__.splitlines()[0], "train.json")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads for the PyTorch loop (default: the CPU count)")
    p.add_argument("--worker-devices", type=int, default=None, help="internal: run part 2 on this many devices")
    p.add_argument("--shape", default=None, help="batch x seq, e.g. 8x256 (overrides the default 8x512 / quick 4x128)")
    args = p.parse_args()
    b, l = shapes(args.quick)
    n = 1 if args.quick else args.n
    if args.shape:
        b, l = (int(v) for v in args.shape.lower().split("x"))
    if args.worker_devices is not None:
        worker(args.worker_devices, b, l, n)
        return
    import torch

    torch.set_num_threads(args.torch_threads)
    meta = H.meta(args, torch_threads=torch.get_num_threads(), target_ratio=TARGET, runs=n, batch=b, seq=l,
                  optimizer={"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WD, "clip_norm": CLIP},
                  xla_flags=os.environ.get("XLA_FLAGS"),
                  source_models=H.source_state(("seqmix_jax/models", "seqmix_jax/layers", "seqmix_jax/ops",
                                                "seqmix_jax/train")))
    assert jax.device_count() == 1, jax.devices()
    rows = []
    print(f"1. training tokens/s, batch {b} x seq {l}, {n} timed run(s), torch threads {torch.get_num_threads()}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("mamba", "llama"):
            row, (state, mesh) = measure_vs_torch(kind, b, l, n, tmp)
            rows.append(row)
    print("4. the machine's matmul rate (jax and torch)", flush=True)
    rows.append(measure_matmul_rate(b, l, n))
    print("3. checkpoint save / restore (Llama train state)", flush=True)
    rows.append(measure_checkpoint(state, mesh, n))
    del state
    print("2. Llama step time on 1 vs 8 fake CPU devices (subprocesses)", flush=True)
    rows += measure_devices(b, l, n, args.quick)
    print(report(rows, meta))
    H.write_json(args.out, rows, meta)


def _tok(v):
    return "-" if v is None else f"{v:,.0f}"


def report(rows, meta=None):
    thr = [r for r in rows if r.get("kind") == "throughput"]
    dev = [r for r in rows if r.get("kind") == "devices"]
    ckpt = [r for r in rows if r.get("kind") == "checkpoint"]
    floor = [r for r in rows if r.get("kind") == "floor"]
    out = []
    if thr:
        cols = [("model", "model", None), ("batch x seq", lambda r: f"{r['batch']} x {r['seq']}", None),
                ("ours tok/s", "ours_tok_s", _tok), ("torch tok/s", "torch_tok_s", _tok), ("ratio", "ratio", H.fmt_x),
                ("ours step", "ours_step_s", H.fmt_s), ("torch step", "torch_step_s", H.fmt_s),
                ("ours bare step", "bare_step_s", H.fmt_s), ("ours / bare", "overhead", H.fmt_x),
                ("ours compile", "ours_compile_s", H.fmt_s),
                ("loss step 1 / 2 rel. err", lambda r: f"{r['loss1_rel_err']:.1e} / {r['loss2_rel_err']:.1e}", None)]
        out.append(H.Table(cols).render(thr))
        if meta is not None:
            out.append(f"Training tokens/s = batch x seq / step time (median of {meta.get('runs', '?')} timed runs, "
                       f"round-robin); target >= {meta.get('target_ratio', TARGET):g}x the PyTorch loop (torch "
                       f"threads {meta.get('torch_threads', '?')}). `ours` is the trainer's jitted step on one CPU "
                       "device; `ours bare` the same model, loss and optimizer without the trainer's metrics and "
                       "non-finite guard (diagnostic). shard_batch per step: "
                       + ", ".join(f"{r['model']} {H.fmt_s(r['shard_batch_s'])}" for r in thr) + ".")
    if floor:
        fl = floor[0]
        cols = [("matmul", "shape", None), ("jax GFLOP/s", "jax_gflops", lambda v: f"{v:.0f}"),
                ("torch GFLOP/s", "torch_gflops", lambda v: f"{v:.0f}")]
        text = ("The machine's float32 matmul rate (jit'd jnp.matmul vs torch.matmul, round-robin medians): the "
                "weight-matmul shapes of the Llama step and a large square one.\n\n" + H.Table(cols).render(fl["matmuls"]))
        llama = [r for r in thr if r["model"] == "llama" and r["batch"] == fl["batch"] and r["seq"] == fl["seq"]]
        if llama:
            r = llama[0]
            floor_s = fl["llama_flops_per_step"] / (fl["best_gflops"] * 1e9)
            xla = (f" (XLA's cost analysis of our compiled step: {r['xla_flops_per_step'] / 1e9:.1f} GFLOP)"
                   if r.get("xla_flops_per_step") else "")
            text += (f"\n\nOne Llama training step at {r['batch']} x {r['seq']} is "
                     f"{fl['llama_flops_per_step'] / 1e9:.1f} GFLOP of matmuls (forward + backward, analytic){xla}. "
                     f"At the best matmul rate measured above ({fl['best_gflops']:.0f} GFLOP/s) that is at least "
                     f"{H.fmt_s(floor_s)} per step, so no implementation on this machine can beat torch's "
                     f"{H.fmt_s(r['torch_step_s'])} by more than {r['torch_step_s'] / floor_s:.2f}x "
                     f"(ours: {H.fmt_s(r['ours_step_s'])}, {r['ratio']:.2f}x).")
        out.append(text)
    if dev:
        cols = [("devices", "devices", None),
                ("mesh", lambda r: " ".join(f"{k}={v}" for k, v in (r.get("mesh") or {}).items() if v > 1) or "-",
                 None),
                ("batch x seq", lambda r: f"{r['batch']} x {r['seq']}" if "batch" in r else None, None),
                ("median step", "median_s", H.fmt_s), ("min", "min_s", H.fmt_s), ("max", "max_s", H.fmt_s),
                ("tok/s", "tok_s", _tok), ("vs 1 device", "vs_1_device", H.fmt_x), ("compile", "compile_s", H.fmt_s),
                ("loss rel. err vs 1", "loss_rel_err_vs_1", lambda v: f"{v:.1e}"), ("note", "skipped", None)]
        out.append("Tiny Llama, the trainer's step, 1 vs 8 fake CPU devices (one subprocess each; reported, not a "
                   "target: the fake devices share the machine's cores).\n\n" + H.Table(cols).render(dev))
    if ckpt:
        rowsc = [dict(what=w, **r[k], size=r["state_bytes"], disk=r["disk_bytes"])
                 for r in ckpt for w, k in (("save (blocking part)", "save"), ("save to commit", "commit"),
                                            ("restore", "restore"))]
        cols = [("what", "what", None), ("median", "median_s", H.fmt_s), ("min", "min_s", H.fmt_s),
                ("max", "max_s", H.fmt_s), ("state", "size", H.fmt_bytes), ("on disk", "disk", H.fmt_bytes)]
        r0 = ckpt[0]
        out.append(f"Checkpointer (async orbax) on the tiny Llama train state ({r0['n_leaves']} arrays: params, Adam "
                   f"moments, step, rng), {r0['repeats']} repeats after a warm-up (warm-up: save "
                   f"{H.fmt_s(r0['warmup_save_s'])}, commit {H.fmt_s(r0['warmup_commit_s'])}, restore "
                   f"{H.fmt_s(r0['warmup_restore_s'])}); restored state equal: {r0['restored_equal']}.\n\n"
                   + H.Table(cols).render(rowsc))
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
