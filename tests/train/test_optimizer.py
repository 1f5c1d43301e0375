"""Optimizer: the lr schedule against its formula, AdamW + clipping + masked decay against a float64 numpy
restatement, the weight-decay mask on a real hybrid LM's parameter paths (through nnx.Optimizer), gradient
accumulation == one big batch, and the argument errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix_jax.models import LM
from seqmix_jax.models.config import pattern_config
from seqmix_jax.train.optimizer import decay_mask, make_optimizer, make_schedule
from tests.helpers import assert_close

HP = dict(lr=2e-2, warmup_steps=2, total_steps=6, min_lr_ratio=0.25, b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.3)


def lr_formula(s, lr, warmup, total, r):
    """The schedule restated: linear warmup lr (s + 1) / warmup, then cosine from lr to r lr at `total`."""
    if s < warmup:
        return lr * (s + 1) / warmup
    t = min(max((s - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * t)))


def test_schedule_values():
    sched = make_schedule(lr=1e-3, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    for s in (0, 1, 3, 4, 5, 12, 19, 20, 35):
        ours, ref = float(sched(s)), lr_formula(s, 1e-3, 4, 20, 0.1)
        print(f"step {s}: lr {ours:.6e} (formula {ref:.6e})")
        assert ours == pytest.approx(ref, rel=1e-6)
    assert float(sched(0)) == pytest.approx(2.5e-4) and float(sched(4)) == pytest.approx(1e-3)
    assert float(sched(20)) == pytest.approx(1e-4) and float(sched(100)) == pytest.approx(1e-4)
    no_warmup = make_schedule(lr=1.0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0)
    assert float(no_warmup(0)) == pytest.approx(1.0) and float(no_warmup(5)) == pytest.approx(0.5)
    assert float(jax.jit(no_warmup)(jnp.int32(10))) == pytest.approx(0.0, abs=1e-7)


# --- AdamW + clipping + mask vs numpy --------------------------------------------------------------------------

def numpy_adamw(params, grads_seq, *, lr, warmup_steps, total_steps, min_lr_ratio, b1, b2, eps, weight_decay,
                clip_norm, decayed):
    """Decoupled AdamW (optax/PyTorch convention: eps outside the sqrt, bias-corrected moments, decay scaled
    by the scheduled lr) after global-norm clipping, float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for step, grads in enumerate(grads_seq):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        if clip_norm and norm > clip_norm:
            g = {k: x * clip_norm / norm for k, x in g.items()}
        t = step + 1
        lr_t = lr_formula(step, lr, warmup_steps, total_steps, min_lr_ratio)
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            u = (m[k] / (1 - b1 ** t)) / (np.sqrt(v2[k] / (1 - b2 ** t)) + eps)
            if decayed[k]:
                u = u + weight_decay * p[k]
            p[k] = p[k] - lr_t * u
    return p


@pytest.mark.parametrize("clip_norm", [0.5, None])
def test_adamw_matches_numpy(rng, clip_norm):
    params = {"dense": {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=(3,))},
              "mixer": {"A_log": rng.normal(size=(3, 2))}, "norm": {"scale": 1 + rng.normal(size=(3,))}}
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    grads_seq = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
                 for _ in range(5)]
    tx = make_optimizer(**HP, clip_norm=clip_norm)
    state, p = tx.init(params), params
    for g in grads_seq:
        updates, state = jax.jit(tx.update)(g, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    flat = lambda t: {"/".join(str(k.key) for k in path): np.asarray(v)  # noqa: E731
                      for path, v in jax.tree_util.tree_leaves_with_path(t)}
    decayed = {"dense/kernel": True, "dense/bias": False, "mixer/A_log": False, "norm/scale": False}
    ref = numpy_adamw(flat(params), [flat(g) for g in grads_seq], **HP, clip_norm=clip_norm, decayed=decayed)
    for k, v in flat(p).items():
        assert_close(f"{k} after 5 AdamW steps (clip {clip_norm})", v, ref[k], 1e-5)
    # clip_norm 0 and None both leave the clipping stage out of the chain
    structure = lambda c: jax.tree.structure(make_optimizer(**HP, clip_norm=c).init(params))  # noqa: E731
    assert structure(0) == structure(None) != structure(1.0)


# --- the decay mask on a real model ------------------------------------------------------------------------------

def hybrid(tie=True):
    return pattern_config("MA2SH", vocab_size=37, d_model=16, mlp=True, mlp_hidden=24, max_seq_len=16,
                          norm="layer", tie_embeddings=tie,
                          mixer_kwargs={"mamba": dict(d_state=4, dt_rank=2), "attention": dict(num_heads=2),
                                        "mamba2": dict(d_state=4, headdim=8, chunk_size=8),
                                        "striped_hyena": dict(num_heads=2), "hyena": dict(filter_order=8,
                                                                                          learn_pos_emb=True)})


# Decision per parameter path, restated from the rule: biases, norms, A_log, D, dt_bias, poles, residues, the
# Hyena implicit filter and embeddings (unless decay_embeddings) are not decayed; projections and conv weights are.
DECAYED = {
    "blocks.0.mixer.in_proj.kernel", "blocks.0.mixer.conv_weight", "blocks.0.mixer.x_proj.kernel",
    "blocks.0.mixer.dt_proj.kernel", "blocks.0.mixer.out_proj.kernel", "blocks.1.mixer.q_proj.kernel",
    "blocks.1.mixer.k_proj.kernel", "blocks.1.mixer.v_proj.kernel", "blocks.1.mixer.o_proj.kernel",
    "blocks.2.mixer.in_proj.kernel", "blocks.2.mixer.conv_weight", "blocks.2.mixer.out_proj.kernel",
    "blocks.3.mixer.projections.kernel", "blocks.3.mixer.short_filter_weight", "blocks.3.mixer.out_proj.kernel",
    "blocks.4.mixer.in_proj.kernel", "blocks.4.mixer.short_filter.weight", "blocks.4.mixer.out_proj.kernel",
} | {f"blocks.{i}.mlp.{n}.kernel" for i in range(5) for n in ("gate", "up", "down")}
NOT_DECAYED_SAMPLE = {
    "blocks.0.mixer.A_log", "blocks.0.mixer.D", "blocks.0.mixer.dt_bias", "blocks.0.mixer.conv_bias",
    "blocks.2.mixer.A_log", "blocks.2.mixer.D", "blocks.2.mixer.dt_bias", "blocks.2.mixer.norm_weight",
    "blocks.3.mixer.poles", "blocks.3.mixer.residues", "blocks.3.mixer.D", "blocks.3.mixer.short_filter_bias",
    "blocks.3.mixer.projections.bias", "blocks.4.mixer.in_proj.bias", "blocks.4.mixer.filter_fn.bias",
    "blocks.4.mixer.filter_fn.freq", "blocks.4.mixer.filter_fn.implicit_filter.0.kernel",
    "blocks.4.mixer.filter_fn.pos_emb.z", "blocks.1.norm.scale", "blocks.1.norm.bias", "blocks.1.mlp_norm.scale",
    "norm_f.scale", "norm_f.bias", "embed.embedding",
}


def flat_names(tree):
    return {".".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))}


def test_decay_mask_on_model_paths():
    params = nnx.state(nnx.eval_shape(lambda: LM(hybrid(), rngs=nnx.Rngs(0))), nnx.Param)
    mask = flat_names(decay_mask(params))
    assert NOT_DECAYED_SAMPLE <= set(mask) and DECAYED <= set(mask)
    assert {k for k, v in mask.items() if v} == DECAYED, sorted(set(k for k, v in mask.items() if v) ^ DECAYED)
    with_emb = flat_names(decay_mask(params, decay_embeddings=True))
    # the Hyena positional features sit inside the filter, which is never decayed
    assert {k for k, v in with_emb.items() if v} == DECAYED | {"embed.embedding"}
    untied = nnx.state(nnx.eval_shape(lambda: LM(hybrid(tie=False), rngs=nnx.Rngs(0))), nnx.Param)
    assert flat_names(decay_mask(untied))["lm_head.kernel"] is True


def test_decay_through_nnx_optimizer():
    """Zero gradients: Adam's step is 0, so only decoupled decay moves a parameter, p -> p (1 - lr_0 wd),
    exactly on the decayed paths; every other parameter must stay bit-identical."""
    model = LM(hybrid(), rngs=nnx.Rngs(0))
    tx = make_optimizer(**HP, clip_norm=1.0)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = {k: np.asarray(v.get_value()) for k, v in flat_names(nnx.state(model, nnx.Param)).items()}
    graphdef, state = nnx.split((model, opt))

    @jax.jit
    def update(state):
        m, o = nnx.merge(graphdef, state)
        o.update(m, jax.tree.map(jnp.zeros_like, nnx.state(m, nnx.Param)))
        return nnx.state((m, o))

    model, opt = nnx.merge(graphdef, update(state))
    after = {k: np.asarray(v.get_value()) for k, v in flat_names(nnx.state(model, nnx.Param)).items()}
    shrink = 1 - lr_formula(0, HP["lr"], HP["warmup_steps"], HP["total_steps"], HP["min_lr_ratio"]) * HP["weight_decay"]
    for k in before:
        if k in DECAYED:
            assert_close(f"decayed {k}", after[k], before[k] * shrink, 1e-6)
        else:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)


# --- gradient accumulation -----------------------------------------------------------------------------------

def test_multisteps_equals_big_batch(rng):
    """k=2 micro-batches of 4 rows (mean loss each) == one batch of 8, over 2 updates with a warmup schedule
    (so a schedule counting micro-steps instead of updates would differ)."""
    w0 = {"dense": {"kernel": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}}
    data = [(jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), jnp.asarray(rng.normal(size=(8, 3)), jnp.float32))
            for _ in range(2)]

    def loss(w, x, y):
        return jnp.mean(jnp.square(jnp.tanh(x @ w["dense"]["kernel"] + w["dense"]["bias"]) - y))

    grad = jax.jit(jax.grad(loss))
    hp = dict(HP, warmup_steps=3, total_steps=10)
    big, acc = make_optimizer(**hp, clip_norm=0.5), make_optimizer(**hp, clip_norm=0.5, grad_accum_steps=2)
    wb, sb = w0, big.init(w0)
    wa, sa = w0, acc.init(w0)
    for x, y in data:
        u, sb = big.update(grad(wb, x, y), sb, wb)
        wb = jax.tree.map(jnp.add, wb, u)
        u, sa = acc.update(grad(wa, x[:4], y[:4]), sa, wa)
        assert all(float(jnp.abs(t).max()) == 0 for t in jax.tree.leaves(u))  # no update mid-accumulation
        wa = jax.tree.map(jnp.add, wa, u)
        u, sa = acc.update(grad(wa, x[4:], y[4:]), sa, wa)
        wa = jax.tree.map(jnp.add, wa, u)
    for k in ("kernel", "bias"):
        assert_close(f"accumulated vs big batch {k}", wa["dense"][k], wb["dense"][k], 1e-5)
        assert float(jnp.abs(wa["dense"][k] - w0["dense"][k]).max()) > 1e-3  # it did train


# --- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    (dict(lr=0.0), r"lr must be a number in \(0, inf\)"),
    (dict(warmup_steps=-1), r"warmup_steps must be an int >= 0"),
    (dict(total_steps=0), r"total_steps must be an int >= 1"),
    (dict(warmup_steps=7, total_steps=6), r"warmup_steps=7 exceeds total_steps=6"),
    (dict(min_lr_ratio=1.5), r"min_lr_ratio must be a number in \[0, 1\]"),
    (dict(b1=1.0), r"b1 must be a number in \[0, 1\)"),
    (dict(b2=True), r"b2 must be a number"),
    (dict(eps=0.0), r"eps must be a number in \(0, inf\)"),
    (dict(weight_decay=-0.1), r"weight_decay must be a number in \[0, inf\)"),
    (dict(clip_norm=-1.0), r"clip_norm must be a number in \[0, inf\)"),
    (dict(grad_accum_steps=0), r"grad_accum_steps must be an int >= 1"),
    (dict(decay_embeddings="no"), r"decay_embeddings must be a bool"),
])
def test_argument_errors(change, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(**{**HP, "clip_norm": 1.0, **change})
