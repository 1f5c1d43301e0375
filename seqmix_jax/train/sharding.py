"""The device mesh and the shardings of parameters, optimizer state and batches.

Mesh axes (outermost -> innermost): data, fsdp, expert, tensor (`seqmix_jax.parallel.MESH_AXES`). Sizes come
from the config with at most one -1, filled so that the product equals the device count. Meshes are built
with Auto axis types: jit places the collectives (GSPMD) from the in/out shardings and the activation
constraints, the `pjit` model.

State shardings read each `nnx.Variable`'s logical axis names (metadata `out_sharding`, set by
`seqmix_jax.layers._init.axes`) and resolve them with `seqmix_jax.parallel.logical_to_spec` (a mesh axis that
does not divide a dimension is dropped: that dimension is replicated). flax's `nnx.Optimizer` stores its
optax state as `OptVariable`s that copy the metadata of the parameter they mirror (Adam's mu/nu, MultiSteps'
accumulated gradients), so they shard exactly like their parameter; scalars (step counts) are `OptArray`s or
`OptState`s without names and are replicated.

Batches: the batch dimension is split over ("data", "fsdp", "expert") (outside MoE layers the expert axis is
one more data-parallel axis; MoE layers exchange tokens over it); every process supplies the rows its own
devices hold (`process_batch_rows`), and `shard_batch` assembles the global arrays from those host-local
pieces with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from seqmix_jax.parallel import LOGICAL_RULES, MESH_AXES, Rules, logical_to_spec

BATCH_AXES = ("data", "fsdp", "expert")  # the expert axis is data parallel outside MoE layers


def resolve_mesh_shape(sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Mesh axis sizes {data, fsdp, expert, tensor} whose product is n_devices.

    Args:
      sizes: sizes by axis name; missing axes are 1; at most one -1, filled with the remaining factor.
      n_devices: number of devices in the mesh (all processes together).
    """
    if not isinstance(n_devices, numbers.Integral) or isinstance(n_devices, bool) or n_devices <= 0:
        raise ValueError(f"n_devices must be a positive int, got {n_devices!r}")
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown} in mesh sizes {dict(sizes)}; valid axes: {MESH_AXES}")
    out = {}
    for a in MESH_AXES:
        v = sizes.get(a, 1)
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or (v <= 0 and v != -1):
            raise ValueError(f"mesh size {a}={v!r} must be a positive int or -1 (mesh sizes {dict(sizes)})")
        out[a] = int(v)
    auto = [a for a, v in out.items() if v == -1]
    if len(auto) > 1:
        raise ValueError(f"at most one mesh size may be -1, got {auto} in mesh sizes {dict(sizes)}")
    fixed = math.prod(v for v in out.values() if v != -1)
    if auto:
        if n_devices % fixed:
            raise ValueError(f"mesh sizes {dict(sizes)}: the fixed sizes multiply to {fixed}, which does not "
                             f"divide the {n_devices} devices")
        out[auto[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ValueError(f"mesh sizes {dict(sizes)} multiply to {fixed} but there are {n_devices} devices "
                         f"(use -1 for one axis to fill it automatically)")
    return out


def make_mesh(sizes: Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, expert, tensor), Auto axis types, over `devices` (default: all devices of
    all processes). jax.make_mesh orders the devices for the physical topology (TPU rings)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _mesh_size(mesh: Mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape.get(a, 1) for a in axes)


def _leaf_sharding(x, mesh: Mesh, rules: Rules):
    if isinstance(x, nnx.Variable):
        value = x.get_value()
        shape = getattr(value, "shape", None)
        names = x.get_metadata().get("out_sharding")
        if shape is None:
            return x.replace(None)
        if names and len(names) == len(shape):
            spec = logical_to_spec(names, shape, mesh, rules)
        elif names:
            raise ValueError(f"variable of shape {tuple(shape)} has {len(names)} logical axis names {tuple(names)}")
        else:
            spec = PartitionSpec()
        return x.replace(NamedSharding(mesh, spec))
    if hasattr(x, "shape"):
        return NamedSharding(mesh, PartitionSpec())
    return None


def param_shardings(state, mesh: Mesh, rules: Rules = LOGICAL_RULES):
    """NamedShardings for a state pytree: the same structure, each `nnx.Variable` replaced by a copy holding its
    NamedSharding (from its logical names; replicated without names) and each plain array leaf by a replicated
    NamedSharding. Accepts `nnx.state(model)`, `nnx.state(optimizer)`, `nnx.split(...)` states, or any mix.
    Usable as jit in/out_shardings and with `jax.device_put(state, shardings)`."""
    return jax.tree.map(lambda x: _leaf_sharding(x, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_sharded(init_fn, mesh: Mesh, rules: Rules = LOGICAL_RULES):
    """Build the nnx object(s) that `init_fn()` returns directly in their shardings, never whole on one device.

    `init_fn` takes no arguments and must be deterministic (seed its nnx.Rngs inside), e.g.
    `lambda: (model := LM(cfg, rngs=nnx.Rngs(0)), nnx.Optimizer(model, tx, wrt=nnx.Param))`.
    Returns (graphdef, state, shardings); `nnx.merge(graphdef, state)` gives the objects back."""
    graphdef, abstract = nnx.split(nnx.eval_shape(init_fn))
    shardings = param_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.split(init_fn())[1], out_shardings=shardings)()
    return graphdef, state, shardings


def abstract_state(state, mesh: Mesh, rules: Rules = LOGICAL_RULES):
    """`state` with every array replaced by a `jax.ShapeDtypeStruct` carrying its sharding (a restore target)."""
    shardings = param_shardings(state, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch dimension (the first) split over ("data", "fsdp", "expert"); other dimensions replicated."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def check_batch(global_batch: int, mesh: Mesh) -> None:
    """ValueError unless the global batch size is a positive multiple of the data-parallel size data * fsdp * expert."""
    n = _mesh_size(mesh, BATCH_AXES)
    if not isinstance(global_batch, numbers.Integral) or isinstance(global_batch, bool) or global_batch <= 0:
        raise ValueError(f"global batch size must be a positive int, got {global_batch!r}")
    if global_batch % n:
        sizes = " * ".join(f"{a}={mesh.shape.get(a, 1)}" for a in BATCH_AXES)
        raise ValueError(f"global batch size {global_batch} is not divisible by the data-parallel size "
                         f"{sizes} = {n}")


def process_batch_rows(global_batch: int, mesh: Mesh) -> tuple[int, int]:
    """(start, stop): the rows of the global batch this process must supply (its devices' batch shards).

    Processes that share batch shards (e.g. a tensor-parallel group spanning hosts) get the same rows and must
    load the same data."""
    check_batch(global_batch, mesh)
    sharding = batch_sharding(mesh)
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    rows = sorted({(idx[0].start or 0, global_batch if idx[0].stop is None else idx[0].stop)
                   for idx in index_map.values()})
    start, stop = rows[0][0], rows[-1][1]
    covered = sum(b - a for a, b in rows)
    if covered != stop - start:  # should not happen with MESH_AXES order and process-major device order
        raise ValueError(f"this process's batch shards {rows} are not contiguous; reorder the mesh devices")
    return start, stop


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, global_batch: int | None = None) -> dict:
    """Place a host-local batch (dict of arrays, rows = `process_batch_rows`) on the mesh as global arrays.

    Args:
      batch: host-local arrays, all with the same first (batch) dimension.
      mesh: the mesh.
      global_batch: the global batch size; default: local rows * number of processes holding distinct rows.
    """
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in batch.items()}
    if not sizes or None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"batch arrays must share their first (batch) dimension, got {sizes}")
    local = next(iter(sizes.values()))
    if global_batch is None:
        n = _mesh_size(mesh, BATCH_AXES)
        shards_here = {i for i, d in enumerate(_batch_shard_devices(mesh)) if d}
        global_batch = local * n // max(len(shards_here), 1)
    start, stop = process_batch_rows(global_batch, mesh)
    if stop - start != local:
        raise ValueError(f"this process must supply rows [{start}, {stop}) of the global batch {global_batch}, "
                         f"got {local} rows")
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_batch,) + np.shape(v)[1:])
            for k, v in batch.items()}


def _batch_shard_devices(mesh: Mesh) -> list[bool]:
    """For each batch shard (data, fsdp, expert) index: whether this process holds a device of it."""
    names = list(mesh.axis_names)
    devs = mesh.devices
    keep = [names.index(a) for a in BATCH_AXES if a in names]
    rest = [i for i in range(devs.ndim) if i not in keep]
    grouped = np.transpose(devs, keep + rest).reshape(math.prod(devs.shape[i] for i in keep) if keep else 1, -1)
    me = jax.process_index()
    return [any(d.process_index == me for d in row) for row in grouped]
