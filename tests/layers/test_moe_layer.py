"""seqmix_jax.layers.MoE: the layer against a numpy float64 restatement (router, experts, shared expert) on its own
parameters; parameter shapes and logical axes; padding through segment_ids; sown statistics and pop_moe_stats order;
jax.jit / nnx.jit / bfloat16; gradients of every dispatch path equal; step == call; the expert-parallel modes under
an ambient mesh (8 fake CPU devices) == the local layer; every ValueError."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from seqmix_jax.layers import MoE, pop_moe_stats
from seqmix_jax.layers import moe as moe_layer_module
from seqmix_jax.ops.moe import MoEStats
from seqmix_jax.parallel import MESH_AXES, use_rules
from tests.helpers import assert_close
from tests.ops.test_moe import np_moe, np_route, np_stats

OUT_TOL, GRAD_TOL = 1e-5, 1e-4
B, L, D, H, E, K = 3, 5, 13, 11, 7, 2


def layer(**kw):
    args = dict(d_model=D, hidden=H, num_experts=E, top_k=K)
    args.update(kw)
    return MoE(args.pop("d_model"), args.pop("hidden"), args.pop("num_experts"), args.pop("top_k"), **args,
               rngs=nnx.Rngs(0))


def np_layer(m: MoE, x, renormalize=True, scoring="softmax"):
    xt = np.asarray(x, np.float64).reshape(-1, m.d_model)
    _, _, w, experts = np_route(xt, np.asarray(m.router.kernel[...]), m.top_k, scoring, renormalize)
    y = np_moe(xt, w, experts, np.asarray(m.wi[...]), np.asarray(m.wo[...]))
    if m.shared is not None:
        g = xt @ np.asarray(m.shared.gate.kernel[...], np.float64)
        u = xt @ np.asarray(m.shared.up.kernel[...], np.float64)
        y += (g / (1 + np.exp(-g)) * u) @ np.asarray(m.shared.down.kernel[...], np.float64)
    return y.reshape(x.shape)


@pytest.mark.parametrize("dispatch", ["reference", "dropless", "capacity"])
def test_layer_vs_numpy(rng, dispatch):
    m = layer(dispatch=dispatch, capacity_factor=E / K, shared_hidden=9)
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    y = m(jnp.asarray(x))
    assert y.shape == (B, L, D)
    assert_close(f"MoE {dispatch} (+ shared)", y, np_layer(m, x), OUT_TOL)
    (stats,) = pop_moe_stats(m)
    assert float(stats.drop_fraction) == 0.0


def test_layer_no_renormalize_sigmoid(rng):
    m = layer(renormalize=False, scoring="sigmoid")
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    assert_close("MoE sigmoid, no renormalize", m(jnp.asarray(x)), np_layer(m, x, False, "sigmoid"), OUT_TOL)


def test_params_and_axes():
    m = layer(shared_hidden=9)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    want = {"router.kernel": ((D, E), ("embed", None)), "wi": ((E, D, 2 * H), ("expert", "embed", "mlp")),
            "wo": ((E, H, D), ("expert", "mlp", "embed")), "shared.gate.kernel": ((D, 9), ("embed", "mlp")),
            "shared.up.kernel": ((D, 9), ("embed", "mlp")), "shared.down.kernel": ((9, D), ("mlp", "embed"))}
    assert set(flat) == set(want)
    for name, (shape, names) in want.items():
        assert flat[name][...].shape == shape and flat[name][...].dtype == jnp.float32, name
        assert tuple(flat[name].get_metadata()["out_sharding"]) == names, name
    assert not hasattr(layer(), "shared") or layer().shared is None


def test_segment_ids_padding(rng):
    """Segment 0 is padding: y there is the shared expert alone (0 without one), the other tokens are unchanged and
    the statistics are those of the real tokens only."""
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    seg = np.ones((B, L), np.int32)
    seg[0, 3:] = 0
    seg[2, :2] = 0
    seg[1, 1] = 2
    for dispatch in ("dropless", "capacity"):
        m = layer(dispatch=dispatch, capacity_factor=E / K)
        y = np.asarray(m(jnp.asarray(x), segment_ids=jnp.asarray(seg)))
        (s,) = pop_moe_stats(m)
        full = np.asarray(m(jnp.asarray(x)))
        pop_moe_stats(m)
        assert np.abs(y[seg == 0]).max() == 0.0
        np.testing.assert_allclose(y[seg != 0], full[seg != 0], rtol=1e-6, atol=1e-7)
        xt = x.reshape(-1, D).astype(np.float64)
        logits, p, _, experts = np_route(xt, np.asarray(m.router.kernel[...]), K)
        lb, z, counts = np_stats(logits, p, experts, E, (seg != 0).reshape(-1))
        assert_close(f"{dispatch} padded lb", s.load_balance_loss, lb, OUT_TOL)
        assert_close(f"{dispatch} padded z", s.z_loss, z, OUT_TOL)
        np.testing.assert_array_equal(np.asarray(s.tokens_per_expert), counts)
    m = layer(shared_hidden=9)
    y = np.asarray(m(jnp.asarray(x), segment_ids=jnp.asarray(seg)))
    shared = np.asarray(m.shared(jnp.asarray(x)))
    np.testing.assert_allclose(y[seg == 0], shared[seg == 0], rtol=1e-6, atol=1e-7)


class Stack(nnx.Module):
    """n MoE layers choosing 1..n of 12 experts: the number of routed pairs (tokens x top_k) tells the layers apart;
    equal parameter shapes keep the eager init cheap."""

    def __init__(self, n: int):
        self.blocks = nnx.List([MoE(8, 6, 12, 1 + i, rngs=nnx.Rngs(i)) for i in range(n)])

    def __call__(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def test_pop_order_is_layer_order():
    """11 layers (a string sort of the indices would put 10 before 2); values recorded without running them, on
    abstract parameters (nnx.eval_shape: nothing to compute)."""
    model = nnx.eval_shape(lambda: Stack(11))
    for i, b in enumerate(model.blocks):
        b._record(MoEStats(*(jnp.float32(i),) * 3, jnp.full((12,), i, jnp.float32)))
    assert [float(s.z_loss) for s in pop_moe_stats(model)] == list(range(11))
    assert pop_moe_stats(model) == []


def test_stats_sown_pop_and_jit(rng):
    x = jnp.asarray(rng.normal(size=(2, 3, 8)).astype(np.float32))
    model = Stack(3)
    nnx.jit(lambda m, x: m(x))(model, x)
    stats = pop_moe_stats(model)
    assert [int(s.tokens_per_expert.sum()) for s in stats] == [6, 12, 18]
    assert pop_moe_stats(model) == []
    # jax.jit over split / merge; the statistics leave the jitted function as outputs.
    m = model.blocks[1]
    y = m(x)
    (want,) = pop_moe_stats(m)
    gdef, state = nnx.split(m)

    def f(state, x):
        mm = nnx.merge(gdef, state)
        return mm(x), pop_moe_stats(mm)

    y_jax, (got,) = jax.jit(f)(state, x)
    np.testing.assert_allclose(np.asarray(y_jax), np.asarray(y), rtol=1e-6, atol=1e-6)
    for name, a, b in zip(want._fields, got, want):
        assert_close(f"jax.jit {name}", a, b, OUT_TOL)
    # Two calls: the last one's statistics in one nnx.Intermediate (nothing piles up), which nnx.pop sees as well.
    m(x)
    m(x[:1])
    popped = nnx.to_flat_state(nnx.pop(m, nnx.Intermediate))
    assert [p for p, _ in popped] == [("moe_stats",)] and len(popped[0][1].get_value()) == 1
    assert int(popped[0][1].get_value()[0].tokens_per_expert.sum()) == 3 * 2  # x[:1]: 3 tokens, top-2
    assert pop_moe_stats(m) == []


def test_bfloat16_compute(rng):
    x = jnp.asarray(rng.normal(size=(B, L, D)).astype(np.float32))
    ref = layer(shared_hidden=9)(x)
    for dispatch in ("dropless", "capacity"):
        m = layer(dispatch=dispatch, capacity_factor=E / K, shared_hidden=9, dtype=jnp.bfloat16)
        y = nnx.jit(lambda m, x: m(x))(m, x)
        (s,) = pop_moe_stats(m)
        assert y.dtype == jnp.bfloat16 and m.wi[...].dtype == jnp.float32 and s.z_loss.dtype == jnp.float32
        assert_close(f"bf16 layer {dispatch}", y, ref, 3e-2)


def test_gradients_of_all_paths_equal(rng):
    x = jnp.asarray(rng.normal(size=(B, L, D)).astype(np.float32))
    ct = jnp.asarray(rng.normal(size=(B, L, D)).astype(np.float32))

    def grads(dispatch):
        m = layer(dispatch=dispatch, capacity_factor=E / K, shared_hidden=9)

        def loss(m, x):
            y = m(x)
            (s,) = pop_moe_stats(m)
            return jnp.sum(y * ct) + 0.3 * s.load_balance_loss + 0.05 * s.z_loss

        gm, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(m, x)
        return {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(gm)}, gx

    ref, gx_ref = grads("reference")
    assert np.abs(np.asarray(ref["router.kernel"])).max() > 0
    for dispatch in ("dropless", "capacity"):
        got, gx = grads(dispatch)
        assert set(got) == set(ref)
        assert_close(f"{dispatch} dx", gx, gx_ref, GRAD_TOL)
        for name in sorted(ref):
            assert_close(f"{dispatch} d{name}", got[name], ref[name], GRAD_TOL)


def test_step_equals_call(rng):
    m = layer()
    x = jnp.asarray(rng.normal(size=(B, D)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(m.step(x)), np.asarray(m(x[:, None])[:, 0]))


def _mesh(**sizes):
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@pytest.mark.parametrize("mode", ["all_to_all", "all_gather"])
def test_expert_parallel_layer(rng, mode, monkeypatch):
    """Under use_rules(mesh data=2 x expert=4) the layer exchanges tokens over "expert" (read at trace time) and
    equals the local layer in output, statistics and gradients; a mesh whose expert axis is 1 runs the local path."""
    assert jax.device_count() == 8
    x = jnp.asarray(rng.normal(size=(8, 4, 16)).astype(np.float32))
    ct = jnp.asarray(rng.normal(size=(8, 4, 16)).astype(np.float32))
    local = MoE(16, 12, 8, 2, dispatch="capacity", capacity_factor=4.0, rngs=nnx.Rngs(0))
    ep = MoE(16, 12, 8, 2, dispatch="capacity", capacity_factor=4.0, expert_parallel=mode, rngs=nnx.Rngs(0))

    def loss(m, x):
        y = m(x)
        (s,) = pop_moe_stats(m)
        return jnp.sum(y * ct) + 0.3 * s.load_balance_loss, (y, s)

    step = nnx.jit(nnx.grad(loss, has_aux=True))
    g_ref, (y_ref, s_ref) = step(local, x)
    with use_rules(_mesh(data=2, expert=4)):
        g, (y, s) = nnx.jit(nnx.grad(loss, has_aux=True))(ep, x)
    assert_close(f"EP layer {mode} y", y, y_ref, OUT_TOL)
    assert_close(f"EP layer {mode} lb", s.load_balance_loss, s_ref.load_balance_loss, OUT_TOL)
    assert float(s.drop_fraction) == 0.0
    ref = dict(nnx.to_flat_state(g_ref))
    for p, v in nnx.to_flat_state(g):
        assert_close(f"EP layer {mode} d{'.'.join(map(str, p))}", v[...], ref[p][...], GRAD_TOL)
    with use_rules(_mesh(data=8)):
        y1 = nnx.jit(lambda m, x: m(x))(ep, x)
    assert_close(f"expert axis 1 {mode}", y1, y_ref, OUT_TOL)
    # A decode step of batch 2 does not split over 8 token shards: the local path runs, with a warning (once).
    monkeypatch.setattr(moe_layer_module, "_WARNED", set())
    with use_rules(_mesh(data=2, expert=4)), pytest.warns(UserWarning, match=r"2 tokens do not split over the 8"):
        y2 = nnx.jit(lambda m, x: m.step(x))(ep, x[:2, 0])
    assert_close(f"unsplittable step {mode}", y2, nnx.jit(lambda m, x: m.step(x))(local, x[:2, 0]), OUT_TOL)


def test_errors():
    with pytest.raises(ValueError, match=r"top_k=8 must be <= num_experts=7"):
        layer(top_k=8)
    with pytest.raises(ValueError, match=r"capacity_factor must be a finite number > 0 .* got 0"):
        layer(dispatch="capacity", capacity_factor=0)
    with pytest.raises(ValueError, match=r"capacity_factor must be a finite number > 0 .* got -1.0"):
        layer(dispatch="capacity", capacity_factor=-1.0)
    layer(dispatch="dropless", capacity_factor=0)  # only the capacity path uses it
    with pytest.raises(ValueError, match=r"dispatch must be one of .* got 'megablocks'"):
        layer(dispatch="megablocks")
    with pytest.raises(ValueError, match=r"scoring must be one of .* got 'tanh'"):
        layer(scoring="tanh")
    with pytest.raises(ValueError, match=r"activation must be one of .* got 'relu'"):
        layer(activation="relu")
    with pytest.raises(ValueError, match=r"expert_parallel must be None or one of .* got 'ring'"):
        layer(expert_parallel="ring")
    with pytest.raises(ValueError, match=r"dispatch='reference' has no expert-parallel path"):
        layer(dispatch="reference", expert_parallel="all_to_all")
    with pytest.raises(ValueError, match=r"num_experts must be a positive int, got 0"):
        layer(num_experts=0)
    with pytest.raises(ValueError, match=r"shared_hidden must be a positive int, got 0"):
        layer(shared_hidden=0)
    m = layer()
    with pytest.raises(ValueError, match=rf"x must have shape \(b, l, d_model={D}\), got \(2, 5, 12\)"):
        m(jnp.zeros((2, 5, D - 1)))
    with pytest.raises(ValueError, match=rf"x must have shape \(b, l, d_model={D}\), got \(5, {D}\)"):
        m(jnp.zeros((5, D)))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(b, l\) = \(2, 5\), got \(2, 4\)"):
        m(jnp.zeros((2, 5, D)), segment_ids=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=rf"step expects x of shape \(b, d_model={D}\)"):
        m.step(jnp.zeros((2, 1, D)))
    ep = layer(expert_parallel="all_to_all")  # 7 experts on an expert axis of 4
    with use_rules(_mesh(data=2, expert=4)):
        with pytest.raises(ValueError, match=r"num_experts=7 must be divisible by the expert-parallel size expert=4"):
            ep(jnp.zeros((8, 2, D)))
