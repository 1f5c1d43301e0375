"""The training loop: one `TrainConfig` -> a trained `LM`, checkpoints, metrics and a plot in `runs/<name>/`.

    result = train(load_config("configs/tiny.yaml", ["run.steps=200"]))

What one run does, in order (nothing is written until every check has passed, so a failed start leaves any
existing run directory and checkpoint untouched):
  1. JAX's multi-host runtime (`jax.distributed.initialize`) when the run is distributed: `run.distributed: true`,
     or the config / environment names a coordinator (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
     JAX_PROCESS_ID). Every process runs this same function; only process 0 writes logs, metrics and the plot.
  2. The mesh (data, fsdp, tensor, expert; one -1 filled from the device count) and the logical-axis rules that
     shard parameters, optimizer state and activations (`seqmix_jax.parallel`, `seqmix_jax.train.sharding`).
  3. The data (grain iterators over the synthetic tasks or files); each process loads its rows of every global
     batch, `shard_batch` assembles global arrays.
  4. The train state {params, opt_state, step, rng}, built directly in its shardings; restored from the run's
     latest readable checkpoint (model, optimizer, step, RNG and the data iterator: exact resume), else
     initialized, optionally from `from_pretrained` weights (`checkpoint.init_from`).
  5. Steps: one jitted function with explicit in/out shardings and donated state. Gradient accumulation splits
     the global batch into `grad_accum_steps` micro-batches (lax.scan) and sums token-weighted losses, so the
     update equals the one for the whole batch. A non-finite loss or gradient never reaches the parameters:
     the update is skipped inside the step; policy `stop` then ends the run with an error (exit code 1 from the
     CLI; the last good checkpoint stays as it was), `skip` goes on.
  6. Periodic evaluation on the test split (loss and the task's accuracy), async checkpoints every
     `checkpoint.every_steps` and at the end, JSON-lines metrics, a tqdm bar with tokens/s and MFU, and a
     loss/accuracy PNG at the end. SIGTERM saves a checkpoint at the current step and returns cleanly.

The loss is the token-weighted cross-entropy sum(w * CE) / sum(w) over the batch's `weights`; with
`model.head_only_at_weights` the output head is computed only at the weighted positions (a static count per
batch, bucketed to powers of two so few shapes compile), which gives the same loss for a fraction of the head's
cost on tasks such as MQAR.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix_jax import parallel
from seqmix_jax.layers.moe import pop_moe_stats
from seqmix_jax.models import LM
from seqmix_jax.models.lm import MIXER_CLASSES
from seqmix_jax.train import sharding as sh
from seqmix_jax.train.checkpoint import Checkpointer, check_compatible
from seqmix_jax.train.config import TrainConfig, run_name, to_dict
from seqmix_jax.train.data import accuracy_fn, make_dataset
from seqmix_jax.train.metrics import (MetricsWriter, Progress, model_flops_per_token, peak_flops_per_device,
                                      plot_metrics)
from seqmix_jax.train.optimizer import make_optimizer, make_schedule

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


class NonFiniteLoss(RuntimeError):
    """Raised under nonfinite policy "stop" when a step produced a non-finite loss or gradient."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    step: int  # steps completed
    status: str  # "finished" | "terminated" (SIGTERM)
    train_loss: float | None
    eval: dict  # last evaluation: {"loss", "accuracy"} (empty if none ran)
    seconds: float
    resumed_from: int | None


# --- start-up ----------------------------------------------------------------------------------------------------

def init_distributed(cfg: TrainConfig) -> bool:
    """Start JAX's multi-host runtime when the run is distributed; returns whether it is. Must run before anything
    touches the devices. Config fields win over JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
    r = cfg.run
    address = r.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = r.num_processes if r.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = r.process_id if r.process_id is not None else _env_int("JAX_PROCESS_ID")
    wanted = r.distributed if r.distributed is not None else address is not None
    if not wanted:
        return False
    if _distributed_started():
        return True
    kwargs = {k: v for k, v in (("coordinator_address", address), ("num_processes", n), ("process_id", pid))
              if v is not None}
    jax.distributed.initialize(**kwargs)  # with no arguments: the cluster's own environment (SLURM, TPU pods, ...)
    return True


def _any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (the value itself in a single-process run)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} must be an integer") from None


def _distributed_started() -> bool:
    try:
        from jax._src import distributed as _d  # no public query exists in jax 0.10 / 0.11
        return _d.global_state.client is not None
    except Exception:  # pragma: no cover - private layout changed: assume not started
        return False


def _synthetic(cfg: TrainConfig) -> bool:
    return cfg.data.task not in ("text", "memmap")


def _use_segments(cfg: TrainConfig) -> bool:
    """Pass segment_ids to the model only when rows really pack several documents."""
    return cfg.data.task == "text" and cfg.data.pack


def _data(cfg: TrainConfig, split: str, mesh) -> Any:
    start, stop = sh.process_batch_rows(cfg.data.batch_size, mesh)
    n_blocks = cfg.data.batch_size // (stop - start)
    return make_dataset(**dataclasses.asdict(cfg.data), split=split, process_index=start // (stop - start),
                        process_count=n_blocks)


# --- the step functions --------------------------------------------------------------------------------------------

def _head_positions(batch: dict, seq_len: int) -> np.ndarray | None:
    """(b, n) positions covering every weighted token of each row (padding positions point at 0 with weight 0),
    n = the largest weighted count over the global batch, rounded up to a power of two >= 8; None when that is
    over half the row (then the head runs everywhere)."""
    most = int((batch["weights"] > 0).sum(axis=1).max())
    if jax.process_count() > 1:  # every process must pick the same static shape
        from jax.experimental import multihost_utils
        most = int(np.max(multihost_utils.process_allgather(np.int32(most))))
    n = max(8, 1 << (max(most, 1) - 1).bit_length())
    if n * 2 > seq_len:
        return None
    order = np.argsort(batch["weights"] <= 0, axis=1, kind="stable")[:, :n]  # weighted positions first, in order
    return order.astype(np.int32)


def _gather(x, idx):
    return x if idx is None else jnp.take_along_axis(x, idx, axis=1)


def _losses(model: LM, batch: dict, idx, use_segments: bool, acc_fn):
    """Sum of weighted CE, sum of weights, correct and counted tokens for one (micro-)batch, and the MoE layers'
    statistics {"aux", "z", "drop"} (one entry per MoE layer, in layer order; empty arrays without MoE)."""
    seg = batch["segment_ids"] if use_segments else None
    logits = model(batch["inputs"], segment_ids=seg, logits_at=idx)
    stats = pop_moe_stats(model)
    moe = {k: jnp.stack([getattr(s, field) for s in stats]) if stats else jnp.zeros((0,), jnp.float32)
           for k, field in _MOE_TERMS.items()}
    vocab = model.config.vocab_size
    logits = logits[..., :vocab]  # padded vocabulary rows are never targets
    targets, weights = _gather(batch["targets"], idx), _gather(batch["weights"], idx)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce_sum = jnp.sum(weights * (logz - picked))
    correct, count = acc_fn(logits, {"targets": targets, "weights": weights})
    return ce_sum, jnp.sum(weights), correct, count, moe


def _check_expert_parallel(model_config, mesh) -> None:
    """Expert-parallel MoE layers need their experts to split evenly over the mesh's expert axis."""
    p = mesh.shape.get("expert", 1)
    for i, b in enumerate(model_config.blocks):
        if b.moe is not None and b.moe.get("expert_parallel") and p > 1 and b.moe["num_experts"] % p:
            raise ValueError(f"layer {i}: model.moe.num_experts={b.moe['num_experts']} must be divisible by the "
                             f"expert-parallel size mesh.expert={p} (model.moe.expert_parallel="
                             f"{b.moe['expert_parallel']!r})")


def _moe_layers(model_config) -> list[int]:
    """Indices of the blocks whose channel mixer is a mixture of experts."""
    return [i for i, b in enumerate(model_config.blocks) if b.moe is not None]


_MOE_TERMS = {"aux": "load_balance_loss", "z": "z_loss", "drop": "drop_fraction"}  # metric key -> MoEStats field


def _mean_or_zero(x):
    return jnp.mean(x) if x.shape[0] else jnp.float32(0)


def make_train_step(graphdef, tx, *, accum: int, use_segments: bool, acc_fn, mesh, in_shardings, out_shardings,
                    batch_sharding, n_moe: int = 0, moe_aux_weight: float = 0.0, moe_z_weight: float = 0.0):
    """jit(state, batch, idx) -> (state, metrics) with explicit shardings; state is donated.

    The objective is the token-weighted mean CE plus, with MoE layers, moe_aux_weight * (their mean
    load-balancing loss) + moe_z_weight * (their mean router z-loss); a micro-batch's MoE terms count in
    proportion to its weighted tokens, as its CE does. `loss` in the metrics is the CE alone. `n_moe`: the
    model's number of MoE layers."""

    def loss_and_grad(params, rest, batch, idx):
        def f(p):
            model = nnx.merge(graphdef, p, rest)
            ce, w, correct, count, moe = _losses(model, batch, idx, use_segments, acc_fn)
            # per-token-weighted sums, so that accumulation over micro-batches and the final / w give means
            moe = jax.tree.map(lambda v: v * w, moe)
            objective = ce + moe_aux_weight * _mean_or_zero(moe["aux"]) + moe_z_weight * _mean_or_zero(moe["z"])
            return objective, (ce, w, correct, count, moe)
        return jax.value_and_grad(f, has_aux=True)(params)

    def step(state, batch, idx):
        params, rest = state["params"], state["rest"]
        if accum == 1:
            (obj, (ce, w, correct, count, moe)), grads = loss_and_grad(params, rest, batch, idx)
        else:
            split = lambda x: None if x is None else x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
            micro = jax.tree.map(split, batch)
            micro_idx = split(idx)

            def body(carry, xs):
                mb, mi = xs
                (o, (ce, w, c, n, m)), g = loss_and_grad(params, rest, mb, mi)
                acc = jax.tree.map(jnp.add, carry, (g, o, ce, w, c, n, m))
                return acc, None

            zeros = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0), jnp.float32(0),
                     jnp.int32(0), jnp.int32(0), {k: jnp.zeros((n_moe,), jnp.float32) for k in _MOE_TERMS})
            (grads, obj, ce, w, correct, count, moe), _ = jax.lax.scan(body, zeros, (micro, micro_idx))
        denom = jnp.maximum(w, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = ce / denom
        objective = obj / denom
        moe = jax.tree.map(lambda v: v / denom, moe)
        grad_norm = _global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, updates)
        # A non-finite loss, gradient, parameter or optimizer moment (e.g. an overflowing step) never enters the
        # state. Elementwise: the norm of a finite update can overflow float32 (|u| ~ 1e20) and the state's own
        # values are what a checkpoint must hold finite.
        ok = jnp.isfinite(objective) & jnp.isfinite(grad_norm) & _all_finite((new_params, opt_state))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = dict(state, params=keep(new_params, params), opt_state=keep(opt_state, state["opt_state"]),
                         step=state["step"] + 1)
        metrics = {"loss": loss, "grad_norm": grad_norm, "ok": ok, "correct": correct, "count": count,
                   "tokens": w}
        if moe["aux"].shape[0]:
            metrics.update(moe_aux_loss=jnp.mean(moe["aux"]), moe_z_loss=jnp.mean(moe["z"]),
                           moe_drop_fraction=moe["drop"])
        return new_state, metrics

    def wrapped(state, batch, idx):
        with parallel.use_rules(mesh):
            return step(state, batch, idx)

    return jax.jit(wrapped, in_shardings=(in_shardings, batch_sharding, batch_sharding),
                   out_shardings=(out_shardings, None), donate_argnums=(0,))


def make_eval_step(graphdef, *, use_segments: bool, acc_fn, mesh, state_shardings, batch_sharding):
    def step(state, batch, idx):
        with parallel.use_rules(mesh):
            model = nnx.merge(graphdef, state["params"], state["rest"])
            return _losses(model, batch, idx, use_segments, acc_fn)[:4]

    return jax.jit(step, in_shardings=(state_shardings, batch_sharding, batch_sharding))


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _global_norm(tree) -> jax.Array:
    leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(leaves))


# --- the run -----------------------------------------------------------------------------------------------------

def prepare(cfg: TrainConfig):
    """Everything that can fail on bad input, before anything is written: mesh, batch split, data sources, model
    config, the run directory's state. Returns a namespace the loop uses."""
    init_distributed(cfg)
    sizes = sh.resolve_mesh_shape(cfg.mesh.shape, jax.device_count())
    mesh = sh.make_mesh(sizes)
    sh.check_batch(cfg.data.batch_size, mesh)
    if cfg.data.batch_size % (cfg.optimizer.grad_accum_steps * math.prod(
            mesh.shape[a] for a in sh.BATCH_AXES if a in mesh.shape)):
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by optimizer.grad_accum_steps="
                         f"{cfg.optimizer.grad_accum_steps} x the data-parallel size (each micro-batch is split "
                         f"over the data/fsdp/expert devices)")
    model_config = cfg.model.to_model_config()
    if model_config.max_seq_len is not None and cfg.data.seq_len > model_config.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len="
                         f"{model_config.max_seq_len}")
    _check_expert_parallel(model_config, mesh)
    train_data = _data(cfg, "train", mesh)  # raises on missing files, unknown tasks, bad task arguments
    run_dir = Path(cfg.logging.run_dir) / run_name(cfg)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    saved_config = None
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        probe = Checkpointer(ckpt_dir, keep=None, async_save=False)
        try:
            if probe.latest_step() is not None:
                if not cfg.checkpoint.resume:
                    raise ValueError(f"{ckpt_dir} already holds checkpoints (steps {probe.steps()}) and "
                                     f"checkpoint.resume is false; pick another logging.name or run_dir, or resume")
                saved_config = probe.read_config()
                check_compatible(saved_config, to_dict(cfg), section="model")
        finally:
            probe.close()
    if cfg.checkpoint.init_from is not None and not Path(cfg.checkpoint.init_from).is_dir():
        raise ValueError(f"checkpoint.init_from={cfg.checkpoint.init_from!r} is not a directory")
    return dict(mesh=mesh, model_config=model_config, train_data=train_data, run_dir=run_dir, ckpt_dir=ckpt_dir,
                resume=saved_config is not None)


def _build_state(cfg: TrainConfig, model_config, tx, mesh):
    """(graphdef, state, shardings): the train state built directly in its shardings (never whole on one device),
    or, with `checkpoint.init_from`, loaded on the host by `from_pretrained` and then placed."""
    def make_model():
        if cfg.checkpoint.init_from is not None:
            return _init_from(cfg.checkpoint.init_from, model_config, cfg.run.seed)
        return LM(model_config, rngs=nnx.Rngs(cfg.run.seed))

    def state_of(model):
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {"params": params, "rest": rest, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(cfg.run.seed))}

    if cfg.checkpoint.init_from is not None:
        model = make_model()
        graphdef = nnx.split(model, nnx.Param, ...)[0]
        state = state_of(model)
        shardings = sh.param_shardings(state, mesh)
        return graphdef, jax.device_put(state, shardings), shardings
    graphdef = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)[0]
    abstract = jax.eval_shape(lambda: state_of(make_model()))
    shardings = sh.param_shardings(abstract, mesh)
    state = jax.jit(lambda: state_of(make_model()), out_shardings=shardings)()
    return graphdef, state, shardings


def _init_from(path, model_config, seed: int):
    """`LM(model_config)` holding the weights of the from_pretrained checkpoint at `path`.

    The model is built from the run's config (as a resume rebuilds it), so the checkpoint must hold the same
    parameters (names and shapes) and agree on what changes the computation without changing a shape. Configs are
    compared after filling in each mixer's constructor defaults: from_pretrained spells out arguments (head_dim,
    rope_base, ...) that a run config usually leaves implicit; an argument that defaults to None is derived from
    other fields (e.g. head_dim = d_model / num_heads), which the shape check covers."""
    from seqmix_jax.models import from_pretrained

    loaded = from_pretrained(path)
    model = LM(model_config, rngs=nnx.Rngs(seed))
    ours = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    theirs = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(loaded, nnx.Param))}
    a, b = loaded.config, model_config
    diff = [f"{f}: checkpoint {getattr(a, f)!r}, config {getattr(b, f)!r}"
            for f in ("vocab_size", "d_model", "norm", "norm_eps", "mlp_activation", "tie_embeddings")
            if getattr(a, f) != getattr(b, f)]
    if len(a.blocks) == len(b.blocks):
        for i, (x, y) in enumerate(zip(a.blocks, b.blocks)):
            if (x.mixer, x.mlp, x.moe is None) != (y.mixer, y.mlp, y.moe is None):
                kind = lambda z: f"{z.mixer} (mlp {z.mlp}{', moe' if z.moe is not None else ''})"
                diff.append(f"layer {i}: checkpoint {kind(x)}, config {kind(y)}")
                continue
            for k in ("num_experts", "top_k", "hidden", "shared_hidden", "scoring", "renormalize", "activation"):
                u, w = (x.moe or {}).get(k), (y.moe or {}).get(k)
                if u is not None and w is not None and u != w:
                    diff.append(f"layer {i} moe {k}: checkpoint {u!r}, config {w!r}")
            defaults = {k: v.default for k, v in inspect.signature(MIXER_CLASSES[x.mixer].__init__).parameters.items()
                        if v.default is not inspect.Parameter.empty}
            for k in sorted(set(x.mixer_kwargs) | set(y.mixer_kwargs)):
                u, w = x.mixer_kwargs.get(k, defaults.get(k)), y.mixer_kwargs.get(k, defaults.get(k))
                if u is not None and w is not None and u != w:
                    diff.append(f"layer {i} {x.mixer} {k}: checkpoint {u!r}, config {w!r}")
    else:
        diff.append(f"{len(a.blocks)} layers in the checkpoint, {len(b.blocks)} in the config")
    name = lambda p: ".".join(map(str, p))
    diff += [f"{name(p)} missing from the checkpoint" for p in ours if p not in theirs]
    diff += [f"unexpected {name(p)}" for p in theirs if p not in ours]
    diff += [f"{name(p)}: checkpoint {tuple(theirs[p].shape)}, config {tuple(v.shape)}"
             for p, v in ours.items() if p in theirs and tuple(theirs[p].shape) != tuple(v.shape)]
    if diff:
        raise ValueError(f"checkpoint.init_from={str(path)!r} holds a different model than the config's model "
                         f"section: {'; '.join(diff[:6])}" + (f" and {len(diff) - 6} more" if len(diff) > 6 else ""))
    for p, var in ours.items():
        var.set_value(jnp.asarray(theirs[p][...], var.dtype))
    return model


def train(cfg: TrainConfig) -> RunResult:
    """Run (or resume) the training job `cfg` describes. See the module docstring."""
    t_start = time.perf_counter()
    p = prepare(cfg)
    mesh, model_config, run_dir, ckpt_dir = p["mesh"], p["model_config"], p["run_dir"], p["ckpt_dir"]
    lead = jax.process_index() == 0
    o = cfg.optimizer
    sched = dict(lr=o.lr, warmup_steps=min(o.warmup_steps, max(cfg.run.steps - 1, 0)), total_steps=cfg.run.steps,
                 min_lr_ratio=o.min_lr_ratio)
    tx = make_optimizer(**sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                        decay_embeddings=o.decay_embeddings)
    schedule = make_schedule(**sched)
    graphdef, state, shardings = _build_state(cfg, model_config, tx, mesh)
    config_dict = to_dict(cfg)

    # From here on the run directory is ours: every check above has passed.
    ckpt = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                        every_steps=cfg.checkpoint.every_steps or None)
    train_data = p["train_data"]
    resumed_from = None
    if p["resume"]:
        restored = ckpt.restore(sh.abstract_state(state, mesh))
        state = restored.state
        resumed_from = int(restored.meta["step"])
        if restored.data_state is not None:
            train_data.set_state(restored.data_state)
        else:  # saved with another process count: the global-batch counter still resumes the stream
            train_data.set_state({"next_index": resumed_from})
    if lead:  # after the restore, which can still refuse a checkpoint (e.g. another optimizer's state layout)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2))
    # checkpoint.every_steps=0 means no periodic saves (the Checkpointer's every_steps=None means every step).
    periodic = (lambda s: ckpt.should_save(s)) if cfg.checkpoint.every_steps else (lambda s: False)

    batch_sharding = sh.batch_sharding(mesh)
    acc_fn = accuracy_fn(cfg.data.task)
    use_segments = _use_segments(cfg)
    moe_layers = _moe_layers(p["model_config"])
    train_step = make_train_step(graphdef, tx, accum=o.grad_accum_steps, use_segments=use_segments, acc_fn=acc_fn,
                                 mesh=mesh, in_shardings=shardings, out_shardings=shardings,
                                 batch_sharding=batch_sharding, n_moe=len(moe_layers),
                                 moe_aux_weight=cfg.model.moe_aux_loss_weight,
                                 moe_z_weight=cfg.model.moe_z_loss_weight)
    eval_step = make_eval_step(graphdef, use_segments=use_segments, acc_fn=acc_fn, mesh=mesh,
                               state_shardings=shardings, batch_sharding=batch_sharding)

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    flops = model_flops_per_token(model_config, cfg.data.seq_len, n_params=n_params)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    writer = MetricsWriter(run_dir, enabled=lead, tensorboard=cfg.logging.tensorboard)
    start_step = int(jax.device_get(state["step"]))
    progress = Progress(cfg.run.steps, initial=start_step, enabled=cfg.logging.progress and lead,
                        flops_per_token=flops, n_devices=jax.device_count(),
                        peak_flops=peak_flops_per_device(jax.devices()[0]))
    if lead and resumed_from is None:
        writer.write(start_step, "meta", {"n_params": n_params, "flops_per_token": flops,
                                          "devices": jax.device_count(), "processes": jax.process_count(),
                                          "mesh": json.dumps(dict(mesh.shape))})

    stop_requested = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    status, last_eval, pending, last_loss = "finished", {}, [], None
    step = start_step
    try:
        while step < cfg.run.steps:
            # All processes stop at the same step: SIGTERM may reach one host, or each at a different step.
            if _any_process(bool(stop_requested)):
                status = "terminated"
                break
            batch = next(train_data)
            idx = _head_positions(batch, cfg.data.seq_len) if cfg.model.head_only_at_weights else None
            gbatch = sh.shard_batch(batch, mesh, cfg.data.batch_size)
            gidx = None if idx is None else sh.shard_batch({"i": idx}, mesh, cfg.data.batch_size)["i"]
            state, m = train_step(state, gbatch, gidx)
            step += 1
            pending.append((step, m))
            if step % cfg.logging.log_every == 0 or step == cfg.run.steps or periodic(step):
                last_loss = _flush(pending, writer, progress, schedule, tokens_per_step, cfg, moe_layers)
                pending = []
            if cfg.logging.eval_every and step % cfg.logging.eval_every == 0 and step != cfg.run.steps:
                last_eval = evaluate(cfg, eval_step, state, mesh)
                writer.write(step, "eval", last_eval)
                progress.write(f"step {step}: eval loss {last_eval['loss']:.4f} accuracy "
                               f"{last_eval['accuracy']:.4f}")
            if periodic(step) and step != cfg.run.steps:
                ckpt.save(step, state=state, data_state=train_data.get_state(), config=config_dict)
        if pending:
            last_loss = _flush(pending, writer, progress, schedule, tokens_per_step, cfg, moe_layers)
        if status == "finished":
            last_eval = evaluate(cfg, eval_step, state, mesh)
            writer.write(step, "eval", last_eval)
        # Returns False (writes nothing) when this step is already saved and readable; re-saves a step that the
        # restore found damaged (moving the damaged copy aside), e.g. a resume that fell back past it.
        ckpt.save(step, state=state, data_state=train_data.get_state(), config=config_dict, force=True)
        ckpt.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
        ckpt.close()
        writer.close()
    if lead and cfg.logging.plot:
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png")
    seconds = time.perf_counter() - t_start
    result = RunResult(run_dir=run_dir, step=step, status=status, train_loss=last_loss, eval=last_eval,
                       seconds=seconds, resumed_from=resumed_from)
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(
            {"step": step, "status": status, "train_loss": last_loss, "eval": last_eval, "seconds": seconds,
             "resumed_from": resumed_from}, indent=2))
    return result


def _moe_metrics(m: dict, moe_layers: list[int]) -> dict:
    """The MoE terms of one step's metrics: mean load-balancing and z-loss over the MoE layers, the drop fraction
    (mean, and per layer as `moe_drop_fraction/block{i}`)."""
    if "moe_drop_fraction" not in m:
        return {}
    drops = [float(v) for v in np.asarray(m["moe_drop_fraction"])]
    return {"moe_aux_loss": float(m["moe_aux_loss"]), "moe_z_loss": float(m["moe_z_loss"]),
            "moe_drop_fraction": float(np.mean(drops)),
            **{f"moe_drop_fraction/block{i}": d for i, d in zip(moe_layers, drops)}}


def _flush(pending, writer, progress, schedule, tokens_per_step, cfg, moe_layers=()) -> float | None:
    """Pull the queued step metrics to the host, log them, and apply the non-finite policy."""
    host = jax.device_get([m for _, m in pending])
    loss = None
    for (step, _), m in zip(pending, host):
        loss = float(m["loss"])
        progress.update(step, loss=loss, tokens=tokens_per_step)
        acc = float(m["correct"]) / max(float(m["count"]), 1.0)
        writer.write(step, "train", {"loss": loss, "accuracy": acc, "grad_norm": float(m["grad_norm"]),
                                     "lr": float(schedule(step - 1)), "skipped": not bool(m["ok"]),
                                     **_moe_metrics(m, moe_layers), **progress.rates()})  # the failing step too
        if not bool(m["ok"]):
            if cfg.run.nonfinite == "stop":
                raise NonFiniteLoss(f"non-finite loss, gradient or update at step {step} (loss {loss}, grad norm "
                                    f"{float(m['grad_norm'])}); the update was not applied and no checkpoint was "
                                    f"written after it (run.nonfinite=stop)")
            progress.write(f"step {step}: non-finite loss, gradient or update; update skipped (run.nonfinite=skip)")
    return loss


def evaluate(cfg: TrainConfig, eval_step, state, mesh) -> dict:
    """Loss and accuracy over the test split (or its first `logging.eval_batches` batches)."""
    data = _data(cfg, "test", mesh)
    totals = np.zeros(4)
    for i, batch in enumerate(data):
        if cfg.logging.eval_batches is not None and i >= cfg.logging.eval_batches:
            break
        idx = _head_positions(batch, cfg.data.seq_len) if cfg.model.head_only_at_weights else None
        gbatch = sh.shard_batch(batch, mesh, cfg.data.batch_size)
        gidx = None if idx is None else sh.shard_batch({"i": idx}, mesh, cfg.data.batch_size)["i"]
        totals += np.asarray(jax.device_get(eval_step(state, gbatch, gidx)), np.float64)
    ce, w, correct, count = totals
    return {"loss": ce / max(w, 1.0), "accuracy": correct / max(count, 1.0), "tokens": int(w)}
