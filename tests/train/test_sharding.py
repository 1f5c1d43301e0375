"""Mesh and sharding: mesh sizes (auto-fill, errors), the logical rules -> PartitionSpecs for every kind of
parameter of a small hybrid LM and its optimizer state, activation constraints, batch placement, and a sharded
train step on 8 fake CPU devices (data=2, fsdp=2, tensor=2) giving the same losses as on one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from seqmix_jax.models import LM
from seqmix_jax.models.config import pattern_config
from seqmix_jax.parallel import LOGICAL_RULES, MESH_AXES, constrain, logical_to_spec, use_rules
from seqmix_jax.train.optimizer import make_optimizer
from seqmix_jax.train.sharding import (abstract_state, batch_sharding, check_batch, init_sharded, make_mesh,
                                       param_shardings, process_batch_rows, resolve_mesh_shape, shard_batch)
from tests.helpers import assert_close

DP = ("data", "fsdp")


def small_config(pattern="MA2SH"):
    # d=16 splits over fsdp=2; vocab 37 is padded to 40 so the vocabulary splits over tensor=2.
    return pattern_config(pattern, vocab_size=37, d_model=16, mlp=True, mlp_hidden=24, max_seq_len=16,
                          pad_vocab_size_multiple=8,
                          mixer_kwargs={"mamba": dict(d_state=4, dt_rank=2), "attention": dict(num_heads=2),
                                        "mamba2": dict(d_state=4, headdim=8, chunk_size=8),
                                        "striped_hyena": dict(num_heads=2), "hyena": dict(filter_order=8)})


def mesh_of(**sizes):
    return make_mesh(sizes, devices=jax.devices()[:int(np.prod(list(sizes.values())))])


def is_var(x):
    return isinstance(x, nnx.Variable)


def named_leaves(tree):
    """{'a.b.c': leaf} with Variables as leaves."""
    out = {}
    for path, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_var):
        out[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = v
    return out


# --- mesh sizes ---------------------------------------------------------------------------------------------------

def test_resolve_mesh_shape():
    assert resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == dict(data=2, fsdp=2, expert=1, tensor=2)
    assert resolve_mesh_shape({"data": -1, "tensor": 2}, 8) == dict(data=4, fsdp=1, expert=1, tensor=2)
    assert resolve_mesh_shape({"fsdp": -1}, 1) == dict(data=1, fsdp=1, expert=1, tensor=1)
    assert resolve_mesh_shape({}, 1)["data"] == 1
    with pytest.raises(ValueError, match=r"fixed sizes multiply to 3, which does not divide the 8 devices"):
        resolve_mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match=r"multiply to 4 but there are 8 devices"):
        resolve_mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match=r"at most one mesh size may be -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
        resolve_mesh_shape({"model": 2}, 2)
    with pytest.raises(ValueError, match=r"mesh size tensor=0 must be a positive int or -1"):
        resolve_mesh_shape({"tensor": 0}, 8)
    with pytest.raises(ValueError, match=r"n_devices must be a positive int"):
        resolve_mesh_shape({"data": 1}, 0)


def test_make_mesh():
    assert jax.device_count() == 8
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": -1})
    assert mesh.axis_names == MESH_AXES and dict(mesh.shape) == dict(data=2, fsdp=2, expert=1, tensor=2)
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert mesh_of(data=1).devices.size == 1
    with pytest.raises(ValueError, match=r"multiply to 2 but there are 8 devices"):
        make_mesh({"data": 2})


# --- rules ----------------------------------------------------------------------------------------------------------

def test_logical_to_spec_rules():
    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    # activations: the batch takes data+fsdp, so `embed` falls through to its replicated rule
    assert logical_to_spec(("batch", "length", "embed"), (8, 16, 16), mesh) == P(DP, None, None)
    # a mesh axis that does not divide the dimension is dropped (left to right while the product divides)
    assert logical_to_spec(("batch", "length", "embed"), (6, 16, 16), mesh) == P("data", None, None)
    assert logical_to_spec(("batch", "length", "embed"), (3, 16, 16), mesh) == P(None, None, None)
    assert logical_to_spec(("embed", "mlp"), (16, 7), mesh) == P("fsdp", None)
    assert logical_to_spec(("vocab", "embed"), (37, 16), mesh) == P(None, "fsdp")
    # mesh axes the mesh lacks are dropped; unknown logical names and None are replicated
    from jax.sharding import Mesh
    two = Mesh(np.array(jax.devices()[:2]), ("tensor",), axis_types=(AxisType.Auto,))
    assert logical_to_spec(("expert", "embed", "mlp"), (2, 16, 8), two) == P(None, None, "tensor")
    assert logical_to_spec(("not_a_name", None), (4, 4), mesh) == P(None, None)
    # custom rules: first non-colliding rule wins
    assert logical_to_spec(("a", "b"), rules=(("a", "x"), ("b", "x"), ("b", "y"))) == P("x", "y")
    with pytest.raises(ValueError, match=r"rules\[0\] must be a pair"):
        logical_to_spec(("embed",), rules=(("embed", 3),))
    with pytest.raises(ValueError, match=r"do not match the array's shape \(4, 4, 4\)"):
        logical_to_spec(("embed", "mlp"), (4, 4, 4), mesh)


# Expected spec on data=2, fsdp=2, tensor=2 for each kind of parameter of small_config(), restated by path.
EXPECTED = {
    "embed.embedding": P("tensor", "fsdp"),                     # (40, 16) vocab x embed
    "norm_f.scale": P("fsdp"),
    "blocks.0.norm.scale": P("fsdp"),
    "blocks.0.mlp_norm.scale": P("fsdp"),
    "blocks.0.mlp.gate.kernel": P("fsdp", "tensor"),           # (16, 24)
    "blocks.0.mlp.down.kernel": P("tensor", "fsdp"),
    "blocks.0.mixer.in_proj.kernel": P("fsdp", "tensor"),      # mamba (16, 64)
    "blocks.0.mixer.conv_weight": P(None, "tensor"),           # (4, 32)
    "blocks.0.mixer.x_proj.kernel": P("tensor", None),         # (32, 2 + 8)
    "blocks.0.mixer.dt_proj.kernel": P(None, "tensor"),        # (2, 32)
    "blocks.0.mixer.A_log": P("tensor", None),                 # (32, 4)
    "blocks.0.mixer.D": P("tensor"),
    "blocks.0.mixer.dt_bias": P("tensor"),
    "blocks.0.mixer.out_proj.kernel": P("tensor", "fsdp"),
    "blocks.1.mixer.q_proj.kernel": P("fsdp", "tensor"),       # attention
    "blocks.1.mixer.k_proj.kernel": P("fsdp", "tensor"),
    "blocks.1.mixer.o_proj.kernel": P("tensor", "fsdp"),
    "blocks.2.mixer.in_proj.kernel": P("fsdp", "tensor"),      # mamba2 (16, 32 + 48 + 4)
    "blocks.2.mixer.A_log": P("tensor"),                       # (4,) ssm_heads
    "blocks.2.mixer.norm_weight": P("tensor"),
    "blocks.3.mixer.poles": P("tensor", None, None),           # striped hyena (16, 1, 2)
    "blocks.3.mixer.residues": P("tensor", None, None),
    "blocks.3.mixer.projections.kernel": P("fsdp", "tensor"),
    "blocks.3.mixer.short_filter_weight": P(None, "tensor"),
    "blocks.4.mixer.in_proj.kernel": P("fsdp", "tensor"),      # hyena
    "blocks.4.mixer.in_proj.bias": P("tensor"),
    "blocks.4.mixer.out_proj.bias": P("fsdp"),
    "blocks.4.mixer.filter_fn.implicit_filter.0.kernel": P(None, None),
    "blocks.4.mixer.filter_fn.implicit_filter.3.kernel": P(None, "tensor"),
    "blocks.4.mixer.filter_fn.deltas": P("tensor"),            # a Buffer: also sharded by its names
    "blocks.4.mixer.filter_fn.pos_emb.z": P(None, None),
    "blocks.4.mixer.short_filter.weight": P(None, "tensor"),
}


def test_param_and_optimizer_shardings():
    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    model = nnx.eval_shape(lambda: LM(small_config(), rngs=nnx.Rngs(0)))  # shapes and metadata only
    used = {n for v in named_leaves(nnx.state(model)).values() for n in v.get_metadata()["out_sharding"]} - {None}
    missing = used - {name for name, _ in LOGICAL_RULES}
    assert not missing, f"logical names without a rule: {missing}"

    specs = {k: v.get_value().spec for k, v in named_leaves(param_shardings(nnx.state(model), mesh)).items()}
    for path, spec in EXPECTED.items():
        assert specs[path] == spec, (path, specs[path], spec)

    tx = make_optimizer(lr=1e-3, warmup_steps=1, total_steps=10, grad_accum_steps=2)
    opt = nnx.eval_shape(lambda: nnx.Optimizer(LM(small_config(), rngs=nnx.Rngs(0)), tx, wrt=nnx.Param))
    ospecs = {k: v.get_value().spec if is_var(v) else v.spec
              for k, v in named_leaves(param_shardings(nnx.state(opt), mesh)).items()}
    # Adam's moments and MultiSteps' accumulated gradients mirror their parameter; counters are replicated
    for path, spec in EXPECTED.items():
        if path.endswith(("deltas", "pos_emb.z")):  # Buffers: not optimized
            continue
        for k in ("opt_state.acc_grads.", "opt_state.inner_opt_state.1.0.mu.", "opt_state.inner_opt_state.1.0.nu."):
            assert ospecs[k + path] == spec, (k + path, ospecs[k + path], spec)
    scalars = {k: s for k, s in ospecs.items() if "mini_step" in k or "count" in k or k == "step"}
    assert scalars and all(s == P() for s in scalars.values()), scalars

    abstract = named_leaves(abstract_state(nnx.state(model), mesh))
    a = abstract["embed.embedding"].get_value()
    assert a.shape == (40, 16) and a.sharding.spec == P("tensor", "fsdp")


def test_param_shardings_bad_metadata():
    v = nnx.Param(jnp.zeros((2, 3)), out_sharding=("embed",), eager_sharding=False)
    with pytest.raises(ValueError, match=r"variable of shape \(2, 3\) has 1 logical axis names"):
        param_shardings({"w": v}, mesh_of(data=1))


# --- activations ------------------------------------------------------------------------------------------------

def test_constrain():
    x = jnp.arange(8 * 4 * 6, dtype=jnp.float32).reshape(8, 4, 6)
    names = ("batch", "length", "embed")
    assert constrain(x, names) is x  # no rules active: identity
    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    with use_rules(mesh):
        y = jax.jit(lambda a: constrain(a * 2, names))(x)
        with pytest.raises(ValueError, match=r"constrain: 2 logical names"):
            constrain(x, ("batch", "length"))
    assert y.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(DP, None, None)), 3), y.sharding
    np.testing.assert_array_equal(np.asarray(y), 2 * np.asarray(x))
    with pytest.raises(ValueError, match=r"use_rules needs a jax.sharding.Mesh"):
        with use_rules("mesh"):
            pass


# --- batches ------------------------------------------------------------------------------------------------------

def test_batch_placement():
    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    assert batch_sharding(mesh).spec == P(DP)
    check_batch(8, mesh)
    with pytest.raises(ValueError, match=r"global batch size 6 is not divisible by the data-parallel size "
                                         r"data=2 \* fsdp=2 \* expert=1 = 4"):
        check_batch(6, mesh)
    # the expert axis is data parallel outside MoE layers: the batch is split over it too
    ep = mesh_of(data=2, expert=2, tensor=2)
    assert batch_sharding(ep).spec == P(("data", "expert"))
    assert logical_to_spec(("batch", "length", "embed"), (8, 16, 16), ep) == P(("data", "expert"), None, None)
    with pytest.raises(ValueError, match=r"data=2 \* fsdp=1 \* expert=2 = 4"):
        check_batch(6, ep)
    with pytest.raises(ValueError, match=r"global batch size must be a positive int"):
        check_batch(0, mesh)
    assert process_batch_rows(8, mesh) == (0, 8)  # one process holds every row
    host = {"inputs": np.arange(8 * 5, dtype=np.int32).reshape(8, 5), "weights": np.ones((8, 5), np.float32)}
    placed = shard_batch(host, mesh)
    assert placed["inputs"].shape == (8, 5) and placed["inputs"].sharding.spec == P(DP)
    assert {(s.index[0].start, s.index[0].stop) for s in placed["inputs"].addressable_shards} == {
        (0, 2), (2, 4), (4, 6), (6, 8)}  # 4 row blocks, each held by the 2 tensor devices
    np.testing.assert_array_equal(np.asarray(placed["inputs"]), host["inputs"])
    with pytest.raises(ValueError, match=r"must share their first \(batch\) dimension"):
        shard_batch({"a": np.zeros((8, 2)), "b": np.zeros((4, 2))}, mesh)
    with pytest.raises(ValueError, match=r"must supply rows \[0, 16\) of the global batch 16, got 8 rows"):
        shard_batch(host, mesh, global_batch=16)


# --- the sharded train step ----------------------------------------------------------------------------------

def make_train_step(graphdef, shardings, mesh):
    """loss + grad + optimizer update on (model, optimizer) state, jitted with explicit in/out shardings."""

    def step(state, batch):
        model, opt = nnx.merge(graphdef, state)

        def loss_fn(m):
            logits = m(batch["inputs"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            return jnp.sum(ce * batch["weights"]) / jnp.sum(batch["weights"])

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    replicated = jax.sharding.NamedSharding(mesh, P())
    data = {k: batch_sharding(mesh) for k in ("inputs", "targets", "weights")}
    return jax.jit(step, in_shardings=(shardings, data), out_shardings=(shardings, replicated), donate_argnums=0)


def run_steps(mesh, batches, pattern):
    def init():
        model = LM(small_config(pattern), rngs=nnx.Rngs(0))
        tx = make_optimizer(lr=3e-3, warmup_steps=1, total_steps=3, weight_decay=0.1, clip_norm=1.0)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    graphdef, state, shardings = init_sharded(init, mesh)  # created sharded (jit with out_shardings)
    with use_rules(mesh):  # active while the step traces: activations constrained at block boundaries
        step = make_train_step(graphdef, shardings, mesh)
        losses = []
        for b in batches:
            state, loss = step(state, shard_batch(b, mesh))
            losses.append(float(loss))
    return np.array(losses), state


@pytest.mark.parametrize("pattern", ["2A", pytest.param("MA2SH", marks=pytest.mark.slow)])
def test_sharded_step_matches_single_device(rng, pattern):
    b, l, v = 8, 16, 37
    batches = []
    for _ in range(2):
        ids = rng.integers(0, v, (b, l + 1)).astype(np.int32)
        batches.append({"inputs": ids[:, :-1], "targets": ids[:, 1:],
                        "weights": (rng.random((b, l)) < 0.8).astype(np.float32)})
    batches.append(batches[0])  # seen again after two updates: its loss must have dropped
    one, state1 = run_steps(mesh_of(data=1), batches, pattern)
    eight, state8 = run_steps(mesh_of(data=2, fsdp=2, tensor=2), batches, pattern)
    print("losses 1 device", one, "8 devices", eight)
    assert np.all(np.isfinite(one)) and one[2] < one[0]
    assert_close("losses 8 vs 1 device", eight, one, 1e-5)

    leaves1, leaves8 = named_leaves(state1), named_leaves(state8)
    w = leaves8["0.blocks.0.mlp.gate.kernel"].get_value()
    assert w.sharding.spec == P("fsdp", "tensor") and w.addressable_shards[0].data.shape == (8, 12)
    mu = leaves8["1.opt_state.1.0.mu.blocks.1.mixer.q_proj.kernel"].get_value()
    assert mu.sharding.spec == P("fsdp", "tensor") and mu.addressable_shards[0].data.shape == (8, 8)
    emb = leaves8["0.embed.embedding"].get_value()
    assert emb.sharding.spec == P("tensor", "fsdp") and emb.addressable_shards[0].data.shape == (20, 8)
    for k in leaves1:
        a1 = leaves1[k].get_value() if is_var(leaves1[k]) else leaves1[k]
        a8 = leaves8[k].get_value() if is_var(leaves8[k]) else leaves8[k]
        if np.ndim(a1) >= 1 and np.issubdtype(np.asarray(a1).dtype, np.floating) and "opt_state" not in k:
            assert_close(f"{k} after 3 steps", a8, a1, 1e-4)
