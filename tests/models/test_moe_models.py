"""Mixture-of-experts language models without PyTorch: BlockSpec.moe, the Block wiring restated in numpy (top-k
routing and SwiGLU experts as a per-token loop), incremental decoding == full forward and packed == separate for tiny
Mixtral and Jamba configs, generation, the presets' layer patterns (transformers' period / offset rule restated), the
Jamba Mamba mixer's dt/B/C norms at layer level, checkpoint round trips in both expert layouts, and every error.
Parity with transformers lives in tests/parity/test_moe_models_parity.py."""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix_jax.layers import MambaMixer
from seqmix_jax.layers.moe import pop_moe_stats
from seqmix_jax.models import _tensors
from seqmix_jax.models.checkpoints import export_format, from_pretrained, key_map, save_pretrained
from seqmix_jax.models.config import BlockSpec, ModelConfig, jamba_preset, mixtral_preset
from seqmix_jax.models.generate import generate
from seqmix_jax.models.lm import LM
from tests.helpers import assert_close
from tests.models.test_generate import greedy_by_full_forward

V, D = 37, 24


def mixtral(**kw):
    base = dict(vocab_size=V, hidden_size=D, intermediate_size=20, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, num_local_experts=5, num_experts_per_tok=2, rope_theta=500.0,
                sliding_window=5, max_position_embeddings=64)
    return mixtral_preset(**{**base, **kw})


def jamba(**kw):  # attention at layer 1, experts at 1 and 3: every mixer / channel-mixer pairing
    base = dict(vocab_size=V, hidden_size=D, intermediate_size=20, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, num_experts=5, num_experts_per_tok=2, attn_layer_period=3, attn_layer_offset=1,
                expert_layer_period=2, expert_layer_offset=1, mamba_d_state=5, mamba_dt_rank=3,
                max_position_embeddings=64)
    return jamba_preset(**{**base, **kw})


CONFIGS = {"mixtral": mixtral, "jamba": jamba}


def build(cfg, seed=0):
    return LM(cfg, rngs=nnx.Rngs(seed))


def jit_apply(model, fn):
    g, p = nnx.split(model)
    return jax.jit(lambda p, *args: fn(nnx.merge(g, p), *args)).__get__(p)


def ids_of(key, b, l):
    return jax.random.randint(jax.random.key(key), (b, l), 0, V)


def _params(model):
    return {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ------------------------------------------------------------------ config and block structure

def test_presets_reproduce_the_reference_layer_patterns():
    cfg = mixtral()
    assert [b.mixer for b in cfg.blocks] == ["attention"] * 2 and not any(b.mlp for b in cfg.blocks)
    for b in cfg.blocks:
        assert b.moe == dict(num_experts=5, top_k=2, scoring="softmax", renormalize=True, dispatch="dropless",
                             activation="silu")
        assert b.mixer_kwargs == dict(num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=False, out_bias=False,
                                      rope_base=500.0, window=5)
    assert cfg.mlp_hidden == 20 and cfg.max_seq_len == 64 and not cfg.tie_embeddings and cfg.norm == "rms"
    # transformers' JambaConfig rule, restated: attention iff i % attn_period == attn_offset, experts iff
    # i % expert_period == expert_offset (and num_experts > 1), a SwiGLU MLP elsewhere
    for n, (ap, ao, ep, eo) in ((8, (8, 4, 2, 1)), (7, (3, 0, 3, 2)), (5, (1, 0, 5, 4))):
        cfg = jamba(num_hidden_layers=n, attn_layer_period=ap, attn_layer_offset=ao, expert_layer_period=ep,
                    expert_layer_offset=eo)
        assert [b.mixer for b in cfg.blocks] == ["attention" if i % ap == ao else "mamba" for i in range(n)]
        assert [b.moe is not None for b in cfg.blocks] == [i % ep == eo for i in range(n)]
        assert all(b.mlp == (b.moe is None) for b in cfg.blocks)
    cfg = jamba()
    attn, mamba, moe = cfg.blocks[1], cfg.blocks[0], cfg.blocks[1].moe
    assert attn.mixer_kwargs["rotary_dim"] == 0 and moe["renormalize"] is False
    assert mamba.mixer_kwargs == dict(d_state=5, d_conv=4, expand=2, dt_rank=3, conv_bias=True, bias=False,
                                      bcdt_rms_norm=True, bcdt_norm_eps=1e-6)
    assert jamba(mamba_dt_rank="auto").blocks[0].mixer_kwargs["dt_rank"] == 2  # ceil(24 / 16)
    assert all(b.moe is None and b.mlp for b in jamba(num_experts=1, num_experts_per_tok=1).blocks)
    assert mixtral(moe_dispatch="capacity", capacity_factor=2.0).blocks[0].moe["capacity_factor"] == 2.0


@pytest.mark.parametrize("make, match", [
    (lambda: BlockSpec("attention", True, moe=dict(num_experts=4, top_k=2)), "either mlp=True or moe"),
    (lambda: BlockSpec("attention", moe=[("num_experts", 4)]), "moe must be None or a mapping"),
    (lambda: BlockSpec("attention", moe=dict(num_experts=4)), r"moe needs \['top_k'\]"),
    (lambda: BlockSpec("attention", moe=dict(num_experts=4, top_k=5)), "top_k=5 exceeds num_experts=4"),
    (lambda: BlockSpec("attention", moe=dict(num_experts=0, top_k=1)), "moe num_experts must be a positive int"),
    (lambda: BlockSpec("attention", moe=dict(num_experts=4, top_k=1, dtype="float32")), r"must not set \['dtype'\]"),
    (lambda: BlockSpec("attention", moe=dict(num_experts=4, top_k=1, hidden=0)), "moe hidden must be a positive"),
    (lambda: ModelConfig(V, D, (BlockSpec("mamba", moe=dict(num_experts=4, top_k=1)),)),
     r"mlp_hidden is None but the moe of blocks \[0\] has no hidden width"),
    (lambda: mixtral(router_jitter_noise=0.01), "router_jitter_noise=0.01 is not supported"),
    (lambda: mixtral(hidden_act="gelu"), "mixtral: hidden_act 'gelu' is not supported"),
    (lambda: mixtral(num_experts_per_tok=6), "num_experts_per_tok=6 exceeds the number of experts 5"),
    (lambda: mixtral(sliding_window=0), "sliding_window must be a positive int"),
    (lambda: jamba(attn_layer_offset=3), r"attn_layer_offset=3 must be an int in \[0, attn_layer_period=3\)"),
    (lambda: jamba(expert_layer_period=0), "expert_layer_period must be a positive int"),
    (lambda: jamba(hidden_act="gelu"), "jamba: hidden_act 'gelu' is not supported"),
])
def test_config_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_block_parameters_and_build_errors():
    cfg = jamba()
    m = build(cfg)
    paths = set(_params(m))
    for i in (1, 3):  # MoE blocks
        assert {("blocks", i, "mlp_norm", "scale"), ("blocks", i, "moe", "router", "kernel"),
                ("blocks", i, "moe", "wi"), ("blocks", i, "moe", "wo")} <= paths
        assert m.blocks[i].mlp is None and m.blocks[i].moe.hidden == 20  # hidden defaults to mlp_hidden
    assert m.blocks[0].moe is None and m.blocks[0].mlp is not None
    assert _params(m)[("blocks", 1, "moe", "wi")].shape == (5, D, 40)
    for name in ("dt_layernorm", "b_layernorm", "c_layernorm"):
        assert ("blocks", 0, "mixer", name, "scale") in paths
    blocks = (BlockSpec("attention", moe=dict(num_experts=3, top_k=1, hidden=12), mixer_kwargs={"num_heads": 2}),)
    assert build(ModelConfig(V, D, blocks, mlp_hidden=20)).blocks[0].moe.hidden == 12
    bad = (BlockSpec("attention", moe=dict(num_experts=3, top_k=1, dispach="capacity"), mixer_kwargs={"num_heads": 2}),)
    with pytest.raises(ValueError, match=r"blocks\[0\] moe \['dispach', 'num_experts', 'top_k'\]"):
        build(ModelConfig(V, D, bad, mlp_hidden=20))


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + eps) * w


def _moe_loop(h, router, wi, wo, top_k, renormalize):
    """The definition, token by token: softmax over the router logits, the top-k experts (ties -> lower id),
    weights renormalized (Mixtral) or not (Jamba), y = sum_j w_j * down(silu(gate h) * up h)."""
    f = wi.shape[-1] // 2
    out = np.zeros_like(h)
    for t in range(h.shape[0]):
        logits = h[t] @ router
        p = np.exp(logits - logits.max())
        p /= p.sum()
        chosen = sorted(range(len(p)), key=lambda i: (-p[i], i))[:top_k]
        w = p[chosen] / (p[chosen].sum() if renormalize else 1.0)
        for wj, e in zip(w, chosen):
            g, u = h[t] @ wi[e][:, :f], h[t] @ wi[e][:, f:]
            out[t] += wj * ((g / (1 + np.exp(-g))) * u) @ wo[e]
    return out


@pytest.mark.parametrize("kind", ["mixtral", pytest.param("jamba", marks=pytest.mark.slow)])
def test_moe_block_math_restated(kind):
    """r += mixer(norm(r)); r += moe(mlp_norm(r)), the MoE as a numpy float64 per-token loop (the mixer itself is
    tested in tests/layers and tests/parity)."""
    cfg = CONFIGS[kind]()
    i = 0 if kind == "mixtral" else 1
    m = build(cfg, seed=1)
    blk = m.blocks[i]
    rng = np.random.default_rng(0)
    blk.mlp_norm.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(D), jnp.float32)
    blk.moe.router.kernel[...] = jnp.asarray(rng.standard_normal((D, 5)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((2, 9, D)), jnp.float32)
    got, h = jit_apply(blk, lambda b, r: (b(r), r + b.mixer(b.norm(r))))(r)
    P = {k: np.asarray(v[...], np.float64) for k, v in
         dict(router=blk.moe.router.kernel, wi=blk.moe.wi, wo=blk.moe.wo, s=blk.mlp_norm.scale).items()}
    h = np.asarray(h, np.float64)
    ff = _moe_loop(_rms(h, P["s"], cfg.norm_eps).reshape(-1, D), P["router"], P["wi"], P["wo"], 2,
                   renormalize=kind == "mixtral")
    assert_close(f"{kind} MoE block vs numpy loop", got, h + ff.reshape(h.shape), 1e-5)


# ------------------------------------------------------------------ decoding, packing, generation

@pytest.mark.parametrize("kind", [pytest.param("mixtral", marks=pytest.mark.slow), "jamba"])
def test_decoding_and_packing_equal_the_full_forward(kind):
    """Incremental decoding (prefill + steps) == the full forward; packed documents == each document alone; padding
    (segment 0) is routed nowhere. One forward shape (2, 14) throughout, so it compiles once."""
    m = build(CONFIGS[kind]())
    fwd = jit_apply(m, lambda m, ids, seg: (m(ids, segment_ids=seg), pop_moe_stats(m)))
    prefill = jit_apply(m, lambda m, ids, st: m.prefill(ids, st))
    step = jit_apply(m, lambda m, tok, st: m.step(tok, st))
    b, l, split = 2, 14, 6  # past the sliding window (5) of the Mixtral config
    ids = ids_of(1, b, l)
    ones = jnp.ones((b, l), jnp.int32)
    logits, _ = fwd(ids, ones)
    state = m.init_state(b, l)
    l1, state = prefill(ids[:, :split], state)
    outs = [l1]
    for t in range(split, l):
        lt, state = step(ids[:, t], state)
        outs.append(lt[:, None])
    assert_close(f"{kind} prefill + steps vs forward", jnp.concatenate(outs, 1), logits, 1e-5)

    # row 0 packs documents of 5 and 6 tokens (numbered from 1, as the trainer packs) and 3 padding tokens
    # (segment 0); row 1 packs 4 + 10
    seg = jnp.asarray([[1] * 5 + [2] * 6 + [0] * 3, [1] * 4 + [2] * 10], jnp.int32)
    packed, stats = fwd(ids, seg)
    docs = [(0, 0, 5), (0, 5, 6), (1, 0, 4), (1, 4, 10)]
    for k in range(0, 4, 2):  # the documents alone, two per call (left-aligned, right-padded)
        alone = np.zeros((b, l), np.int32)
        for r, (row, s, n) in enumerate(docs[k:k + 2]):
            alone[r, :n] = np.asarray(ids[row, s:s + n])
        alone_logits, _ = fwd(jnp.asarray(alone), ones)
        for r, (row, s, n) in enumerate(docs[k:k + 2]):
            assert_close(f"{kind} document ({row}, {s})", packed[row, s:s + n], alone_logits[r, :n], 1e-5)
    assert len(stats) == sum(blk.moe is not None for blk in m.config.blocks)
    for st in stats:  # every real token makes top_k = 2 assignments, the padding none
        np.testing.assert_allclose(float(np.sum(st.tokens_per_expert)), 2 * (b * l - 3))


@pytest.mark.parametrize("kind", ["mixtral", pytest.param("jamba", marks=pytest.mark.slow)])
def test_greedy_generation_equals_argmax_of_full_forward(kind):
    """generate() on MoE models (their layers sow statistics inside the jitted decode loop)."""
    m = build(CONFIGS[kind]().replace(embed_init_std=1.0))
    prompt = ids_of(11, 2, 7)
    out = generate(m, prompt, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(out), greedy_by_full_forward(m, prompt, 6))


# ------------------------------------------------------------------ Jamba's Mamba mixer (dt / B / C norms)

@functools.partial(jax.jit, static_argnums=0)
def _forward_and_steps_jit(graphdef, params, x):
    m = nnx.merge(graphdef, params)

    def body(state, x_t):
        y_t, state = m.step(x_t, state)
        return state, y_t

    _, ys = jax.lax.scan(body, m.init_state(x.shape[0]), x.swapaxes(0, 1))
    return m(x), ys.swapaxes(0, 1)


def _forward_and_steps(mixer, x):
    """(mixer(x), the outputs of one step per token), one compile per mixer structure."""
    return _forward_and_steps_jit(*nnx.split(mixer), x)


def test_jamba_mamba_mixer_norms_step_and_errors(key):
    kw = dict(d_state=5, dt_rank=3, chunk_size=8)
    m = MambaMixer(D, bcdt_rms_norm=True, bcdt_norm_eps=1e-6, rngs=nnx.Rngs(2), **kw)
    assert m.dt_layernorm.scale[...].shape == (3,) and m.b_layernorm.scale[...].shape == (5,)
    assert m.c_layernorm.scale[...].shape == (5,) and m.bcdt_norm_eps == 1e-6
    specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
    assert tuple(specs["b_layernorm"]["scale"].get_value()) == ("ssm_state",)
    assert tuple(specs["dt_layernorm"]["scale"].get_value()) == ("dt_rank",)
    x = jax.random.normal(key, (2, 11, D))
    # Scaling x_proj's dt, B and C columns (by 7, 10, 10) is invisible behind the norms (exactly scale-invariant with
    # eps 0), and changes the output of the same mixer without them.
    for norms in (True, False):
        mixer = MambaMixer(D, bcdt_rms_norm=norms, bcdt_norm_eps=0.0, rngs=nnx.Rngs(2), **kw)
        assert (mixer.dt_layernorm is not None) == norms
        ref = _forward_and_steps(mixer, x)[0]
        k = mixer.x_proj.kernel[...]
        mixer.x_proj.kernel[...] = k.at[:, :3].multiply(7.0).at[:, 3:].multiply(10.0)
        err = float(jnp.abs(_forward_and_steps(mixer, x)[0] - ref).max() / jnp.abs(ref).max())
        print(f"bcdt_rms_norm={norms}: rel change {err:.2e}")
        assert (err < 1e-5) if norms else (err > 1e-2)
        if norms:  # step == forward, with scales moved away from 1
            mixer.dt_layernorm.scale[...] = jnp.asarray([0.5, 1.5, -1.0])
            mixer.b_layernorm.scale[...] = jnp.linspace(0.5, 2.0, 5)
            y, stepped = _forward_and_steps(mixer, x)
            assert_close("jamba mamba step vs forward", stepped, y, 1e-5)
    with pytest.raises(ValueError, match="bcdt_rms_norm must be a bool"):
        MambaMixer(D, bcdt_rms_norm="yes", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        MambaMixer(D, bcdt_rms_norm=True, bcdt_norm_eps=-1.0, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ checkpoints

def _expert_keys(kind, i, j):
    """transformers' on-disk per-expert names (gate, up, down), restated."""
    if kind == "mixtral":
        return [f"model.layers.{i}.block_sparse_moe.experts.{j}.{n}.weight" for n in ("w1", "w3", "w2")]
    return [f"model.layers.{i}.feed_forward.experts.{j}.{n}_proj.weight" for n in ("gate", "up", "down")]


@pytest.fixture(params=["mixtral", "jamba"])
def saved(request, tmp_path):
    kind = request.param
    model = build(CONFIGS[kind](), seed=3)
    save_pretrained(model, tmp_path / "ckpt")
    return kind, model, tmp_path / "ckpt"


def test_round_trip_and_per_expert_layout_on_disk(saved):
    kind, model, d = saved
    assert export_format(model) == kind
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == kind
    sd = _tensors.read_safetensors(d / "model.safetensors")
    i = 1  # an MoE layer of both configs
    gate, up, down = (sd[k] for k in _expert_keys(kind, i, 4))
    wi, wo = _params(model)[("blocks", i, "moe", "wi")], _params(model)[("blocks", i, "moe", "wo")]
    np.testing.assert_array_equal(gate, wi[4][:, :20].T)  # torch Linear (out, in)
    np.testing.assert_array_equal(up, wi[4][:, 20:].T)
    np.testing.assert_array_equal(down, wo[4].T)
    assert not any("gate_up_proj" in k or k.endswith("experts.down_proj") for k in sd)
    back = from_pretrained(d)
    pa, pb = _params(model), _params(back)
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert back.config == model.config  # same parameters and config: the same function


def _fuse_in_test(kind, sd, layers, e):
    """The fused in-memory layout built from the per-expert tensors with numpy (gate rows, then up rows)."""
    out = dict(sd)
    ffn = "mlp" if kind == "mixtral" else "feed_forward"
    for i in layers:
        parts = [[out.pop(k) for k in _expert_keys(kind, i, j)] for j in range(e)]
        out[f"model.layers.{i}.{ffn}.experts.gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u, _ in parts])
        out[f"model.layers.{i}.{ffn}.experts.down_proj"] = np.stack([dn for _, _, dn in parts])
        if kind == "mixtral":
            gate = f"model.layers.{i}.block_sparse_moe.gate.weight"
            out[gate.replace("block_sparse_moe", "mlp")] = out.pop(gate)
    return out


def test_fused_layout_loads_and_mixed_or_wrong_layouts_are_named(saved):
    kind, model, d = saved
    sd = _tensors.read_safetensors(d / "model.safetensors")
    moe_layers = [i for i, b in enumerate(model.config.blocks) if b.moe is not None]
    fused = _fuse_in_test(kind, sd, moe_layers, 5)
    _tensors.write_safetensors(d / "model.safetensors", fused)
    pa, pb = _params(model), _params(from_pretrained(d))
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    i = moe_layers[0]
    base = f"model.layers.{i}.{'mlp' if kind == 'mixtral' else 'feed_forward'}.experts"  # the name after loading
    disk = f"model.layers.{i}.{'block_sparse_moe' if kind == 'mixtral' else 'feed_forward'}.experts"
    k0 = _expert_keys(kind, i, 0)

    def fails(tensors, match):
        _tensors.write_safetensors(d / "model.safetensors", tensors)
        with pytest.raises(ValueError, match=match):
            from_pretrained(d)

    # one layer fused, another per expert: accepted (each layer holds one layout)
    _tensors.write_safetensors(d / "model.safetensors", _fuse_in_test(kind, sd, moe_layers[:1], 5))
    pb = _params(from_pretrained(d))
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    # both layouts in one layer
    fails({**fused, **{k: sd[k] for k in k0}}, rf"mixed expert layouts under '{re.escape(base)}'")
    # the fused tensors with the wrong number of experts
    fails({**fused, f"{base}.gate_up_proj": fused[f"{base}.gate_up_proj"][:4]},
          rf"'{re.escape(base)}\.gate_up_proj' has shape \(4, 40, 24\): expected \(5, \.\.\.\)")
    # per-expert: an expert too many, one missing, an unknown name, a wrong shape
    fails({**sd, **{k.replace(".4.", ".5."): sd[k] for k in _expert_keys(kind, i, 4)}},
          rf"unexpected tensor '{re.escape(base)}\.5\.\w+\.weight': expert index 5, but the config has 5 experts")
    up = _expert_keys(kind, i, 3)[1]
    fails({k: v for k, v in sd.items() if k != up},
          rf"missing {re.escape(base)}\.3\.{up.split('.')[-2]}\.weight \(the config has 5 experts")
    fails({**sd, f"{disk}.0.w9.weight": sd[k0[0]]},
          rf"unexpected tensor '{re.escape(base)}\.0\.w9\.weight': the expert weights are named")
    fails({**sd, k0[2]: sd[k0[2]][:, :7]},
          rf"{re.escape(base)}\.0\.\w+\.weight has shape \(24, 7\), expected \(24, 20\)")


def test_checkpoint_config_options(saved):
    kind, model, d = saved
    cfg = json.loads((d / "config.json").read_text())

    def load(**changes):
        (d / "config.json").write_text(json.dumps({**cfg, **changes}))
        return from_pretrained(d)

    if kind == "mixtral":
        # router jitter is training-time input noise: inference equals the model without it, so it loads
        assert load(router_jitter_noise=0.1).config == model.config
        with pytest.raises(ValueError, match="rope_type 'linear' is not supported"):
            load(rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})
        with pytest.raises(ValueError, match="num_local_experts=5 and num_experts=4"):
            load(num_experts=4)
        with pytest.raises(ValueError, match="num_experts_per_tok=6 exceeds the number of experts 5"):
            load(num_experts_per_tok=6)
        (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "intermediate_size"}))
        with pytest.raises(ValueError, match="mixtral config is missing 'intermediate_size'"):
            from_pretrained(d)
    else:
        # PyTorch implementation switches: ignored
        assert load(use_mamba_kernels=False, use_mambapy=True).config == model.config
        with pytest.raises(ValueError, match="jamba: hidden_act 'gelu' is not supported"):
            load(hidden_act="gelu")
        with pytest.raises(ValueError, match="head_dim=4 != hidden_size 24 / num_attention_heads 4"):
            load(head_dim=4)
        with pytest.raises(ValueError, match=r"shape mismatch for 'model\.layers\.0\.feed_forward\.down_proj\.weight'"):
            load(intermediate_size=16)


def test_export_errors(tmp_path):
    def export(cfg, name):
        save_pretrained(build(cfg), tmp_path / name)

    blocks = list(mixtral().blocks)
    blocks[0] = BlockSpec("attention", False, blocks[0].mixer_kwargs, moe={**blocks[0].moe, "shared_hidden": 8})
    with pytest.raises(ValueError, match=r"MoE layers differ in \['shared_hidden'\]"):
        export(mixtral().replace(blocks=tuple(blocks)), "a")
    blocks[1] = blocks[0]
    with pytest.raises(ValueError, match="mixtral export needs softmax routing with renormalize=True"):
        export(mixtral().replace(blocks=tuple(blocks)), "b")
    with pytest.raises(ValueError, match=r"MoE parameter blocks\.0\.moe\.shared\.\w+\.kernel has no mixtral"):
        key_map(build(mixtral().replace(blocks=tuple(blocks))), "mixtral")
    # a Jamba layer pattern that is not "every p-th layer from an offset"
    cfg = jamba()
    blocks = list(cfg.blocks)
    blocks[2] = BlockSpec("attention", True, blocks[1].mixer_kwargs)
    with pytest.raises(ValueError, match=r"the attention layers \[1, 2\] are not the layers i with i % period"):
        export(cfg.replace(blocks=tuple(blocks)), "c")
    # Jamba's Mamba layers need the dt/B/C norms; renormalized routing is Mixtral's, not Jamba's
    blocks = [BlockSpec(b.mixer, b.mlp, {**b.mixer_kwargs, "bcdt_rms_norm": False} if b.mixer == "mamba"
                        else b.mixer_kwargs, moe=b.moe) for b in cfg.blocks]
    with pytest.raises(ValueError, match="jamba export needs Mamba layers with bcdt_rms_norm=True"):
        export(cfg.replace(blocks=tuple(blocks)), "d")
    blocks = [BlockSpec(b.mixer, b.mlp, b.mixer_kwargs, moe=b.moe and {**b.moe, "renormalize": True})
              for b in cfg.blocks]
    with pytest.raises(ValueError, match="jamba export needs softmax routing with renormalize=False"):
        export(cfg.replace(blocks=tuple(blocks)), "e")
    # a Mamba model with the Jamba norms but no channel mixers has no checkpoint format
    blocks = tuple(BlockSpec("mamba", False, cfg.blocks[0].mixer_kwargs) for _ in range(2))
    with pytest.raises(ValueError, match="no supported checkpoint format represents this layer pattern"):
        export(cfg.replace(blocks=blocks), "f")
    assert not any((tmp_path / n).exists() for n in "abcdef")
