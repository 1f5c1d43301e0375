"""Checkpoint import/export without a PyTorch model: LM -> save_pretrained -> from_pretrained round trips (every
exportable preset, sharded safetensors, pytorch_model.bin), and every documented error on a deliberately broken
directory. Parity with the PyTorch models lives in tests/parity/test_lm_parity.py."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix_jax.models import _tensors
from seqmix_jax.models.checkpoints import export_format, from_pretrained, save_pretrained
from seqmix_jax.models.config import (BlockSpec, llama_preset, mamba2_preset, mamba_preset, pattern_config,
                                      striped_hyena_preset)
from seqmix_jax.models.lm import LM
from tests.parity import torch_refs

PRESETS = {
    "mamba": lambda: mamba_preset(d_model=16, n_layer=2, vocab_size=29, pad_vocab_size_multiple=1,
                                  ssm_cfg=dict(d_state=5, dt_rank=3)),
    "mamba2": lambda: mamba2_preset(d_model=16, n_layer=2, vocab_size=29, pad_vocab_size_multiple=1,
                                    tie_embeddings=False,
                                    ssm_cfg=dict(d_state=5, headdim=8, ngroups=2, chunk_size=8)),
    "llama": lambda: llama_preset(vocab_size=31, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
                                  attention_bias=True),
    "stripedhyena": lambda: striped_hyena_preset(vocab_size=27, hidden_size=24, num_layers=3, attn_layer_idxs=[1],
                                                 num_attention_heads=4, proj_groups=2, state_size=3,
                                                 inner_mlp_size=40, rotary_emb_base=1000.0, tie_embeddings=True,
                                                 use_flash_rmsnorm=False),
}


def _model(kind, seed=0):
    return LM(PRESETS[kind](), rngs=nnx.Rngs(seed))


def _params(model):
    return {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert set(pa) == set(pb), sorted(set(pa) ^ set(pb))
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k


@pytest.mark.parametrize("kind", list(PRESETS))
def test_round_trip_params_and_logits(tmp_path, kind):
    model = _model(kind)
    assert export_format(model) == kind
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == kind
    back = from_pretrained(tmp_path)
    _assert_same_params(model, back)
    assert [b.mixer for b in back.config.blocks] == [b.mixer for b in model.config.blocks]
    ids = jnp.asarray(np.arange(14).reshape(2, 7) % model.config.vocab_size, jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(back(ids)))


def test_dtypes_poles_and_ssm_parameters_stay_float32(tmp_path):
    save_pretrained(_model("stripedhyena"), tmp_path / "sh")
    m = from_pretrained(tmp_path / "sh", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    mixer = m.blocks[0].mixer
    assert m.config.dtype == "bfloat16" and m.config.param_dtype == "bfloat16"
    assert mixer.poles[...].dtype == mixer.residues[...].dtype == jnp.float32
    assert mixer.projections.kernel[...].dtype == jnp.bfloat16
    save_pretrained(_model("mamba"), tmp_path / "m")
    m = from_pretrained(tmp_path / "m", param_dtype="bfloat16")
    mixer = m.blocks[0].mixer
    assert mixer.A_log[...].dtype == jnp.float32 and mixer.in_proj.kernel[...].dtype == jnp.bfloat16


def test_sharded_safetensors_and_prefixes(tmp_path):
    src = _model("stripedhyena")
    save_pretrained(src, tmp_path / "one")
    sd = _tensors.read_safetensors(tmp_path / "one" / "model.safetensors")
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():  # Hugging Face StripedHyena checkpoints prefix every key with `backbone.`
        _tensors.write_safetensors(d / name, {"backbone." + k: sd[k] for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"backbone." + k: name for name, ks in shards.items() for k in ks}}))
    _assert_same_params(src, from_pretrained(d))
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="shard model-00002-of-00002.safetensors named by"):
        from_pretrained(d)


def test_pytorch_model_bin(tmp_path):
    torch = torch_refs.torch()  # fails under CI when missing, skips locally
    src = _model("llama")
    save_pretrained(src, tmp_path / "st")
    sd = _tensors.read_safetensors(tmp_path / "st" / "model.safetensors")
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    sd = {k: torch.tensor(v) for k, v in sd.items()}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.tensor(
        1.0 / 500.0 ** (np.arange(0, 6, 2, dtype=np.float32) / 6))  # an old transformers buffer, head_dim 6
    torch.save(sd, d / "pytorch_model.bin")
    _assert_same_params(src, from_pretrained(d))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] *= 2
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="inv_freq' does not match the config's RoPE"):
        from_pretrained(d)
    (d / "pytorch_model.bin").write_bytes(b"not a zip archive" * 4)
    with pytest.raises(ValueError, match=r"cannot read weight file .*pytorch_model\.bin"):
        from_pretrained(d)


# ------------------------------------------------------------------ broken directories

@pytest.fixture
def saved(tmp_path):
    """A saved Mamba model and its tensors (for rewriting)."""
    d = tmp_path / "ckpt"
    save_pretrained(_model("mamba"), d)
    return d, _tensors.read_safetensors(d / "model.safetensors")


def _rewrite(d, sd):
    _tensors.write_safetensors(d / "model.safetensors", sd)


def test_missing_config(saved):
    d, _ = saved
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json in"):
        from_pretrained(d)
    with pytest.raises(ValueError, match="checkpoint directory not found"):
        from_pretrained(d / "nope")


def test_unsupported_model_type_is_named_with_the_supported_list(saved):
    d, _ = saved
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*supported: \['mamba', 'mamba2', 'llama', "
                                         r"'mixtral', 'jamba', 'stripedhyena'\]"):
        from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        from_pretrained(d)


def test_truncated_or_corrupt_safetensors_names_the_file(saved):
    d, _ = saved
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read weight file .*model\.safetensors.*corrupt or truncated"):
        from_pretrained(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match=r"cannot read weight file .*model\.safetensors"):
        from_pretrained(d)


def test_missing_key_is_named(saved):
    d, sd = saved
    del sd["backbone.layers.1.mixer.A_log"]
    _rewrite(d, sd)
    with pytest.raises(ValueError, match=r"missing 1 tensor.*backbone\.layers\.1\.mixer\.A_log"):
        from_pretrained(d)


def test_unexpected_key_is_named(saved):
    d, sd = saved
    sd["backbone.layers.0.mixer.extra"] = np.zeros(3, np.float32)
    _rewrite(d, sd)
    with pytest.raises(ValueError, match=r"unexpected tensor 'backbone\.layers\.0\.mixer\.extra'"):
        from_pretrained(d)


def test_shape_mismatch_names_key_and_both_shapes(saved):
    d, sd = saved
    sd["backbone.layers.0.mixer.x_proj.weight"] = np.zeros((14, 32), np.float32)  # dt_rank 3 + 2 * 5 = 13 rows
    _rewrite(d, sd)
    with pytest.raises(ValueError, match=r"shape mismatch for 'backbone\.layers\.0\.mixer\.x_proj\.weight': "
                                         r"checkpoint \(14, 32\), model expects \(13, 32\)"):
        from_pretrained(d)


def test_tied_head_must_equal_the_embedding_and_mamba_ssm_name_is_accepted(saved):
    d, sd = saved
    emb = sd.pop("backbone.embeddings.weight")
    sd["backbone.embedding.weight"] = emb  # mamba_ssm's name
    sd["lm_head.weight"] = emb.copy()  # torch.save of a tied model holds the duplicate
    _rewrite(d, sd)
    from_pretrained(d)
    sd["lm_head.weight"] = emb + 1
    _rewrite(d, sd)
    with pytest.raises(ValueError, match=r"ties the embeddings but 'lm_head\.weight' differs"):
        from_pretrained(d)


def test_weight_file_discovery_errors(saved):
    d, _ = saved
    (d / "model.safetensors").rename(d / "a.safetensors")
    from_pretrained(d)  # a single weight file under another name is used
    (d / "b.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"several weight files .*\['a\.safetensors', 'b\.pt'\]"):
        from_pretrained(d)
    (d / "a.safetensors").unlink()
    (d / "b.pt").unlink()
    with pytest.raises(ValueError, match="no weight file in"):
        from_pretrained(d)


def test_unsupported_config_values(saved):
    d, _ = saved
    cfg = {"model_type": "llama", "vocab_size": 11, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_parameters": {"rope_type": "llama3",
                                                                                  "rope_theta": 1e4}}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_type 'llama3' is not supported"):
        from_pretrained(d)
    (d / "config.json").write_text(json.dumps({"model_type": "stripedhyena", "hidden_size": 8,
                                               "hyena_filter_groups": 8}))
    with pytest.raises(ValueError, match="hyena_filter_groups=8 is not supported"):
        from_pretrained(d)
    (d / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="mamba config is missing 'hidden_size'"):
        from_pretrained(d)


def test_save_refuses_non_empty_directory(saved):
    d, _ = saved
    model = _model("mamba", seed=1)
    with pytest.raises(ValueError, match="exists and is not an empty directory; pass overwrite=True"):
        save_pretrained(model, d)
    save_pretrained(model, d, overwrite=True, extra_config={"eos_token_id": 7})
    assert json.loads((d / "config.json").read_text())["eos_token_id"] == 7
    _assert_same_params(model, from_pretrained(d))


def test_export_rejects_patterns_without_a_checkpoint_format(tmp_path):
    cfg = pattern_config("MA", vocab_size=11, d_model=16, mixer_kwargs={"attention": {"num_heads": 2}})
    with pytest.raises(ValueError, match="no supported checkpoint format represents this layer pattern"):
        save_pretrained(LM(cfg, rngs=nnx.Rngs(0)), tmp_path)
    cfg = PRESETS["mamba"]().replace(norm="layer")
    with pytest.raises(ValueError, match="norm='layer', final_norm=True cannot be exported"):
        save_pretrained(LM(cfg, rngs=nnx.Rngs(0)), tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written by a failed export
    blocks = list(PRESETS["llama"]().blocks)
    blocks[1] = BlockSpec("attention", True, {**blocks[1].mixer_kwargs, "rope_base": 10.0})
    with pytest.raises(ValueError, match=r"attention layers differ in \['rope_base'\]"):
        save_pretrained(LM(PRESETS["llama"]().replace(blocks=tuple(blocks)), rngs=nnx.Rngs(0)), tmp_path / "y")


def test_mamba_ssm_native_hybrid_layout(tmp_path):
    """mamba_ssm's own config.json (no model_type) with attention layers and MLPs: the MHA's fused in_proj rows
    [q | k | v] and GatedMLP's fc1 rows [value | gate] are split into our q/k/v and up/gate (layout check only: no
    mamba_ssm model here)."""
    from seqmix_jax.models.checkpoints import key_map

    raw = {"d_model": 32, "n_layer": 3, "vocab_size": 50, "d_intermediate": 40, "pad_vocab_size_multiple": 16,
           "ssm_cfg": {"layer": "Mamba2", "d_state": 4, "headdim": 8, "chunk_size": 8}, "attn_layer_idx": [1],
           "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "rotary_emb_dim": 4,
                        "qkv_proj_bias": True, "out_proj_bias": False}, "rms_norm": True, "tie_embeddings": True}
    src = LM(mamba2_preset(**{k: v for k, v in raw.items() if k != "vocab_size"}, vocab_size=50),
             rngs=nnx.Rngs(3))
    flat = _params(src)
    sd = {e.key: e.to_ckpt(tuple(flat[p] for p in e.paths)) for e in key_map(src, "mamba_ssm")}
    assert sd["backbone.layers.1.mixer.in_proj.weight"].shape == (8 * (4 + 2 * 2), 32)
    assert sd["backbone.layers.0.mlp.fc1.weight"].shape == (2 * 128, 32)  # hidden rounded up to 128
    np.testing.assert_array_equal(sd["backbone.layers.0.mlp.fc1.weight"][:128], flat[("blocks", 0, "mlp", "up",
                                                                                       "kernel")].T)
    sd["backbone.embedding.weight"] = sd.pop("backbone.embeddings.weight")
    _tensors.write_safetensors(tmp_path / "model.safetensors", sd)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    back = from_pretrained(tmp_path)
    assert back.config.padded_vocab_size == 64
    _assert_same_params(src, back)
