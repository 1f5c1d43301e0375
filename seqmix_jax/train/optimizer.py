"""AdamW with linear warmup + cosine decay, global-norm clipping, a weight-decay mask and gradient accumulation.

    updates = MultiSteps_k( adamw(lr_schedule, b1, b2, eps, weight_decay, mask=decay_mask)
                            ∘ clip_by_global_norm(clip_norm) )

* The schedule (`make_schedule`, also for logging the lr): for s < warmup, lr (s + 1) / warmup (the first
  update already moves: no step at lr = 0); then a cosine from lr down to r * lr (r = min_lr_ratio) at
  s = total_steps, constant afterwards:
      t = clip((s - warmup) / (total - warmup), 0, 1),   lr_s = lr (r + (1 - r) (1 + cos(pi t)) / 2).
  s counts optimizer updates (after accumulation: MultiSteps only advances the inner step on real updates),
  so the lr applied by the n-th call of `nnx.Optimizer.update` is schedule(n // grad_accum_steps).
* Weight decay is decoupled (PyTorch AdamW: p -= lr_s * (adam_update + weight_decay * p)) and masked by
  `decay_mask`.
* Clipping runs on the (accumulated) gradient before Adam; clip_norm 0 or None disables it.
* grad_accum_steps = k > 1: `optax.MultiSteps` averages k successive gradients and applies one update every k
  calls (the k - 1 others return zero updates). With equal-sized micro-batches and a mean loss this equals
  one step on the k-times larger batch.

Master weights: parameters keep their `param_dtype` (float32) and the optimizer state follows them; bf16
compute (the model config's `dtype`) only changes the forward/backward.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# Leaf names never decayed (StripedHyena / Mamba filter and SSM parameters, restated from the references'
# `_no_weight_decay`): decaying A_log or poles toward 0 changes the dynamics of the recurrence, not its scale.
NO_DECAY_LEAVES = frozenset({"A_log", "D", "dt_bias", "poles", "residues"})


def _num(name, v, lo, hi=None, *, lo_open=False, hi_open=False):
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo)
    if hi is not None:
        ok = ok and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{')' if hi_open or hi is None else ']'}"
        raise ValueError(f"{name} must be a number in {rng}, got {v!r}")


def _int(name, v, lo):
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def make_schedule(*, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> optax.Schedule:
    """The learning rate as a function of the update count (see the module docstring); jit-friendly."""
    _num("lr", lr, 0, lo_open=True)
    _int("warmup_steps", warmup_steps, 0)
    _int("total_steps", total_steps, 1)
    _num("min_lr_ratio", min_lr_ratio, 0, 1)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} exceeds total_steps={total_steps}")
    decay = max(total_steps - warmup_steps, 1)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = lr * (s + 1.0) / max(warmup_steps, 1)
        t = jnp.clip((s - warmup_steps) / decay, 0.0, 1.0)
        cos = lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * t)))
        return jnp.where(s < warmup_steps, warm, cos)

    return schedule


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def decays(path: tuple[str, ...], *, decay_embeddings: bool = False) -> bool:
    """Whether the parameter at `path` (names from the model root, e.g. ("blocks", "0", "mixer", "A_log"))
    gets weight decay. No decay for:

    * biases: the leaf is `bias` or ends in `_bias` (linear and conv biases, dt_bias, the Hyena filter's D-like
      `filter_fn.bias`);
    * norms: any path component containing "norm" (norm, mlp_norm, norm_f scale/bias, Mamba-2's norm_weight);
    * A_log, D, dt_bias, StripedHyena poles and residues (`NO_DECAY_LEAVES`);
    * the Hyena implicit filter (everything under `filter_fn`: its MLP, sine frequency, modulation), as safari's
      hyena-filter config (wd=0);
    * embeddings unless decay_embeddings: the `embedding` leaf of nnx.Embed and a learned positional `pos_emb`.
      An untied `lm_head` is a projection and is decayed.
    Everything else (projection kernels, conv weights) decays."""
    leaf = path[-1] if path else ""
    if leaf == "bias" or leaf.endswith("_bias") or leaf in NO_DECAY_LEAVES:
        return False
    if any("norm" in p for p in path) or "filter_fn" in path:
        return False
    if leaf == "embedding" or "pos_emb" in path:
        return decay_embeddings
    return True


def decay_mask(params, *, decay_embeddings: bool = False):
    """Pytree of bools with the structure of `params` (nnx Variables count as leaves): True where weight decay
    applies (see `decays`). Works on `nnx.state(model, nnx.Param)` and on its pure-array form."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decays(tuple(_key_name(k) for k in path), decay_embeddings=decay_embeddings),
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(*, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1, clip_norm: float | None = 1.0,
                   grad_accum_steps: int = 1, decay_embeddings: bool = False) -> optax.GradientTransformation:
    """The trainer's optax transformation (see the module docstring).

    Args:
      lr: peak learning rate.
      warmup_steps: linear warmup length in optimizer updates (0: none).
      total_steps: update count at which the cosine reaches min_lr_ratio * lr.
      min_lr_ratio: final lr as a fraction of the peak, in [0, 1].
      b1, b2, eps: Adam moments' decay rates and denominator epsilon.
      weight_decay: decoupled weight decay coefficient (multiplied by the scheduled lr), masked by decay_mask.
      clip_norm: global gradient norm limit; 0 or None disables clipping.
      grad_accum_steps: micro-batches accumulated per update (1: none).
      decay_embeddings: apply weight decay to embeddings too.
    """
    schedule = make_schedule(lr=lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)
    _num("b1", b1, 0, 1, hi_open=True)
    _num("b2", b2, 0, 1, hi_open=True)
    _num("eps", eps, 0, lo_open=True)
    _num("weight_decay", weight_decay, 0)
    if clip_norm is not None:
        _num("clip_norm", clip_norm, 0)
    _int("grad_accum_steps", grad_accum_steps, 1)
    if not isinstance(decay_embeddings, bool):
        raise ValueError(f"decay_embeddings must be a bool, got {decay_embeddings!r}")

    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=lambda p: decay_mask(p, decay_embeddings=decay_embeddings)))
    tx = optax.chain(*parts)
    if grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps).gradient_transformation()
    return tx
