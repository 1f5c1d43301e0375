"""MoE against transformers' `MixtralSparseMoeBlock` (top-k renormalized) and `JambaSparseMoeBlock` (top-k left
unnormalized), same random weights, every dispatch path: outputs and gradients (input, router, fused experts) in
float32; the load-balancing loss vs transformers' `load_balancing_loss_func` for one layer (with and without an
attention mask) and the z-loss vs Switch Transformers' `router_z_loss_func`.

Weight map: router.kernel = gate.weight^T (Mixtral) / router.weight^T (Jamba); wi = experts.gate_up_proj
transposed to (e, d, 2f); wo = experts.down_proj transposed to (e, f, d).

Tolerances (never loosened): outputs max|ours - ref| / max|ref| <= 1e-5, gradients <= 1e-4.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix_jax.layers.moe import MoE, pop_moe_stats
from tests.helpers import assert_close
from tests.parity import torch_refs

OUT_TOL, GRAD_TOL = 1e-5, 1e-4
B, L, D, F, E, K = 2, 9, 13, 11, 7, 2
ROUTER_KEY = {"mixtral": "gate.weight", "jamba": "router.weight"}


def torch_block(kind: str):
    torch = torch_refs.torch()
    if kind == "mixtral":
        hf = torch_refs.require("transformers.models.mixtral.modeling_mixtral")
        cfg = hf.MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K,
                               hidden_act="silu", router_jitter_noise=0.0)
        block = hf.MixtralSparseMoeBlock(cfg)
    else:
        hf = torch_refs.require("transformers.models.jamba.modeling_jamba")
        cfg = hf.JambaConfig(hidden_size=D, intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                             hidden_act="silu")
        block = hf.JambaSparseMoeBlock(cfg)
    gen = torch.Generator().manual_seed(7 if kind == "mixtral" else 8)
    scale = {ROUTER_KEY[kind]: 2.0 / np.sqrt(D), "experts.gate_up_proj": 1 / np.sqrt(D),
             "experts.down_proj": 1 / np.sqrt(F)}
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale[name])  # the blocks start from torch.empty
    return block.eval()


def ours(kind: str, block, dispatch: str) -> MoE:
    sd = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    assert set(sd) == {ROUTER_KEY[kind], "experts.gate_up_proj", "experts.down_proj"}
    m = MoE(D, F, E, K, dispatch=dispatch, capacity_factor=E / K, renormalize=(kind == "mixtral"),
            rngs=nnx.Rngs(0))
    m.router.kernel[...] = jnp.asarray(sd[ROUTER_KEY[kind]].T)
    m.wi[...] = jnp.asarray(sd["experts.gate_up_proj"].transpose(0, 2, 1))
    m.wo[...] = jnp.asarray(sd["experts.down_proj"].transpose(0, 2, 1))
    return m


@pytest.fixture(scope="module", params=["mixtral", "jamba"])
def ref(request):
    """The torch block, an input, a cotangent, and the torch output and gradients."""
    torch = torch_refs.torch()
    kind = request.param
    block = torch_block(kind)
    rng = np.random.default_rng(11)
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    ct = rng.normal(size=(B, L, D)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    y = block(xt)
    params = dict(block.named_parameters())
    grads = torch.autograd.grad(y, [xt, *params.values()], torch.tensor(ct))
    g = {k: v.numpy() for k, v in zip(["x", *params], grads)}
    return kind, block, x, ct, y.detach().numpy(), g


@pytest.mark.parametrize("dispatch", ["reference", "dropless", "capacity"])
def test_outputs_and_gradients(ref, dispatch):
    kind, block, x, ct, y_ref, g_ref = ref
    m = ours(kind, block, dispatch)

    def loss(m, x):
        y = m(x)
        pop_moe_stats(m)
        return jnp.sum(y * ct), y

    (gm, gx), y = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))(m, jnp.asarray(x))
    assert_close(f"{kind} {dispatch} y", y, y_ref, OUT_TOL)
    assert_close(f"{kind} {dispatch} dx", gx, g_ref["x"], GRAD_TOL)
    assert_close(f"{kind} {dispatch} d{ROUTER_KEY[kind]}", np.asarray(gm["router"]["kernel"][...]).T,
                 g_ref[ROUTER_KEY[kind]], GRAD_TOL)
    assert_close(f"{kind} {dispatch} dgate_up_proj", np.asarray(gm["wi"][...]).transpose(0, 2, 1),
                 g_ref["experts.gate_up_proj"], GRAD_TOL)
    assert_close(f"{kind} {dispatch} ddown_proj", np.asarray(gm["wo"][...]).transpose(0, 2, 1),
                 g_ref["experts.down_proj"], GRAD_TOL)


def test_aux_losses_vs_transformers(ref):
    torch = torch_refs.torch()
    kind, block, x, *_ = ref
    mix = torch_refs.require("transformers.models.mixtral.modeling_mixtral")
    switch = torch_refs.require("transformers.models.switch_transformers.modeling_switch_transformers")
    router = block.gate if kind == "mixtral" else block.router
    with torch.no_grad():
        logits = router(torch.tensor(x).reshape(-1, D))[0]
    mask = np.ones((B, L), np.int64)
    mask[0, 6:] = 0
    mask[1, :2] = 0
    m = ours(kind, block, "dropless")
    for attn in (None, mask):
        m(jnp.asarray(x), segment_ids=None if attn is None else jnp.asarray(attn, jnp.int32))
        (s,) = pop_moe_stats(m)
        want = mix.load_balancing_loss_func((logits,), E, K, None if attn is None else torch.tensor(attn))
        label = "no mask" if attn is None else "masked"
        assert_close(f"{kind} load_balance_loss ({label})", s.load_balance_loss, float(want), OUT_TOL)
        keep = np.ones(B * L, bool) if attn is None else attn.reshape(-1).astype(bool)
        z = switch.router_z_loss_func(logits[torch.tensor(keep)][None])
        assert_close(f"{kind} z_loss ({label})", s.z_loss, float(z), OUT_TOL)
