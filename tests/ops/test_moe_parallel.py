"""seqmix_jax.ops.moe_parallel on 8 fake CPU devices (tests/conftest.py sets the device count before JAX starts,
the same harness as tests/train/test_sharding.py).

Checks: with capacity enough that nothing drops, the all_to_all and all_gather expert-parallel paths equal the
single-device reference path in outputs, statistics and gradients (input, router, experts, through the output and
the auxiliary losses); with fully skewed routing, the dropped pairs follow the per-shard (all_to_all) and
per-group (all_gather) capacity rule and the drop fraction is the global one; every ValueError.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from seqmix_jax.ops.moe import moe_ffn, route
from seqmix_jax.ops.moe_parallel import moe_ffn_expert_parallel
from seqmix_jax.parallel import MESH_AXES
from tests.helpers import assert_close
from tests.ops.test_moe import make, np_moe, np_route

OUT_TOL, GRAD_TOL = 1e-5, 1e-4
T, D, E, F, K = 64, 12, 8, 10, 2


def mesh_of(**sizes):
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=jax.devices()[:math.prod(shape)])


def _value_and_grad(ffn, args, ct):
    def loss(x, wr, wi, wo):
        r = route(x, wr, top_k=K)
        y, s = ffn(x, r, wi, wo)
        return jnp.sum(y * ct) + 0.3 * s.load_balance_loss + 0.05 * s.z_loss, (y, s)

    (_, (y, s)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    return y, s, g


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    args = make(rng, t=T, d=D, e=E, f=F)
    ct = rng.normal(size=(T, D)).astype(np.float32)
    ref = _value_and_grad(lambda x, r, wi, wo: moe_ffn(x, r, wi, wo, dispatch="reference"), args, ct)
    return args, ct, ref


EP_CASES = [
    pytest.param(dict(data=2, expert=4), "all_to_all", "capacity", id="data2-expert4-all_to_all-capacity"),
    pytest.param(dict(data=2, expert=4), "all_to_all", "dropless", id="data2-expert4-all_to_all-dropless"),
    pytest.param(dict(data=2, expert=4), "all_gather", "capacity", id="data2-expert4-all_gather-capacity"),
    pytest.param(dict(data=2, expert=4), "all_gather", "dropless", id="data2-expert4-all_gather-dropless"),
    pytest.param(dict(expert=8), "all_to_all", "capacity", id="expert8-all_to_all-capacity"),
    pytest.param(dict(expert=8), "all_gather", "dropless", id="expert8-all_gather-dropless",
                 marks=pytest.mark.slow),
    pytest.param(dict(fsdp=2, expert=2, tensor=2), "all_to_all", "capacity", id="fsdp2-expert2-tensor2-a2a"),
    pytest.param(dict(fsdp=2, expert=2, tensor=2), "all_gather", "capacity", id="fsdp2-expert2-tensor2-ag",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("sizes,mode,dispatch", EP_CASES)
def test_expert_parallel_equals_single_device(case, sizes, mode, dispatch):
    assert jax.device_count() == 8
    args, ct, (y_ref, s_ref, g_ref) = case
    mesh = mesh_of(**sizes)

    def ffn(x, r, wi, wo):  # capacity_factor e / k: c = all tokens of the shard (group), nothing can drop
        return moe_ffn_expert_parallel(x, r, wi, wo, mesh=mesh, mode=mode, dispatch=dispatch, capacity_factor=E / K)

    y, s, g = _value_and_grad(ffn, args, ct)
    name = f"{sizes} {mode} {dispatch}"
    assert_close(f"{name} y", y, y_ref, OUT_TOL)
    assert float(s.drop_fraction) == 0.0
    assert_close(f"{name} load_balance_loss", s.load_balance_loss, s_ref.load_balance_loss, OUT_TOL)
    assert_close(f"{name} z_loss", s.z_loss, s_ref.z_loss, OUT_TOL)
    np.testing.assert_array_equal(np.asarray(s.tokens_per_expert), np.asarray(s_ref.tokens_per_expert))
    for pname, a, b in zip(("x", "router_kernel", "wi", "wo"), g, g_ref):
        assert_close(f"{name} d{pname}", a, b, GRAD_TOL)


def _skewed(seed):
    """Inputs whose router sends every token's first choice to expert 0 and its second to expert 1."""
    x, wr, wi, wo = make(np.random.default_rng(seed), t=T, d=D, e=E, f=F)
    x[:, 0] = np.abs(x[:, 0]) + 1.0
    wr[:] = 0.0
    wr[0, 0], wr[0, 1] = 20.0, 10.0
    _, _, w, experts = np_route(x, wr, K)
    return x, wr, wi, wo, w, experts


@pytest.mark.parametrize("mode", ["all_to_all", "all_gather"])
def test_expert_parallel_drops(mode):
    """Every token picks (expert 0, expert 1). data=2 x expert=4: 8 token shards of t_loc = 8 rows, each expert
    row-block of 4 shards (32 rows) forms an all_gather group.
      all_to_all: c = ceil(8 * 2 / 8 * 1.0) = 2 slots per expert and shard: the first 2 tokens of every shard
                  keep both choices;
      all_gather: c = ceil(32 * 2 / 8 * 1.0) = 8 slots per expert and group: the first 8 tokens of each group do.
    Either way 96 of the 128 pairs drop."""
    x, wr, wi, wo, w, experts = _skewed(1)
    assert (experts == [0, 1]).all()
    mesh = mesh_of(data=2, expert=4)
    keep = np.zeros((T, K), bool)
    block, kept = (8, 2) if mode == "all_to_all" else (32, 8)
    for start in range(0, T, block):
        keep[start:start + kept] = True

    def fn(x, wr, wi, wo):
        r = route(x, wr, top_k=K)
        return moe_ffn_expert_parallel(x, r, wi, wo, mesh=mesh, mode=mode, dispatch="capacity", capacity_factor=1.0)

    y, s = jax.jit(fn)(x, wr, wi, wo)
    hlo = jax.jit(fn).lower(x, wr, wi, wo).compile().as_text()
    wanted = ("all-to-all",) if mode == "all_to_all" else ("all-gather", "reduce-scatter")
    assert all(op in hlo for op in wanted), f"{mode}: {wanted} not in the compiled program"
    print(f"{mode}: drop_fraction {float(s.drop_fraction)}")
    assert math.isclose(float(s.drop_fraction), 96 / 128, rel_tol=1e-6)
    assert_close(f"{mode} skewed y", y, np_moe(x, w, experts, wi, wo, keep), OUT_TOL)


def test_expert_parallel_dropless_on_skewed_routing():
    x, wr, wi, wo, w, experts = _skewed(2)
    mesh = mesh_of(data=2, expert=4)
    want = np_moe(x, w, experts, wi, wo)
    for mode in ("all_to_all", "all_gather"):
        fn = lambda x, wr, wi, wo: moe_ffn_expert_parallel(x, route(x, wr, top_k=K), wi, wo, mesh=mesh,  # noqa: E731
                                                           mode=mode, dispatch="dropless")
        y, s = jax.jit(fn)(x, wr, wi, wo)
        assert float(s.drop_fraction) == 0.0
        assert_close(f"{mode} dropless skewed y", y, want, OUT_TOL)


def test_expert_parallel_token_mask():
    rng = np.random.default_rng(3)
    x, wr, wi, wo = (jnp.asarray(a) for a in make(rng, t=T, d=D, e=E, f=F))
    mask = jnp.asarray(rng.uniform(size=T) < 0.6)
    mesh = mesh_of(data=2, expert=4)
    r = route(x, wr, top_k=K)
    y_ref, s_ref = moe_ffn(x, r, wi, wo, dispatch="reference", token_mask=mask)
    y, s = jax.jit(lambda x, r: moe_ffn_expert_parallel(x, r, wi, wo, mesh=mesh, mode="all_to_all",
                                                        capacity_factor=E / K, token_mask=mask))(x, r)
    assert_close("masked EP y", y, y_ref, OUT_TOL)
    assert_close("masked EP lb", s.load_balance_loss, s_ref.load_balance_loss, OUT_TOL)
    np.testing.assert_array_equal(np.asarray(s.tokens_per_expert), np.asarray(s_ref.tokens_per_expert))


def test_errors():
    rng = np.random.default_rng(4)
    x, wr, wi, wo = (jnp.asarray(a) for a in make(rng, t=T, d=D, e=E, f=F))
    r = route(x, wr, top_k=K)
    mesh = mesh_of(data=2, expert=4)
    kw = dict(mesh=mesh)
    with pytest.raises(ValueError, match=r"num_experts=6 must be divisible by the expert-parallel size expert=4"):
        r6 = route(x, wr[:, :6], top_k=K)
        moe_ffn_expert_parallel(x, r6, wi[:6], wo[:6], **kw)
    with pytest.raises(ValueError, match=r"the number of tokens t=60 must be divisible by the 8 token shards"):
        moe_ffn_expert_parallel(x[:60], route(x[:60], wr, top_k=K), wi, wo, **kw)
    with pytest.raises(ValueError, match=r"expert-parallel mode must be one of .* got 'ring'"):
        moe_ffn_expert_parallel(x, r, wi, wo, mode="ring", **kw)
    with pytest.raises(ValueError, match=r"dispatch='reference' has no expert-parallel path"):
        moe_ffn_expert_parallel(x, r, wi, wo, dispatch="reference", **kw)
    with pytest.raises(ValueError, match=r"capacity_factor must be a finite number > 0 .* got 0"):
        moe_ffn_expert_parallel(x, r, wi, wo, capacity_factor=0, **kw)
    with pytest.raises(ValueError, match=r"expert_axis='experts' is not an axis of the mesh"):
        moe_ffn_expert_parallel(x, r, wi, wo, expert_axis="experts", **kw)
    with pytest.raises(ValueError, match=r"token_axes=\('data',\) must include expert_axis='expert'"):
        moe_ffn_expert_parallel(x, r, wi, wo, token_axes=("data",), **kw)
    with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh, got dict"):
        moe_ffn_expert_parallel(x, r, wi, wo, mesh={"expert": 4})
    with pytest.raises(ValueError, match=r"wo must have shape"):
        moe_ffn_expert_parallel(x, r, wi, wo[:, :3], **kw)
