"""Whole-model parity through checkpoint files: tiny random transformers `MambaForCausalLM`, `Mamba2ForCausalLM`,
`LlamaForCausalLM` and a stripedhyena `StripedHyena` (Hyena + attention blocks), float32 on CPU.

Each model is saved to disk as its users would (`save_pretrained`, or `torch.save(state_dict)` + config.json for
stripedhyena), loaded with `seqmix_jax.models.checkpoints.from_pretrained`, and compared:
  * logits, max|ours - ref| / max|ref| <= 1e-5;
  * gradients of the mean next-token cross-entropy w.r.t. every checkpoint tensor <= 1e-4 (ours mapped back to the
    checkpoint layout by the same key map the exporter uses);
  * export: `save_pretrained(ours)` -> transformers `from_pretrained` (stripedhyena: `load_state_dict(strict=True)`)
    -> logits equal to the original model's within 1e-6.
The PyTorch side of the checkpoint comparison and of the export round trip goes through `seqmix_jax.compare` (the
`python -m seqmix_jax.compare` CLI users run): `compare_checkpoint` on the saved directory must pass at 1e-5 for the
residual stream after every block as well as for the logits, and `load_torch_model` reloads the export.
Every parameter is moved away from its init first (norm weights, A_log, D, biases, poles), so a parameter that is
ignored, swapped or mis-laid cannot pass.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix_jax.compare import compare_checkpoint, format_table, load_torch_model, torch_forward
from seqmix_jax.models.checkpoints import from_pretrained, key_map, read_config, save_pretrained
from tests.helpers import assert_close
from tests.parity import torch_refs

OUT_TOL, GRAD_TOL, EXPORT_TOL = 1e-5, 1e-4, 1e-6
B, L = 2, 13


def _perturb(model, seed):
    torch = torch_refs.torch()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("norm.weight", "norm_f.weight", "layernorm.weight", "norm.scale")):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("A_log"):
                p.add_(0.5 * noise)
            elif name.endswith(".D") or name == "D":
                p.copy_(1.0 + 0.5 * noise)
            elif name.endswith("bias"):
                p.add_(0.3 * noise)
            elif name.endswith(("embeddings.weight", "embed_tokens.weight", "embedding_layer.weight")):
                p.copy_(0.5 * noise)
    return model


def _hf(kind):
    torch = torch_refs.torch()
    tf = torch_refs.require("transformers")
    torch.manual_seed(0)
    if kind == "mamba":
        cfg = tf.MambaConfig(vocab_size=53, hidden_size=24, state_size=5, num_hidden_layers=2, expand=2,
                             conv_kernel=4, time_step_rank=3, use_bias=False, use_conv_bias=True,
                             tie_word_embeddings=True)
        model = tf.MambaForCausalLM(cfg)
    elif kind == "mamba2":
        cfg = tf.Mamba2Config(vocab_size=53, hidden_size=24, num_heads=6, head_dim=8, n_groups=2, state_size=5,
                              num_hidden_layers=2, expand=2, conv_kernel=4, chunk_size=8, use_bias=False,
                              use_conv_bias=True, tie_word_embeddings=False)
        model = tf.Mamba2ForCausalLM(cfg)
    else:
        cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5,
                             rope_parameters={"rope_type": "default", "rope_theta": 500.0}, attention_bias=True,
                             tie_word_embeddings=False, max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
    return _perturb(model.float().eval(), seed=1)


def _torch_logits_and_grads(model, ids, *, call=None):
    """Logits and the gradient of the mean next-token cross-entropy w.r.t. every state-dict tensor."""
    torch = torch_refs.torch()
    model.zero_grad()
    logits = call(torch.tensor(ids)) if call else model(torch.tensor(ids)).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             torch.tensor(ids[:, 1:]).reshape(-1))
    loss.backward()
    grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
    return logits.detach().numpy(), grads


def _ours_logits_and_grads(model, ids, fmt, strip=""):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(jnp.asarray(ids))
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:])[..., None], axis=-1)
        return nll.mean(), logits

    (_, logits), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    flat = {tuple(p): np.asarray(v[...] if isinstance(v, nnx.Variable) else v) for p, v in nnx.to_flat_state(g)}
    grads = {strip + e.key: e.to_ckpt(tuple(flat[p] for p in e.paths)) for e in key_map(model, fmt)}
    return np.asarray(logits), grads


def _compare_layers(path, ids):
    """`seqmix_jax.compare` on the saved checkpoint with the test's ids: every block's output and the logits."""
    report = compare_checkpoint(path, tokens=ids, tol=OUT_TOL)
    print(format_table(report))
    assert report["shape"] == list(ids.shape)
    assert report["ok"], f"{report['first_divergent']} diverges first"


def _compare(name, logits, grads, ref_logits, ref_grads, aliases=None):
    assert_close(f"{name} logits", logits, ref_logits, OUT_TOL)
    aliases = aliases or {}
    for k, ref in ref_grads.items():
        k_ours = aliases.get(k, k)
        assert k_ours in grads, f"{name}: no gradient of ours maps to {k}"
        assert np.abs(ref).max() > 0, f"{name}: reference gradient {k} is identically zero"
        assert_close(f"{name} d{k}", grads[k_ours], ref, GRAD_TOL)


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "llama"])
def test_transformers_models_load_match_and_export(tmp_path, rng, kind):
    torch_refs.torch()
    tf = torch_refs.require("transformers")
    ref = _hf(kind)
    ref.save_pretrained(tmp_path / "hf")
    ids = rng.integers(0, ref.config.vocab_size, (B, L))
    ref_logits, ref_grads = _torch_logits_and_grads(ref, ids)

    ours = from_pretrained(tmp_path / "hf")
    fmt, _ = read_config(tmp_path / "hf")
    logits, grads = _ours_logits_and_grads(ours, ids, fmt)
    # transformers names the embedding `embeddings` (Mamba) — the same as our key map
    _compare(kind, logits, grads, ref_logits, ref_grads)
    _compare_layers(tmp_path / "hf", ids)

    save_pretrained(ours, tmp_path / "export")
    back = load_torch_model(tmp_path / "export")
    assert isinstance(back, tf.PreTrainedModel)
    back_logits, _ = torch_forward(back, ids)
    assert_close(f"{kind} export -> transformers logits", back_logits, ref_logits, EXPORT_TOL)


# ------------------------------------------------------------------ stripedhyena

SH_CFG = dict(vocab_size=47, hidden_size=24, num_filters=24, num_layers=3, attn_layer_idxs=[1],
              hyena_layer_idxs=[0, 2], num_attention_heads=4, proj_groups=2, state_size=3, short_filter_length=3,
              short_filter_bias=True, eps=1e-5, rotary_emb_base=1000.0, inner_mlp_size=40, mlp_activation="silu",
              tie_embeddings=False, mha_out_proj_bias=True, qkv_proj_bias=False, column_split_hyena=True,
              hyena_filter_groups=1, final_norm=True, use_flash_rmsnorm=True, use_flash_attn=False,
              use_flashfft=False, use_flash_depthwise=False, prefill_style="fft", model_parallel_size=1)


def _sh_model(cfg):
    torch = torch_refs.torch()
    model_mod = torch_refs.stripedhyena()
    utils = torch_refs.require("stripedhyena.utils")
    full = utils.dotdict(cfg, params_dtype=torch.float32, hyena_block_dtype=torch.float32, mlp_dtype=torch.float32,
                         attn_block_dtype=torch.float32)
    torch.manual_seed(0)
    model = model_mod.StripedHyena(full).float().eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("filter.poles"):  # stable, long-memory poles (the open-code init dies in 1-2 taps)
                d, n = p.shape[:2]
                mag = 0.5 + 0.48 * torch.rand(d, n, 1, generator=gen)
                ang = (2 * torch.rand(d, n, 1, generator=gen) - 1) * np.pi
                p.copy_(torch.stack([mag * torch.cos(ang), mag * torch.sin(ang)], -1))
            elif name.endswith("filter.residues"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("short_filter_weight"):
                p.mul_(0.5)
    return _perturb(model, seed=3)


@pytest.mark.parametrize("prefix", ["", "backbone."], ids=["plain", "backbone_prefix"])
def test_striped_hyena_loads_matches_and_exports(tmp_path, rng, prefix):
    torch = torch_refs.torch()
    ref = _sh_model(SH_CFG)
    d = tmp_path / "sh"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SH_CFG))
    torch.save({prefix + k: v for k, v in ref.state_dict().items()}, d / "model.pt")
    ids = rng.integers(0, SH_CFG["vocab_size"], (B, L))
    ref_logits, ref_grads = _torch_logits_and_grads(ref, ids, call=lambda x: ref(x)[0])

    ours = from_pretrained(d)
    logits, grads = _ours_logits_and_grads(ours, ids, "stripedhyena")
    _compare("stripedhyena", logits, grads, ref_logits, ref_grads)
    _compare_layers(d, ids)

    save_pretrained(ours, tmp_path / "export")
    back = load_torch_model(tmp_path / "export")  # StripedHyena(config) + load_state_dict(strict=True)
    assert type(back).__name__ == "StripedHyena"
    back_logits, _ = torch_forward(back, ids)
    assert_close("stripedhyena export -> stripedhyena logits", back_logits, ref_logits, EXPORT_TOL)
