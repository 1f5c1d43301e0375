"""Expert parallelism for `moe_ffn`: experts split over a mesh axis, tokens moved with `jax.shard_map`.

Axis letters as in `seqmix_jax.ops.moe`; in addition p = size of the expert mesh axis, e_loc = e / p experts
per device (device j of the expert axis holds experts [j e_loc, (j + 1) e_loc), the layout of a
("expert", ...) PartitionSpec on the experts dimension), t_loc tokens per device.

The tokens (t, d) are split over `token_axes` (default ("data", "fsdp", "expert"), the trainer's batch
rule); the expert weights over `expert_axis`. Two ways to bring tokens and experts together:

  all_to_all  every device fills static (e, c, d) buffers with its own tokens (`capacity_slots`: the capacity
              rule of `moe_ffn`, applied to the device's t_loc tokens), an all_to_all over the expert axis
              hands every device the (p, e_loc, c, d) buffers of its experts, the experts run, a second
              all_to_all returns the results, and each device combines its tokens. Traffic ~ 2 k t_loc d
              per device (times capacity_factor).
  all_gather  the tokens (and their routing) are all-gathered over the expert axis, every device runs its
              e_loc experts on all p t_loc tokens, and a reduce-scatter (psum_scatter) sums the experts'
              contributions and hands each device its own tokens back. Simpler, traffic ~ 2 p t_loc d.

dispatch="capacity" drops what overflows a buffer, with the capacity counted per device (all_to_all: c from
t_loc tokens) or per expert-axis group (all_gather: c from p t_loc tokens); with enough capacity both equal
the single-device `moe_ffn`. dispatch="dropless" keeps every token: all_to_all then sizes the buffers for the
worst case (c = t_loc, e/k times the work of a balanced load: prefer "capacity" at scale), all_gather runs
its local experts as grouped matmuls.

Statistics are global: the router statistics are computed outside the shard_map on the (sharded) global
routing arrays, and the dropped pairs are summed (psum) over every token axis.

Differences from a production EP kernel: the buffers are dense and static (no `ragged_all_to_all`, which XLA
does not implement on CPU); tensor-parallel sharding of the expert weights is gathered inside the shard_map.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, Bool, Float

from seqmix_jax.ops.moe import (MoEStats, Routing, capacity_ffn, capacity_slots, check_capacity_factor,
                                check_ffn_inputs, combine_from_slots, dispatch_to_slots, dropless_ffn,
                                expert_capacity, experts_on_buffers, moe_stats)

EP_MODES = ("all_to_all", "all_gather")
EP_DISPATCHES = ("capacity", "dropless")
TOKEN_AXES = ("data", "fsdp", "expert")


def moe_ffn_expert_parallel(x: Float[Array, "t d"], routing: Routing, wi: Float[Array, "e d f2"],
                            wo: Float[Array, "e f d"], *, mesh: Mesh, mode: str = "all_to_all",
                            dispatch: str = "capacity", capacity_factor: float = 1.25, activation: str = "silu",
                            token_mask: Bool[Array, "t"] | None = None, expert_axis: str = "expert",
                            token_axes: tuple[str, ...] = TOKEN_AXES) -> tuple[Float[Array, "t d"], MoEStats]:
    """`moe_ffn` with the experts split over `mesh.shape[expert_axis]` devices: (y (t, d) in x.dtype, MoEStats).

    Args:
      x, routing, wi, wo, capacity_factor, activation, token_mask: as in `moe_ffn` (global arrays; call it
        inside jit, where they may be sharded in any way: shard_map moves them to the layout it needs).
      mesh: a jax.sharding.Mesh with `expert_axis`.
      mode: "all_to_all" or "all_gather" (see the module docstring).
      dispatch: "capacity" or "dropless" ("reference" has no expert-parallel form).
      expert_axis: mesh axis the experts are split over; e must be divisible by its size.
      token_axes: mesh axes the tokens are split over (those the mesh lacks are ignored); must include
        expert_axis, and t must be divisible by the product of their sizes.
    """
    if mode not in EP_MODES:
        raise ValueError(f"expert-parallel mode must be one of {EP_MODES}, got {mode!r}")
    if dispatch not in EP_DISPATCHES:
        raise ValueError(f"dispatch={dispatch!r} has no expert-parallel path; choose one of {EP_DISPATCHES}")
    check_ffn_inputs(x, routing, wi, wo, activation, token_mask)
    if dispatch == "capacity":
        check_capacity_factor(capacity_factor)
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    sizes = dict(mesh.shape)
    if expert_axis not in sizes:
        raise ValueError(f"expert_axis={expert_axis!r} is not an axis of the mesh {sizes}")
    tok_axes = tuple(a for a in token_axes if a in sizes)
    if expert_axis not in tok_axes:
        raise ValueError(f"token_axes={tuple(token_axes)} must include expert_axis={expert_axis!r}")
    t, k = routing.experts.shape
    e, p = wi.shape[0], sizes[expert_axis]
    if e % p:
        raise ValueError(f"num_experts={e} must be divisible by the expert-parallel size "
                         f"{expert_axis}={p} (mesh {sizes})")
    n_shards = math.prod(sizes[a] for a in tok_axes)
    if t % n_shards:
        raise ValueError(f"the number of tokens t={t} must be divisible by the {n_shards} token shards over "
                         f"{tok_axes} (mesh {sizes})")
    t_loc = t // n_shards
    valid = jnp.ones((t,), bool) if token_mask is None else token_mask
    if mode == "all_to_all":
        c = expert_capacity(t_loc, e, k, capacity_factor) if dispatch == "capacity" else t_loc
        body = _all_to_all_body(e, p, c, activation, expert_axis, tok_axes)
    else:
        c = expert_capacity(t_loc * p, e, k, capacity_factor) if dispatch == "capacity" else None
        body = _all_gather_body(e, p, c, activation, expert_axis, tok_axes)
    tok = P(tok_axes)
    exp = P(expert_axis)
    y, dropped = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, tok, exp, exp), out_specs=(tok, P()))(
        x, routing.weights, routing.experts, valid, wi, wo)
    return y.astype(x.dtype), moe_stats(routing, token_mask, dropped)


def _all_to_all_body(e: int, p: int, c: int, activation: str, expert_axis: str, tok_axes: tuple[str, ...]):
    e_loc = e // p

    def body(x, weights, experts, valid, wi, wo):
        d = x.shape[1]
        # capacity_ffn's three steps, with the two exchanges between them.
        slot, keep = capacity_slots(experts, jnp.broadcast_to(valid[:, None], experts.shape), e, c)
        send = dispatch_to_slots(x, slot, keep, e * c).reshape(p, e_loc * c, d)  # grouped by destination
        recv = lax.all_to_all(send, expert_axis, 0, 0, tiled=True)  # (p sources, e_loc c, d)
        h = recv.reshape(p, e_loc, c, d).transpose(1, 0, 2, 3).reshape(e_loc, p * c, d)
        out = experts_on_buffers(h, wi, wo, activation)
        out = out.reshape(e_loc, p, c, d).transpose(1, 0, 2, 3).reshape(p, e_loc * c, d)
        back = lax.all_to_all(out, expert_axis, 0, 0, tiled=True)  # (p expert groups, e_loc c, d), my tokens
        y = combine_from_slots(back.reshape(e * c, d), slot, keep, weights)
        dropped = lax.psum(jnp.sum(valid[:, None] & ~keep), tok_axes)
        return y, dropped

    return body


def _all_gather_body(e: int, p: int, c: int | None, activation: str, expert_axis: str, tok_axes: tuple[str, ...]):
    e_loc = e // p

    def body(x, weights, experts, valid, wi, wo):
        gather = lambda a: lax.all_gather(a, expert_axis, axis=0, tiled=True)  # noqa: E731
        xg, wg, eg, vg = gather(x), gather(weights), gather(experts), gather(valid)
        local = eg - lax.axis_index(expert_axis) * e_loc
        mine = vg[:, None] & (local >= 0) & (local < e_loc)
        local = jnp.where(mine, local, 0)
        if c is None:
            yg = dropless_ffn(xg, wg, local, mine, wi, wo, activation)
            dropped = jnp.zeros((), jnp.int32)
        else:
            yg, dropped = capacity_ffn(xg, wg, local, mine, wi, wo, activation, c)
        y = lax.psum_scatter(yg, expert_axis, scatter_dimension=0, tiled=True)
        return y, lax.psum(dropped, tok_axes)

    return body
