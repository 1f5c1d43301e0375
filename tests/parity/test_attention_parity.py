"""Attention, RoPE, GatedMLP and RMSNorm against transformers 5.x (CPU, float32, eager attention).

References, called directly with the same weights:
  * `LlamaAttention` (GQA, full rotate-half RoPE, with and without biases), `MistralAttention` with a sliding window
    smaller than the sequence, `StableLmAttention` (partial rotate-half RoPE, 1/4 of the head), `GlmAttention`
    (partial *interleaved* RoPE, half the head, qkv biases). Position embeddings come from each model's rotary
    embedding class, masks from `transformers.masking_utils` (what the models build for eager attention).
  * `apply_rotary_pos_emb` + `LlamaRotaryEmbedding` (offset and per-row positions) and GLM's interleaved variant.
  * `LlamaMLP` (SwiGLU, with and without bias), `LlamaRMSNorm`.
Outputs and gradients w.r.t. the input and every weight are compared (a random cotangent): outputs
max|ours - ref| / max|ref| <= 1e-5, gradients <= 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix_jax.layers.attention import Attention
from seqmix_jax.layers.mlp import GatedMLP
from seqmix_jax.layers.norms import RMSNorm
from seqmix_jax.ops.rotary import apply_rotary
from tests.helpers import assert_close
from tests.parity import torch_refs

OUT_TOL = 1e-5
GRAD_TOL = 1e-4
B, L, D = 2, 23, 64
COMMON = dict(hidden_size=D, vocab_size=11, num_hidden_layers=1, intermediate_size=88, attn_implementation="eager",
              pad_token_id=0)

# name -> (transformers model package, config overrides, our Attention kwargs, mask kind)
ATTN_CASES = {
    "llama_gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
                  dict(num_heads=4, num_kv_heads=2, head_dim=16, rope_base=500.0), "causal"),
    "llama_bias_mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                       dict(num_heads=4, qkv_bias=True, out_bias=True), "causal"),
    "mistral_window": ("mistral", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=5,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                       dict(num_heads=4, num_kv_heads=1, head_dim=16, window=5), "sliding"),
    "stablelm_partial": ("stablelm", dict(num_attention_heads=4, num_key_value_heads=2, use_qkv_bias=True,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "partial_rotary_factor": 0.25}),
                         dict(num_heads=4, num_kv_heads=2, qkv_bias=True, rotary_dim=4), "causal"),
    "glm_partial_interleaved": ("glm", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                            attention_bias=True,
                                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "partial_rotary_factor": 0.5}),
                                dict(num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, rotary_dim=8,
                                     rope_interleaved=True), "causal"),
}
_CLASS = {"llama": "Llama", "mistral": "Mistral", "stablelm": "StableLm", "glm": "Glm"}


# ------------------------------------------------------------------ weights and gradients across the two sides

def _torch_key(path, renames) -> str:
    path = tuple(str(p) for p in path)
    if len(path) == 1:  # a norm's scale
        return renames[path[0]]
    sub, leaf = path
    return f"{renames.get(sub, sub)}.{'weight' if leaf == 'kernel' else leaf}"


def load_from_torch(module, torch_module, renames=None):
    """Copy the torch module's parameters into ours (Linear weights transposed); the sets must match exactly."""
    renames = renames or {}
    sd = {k: v.detach().numpy() for k, v in torch_module.named_parameters()}
    ours = {_torch_key(p, renames): (p, v) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    assert set(ours) == set(sd), (sorted(ours), sorted(sd))
    for key, (path, var) in ours.items():
        value = sd[key].T if str(path[-1]) == "kernel" else sd[key]
        assert value.shape == var[...].shape, (key, value.shape, var[...].shape)
        var[...] = jnp.asarray(value)


def compare(name, module, torch_module, torch_fn, x, renames=None):
    """Forward and VJP (random cotangent) of both sides; assert outputs and every gradient."""
    torch = torch_refs.torch()
    renames = renames or {}
    xt = torch.tensor(x, requires_grad=True)
    out_t = torch_fn(xt)
    ct = np.random.standard_normal(out_t.shape).astype(np.float32)
    torch_module.zero_grad()
    (out_t * torch.tensor(ct)).sum().backward()

    graphdef, params = nnx.split(module)

    @jax.jit
    def forward_and_vjp(p, x, ct):
        out, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), p, x)
        return out, vjp(ct)

    out, (g_params, g_x) = forward_and_vjp(params, jnp.asarray(x), jnp.asarray(ct))

    assert_close(f"{name} output", out, out_t.detach().numpy(), OUT_TOL)
    assert_close(f"{name} grad x", g_x, xt.grad.numpy(), GRAD_TOL)
    torch_grads = {k: p.grad.numpy() for k, p in torch_module.named_parameters()}
    for path, g in nnx.to_flat_state(g_params):
        key = _torch_key(path, renames)
        g = np.asarray(g[...])
        assert_close(f"{name} grad {key}", g.T if str(path[-1]) == "kernel" else g, torch_grads[key], GRAD_TOL)


# ------------------------------------------------------------------ attention

@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_matches_transformers(case):
    torch = torch_refs.torch()
    pkg, cfg_kw, our_kw, mask_kind = ATTN_CASES[case]
    mod = torch_refs.require(f"transformers.models.{pkg}.modeling_{pkg}")
    cfg_mod = torch_refs.require(f"transformers.models.{pkg}.configuration_{pkg}")
    masking = torch_refs.require("transformers.masking_utils")
    prefix = _CLASS[pkg]
    config = getattr(cfg_mod, f"{prefix}Config")(**COMMON, **cfg_kw)
    ref = getattr(mod, f"{prefix}Attention")(config, layer_idx=0).eval()
    rotary = getattr(mod, f"{prefix}RotaryEmbedding")(config)

    x = np.random.standard_normal((B, L, D)).astype(np.float32)
    position_ids = torch.arange(L)[None].expand(B, L)
    make_mask = masking.create_sliding_window_causal_mask if mask_kind == "sliding" else masking.create_causal_mask
    mask = make_mask(config=config, inputs_embeds=torch.tensor(x), attention_mask=None, cache=None,
                     position_ids=position_ids)
    assert mask is not None  # eager attention gets an explicit additive mask

    def torch_fn(xt):
        cos_sin = rotary(xt, position_ids)
        return ref(hidden_states=xt, position_embeddings=cos_sin, attention_mask=mask)[0]

    ours = Attention(D, **our_kw, rngs=nnx.Rngs(0))
    load_from_torch(ours, ref)
    compare(case, ours, ref, torch_fn, x)


def test_attention_decode_matches_transformers():
    """Prefill + single-token steps of our KV cache reproduce the reference's full-sequence output (Mistral with
    a window smaller than the prompt, so the window is exercised inside the cache)."""
    torch = torch_refs.torch()
    _, cfg_kw, our_kw, _ = ATTN_CASES["mistral_window"]
    mod = torch_refs.require("transformers.models.mistral.modeling_mistral")
    masking = torch_refs.require("transformers.masking_utils")
    config = torch_refs.require("transformers.models.mistral.configuration_mistral").MistralConfig(**COMMON, **cfg_kw)
    ref = mod.MistralAttention(config, layer_idx=0).eval()
    x = np.random.standard_normal((B, L, D)).astype(np.float32)
    position_ids = torch.arange(L)[None].expand(B, L)
    mask = masking.create_sliding_window_causal_mask(config=config, inputs_embeds=torch.tensor(x), attention_mask=None,
                                                     cache=None, position_ids=position_ids)
    with torch.no_grad():
        xt = torch.tensor(x)
        y_ref = ref(hidden_states=xt, position_embeddings=mod.MistralRotaryEmbedding(config)(xt, position_ids),
                    attention_mask=mask)[0].numpy()
    ours = Attention(D, **our_kw, rngs=nnx.Rngs(0))
    load_from_torch(ours, ref)
    prefill = jax.jit(ours.prefill, static_argnames="max_len")
    step = jax.jit(ours.step)
    y0, state = prefill(jnp.asarray(x[:, :9]), max_len=L)
    outs = [y0]
    for t in range(9, L):
        yt, state = step(jnp.asarray(x[:, t]), state)
        outs.append(yt[:, None])
    assert_close("mistral window: prefill 9 + 14 steps vs reference", jnp.concatenate(outs, 1), y_ref, OUT_TOL)


# ------------------------------------------------------------------ rotary op

def test_rotary_matches_transformers_llama():
    torch = torch_refs.torch()
    llama = torch_refs.require("transformers.models.llama.modeling_llama")
    config = torch_refs.require("transformers.models.llama.configuration_llama").LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=18,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    q = np.random.standard_normal((B, 4, L, 18)).astype(np.float32)  # torch layout (b, h, l, k)
    k = np.random.standard_normal((B, 2, L, 18)).astype(np.float32)
    pos = np.stack([np.arange(L) + 7, np.arange(L) * 3 + 100])  # per-row positions with offsets
    cos, sin = llama.LlamaRotaryEmbedding(config)(torch.tensor(q), torch.tensor(pos))
    q_ref, k_ref = llama.apply_rotary_pos_emb(torch.tensor(q), torch.tensor(k), cos, sin)
    for name, a, ref in (("q", q, q_ref), ("k", k, k_ref)):
        ours = apply_rotary(jnp.asarray(a.transpose(0, 2, 1, 3)), jnp.asarray(pos), base=1000.0)
        assert_close(f"rotary {name} vs transformers", ours, ref.numpy().transpose(0, 2, 1, 3), OUT_TOL)


def test_rotary_matches_transformers_glm_interleaved_partial():
    torch = torch_refs.torch()
    glm = torch_refs.require("transformers.models.glm.modeling_glm")
    config = torch_refs.require("transformers.models.glm.configuration_glm").GlmConfig(
        **COMMON, num_attention_heads=2, num_key_value_heads=2, head_dim=20,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.6})
    q = np.random.standard_normal((B, 2, L, 20)).astype(np.float32)
    pos = np.arange(L)[None].repeat(B, 0) + 50
    cos, sin = glm.GlmRotaryEmbedding(config)(torch.tensor(q), torch.tensor(pos))
    q_ref, _ = glm.apply_rotary_pos_emb(torch.tensor(q), torch.tensor(q), cos, sin)
    ours = apply_rotary(jnp.asarray(q.transpose(0, 2, 1, 3)), jnp.asarray(pos[0]), rotary_dim=12, interleaved=True)
    assert_close("interleaved partial rotary vs GLM", ours, q_ref.numpy().transpose(0, 2, 1, 3), OUT_TOL)


# ------------------------------------------------------------------ MLP and RMSNorm

@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_matches_llama_mlp(bias):
    llama = torch_refs.require("transformers.models.llama.modeling_llama")
    config = torch_refs.require("transformers.models.llama.configuration_llama").LlamaConfig(
        **COMMON, num_attention_heads=4, mlp_bias=bias, hidden_act="silu")
    ref = llama.LlamaMLP(config)
    ours = GatedMLP(D, 88, activation="silu", use_bias=bias, rngs=nnx.Rngs(0))
    renames = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    load_from_torch(ours, ref, renames)
    x = np.random.standard_normal((B, L, D)).astype(np.float32)
    compare(f"GatedMLP(bias={bias}) vs LlamaMLP", ours, ref, ref, x, renames)


def test_rms_norm_matches_llama_rms_norm():
    torch = torch_refs.torch()
    llama = torch_refs.require("transformers.models.llama.modeling_llama")
    ref = llama.LlamaRMSNorm(D, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(1.0 + 0.5 * torch.randn(D))  # away from the ones init
    ours = RMSNorm(D, eps=1e-6, rngs=nnx.Rngs(0))
    load_from_torch(ours, ref, {"scale": "weight"})
    x = (np.random.standard_normal((B, L, D)) * 3).astype(np.float32)
    compare("RMSNorm vs LlamaRMSNorm", ours, ref, ref, x, {"scale": "weight"})
