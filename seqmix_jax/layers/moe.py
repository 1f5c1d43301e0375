"""Sparse mixture-of-experts channel mixer (Mixtral, Jamba, DeepSeek-style shared expert).

Axis letters: b batch, l sequence, d model width, e experts, k choices per token (top_k), f expert hidden width.

    logits = x W_r;  experts, weights = top_k(softmax | sigmoid(logits))   (`seqmix_jax.ops.moe.route`)
    y = sum_j weights_j * expert_{experts_j}(x) [+ shared(x)],  expert_i(h) = (silu(h Wi_i^gate) * h Wi_i^up) Wo_i

Parameters (logical axes):  router.kernel (d, e) ("embed", None);  wi (e, d, 2f) ("expert", "embed", "mlp"),
the fused [gate | up] projections;  wo (e, f, d) ("expert", "mlp", "embed");  shared.{gate,up,down}.kernel
(a `GatedMLP`, only with shared_hidden).
Name map: transformers Mixtral `block_sparse_moe.gate.weight` = router.kernel^T, `experts.gate_up_proj (e, 2f, d)`
= wi^T, `experts.down_proj (e, d, f)` = wo^T; Jamba `feed_forward.router.weight` and the same experts.

Differences from the reference code: PyTorch's default Linear init (U(±1/sqrt(fan_in))) for every weight instead
of transformers' normal(0, 0.02); the router logits are float32 whatever the compute dtype (transformers computes
them in the model dtype, then softmaxes in float32); no router jitter noise.
"""

from __future__ import annotations

import math
import warnings

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from seqmix_jax.layers._init import check_dims, linear, param, torch_uniform
from seqmix_jax.layers.mlp import GatedMLP
from seqmix_jax.ops.moe import (ACTIVATIONS, DISPATCHES, SCORINGS, MoEStats, check_capacity_factor, check_top_k,
                                moe_ffn, route)
from seqmix_jax.ops.moe_parallel import EP_DISPATCHES, EP_MODES, moe_ffn_expert_parallel
from seqmix_jax.parallel import active_rules

EXPERT_AXIS = "expert"  # mesh axis of the experts (LOGICAL_RULES: "expert" -> "expert")
TOKEN_AXES = ("data", "fsdp", "expert")  # mesh axes the tokens are split over (the trainer's batch rule)
_WARNED: set[tuple[int, int]] = set()


class MoE(nnx.Module):
    """Top-k routed SwiGLU experts: (b, l, d_model) -> (b, l, d_model).

    Args:
      d_model: model width d.
      hidden: expert hidden width f.
      num_experts: e.
      top_k: k experts per token (1 <= k <= e).
      dispatch: "dropless" (sorted grouped matmuls, nothing dropped), "capacity" (fixed buffers, overflow
        dropped and counted) or "reference" (every expert on every token); see `seqmix_jax.ops.moe`.
      capacity_factor: slots per expert relative to a balanced load (capacity dispatch; > 0).
      scoring: "softmax" or "sigmoid" router probabilities.
      renormalize: rescale the k chosen probabilities to sum 1 (Mixtral True, Jamba False).
      activation: "silu", "gelu" or "gelu_tanh" on the experts' gate branch.
      shared_hidden: width of a shared GatedMLP expert added for every token (None: no shared expert).
      expert_parallel: None, "all_to_all" or "all_gather": inside `seqmix_jax.parallel.use_rules(mesh)` with an
        "expert" mesh axis of size > 1, the experts run split over that axis with tokens exchanged by shard_map
        (`seqmix_jax.ops.moe_parallel`); otherwise (no mesh, axis of size 1) the single-device path runs.
        Needs dispatch "capacity" or "dropless".
      dtype, param_dtype: compute and storage dtypes (the router logits and statistics stay float32).
      rngs: nnx.Rngs (keyword only).

    Every call stores its `MoEStats` in the `nnx.Intermediate` "moe_stats" (a 1-tuple, the layout `Module.sow`
    gives), replacing the previous call's, so repeated calls never accumulate state; read and clear them with
    `pop_moe_stats(model)` or `nnx.pop(model, nnx.Intermediate)`.
    """

    def __init__(self, d_model: int, hidden: int, num_experts: int, top_k: int, *, dispatch: str = "dropless",
                 capacity_factor: float = 1.25, scoring: str = "softmax", renormalize: bool = True,
                 activation: str = "silu", shared_hidden: int | None = None, expert_parallel: str | None = None,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_dims(d_model=d_model, hidden=hidden, num_experts=num_experts)
        check_top_k(top_k, num_experts)
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        if dispatch == "capacity":
            check_capacity_factor(capacity_factor)
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if expert_parallel is not None and expert_parallel not in EP_MODES:
            raise ValueError(f"expert_parallel must be None or one of {EP_MODES}, got {expert_parallel!r}")
        if expert_parallel is not None and dispatch not in EP_DISPATCHES:
            raise ValueError(f"dispatch={dispatch!r} has no expert-parallel path (expert_parallel="
                             f"{expert_parallel!r}); choose one of {EP_DISPATCHES}")
        if shared_hidden is not None:
            check_dims(shared_hidden=shared_hidden)
        self.d_model, self.hidden, self.num_experts, self.top_k = d_model, hidden, num_experts, top_k
        self.dispatch, self.capacity_factor = dispatch, capacity_factor
        self.scoring, self.renormalize = scoring, renormalize
        self.activation, self.expert_parallel = activation, expert_parallel
        self.dtype, self.param_dtype = dtype, param_dtype
        self.router = linear(d_model, num_experts, use_bias=False, names=("embed", None), dtype=None,
                             param_dtype=param_dtype, rngs=rngs)
        self.wi = param(torch_uniform(d_model), (num_experts, d_model, 2 * hidden), ("expert", "embed", "mlp"),
                        param_dtype, rngs)
        self.wo = param(torch_uniform(hidden), (num_experts, hidden, d_model), ("expert", "mlp", "embed"),
                        param_dtype, rngs)
        self.shared = (GatedMLP(d_model, shared_hidden, activation=activation, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs) if shared_hidden is not None else None)

    def __call__(self, x: Float[Array, "b l d"], *, segment_ids: Int[Array, "b l"] | None = None
                 ) -> Float[Array, "b l d"]:
        """segment_ids (b, l): tokens of segment 0 are padding (routed nowhere, out of the statistics, y = 0
        apart from the shared expert); nothing else depends on them (the layer is position-wise)."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (b, l, d_model={self.d_model}), got {tuple(x.shape)}")
        b, l, d = x.shape
        token_mask = None
        if segment_ids is not None:
            if tuple(segment_ids.shape) != (b, l):
                raise ValueError(f"segment_ids must have shape (b, l) = {(b, l)}, got {tuple(segment_ids.shape)}")
            token_mask = (segment_ids != 0).reshape(b * l)
        dtype = self.dtype if self.dtype is not None else jnp.promote_types(x.dtype, self.param_dtype)
        xt = x.reshape(b * l, d).astype(dtype)
        routing = route(xt, self.router.kernel[...], top_k=self.top_k, scoring=self.scoring,
                        renormalize=self.renormalize)
        wi, wo = self.wi[...].astype(dtype), self.wo[...].astype(dtype)
        kw = dict(dispatch=self.dispatch, capacity_factor=self.capacity_factor, activation=self.activation,
                  token_mask=token_mask)
        mesh = self._expert_mesh(b * l)
        if mesh is None:
            y, stats = moe_ffn(xt, routing, wi, wo, **kw)
        else:
            y, stats = moe_ffn_expert_parallel(xt, routing, wi, wo, mesh=mesh, mode=self.expert_parallel,
                                               expert_axis=EXPERT_AXIS, token_axes=TOKEN_AXES, **kw)
        self._record(stats)
        if self.shared is not None:
            y = y + self.shared(xt).astype(y.dtype)
        return y.reshape(b, l, d)

    def step(self, x_t: Float[Array, "b d"]) -> Float[Array, "b d"]:
        """One decoding position: the layer on a length-1 sequence (it keeps no state)."""
        if x_t.ndim != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"step expects x of shape (b, d_model={self.d_model}), got {tuple(x_t.shape)}")
        return self(x_t[:, None])[:, 0]

    def _record(self, stats: MoEStats) -> None:
        """Store `stats` as the `nnx.Intermediate` "moe_stats" = (stats,), the layout `self.sow(nnx.Intermediate,
        "moe_stats", stats)` gives on a first call (written directly because flax 0.12 deprecates `sow` outside
        `nnx.capture`). The last call wins: a model called in a Python loop does not pile statistics up."""
        if hasattr(self, "moe_stats"):
            self.moe_stats.set_value((stats,))
        else:
            self.moe_stats = nnx.Intermediate((stats,))

    def _expert_mesh(self, num_tokens: int):
        """The ambient mesh when expert parallelism applies (read at trace time), else None.

        A token count that the token shards do not divide (a decode step of batch 1 on a data x expert mesh) runs
        the local path (XLA places the experts' collectives) and warns once: same function, no token exchange."""
        if self.expert_parallel is None:
            return None
        active = active_rules()
        if active is None:
            return None
        mesh = active[0]
        sizes = dict(mesh.shape)
        if sizes.get(EXPERT_AXIS, 1) == 1:
            return None
        shards = math.prod(sizes.get(a, 1) for a in TOKEN_AXES)
        if num_tokens % shards:
            key = (num_tokens, shards)
            if key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(f"MoE: {num_tokens} tokens do not split over the {shards} token shards of {TOKEN_AXES} "
                              f"(mesh {sizes}); running the experts without expert_parallel={self.expert_parallel!r}",
                              stacklevel=3)
            return None
        return mesh


def pop_moe_stats(model: nnx.Module) -> list[MoEStats]:
    """Remove the sown MoEStats from `model` and return them in layer order (one entry per layer: its last call)."""
    found = []
    for path, module in nnx.iter_modules(model):
        if isinstance(module, MoE) and hasattr(module, "moe_stats"):
            found.append((path, module))
    found.sort(key=lambda pm: tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in pm[0]))
    out = []
    for _, module in found:
        out.extend(module.moe_stats.get_value())
        del module.moe_stats
    return out
