"""Logical-axis sharding rules and activation constraints (low level: imports jax only, so layers may use it).

Parameters carry logical axis names from their creation (`seqmix_jax.layers._init.axes`); activations name their
axes where `constrain` is called. `LOGICAL_RULES` maps a logical name to mesh axes of the trainer's mesh
(`data`, `fsdp`, `tensor`, `expert`):

* data parallel: the batch of activations is split over ("data", "fsdp", "expert"); weights are not split over
  "data" (outside MoE layers the expert axis is one more data-parallel axis).
* FSDP (ZeRO-3): the `embed` dimension of every weight is split over "fsdp"; XLA gathers it before use.
* tensor parallel (Megatron): the wide inner dimensions (mlp, heads, kv_heads, ssm_inner, ssm_heads,
  hyena_inner) and the vocabulary are split over "tensor".
* expert parallel: the `expert` dimension of MoE weights is split over "expert".

Resolution of a tuple of logical names (one per array dimension) into a PartitionSpec:

1. Dimensions are taken left to right. For each name the rules are tried in table order; the first rule whose
   mesh axes are not already used by an earlier dimension wins (a name may have several rules: activations'
   `embed` falls back to replicated because the batch already took "fsdp"). A name without a rule, a `None`
   name, or a name whose rules all collide is replicated.
2. With a mesh and a shape: mesh axes that the mesh lacks (or has with size 1) are dropped, and so is any mesh
   axis that does not divide the dimension — axes are kept left to right while their running product divides the size
   (a batch of 6 on data=2, fsdp=2 is split over "data" only; a vocabulary of 37 on tensor=2 is replicated).
   Dropping replicates instead of failing, so any model runs on any mesh; the cost is memory, not correctness.

`use_rules(mesh)` activates a mesh and rules for `constrain(x, names)`, which is a `with_sharding_constraint`
inside the context and the identity outside. The context is read when a function is traced: enter it around
the first call (tracing) of a jitted step, not only around later calls that hit the compilation cache.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")  # outermost -> innermost (tensor wants the fastest links)

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    # the model width: weights FSDP-sharded; activations (batch took "fsdp") fall through to replicated
    ("embed", "fsdp"),
    ("embed", None),
    # tensor-parallel inner dimensions
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("ssm_inner", "tensor"),
    ("ssm_heads", "tensor"),
    ("ssm_state", None),
    ("dt_rank", None),
    ("conv_width", None),
    ("hyena_inner", "tensor"),
    ("hyena_filter", None),
    ("hyena_seq", None),
    ("hyena_pos", None),
    # mixture of experts
    ("expert", "expert"),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar("seqmix_rules", default=None)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _check_rules(rules: Rules) -> tuple:
    out = []
    for i, rule in enumerate(rules):
        axes = rule[1] if isinstance(rule, (tuple, list)) and len(rule) == 2 else 0
        if (not isinstance(rule[0], str) or not (axes is None or isinstance(axes, (str, tuple, list)))
                or not all(isinstance(a, str) for a in _as_tuple(axes))):
            raise ValueError(f"rules[{i}] must be a pair (logical name, mesh axis | tuple of mesh axes | None), "
                             f"got {rule!r}")
        out.append((rule[0], _as_tuple(rule[1])))
    return tuple(out)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    rules: Rules = LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec (one entry per dimension) for logical axis `names` under `rules`; see the module docstring.

    With `mesh` (and `shape`), mesh axes missing from the mesh or of size 1 (and, given `shape`, not dividing
    the dimension) are dropped."""
    table = _check_rules(rules)
    names = tuple(names)
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical names {names} do not match the array's shape {tuple(shape)} "
                         f"({len(names)} names for {len(shape)} dimensions)")
    sizes = dict(mesh.shape) if mesh is not None else None
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        chosen: tuple[str, ...] = ()
        if name is not None:
            for rule_name, axes in table:
                if rule_name == name and not used.intersection(axes):
                    chosen = axes
                    break
        used.update(chosen)
        if sizes is not None:
            kept, prod = [], 1
            for a in chosen:
                if a not in sizes or sizes[a] == 1:  # a size-1 axis splits nothing: keep specs minimal
                    continue
                if shape is not None and shape[dim] % (prod * sizes[a]):
                    continue
                kept.append(a)
                prod *= sizes[a]
            chosen = tuple(kept)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def named_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Rules = LOGICAL_RULES) -> NamedSharding:
    """NamedSharding on `mesh` for an array of `shape` whose dimensions have logical `names`."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Iterator[Mesh]:
    """Within the block, `constrain` applies sharding constraints on `mesh` resolved by `rules`."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"use_rules needs a jax.sharding.Mesh, got {type(mesh).__name__}")
    token = _ACTIVE.set((mesh, _check_rules(rules)))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_rules() -> tuple[Mesh, tuple] | None:
    """(mesh, rules) of the innermost `use_rules` block, or None outside one."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`jax.lax.with_sharding_constraint(x, <names resolved on the active mesh>)` inside `use_rules`, else x.

    Args:
      x: an array (traced or concrete).
      names: one logical axis name (or None) per dimension of x, e.g. ("batch", "length", "embed").
    """
    active = _ACTIVE.get()
    if active is None:
        return x
    names = tuple(names)
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} logical names {names} for an array of shape {tuple(x.shape)}")
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(names, x.shape, mesh, rules))
