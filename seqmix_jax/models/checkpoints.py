"""Import and export of PyTorch checkpoints: Hugging Face `mamba`, `mamba2`, `llama`, `mixtral`, `jamba` directories,
mamba_ssm's own `MambaLMHeadModel` directories, and StripedHyena (togethercomputer/stripedhyena) state dicts.

    model = from_pretrained("path/to/dir")          # -> seqmix_jax.models.LM with an equivalent ModelConfig
    save_pretrained(model, "path/to/out")           # config.json + model.safetensors, loadable by transformers

Tensors are read by `_tensors` (safetensors, or `torch.load(weights_only=True)`; never plain unpickling).

Key map (checkpoint key <- our parameter path; `T`: torch Linear (out, in) is our kernel (in, out) transposed;
`conv`: torch (c, 1, w) is our (w, c); `mode`: stripedhyena (d, n, 1, 2) is our (d, n, 2)):

  mamba / mamba2 (transformers and mamba_ssm; `backbone.embedding.weight` is read as `backbone.embeddings.weight`)
    backbone.embeddings.weight             embed.embedding
    backbone.layers.{i}.norm.weight        blocks.{i}.norm.scale
    backbone.layers.{i}.mixer.in_proj.weight / x_proj.weight / dt_proj.weight / out_proj.weight   (T) ...kernel
    backbone.layers.{i}.mixer.conv1d.weight / conv1d.bias    (conv) mixer.conv_weight / mixer.conv_bias
    backbone.layers.{i}.mixer.dt_proj.bias (Mamba-1) / dt_bias (Mamba-2)                     mixer.dt_bias
    backbone.layers.{i}.mixer.A_log, D, norm.weight (Mamba-2)         mixer.A_log, D, norm_weight
    backbone.layers.{i}.mixer.in_proj.weight (mamba_ssm MHA layer)    [q | k | v] rows -> mixer.{q,k,v}_proj.kernel
    backbone.layers.{i}.mixer.out_proj.weight (MHA)                    mixer.o_proj.kernel
    backbone.layers.{i}.norm2.weight, mlp.fc1.weight ([up | gate] rows), mlp.fc2.weight   mlp_norm, mlp.{up,gate,down}
    backbone.norm_f.weight                 norm_f.scale
    lm_head.weight (T, absent when tied)   lm_head.kernel
  llama
    model.embed_tokens.weight              embed.embedding
    model.layers.{i}.input_layernorm.weight / post_attention_layernorm.weight     blocks.{i}.norm / mlp_norm .scale
    model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight (T), bias}    blocks.{i}.mixer.{q,k,v,o}_proj.{kernel, bias}
    model.layers.{i}.mlp.{gate,up,down}_proj.{weight (T), bias}     blocks.{i}.mlp.{gate,up,down}.{kernel, bias}
    model.norm.weight                      norm_f.scale
    lm_head.weight (T, absent when tied)   lm_head.kernel
    ignored buffers: *.rotary_emb.inv_freq (checked against the config's RoPE base)
  mixtral (as llama for embeddings, norms, attention, head; the MoE is `block_sparse_moe` on disk, `mlp` in memory)
    model.layers.{i}.block_sparse_moe.gate.weight (T)               blocks.{i}.moe.router.kernel
    model.layers.{i}.block_sparse_moe.experts.{j}.w1 / w3 .weight   blocks.{i}.moe.wi[j][:, :f] / [:, f:]  (T)
    model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight         blocks.{i}.moe.wo[j]  (T)
  jamba
    model.embed_tokens.weight, model.final_layernorm.weight, lm_head.weight (T)   embed.embedding, norm_f, lm_head
    model.layers.{i}.input_layernorm.weight / pre_ff_layernorm.weight             blocks.{i}.norm / mlp_norm .scale
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (T)            blocks.{i}.mixer.{q,k,v,o}_proj.kernel
    model.layers.{i}.mamba.<as mamba above>, mamba.{dt,b,c}_layernorm.weight   mixer.<...>, {dt,b,c}_layernorm.scale
    model.layers.{i}.feed_forward.{gate,up,down}_proj.weight (T)    blocks.{i}.mlp.{gate,up,down}.kernel
    model.layers.{i}.feed_forward.router.weight (T)                 blocks.{i}.moe.router.kernel
    model.layers.{i}.feed_forward.experts.{j}.gate_proj / up_proj / down_proj .weight   moe.wi[j] halves / wo[j] (T)
  Experts, both families: the per-expert keys above are what transformers' save_pretrained writes and what export
  writes; the fused in-memory layout, `...experts.gate_up_proj (e, 2f, d)` (gate rows first) and
  `...experts.down_proj (e, d, f)`, is accepted on load too (`_tensors.fuse_experts`), per layer one or the other.
  stripedhyena (keys with or without the `backbone.` prefix of the Hugging Face checkpoints)
    embedding_layer.weight                 embed.embedding
    unembed.weight (T)                     lm_head.kernel (tied: a copy of embedding_layer.weight, must be equal)
    norm.scale                             norm_f.scale
    blocks.{i}.pre_norm.scale / post_norm.scale                     blocks.{i}.norm / mlp_norm .scale
    blocks.{i}.projections.{weight (T), bias}                       blocks.{i}.mixer.projections.{kernel, bias}
    blocks.{i}.filter.short_filter_weight (conv) / short_filter_bias  mixer.short_filter_weight / short_filter_bias
    blocks.{i}.filter.poles / residues (mode), filter.D            mixer.poles / residues (float32), mixer.D
    blocks.{i}.out_filter_dense.{weight (T), bias}                  mixer.out_proj.{kernel, bias}
    blocks.{i}.inner_mha_cls.Wqkv.{weight, bias} ([q | k | v] rows, split_fused_qkv)  mixer.{q,k,v}_proj
    blocks.{i}.inner_mha_cls.out_proj.{weight (T), bias}           mixer.o_proj.{kernel, bias}
    blocks.{i}.inner_mha_cls.rotary_emb.inv_freq   buffer, checked against rotary_emb_base
    blocks.{i}.mlp.l1 / l2 / l3.weight (T)                          blocks.{i}.mlp.gate / up / down.kernel
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix_jax.layers.attention import split_fused_qkv
from seqmix_jax.models import _tensors
from seqmix_jax.models.config import (BlockSpec, ModelConfig, jamba_preset, llama_preset, mamba2_preset,
                                      mamba_preset, mixtral_preset, striped_hyena_preset)
from seqmix_jax.models.lm import LM
from seqmix_jax.ops.rotary import rotary_inv_freq

SUPPORTED = ("mamba", "mamba2", "llama", "mixtral", "jamba", "stripedhyena")
CONFIG_FILES = ("config.json", "config.yml", "config.yaml")
Path_ = tuple  # a parameter path from nnx.to_flat_state, e.g. ("blocks", 0, "mixer", "A_log")


# ================================================================ configs

def read_config(directory) -> tuple[str, dict]:
    """(format, raw config) of a checkpoint directory; format is one of SUPPORTED or "mamba_ssm" (mamba_ssm's own
    config.json: d_model, n_layer, ssm_cfg, ...)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory not found: {directory}")
    files = [directory / n for n in CONFIG_FILES if (directory / n).is_file()]
    if not files:
        raise ValueError(f"no config.json in {directory} (a checkpoint directory needs config.json, or a "
                         f"stripedhyena config.yml, next to its weights)")
    f = files[0]
    raw = _tensors.read_json(f, "config") if f.suffix == ".json" else _tensors.read_yaml(f, "config")
    model_type = raw.get("model_type")
    if model_type is None:
        if "hyena_layer_idxs" in raw or "attn_layer_idxs" in raw:
            return "stripedhyena", raw
        if "d_model" in raw and "n_layer" in raw:
            return "mamba_ssm", raw
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported model_type {model_type!r} in {f}; supported: {list(SUPPORTED)} (and "
                         f"mamba_ssm / stripedhyena configs without a model_type)")
    return model_type, raw


def config_from_checkpoint(fmt: str, raw: dict) -> ModelConfig:
    """A checkpoint config (transformers / mamba_ssm / stripedhyena names) -> an equivalent ModelConfig."""
    return {"mamba": _mamba_config, "mamba2": _mamba2_config, "llama": _llama_config, "mixtral": _mixtral_config,
            "jamba": _jamba_config, "mamba_ssm": _mamba_ssm_config, "stripedhyena": _striped_hyena_config}[fmt](raw)


def _float(x) -> float:
    """A JSON number, or transformers' encoding of a non-finite float ({"__float__": "Infinity"})."""
    if isinstance(x, dict) and set(x) == {"__float__"}:
        x = x["__float__"]
    return float(x)


def _req(raw, key, fmt):
    if key not in raw:
        raise ValueError(f"{fmt} config is missing {key!r}")
    return raw[key]


def _mamba_config(raw):
    d = _req(raw, "hidden_size", "mamba")
    expand = raw.get("expand", 2)
    inner = raw.get("intermediate_size", expand * d)
    if inner != expand * d:
        raise ValueError(f"mamba config: intermediate_size={inner} != expand {expand} * hidden_size {d}")
    dt_rank = raw.get("time_step_rank", "auto")
    ssm = dict(d_state=raw.get("state_size", 16), d_conv=raw.get("conv_kernel", 4), expand=expand,
               dt_rank=math.ceil(d / 16) if dt_rank == "auto" else dt_rank, bias=raw.get("use_bias", False),
               conv_bias=raw.get("use_conv_bias", True))
    return mamba_preset(d_model=d, n_layer=_req(raw, "num_hidden_layers", "mamba"),
                        vocab_size=_req(raw, "vocab_size", "mamba"), ssm_cfg=ssm,
                        norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
                        residual_in_fp32=raw.get("residual_in_fp32", True), pad_vocab_size_multiple=1,
                        tie_embeddings=raw.get("tie_word_embeddings", True))


def _mamba2_config(raw):
    d = _req(raw, "hidden_size", "mamba2")
    expand = raw.get("expand", 2)
    heads, head_dim = _req(raw, "num_heads", "mamba2"), raw.get("head_dim", 64)
    if heads * head_dim != expand * d:
        raise ValueError(f"mamba2 config: num_heads {heads} * head_dim {head_dim} != expand {expand} * hidden_size "
                         f"{d} (a d_ssm < d_inner layout is not supported)")
    if not raw.get("rms_norm", True) or raw.get("norm_before_gate", False):
        raise ValueError("mamba2 config: only rms_norm=True, norm_before_gate=False is supported")
    limit = tuple(_float(x) for x in raw.get("time_step_limit", (0.0, float("inf"))))
    ssm = dict(d_state=raw.get("state_size", 128), d_conv=raw.get("conv_kernel", 4), expand=expand,
               headdim=head_dim, ngroups=raw.get("n_groups", 1), norm_eps=raw.get("layer_norm_epsilon", 1e-5),
               dt_limit=limit, chunk_size=raw.get("chunk_size", 256), bias=raw.get("use_bias", False),
               conv_bias=raw.get("use_conv_bias", True))
    return mamba2_preset(d_model=d, n_layer=_req(raw, "num_hidden_layers", "mamba2"),
                         vocab_size=_req(raw, "vocab_size", "mamba2"), ssm_cfg=ssm,
                         norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
                         residual_in_fp32=raw.get("residual_in_fp32", True), pad_vocab_size_multiple=1,
                         tie_embeddings=raw.get("tie_word_embeddings", True))


def _mamba_ssm_config(raw):
    ssm = dict(raw.get("ssm_cfg") or {})
    layer = ssm.get("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ValueError(f"mamba_ssm config: ssm_cfg layer {layer!r} is not supported (Mamba1, Mamba2)")
    common = dict(d_model=raw["d_model"], n_layer=raw["n_layer"], vocab_size=_req(raw, "vocab_size", "mamba_ssm"),
                  d_intermediate=raw.get("d_intermediate", 0), ssm_cfg=ssm, rms_norm=raw.get("rms_norm", True),
                  residual_in_fp32=raw.get("residual_in_fp32", True),
                  pad_vocab_size_multiple=raw.get("pad_vocab_size_multiple", 8),
                  tie_embeddings=raw.get("tie_embeddings", True))
    if layer == "Mamba1":
        if raw.get("attn_layer_idx"):
            raise ValueError("mamba_ssm config: attention layers are supported with Mamba2 mixers only")
        return mamba_preset(**common)
    return mamba2_preset(**common, attn_layer_idx=raw.get("attn_layer_idx") or (), attn_cfg=raw.get("attn_cfg"))


def _rope_theta(raw, fmt, default):
    """The RoPE base of a transformers config (`rope_parameters`, or the older `rope_theta` / `rope_scaling`);
    only the default (unscaled) RoPE is supported."""
    rope = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"{fmt} config: rope_type {rope_type!r} is not supported (only 'default' RoPE)")
    return rope.get("rope_theta", raw.get("rope_theta", default))


def _llama_config(raw):
    theta = _rope_theta(raw, "llama", 10000.0)
    if raw.get("pretraining_tp", 1) != 1:
        raise ValueError(f"llama config: pretraining_tp={raw['pretraining_tp']} is not supported (1)")
    return llama_preset(vocab_size=_req(raw, "vocab_size", "llama"), hidden_size=_req(raw, "hidden_size", "llama"),
                        intermediate_size=_req(raw, "intermediate_size", "llama"),
                        num_hidden_layers=_req(raw, "num_hidden_layers", "llama"),
                        num_attention_heads=_req(raw, "num_attention_heads", "llama"),
                        num_key_value_heads=raw.get("num_key_value_heads"), head_dim=raw.get("head_dim"),
                        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=theta,
                        attention_bias=raw.get("attention_bias", False), mlp_bias=raw.get("mlp_bias", False),
                        hidden_act=raw.get("hidden_act", "silu"),
                        tie_word_embeddings=raw.get("tie_word_embeddings", False),
                        max_position_embeddings=raw.get("max_position_embeddings"))


def _num_experts(raw, own, alias, default):
    """transformers maps the other model's name onto its own (MixtralConfig num_experts -> num_local_experts)."""
    if own in raw and alias in raw and raw[own] != raw[alias]:
        raise ValueError(f"config sets both {own}={raw[own]} and {alias}={raw[alias]}")
    return raw.get(own, raw.get(alias, default))


def _mixtral_config(raw):
    """transformers `MixtralConfig`. `router_jitter_noise` (training-time input noise) is dropped: inference never
    applies it, and training here does not implement it."""
    fmt = "mixtral"
    return mixtral_preset(
        vocab_size=_req(raw, "vocab_size", fmt), hidden_size=_req(raw, "hidden_size", fmt),
        intermediate_size=_req(raw, "intermediate_size", fmt),
        num_hidden_layers=_req(raw, "num_hidden_layers", fmt),
        num_attention_heads=_req(raw, "num_attention_heads", fmt),
        num_key_value_heads=raw.get("num_key_value_heads", 8), head_dim=raw.get("head_dim"),
        hidden_act=raw.get("hidden_act", "silu"), max_position_embeddings=raw.get("max_position_embeddings", 131072),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5), rope_theta=_rope_theta(raw, fmt, 1e6),
        tie_word_embeddings=raw.get("tie_word_embeddings", False), sliding_window=raw.get("sliding_window"),
        num_experts_per_tok=raw.get("num_experts_per_tok", 2),
        num_local_experts=_num_experts(raw, "num_local_experts", "num_experts", 8))


def _jamba_config(raw):
    """transformers `JambaConfig`. `use_mamba_kernels`, `use_mambapy` and `use_associative_scan` choose PyTorch
    implementations of the same math and are ignored."""
    fmt = "jamba"
    d, heads = _req(raw, "hidden_size", fmt), _req(raw, "num_attention_heads", fmt)
    if raw.get("head_dim") is not None and raw["head_dim"] * heads != d:
        raise ValueError(f"jamba config: head_dim={raw['head_dim']} != hidden_size {d} / num_attention_heads "
                         f"{heads} is not supported")
    return jamba_preset(
        vocab_size=_req(raw, "vocab_size", fmt), hidden_size=d, intermediate_size=_req(raw, "intermediate_size", fmt),
        num_hidden_layers=_req(raw, "num_hidden_layers", fmt), num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads", 8), hidden_act=raw.get("hidden_act", "silu"),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), max_position_embeddings=raw.get("max_position_embeddings", 262144),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        num_experts_per_tok=raw.get("num_experts_per_tok", 2),
        num_experts=_num_experts(raw, "num_experts", "num_local_experts", 16),
        expert_layer_period=raw.get("expert_layer_period", 2), expert_layer_offset=raw.get("expert_layer_offset", 1),
        attn_layer_period=raw.get("attn_layer_period", 8), attn_layer_offset=raw.get("attn_layer_offset", 4),
        mamba_d_state=raw.get("mamba_d_state", 16), mamba_d_conv=raw.get("mamba_d_conv", 4),
        mamba_expand=raw.get("mamba_expand", 2), mamba_dt_rank=raw.get("mamba_dt_rank", "auto"),
        mamba_conv_bias=raw.get("mamba_conv_bias", True), mamba_proj_bias=raw.get("mamba_proj_bias", False))


def _striped_hyena_config(raw):
    """stripedhyena reads its config with `.get` defaults; those defaults (not SH-7B's values) apply here."""
    d = _req(raw, "hidden_size", "stripedhyena")
    if raw.get("num_filters", d) != d:
        raise ValueError(f"stripedhyena config: num_filters={raw['num_filters']} != hidden_size={d} is not supported")
    if raw.get("hyena_filter_groups", d) != 1:
        raise ValueError(f"stripedhyena config: hyena_filter_groups={raw.get('hyena_filter_groups', d)} is not "
                         f"supported (1: one filter per channel, as SH-7B)")
    for flag in ("smeared_gqa", "evo2_style_activations", "interleave"):
        if raw.get(flag):
            raise ValueError(f"stripedhyena config: {flag}=True is not supported")
    if raw.get("long_fir_threshold") is not None:
        raise ValueError("stripedhyena config: long_fir_threshold (a truncated long filter) is not supported")
    heads = _req(raw, "num_attention_heads", "stripedhyena")
    inner = raw.get("inner_mlp_size")
    if inner is None:  # stripedhyena's ParallelGatedMLP rounding
        m = raw.get("inner_size_multiple_of", 64) * raw.get("model_parallel_size", 1)
        inner = m * ((int(2 * d * 4 / 3) + m - 1) // m)
    cfg = striped_hyena_preset(
        vocab_size=_req(raw, "vocab_size", "stripedhyena"), hidden_size=d,
        num_layers=_req(raw, "num_layers", "stripedhyena"), attn_layer_idxs=raw.get("attn_layer_idxs") or [],
        hyena_layer_idxs=raw.get("hyena_layer_idxs") or [], num_attention_heads=heads,
        proj_groups=raw.get("proj_groups", 1), state_size=_req(raw, "state_size", "stripedhyena"),
        short_filter_length=_req(raw, "short_filter_length", "stripedhyena"),
        short_filter_bias=bool(raw.get("short_filter_bias", True)), eps=_req(raw, "eps", "stripedhyena"),
        rotary_emb_base=raw.get("rotary_emb_base", 10000), inner_mlp_size=inner,
        mlp_activation=raw.get("mlp_activation", "silu"), tie_embeddings=bool(raw.get("tie_embeddings")),
        mha_out_proj_bias=raw.get("mha_out_proj_bias", True), qkv_proj_bias=raw.get("qkv_proj_bias", True),
        column_split_hyena=raw.get("column_split_hyena", True), final_norm=raw.get("final_norm", True),
        use_flash_rmsnorm=raw.get("use_flash_rmsnorm", False),
        make_vocab_size_divisible_by=raw.get("make_vocab_size_divisible_by", 1))
    if raw.get("use_interpolated_rotary_pos_emb"):
        scale = float(raw.get("rotary_emb_scaling_factor", 1.0))
        cfg = cfg.replace(blocks=tuple(
            BlockSpec(b.mixer, b.mlp, {**b.mixer_kwargs, "rope_position_scale": scale}) if b.mixer == "attention"
            else b for b in cfg.blocks))
    return cfg


# ================================================================ key maps

_T = (lambda a: a.T, lambda a: a.T)
_ID = (lambda a: a, lambda a: a)
_CONV = (lambda a: a[:, 0, :].T, lambda a: a.T[:, None, :])
_MODE = (lambda a: a[:, :, 0], lambda a: a[:, :, None])


@dataclasses.dataclass(frozen=True)
class Entry:
    """One checkpoint tensor and the parameter(s) of ours it fills: `to_ours(tensor) -> arrays` (one per path),
    `to_ckpt(arrays) -> tensor`."""

    key: str
    paths: tuple[Path_, ...]
    to_ours: Callable
    to_ckpt: Callable


def _leaf(name):
    """A Linear / norm leaf: kernel -> weight (transposed), scale -> weight, bias -> bias."""
    return ("weight", _T) if name == "kernel" else ("weight", _ID) if name == "scale" else (name, _ID)


def _single(key, path, fns):
    to_ours, to_ckpt = fns
    return Entry(key, (path,), lambda a, f=to_ours: (f(a),), lambda arrs, f=to_ckpt: f(arrs[0]))


def _fused(key, paths, sizes, transpose):
    """Rows of one tensor split in `sizes` over several of our parameters (fused qkv, mamba_ssm fc1)."""
    bounds = np.cumsum(sizes)[:-1]

    def to_ours(a):
        parts = np.split(a, bounds, axis=0)
        return tuple(p.T if transpose else p for p in parts)

    def to_ckpt(arrs):
        return np.concatenate([a.T if transpose else a for a in arrs], axis=0)

    return Entry(key, tuple(paths), to_ours, to_ckpt)


_MAMBA_MIXER = {"conv_weight": ("conv1d.weight", _CONV), "conv_bias": ("conv1d.bias", _ID), "A_log": ("A_log", _ID),
                "D": ("D", _ID), "norm_weight": ("norm.weight", _ID)}
_SH_MIXER = {"short_filter_weight": ("filter.short_filter_weight", _CONV),
             "short_filter_bias": ("filter.short_filter_bias", _ID), "poles": ("filter.poles", _MODE),
             "residues": ("filter.residues", _MODE), "D": ("filter.D", _ID)}
_LINEAR_RENAMES = {
    "mamba": {"in_proj": "in_proj", "x_proj": "x_proj", "dt_proj": "dt_proj", "out_proj": "out_proj",
              "o_proj": "out_proj"},
    "llama": {p: f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    "stripedhyena": {"projections": "projections", "out_proj": "out_filter_dense", "o_proj": "inner_mha_cls.out_proj"},
    "jamba": {**{p: f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
              **{p: f"mamba.{p}" for p in ("in_proj", "x_proj", "dt_proj", "out_proj", "dt_layernorm", "b_layernorm",
                                           "c_layernorm")}},
}
_LINEAR_RENAMES["mixtral"] = _LINEAR_RENAMES["llama"]
_EXPERTS = (lambda a: a.transpose(0, 2, 1), lambda a: a.transpose(0, 2, 1))  # torch (e, out, in) <-> ours (e, in, out)
_MOE = {  # our MoE parameter -> key after the block prefix (transformers' in-memory, fused expert layout)
    "mixtral": {("router", "kernel"): ("mlp.gate.weight", _T), ("wi",): ("mlp.experts.gate_up_proj", _EXPERTS),
                ("wo",): ("mlp.experts.down_proj", _EXPERTS)},
    "jamba": {("router", "kernel"): ("feed_forward.router.weight", _T),
              ("wi",): ("feed_forward.experts.gate_up_proj", _EXPERTS),
              ("wo",): ("feed_forward.experts.down_proj", _EXPERTS)},
}
_PREFIX = {"mamba": "backbone.layers.{}.", "llama": "model.layers.{}.", "mixtral": "model.layers.{}.",
           "jamba": "model.layers.{}.", "stripedhyena": "blocks.{}."}
_NORM_NAMES = {"mamba": ("norm", "norm2"), "llama": ("input_layernorm", "post_attention_layernorm"),
               "mixtral": ("input_layernorm", "post_attention_layernorm"),
               "jamba": ("input_layernorm", "pre_ff_layernorm"), "stripedhyena": ("pre_norm", "post_norm")}
_MLP_NAMES = {"llama": {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
              "jamba": {"gate": "feed_forward.gate_proj", "up": "feed_forward.up_proj",
                        "down": "feed_forward.down_proj"},
              "stripedhyena": {"gate": "mlp.l1", "up": "mlp.l2", "down": "mlp.l3"}}
_TOP = {  # our top-level path -> key, per format family
    "mamba": {("embed", "embedding"): ("backbone.embeddings.weight", _ID),
              ("norm_f", "scale"): ("backbone.norm_f.weight", _ID),
              ("norm_f", "bias"): ("backbone.norm_f.bias", _ID), ("lm_head", "kernel"): ("lm_head.weight", _T)},
    "llama": {("embed", "embedding"): ("model.embed_tokens.weight", _ID),
              ("norm_f", "scale"): ("model.norm.weight", _ID),
              ("lm_head", "kernel"): ("lm_head.weight", _T)},
    "jamba": {("embed", "embedding"): ("model.embed_tokens.weight", _ID),
              ("norm_f", "scale"): ("model.final_layernorm.weight", _ID),
              ("lm_head", "kernel"): ("lm_head.weight", _T)},
    "stripedhyena": {("embed", "embedding"): ("embedding_layer.weight", _ID), ("norm_f", "scale"): ("norm.scale", _ID),
                     ("lm_head", "kernel"): ("unembed.weight", _T)},
}
_TOP["mixtral"] = _TOP["llama"]


def _family(fmt):
    return {"mamba": "mamba", "mamba2": "mamba", "mamba_ssm": "mamba"}.get(fmt, fmt)


def key_map(model: LM, fmt: str) -> list[Entry]:
    """Every checkpoint tensor of `model` in format `fmt`, with the parameters it fills."""
    fam = _family(fmt)
    paths = [tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    entries, done = [], set()
    for path in paths:
        if path in done:
            continue
        if path[0] != "blocks":
            if path not in _TOP[fam]:
                raise ValueError(f"parameter {'.'.join(map(str, path))} has no {fmt} checkpoint name")
            key, fns = _TOP[fam][path]
            entries.append(_single(key, path, fns))
            continue
        i, part, rest = path[1], path[2], path[3:]
        block = model.blocks[i]
        prefix = _PREFIX[fam].format(i)
        if part in ("norm", "mlp_norm"):
            leaf = {"scale": "scale" if fam == "stripedhyena" else "weight"}.get(rest[0], rest[0])
            entries.append(_single(f"{prefix}{_NORM_NAMES[fam][part == 'mlp_norm']}.{leaf}", path, _ID))
        elif part == "mlp":
            entries.append(_mlp_entry(fam, prefix, block, path, done))
        elif part == "moe":
            if fam not in _MOE or rest not in _MOE[fam]:
                raise ValueError(f"MoE parameter {'.'.join(map(str, path))} has no {fmt} checkpoint name (mixtral and "
                                 f"jamba checkpoints hold a router and the experts, no shared expert)")
            key, fns = _MOE[fam][rest]
            entries.append(_single(prefix + key, path, fns))
        elif block.kind == "attention" and fam in ("mamba", "stripedhyena") and rest[0] in ("q_proj", "k_proj",
                                                                                           "v_proj"):
            entries.append(_fused_qkv_entry(fam, prefix, block, path, done))
        else:
            entries.append(_mixer_entry(fam, prefix, block, path))
        done.add(path)
    return entries


def _mixer_entry(fam, prefix, block, path):
    rest = path[3:]
    if len(rest) == 2:  # a Linear
        sub, leaf = rest
        if sub not in _LINEAR_RENAMES[fam]:
            raise ValueError(f"{block.kind} parameter {'.'.join(map(str, path))} has no {fam} checkpoint name")
        name, fns = _leaf(leaf)
        mixer = "mixer." if fam == "mamba" else ""
        return _single(f"{prefix}{mixer}{_LINEAR_RENAMES[fam][sub]}.{name}", path, fns)
    (name,) = rest
    if fam in ("mamba", "jamba") and block.kind in ("mamba", "mamba2") and (name == "dt_bias" or name in _MAMBA_MIXER):
        mixer = "mixer." if fam == "mamba" else "mamba."
        if name == "dt_bias":  # Mamba-1 keeps the dt_proj bias apart; Mamba-2 calls it dt_bias
            key = "dt_proj.bias" if block.kind == "mamba" else "dt_bias"
            return _single(f"{prefix}{mixer}{key}", path, _ID)
        key, fns = _MAMBA_MIXER[name]
        return _single(f"{prefix}{mixer}{key}", path, fns)
    if fam == "stripedhyena" and name in _SH_MIXER:
        key, fns = _SH_MIXER[name]
        return _single(f"{prefix}{key}", path, fns)
    raise ValueError(f"{block.kind} parameter {'.'.join(map(str, path))} has no {fam} checkpoint name")


def _fused_qkv_entry(fam, prefix, block, path, done):
    a = block.mixer
    leaf = path[-1]
    paths = [path[:3] + (p, leaf) for p in ("q_proj", "k_proj", "v_proj")]
    done.update(paths)
    key = {"mamba": f"{prefix}mixer.in_proj", "stripedhyena": f"{prefix}inner_mha_cls.Wqkv"}[fam]
    sizes = [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]
    e = _fused(f"{key}.{'weight' if leaf == 'kernel' else leaf}", paths, sizes, transpose=leaf == "kernel")
    if leaf == "kernel":  # split_fused_qkv validates the row count against the head layout
        heads = (a.num_heads, a.num_kv_heads, a.head_dim)
        return dataclasses.replace(e, to_ours=lambda t: tuple(p.T for p in split_fused_qkv(t, *heads)))
    return e


def _mlp_entry(fam, prefix, block, path, done):
    sub, leaf = path[3:]
    if fam == "mamba":  # mamba_ssm GatedMLP: fc1 rows [value | gate], out = fc2(value * silu(gate))
        if sub == "down":
            name, fns = _leaf(leaf)
            return _single(f"{prefix}mlp.fc2.{name}", path, fns)
        paths = [path[:3] + (p, leaf) for p in ("up", "gate")]
        done.update(paths)
        f = block.mlp.hidden
        return _fused(f"{prefix}mlp.fc1.{'weight' if leaf == 'kernel' else leaf}", paths, [f, f],
                      transpose=leaf == "kernel")
    if fam not in _MLP_NAMES:
        raise ValueError(f"MLP parameter {'.'.join(map(str, path))} has no {fam} checkpoint name")
    name, fns = _leaf(leaf)
    return _single(f"{prefix}{_MLP_NAMES[fam][sub]}.{name}", path, fns)


# ================================================================ import

def _dtype_name(dtype):
    return None if dtype is None else jnp.dtype(dtype).name


def _normalize_keys(fmt, sd: dict) -> dict:
    fam = _family(fmt)
    out = {}
    for k, v in sd.items():
        if fam == "stripedhyena" and k.startswith("backbone."):
            k = k[len("backbone."):]
        if fam == "mamba" and k == "backbone.embedding.weight":  # mamba_ssm name; transformers renames it too
            k = "backbone.embeddings.weight"
        if fam == "mixtral":  # the on-disk name of Mixtral's MoE block; transformers renames it on load too
            k = k.replace(".block_sparse_moe.", ".mlp.")
        if k in out:
            raise ValueError(f"checkpoint holds {k!r} twice (with and without a prefix / under two names)")
        out[k] = v
    return out


_INV_FREQ = re.compile(r"(.*\.)?rotary_emb\.inv_freq$")
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "jamba": ("gate_proj", "up_proj", "down_proj")}  # gate, up, down


def _expert_counts(fmt, config) -> dict:
    """{expert tensor base (fused layout): number of experts} for every MoE block of `config`."""
    ffn = "mlp" if fmt == "mixtral" else "feed_forward"
    return {f"model.layers.{i}.{ffn}.experts": b.moe["num_experts"] for i, b in enumerate(config.blocks)
            if b.moe is not None}


def from_pretrained(path, *, dtype=None, param_dtype=jnp.float32) -> LM:
    """Load a checkpoint directory (see the module docstring) into an `LM` with an equivalent config.

    Args:
      path: directory with config.json (or a stripedhyena config.yml) and the weights.
      dtype: compute dtype of the model (None: from the parameters, float32).
      param_dtype: storage dtype; A_log, D, dt biases and StripedHyena poles / residues stay float32.
    Raises ValueError for a missing config, an unsupported model_type, an unreadable weight file, and for missing,
    unexpected or wrongly shaped tensors (naming the key and both shapes)."""
    path = Path(path)
    fmt, raw = read_config(path)
    config = config_from_checkpoint(fmt, raw).replace(dtype=_dtype_name(dtype), param_dtype=_dtype_name(param_dtype))
    sd = _normalize_keys(fmt, _tensors.load_state_dict(path))
    if fmt in _EXPERT_NAMES:  # per-expert (on-disk) or fused (in-memory) expert tensors -> the fused layout
        sd = _tensors.fuse_experts(sd, _expert_counts(fmt, config), _EXPERT_NAMES[fmt])
    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    variables = {tuple(p): v for p, v in nnx.to_flat_state(params)}
    entries = key_map(abstract, fmt)
    values = _assign(entries, sd, variables, config, fmt)
    for p, var in variables.items():
        var.set_value(jnp.asarray(values[p], var.dtype))
    return nnx.merge(graphdef, params, rest)


def _assign(entries, sd, variables, config, fmt) -> dict:
    used, values = set(), {}
    missing = [e.key for e in entries if e.key not in sd]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) the {fmt} config needs, e.g. {missing[:5]}")
    for e in entries:
        t = np.asarray(sd[e.key])
        want = e.to_ckpt(tuple(np.broadcast_to(np.zeros((), np.float32), variables[p].shape) for p in e.paths)).shape
        if t.shape != want:
            raise ValueError(f"shape mismatch for {e.key!r}: checkpoint {tuple(t.shape)}, model expects {tuple(want)} "
                             f"(config.json and weights disagree)")
        for p, v in zip(e.paths, e.to_ours(t)):
            values[p] = v
        used.add(e.key)
    for k in sorted(set(sd) - used):
        if not _expected_extra(k, sd, config, fmt):
            raise ValueError(f"unexpected tensor {k!r} in the checkpoint (shape {tuple(np.shape(sd[k]))}): the {fmt} "
                             f"config has no parameter for it")
    return values


def _expected_extra(key, sd, config, fmt) -> bool:
    """Buffers and tied duplicates that carry no parameter of their own; checked against what they duplicate."""
    fam = _family(fmt)
    tied_head = "unembed.weight" if fam == "stripedhyena" else "lm_head.weight"
    if key == tied_head and config.tie_embeddings:
        emb = _TOP[fam][("embed", "embedding")][0]
        if not np.array_equal(np.asarray(sd[key]), np.asarray(sd[emb])):
            raise ValueError(f"config ties the embeddings but {key!r} differs from {emb!r}")
        return True
    m = _INV_FREQ.match(key)
    if m:
        _check_inv_freq(key, np.asarray(sd[key], np.float32), config)
        return True
    return False


def _check_inv_freq(key, inv_freq, config):
    """A stored RoPE `inv_freq` buffer must be the one our attention recomputes from the config."""
    idx = re.search(r"(?:layers|blocks)\.(\d+)\.", key)
    specs = [config.blocks[int(idx.group(1))]] if idx and int(idx.group(1)) < config.num_layers else config.blocks
    attn = [s for s in specs if s.mixer == "attention"]
    if not attn:
        raise ValueError(f"unexpected tensor {key!r}: no attention layer to take it")
    kw = attn[0].mixer_kwargs
    head_dim = kw.get("head_dim") or config.d_model // kw["num_heads"]
    rotary_dim = kw.get("rotary_dim", head_dim)
    ours = np.asarray(rotary_inv_freq(rotary_dim, kw.get("rope_base", 10000.0)))
    if ours.shape != inv_freq.shape or not np.allclose(ours, inv_freq, rtol=1e-5, atol=0):
        raise ValueError(f"{key!r} does not match the config's RoPE (rotary_dim {rotary_dim}, base "
                         f"{kw.get('rope_base', 10000.0)}): shapes {inv_freq.shape} vs {ours.shape}")


# ================================================================ export

def export_format(model: LM) -> str:
    """The checkpoint format that represents `model`: mamba / mamba2 / llama / mixtral / jamba (transformers) or
    stripedhyena."""
    cfg, kinds = model.config, {b.mixer for b in model.config.blocks}
    ffn = {"moe" if b.moe is not None else "mlp" if b.mlp else "none" for b in cfg.blocks}
    jamba_mamba = any(b.mixer_kwargs.get("bcdt_rms_norm") for b in cfg.blocks if b.mixer == "mamba")
    if kinds == {"mamba"} and ffn == {"none"} and not jamba_mamba:
        return "mamba"
    if kinds == {"mamba2"} and ffn == {"none"}:
        return "mamba2"
    if kinds == {"attention"} and ffn == {"mlp"}:
        return "llama"
    if kinds == {"attention"} and ffn == {"moe"}:
        return "mixtral"
    if kinds <= {"attention", "mamba"} and "none" not in ffn and ("moe" in ffn or "mamba" in kinds):
        return "jamba"
    if kinds <= {"attention", "striped_hyena"} and ffn == {"mlp"} and "striped_hyena" in kinds:
        return "stripedhyena"
    raise ValueError(f"no supported checkpoint format represents this layer pattern (mixers {sorted(kinds)}, "
                     f"channel mixers {sorted(ffn)}); exportable: all-mamba or all-mamba2 without MLPs, all-attention "
                     f"with MLPs (llama) or with MoE (mixtral), mamba + attention with an MLP or MoE in every layer "
                     f"(jamba), attention + striped_hyena with MLPs (stripedhyena)")


def save_pretrained(model: LM, path, *, overwrite: bool = False, extra_config: dict | None = None) -> Path:
    """Write `model` as config.json + model.safetensors in the Hugging Face layout of `export_format(model)`
    (transformers' `from_pretrained` loads mamba / mamba2 / llama; stripedhyena configs load with ours and their
    state dict with stripedhyena's `StripedHyena`). `extra_config` entries (token ids, ...) are merged into
    config.json. Refuses a non-empty directory unless `overwrite`; parameters are written float32 unless the
    model stores them in another dtype."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise ValueError(f"{path} exists and is not an empty directory; pass overwrite=True to replace its "
                         f"checkpoint files")
    fmt = export_format(model)
    config = {"mamba": _export_mamba, "mamba2": _export_mamba2, "llama": _export_llama, "mixtral": _export_mixtral,
              "jamba": _export_jamba, "stripedhyena": _export_striped_hyena}[fmt](model)
    config.update(extra_config or {})
    flat = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tensors = {e.key: e.to_ckpt(tuple(flat[p] for p in e.paths)) for e in key_map(model, fmt)}
    if fmt in _EXPERT_NAMES:  # the per-expert layout transformers' save_pretrained writes (and the Hub holds)
        tensors = _tensors.unfuse_experts(tensors, _EXPERT_NAMES[fmt])
        if fmt == "mixtral":
            tensors = {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in tensors.items()}
    if fmt == "stripedhyena":
        if model.config.tie_embeddings:  # stripedhyena's state_dict holds both names
            tensors["unembed.weight"] = tensors["embedding_layer.weight"].copy()
        for i, b in enumerate(model.blocks):  # a persistent buffer there: strict loading needs it
            if b.kind == "attention":
                tensors[f"blocks.{i}.inner_mha_cls.rotary_emb.inv_freq"] = np.asarray(
                    rotary_inv_freq(b.mixer.rotary_dim, b.mixer.rope_base), np.float32)
    path.mkdir(parents=True, exist_ok=True)
    for stale in (_tensors.SAFETENSORS_INDEX, _tensors.TORCH_BIN, _tensors.TORCH_BIN_INDEX):
        if (path / stale).exists():  # would shadow or contradict the new weights
            (path / stale).unlink()
    _tensors.write_safetensors(path / _tensors.SAFETENSORS, tensors)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def _uniform(model, kind, attrs) -> dict:
    """Mixer attributes that must agree across all layers of `kind` (a checkpoint config has one value)."""
    vals = [{a: getattr(b.mixer, a) for a in attrs} for b in model.blocks if b.kind == kind]
    for v in vals[1:]:
        if v != vals[0]:
            raise ValueError(f"{kind} layers differ in {sorted(k for k in v if v[k] != vals[0][k])}; a checkpoint "
                             f"config holds one value")
    return vals[0]


def _norm_info(model, allowed):
    cfg = model.config
    if cfg.norm not in allowed or not cfg.final_norm:
        raise ValueError(f"norm={cfg.norm!r}, final_norm={cfg.final_norm} cannot be exported (needs {allowed}, "
                         f"final norm)")


def _export_mamba_common(model, kind):
    cfg = model.config
    _norm_info(model, ("rms",))
    m = model.blocks[0].mixer
    return dict(vocab_size=cfg.padded_vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
                state_size=m.d_state, conv_kernel=m.d_conv, expand=m.d_inner // cfg.d_model,
                intermediate_size=m.d_inner, use_bias=m.in_proj.use_bias, use_conv_bias=m.conv_bias is not None,
                layer_norm_epsilon=cfg.norm_eps, residual_in_fp32=cfg.residual_in_fp32,
                tie_word_embeddings=cfg.tie_embeddings, model_type=kind,
                architectures=["MambaForCausalLM" if kind == "mamba" else "Mamba2ForCausalLM"])


def _export_mamba(model):
    out = _export_mamba_common(model, "mamba")
    out.update(time_step_rank=_uniform(model, "mamba", ["dt_rank", "d_state", "d_conv", "d_inner"])["dt_rank"])
    return out


def _export_mamba2(model):
    out = _export_mamba_common(model, "mamba2")
    u = _uniform(model, "mamba2", ["nheads", "headdim", "ngroups", "d_state", "d_conv", "d_inner", "chunk_size",
                                   "dt_limit", "rmsnorm", "norm_before_gate", "D_has_hdim", "norm_eps"])
    if not u["rmsnorm"] or u["norm_before_gate"] or u["D_has_hdim"] or u["norm_eps"] != model.config.norm_eps:
        raise ValueError("mamba2 export needs rmsnorm=True, norm_before_gate=False, D_has_hdim=False and the mixer "
                         "norm eps equal to the model's norm eps (transformers' Mamba2 has one epsilon)")
    out.update(num_heads=u["nheads"], head_dim=u["headdim"], n_groups=u["ngroups"], chunk_size=u["chunk_size"],
               time_step_limit=list(u["dt_limit"]))
    return out


def _attention_info(model, *, rope=True, window=False):
    """The attention layers' shared settings; they must be causal with the default scale, no soft-cap, full-head
    rotate-half RoPE (`rope`) or none, and no sliding window unless `window`."""
    u = _uniform(model, "attention", ["num_heads", "num_kv_heads", "head_dim", "rotary_dim", "rope_base",
                                      "rope_interleaved", "rope_position_scale", "window", "softcap", "scale",
                                      "causal"])
    blk = next(b for b in model.blocks if b.kind == "attention").mixer
    rope_ok = (u["rotary_dim"] == u["head_dim"] and not u["rope_interleaved"]) if rope else u["rotary_dim"] == 0
    if (not rope_ok or (u["window"] is not None and not window) or u["softcap"] is not None or not u["causal"]
            or not math.isclose(u["scale"], u["head_dim"] ** -0.5)):
        raise ValueError(f"attention export needs {'full-head rotate-half RoPE' if rope else 'no RoPE'}, causal, "
                         f"{'' if window else 'no window, '}no softcap and the default 1/sqrt(head_dim) scale")
    u["qkv_bias"], u["out_bias"] = blk.q_proj.use_bias, blk.o_proj.use_bias
    return u


def _export_llama(model):
    cfg = model.config
    _norm_info(model, ("rms",))
    u = _attention_info(model)
    if u["qkv_bias"] != u["out_bias"] or u["rope_position_scale"] != 1.0:
        raise ValueError("llama export needs the same bias setting on q/k/v and o (attention_bias) and unscaled RoPE")
    act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.mlp_activation]
    out = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.padded_vocab_size,
               hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.num_layers,
               num_attention_heads=u["num_heads"], num_key_value_heads=u["num_kv_heads"], head_dim=u["head_dim"],
               rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": u["rope_base"]},
               rope_theta=u["rope_base"], attention_bias=u["qkv_bias"], mlp_bias=cfg.mlp_bias, hidden_act=act,
               tie_word_embeddings=cfg.tie_embeddings)
    if cfg.max_seq_len is not None:
        out["max_position_embeddings"] = cfg.max_seq_len
    return out


def _export_striped_hyena(model):
    cfg = model.config
    _norm_info(model, ("rms", "rms_eps_outside"))
    sh = _uniform(model, "striped_hyena", ["num_heads", "state_size", "short_filter_length", "column_split"])
    blk = next(b for b in model.blocks if b.kind == "striped_hyena").mixer
    if not (blk.projections.use_bias and blk.out_proj.use_bias) or cfg.mlp_bias:
        raise ValueError("stripedhyena export needs biases on the hyena projections and out projection and no MLP "
                         "biases")
    attn_idx = [i for i, b in enumerate(cfg.blocks) if b.mixer == "attention"]
    out = dict(model_type="stripedhyena", vocab_size=cfg.padded_vocab_size, hidden_size=cfg.d_model,
               num_filters=cfg.d_model, num_layers=cfg.num_layers, attn_layer_idxs=attn_idx,
               hyena_layer_idxs=[i for i in range(cfg.num_layers) if i not in attn_idx],
               num_attention_heads=sh["num_heads"], state_size=sh["state_size"],
               short_filter_length=sh["short_filter_length"], short_filter_bias=blk.short_filter_bias is not None,
               column_split_hyena=sh["column_split"], hyena_filter_groups=1, eps=cfg.norm_eps,
               use_flash_rmsnorm=cfg.norm == "rms", inner_mlp_size=cfg.mlp_hidden, mlp_activation=cfg.mlp_activation,
               tie_embeddings=cfg.tie_embeddings, final_norm=True, proj_groups=1, rotary_emb_base=10000.0,
               qkv_proj_bias=False, mha_out_proj_bias=False, use_flash_attn=False, use_flashfft=False,
               use_flash_depthwise=False, prefill_style="fft", model_parallel_size=1)
    if cfg.mlp_activation not in ("silu", "gelu"):
        raise ValueError(f"stripedhyena supports silu and gelu MLPs, not {cfg.mlp_activation!r}")
    if attn_idx:
        u = _attention_info(model)
        if u["head_dim"] * u["num_heads"] != cfg.d_model or u["num_heads"] != sh["num_heads"]:
            raise ValueError("stripedhyena attention needs head_dim * num_heads == d_model and the hyena layers' "
                             "num_heads")
        out.update(proj_groups=u["num_heads"] // u["num_kv_heads"], rotary_emb_base=u["rope_base"],
                   qkv_proj_bias=u["qkv_bias"], mha_out_proj_bias=u["out_bias"])
        if u["rope_position_scale"] != 1.0:
            out.update(use_interpolated_rotary_pos_emb=True, rotary_emb_scaling_factor=u["rope_position_scale"])
    return out


def _moe_info(model, fmt, *, renormalize) -> dict:
    """The MoE blocks' shared settings (from the config; `hidden` resolved): softmax top-k routing with or without
    renormalization as `fmt` needs, SiLU experts, no shared expert. Dispatch settings are runtime choices."""
    cfg = model.config
    vals = []
    for b in cfg.blocks:
        if b.moe is not None:
            m = b.moe
            vals.append(dict(num_experts=m["num_experts"], top_k=m["top_k"], hidden=m.get("hidden") or cfg.mlp_hidden,
                             scoring=m.get("scoring", "softmax"), renormalize=m.get("renormalize", True),
                             activation=m.get("activation", "silu"), shared_hidden=m.get("shared_hidden")))
    for v in vals[1:]:
        if v != vals[0]:
            raise ValueError(f"MoE layers differ in {sorted(k for k in v if v[k] != vals[0][k])}; a {fmt} config "
                             f"holds one value")
    u = vals[0]
    if u["scoring"] != "softmax" or u["renormalize"] != renormalize or u["activation"] != "silu" or u["shared_hidden"]:
        raise ValueError(f"{fmt} export needs softmax routing with renormalize={renormalize}, SiLU experts and no "
                         f"shared expert, got scoring={u['scoring']!r}, renormalize={u['renormalize']}, "
                         f"activation={u['activation']!r}, shared_hidden={u['shared_hidden']}")
    return u


def _export_mixtral(model):
    cfg = model.config
    _norm_info(model, ("rms",))
    u = _attention_info(model, window=True)
    if u["qkv_bias"] or u["out_bias"] or u["rope_position_scale"] != 1.0:
        raise ValueError("mixtral export needs attention without biases and unscaled RoPE")
    m = _moe_info(model, "mixtral", renormalize=True)
    out = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=cfg.padded_vocab_size,
               hidden_size=cfg.d_model, intermediate_size=m["hidden"], num_hidden_layers=cfg.num_layers,
               num_attention_heads=u["num_heads"], num_key_value_heads=u["num_kv_heads"], head_dim=u["head_dim"],
               hidden_act="silu", rms_norm_eps=cfg.norm_eps, rope_theta=u["rope_base"],
               rope_parameters={"rope_type": "default", "rope_theta": u["rope_base"]}, sliding_window=u["window"],
               num_local_experts=m["num_experts"], num_experts_per_tok=m["top_k"], router_jitter_noise=0.0,
               tie_word_embeddings=cfg.tie_embeddings)
    if cfg.max_seq_len is not None:
        out["max_position_embeddings"] = cfg.max_seq_len
    return out


def _layer_period(idx, n_layers, what) -> tuple[int, int]:
    """(period, offset) with {i < n_layers : i % period == offset} == idx (the smallest period); no layers ->
    (n_layers + 1, n_layers)."""
    want = set(idx)
    if not want:
        return n_layers + 1, n_layers
    for period in range(1, n_layers + 1):
        for offset in range(period):
            if {i for i in range(n_layers) if i % period == offset} == want:
                return period, offset
    raise ValueError(f"jamba export: the {what} layers {sorted(want)} are not the layers i with i % period == offset, "
                     f"the only patterns a Jamba config expresses")


def _export_jamba(model):
    cfg = model.config
    _norm_info(model, ("rms",))
    n = cfg.num_layers
    attn_idx = [i for i, b in enumerate(cfg.blocks) if b.mixer == "attention"]
    expert_idx = [i for i, b in enumerate(cfg.blocks) if b.moe is not None]
    attn_period, attn_offset = _layer_period(attn_idx, n, "attention")
    out = dict(model_type="jamba", architectures=["JambaForCausalLM"], vocab_size=cfg.padded_vocab_size,
               hidden_size=cfg.d_model, num_hidden_layers=n, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
               tie_word_embeddings=cfg.tie_embeddings, attn_layer_period=attn_period, attn_layer_offset=attn_offset,
               intermediate_size=cfg.mlp_hidden, num_experts=1, num_experts_per_tok=1, expert_layer_period=2,
               expert_layer_offset=1, num_attention_heads=1, num_key_value_heads=1)
    if len(expert_idx) < n and (cfg.mlp_activation != "silu" or cfg.mlp_bias):
        raise ValueError("jamba export needs SwiGLU MLPs without biases (JambaMLP)")
    if expert_idx:
        m = _moe_info(model, "jamba", renormalize=False)
        if m["num_experts"] < 2 or (len(expert_idx) < n and m["hidden"] != cfg.mlp_hidden):
            raise ValueError(f"jamba export needs >= 2 experts and the experts' width {m['hidden']} equal to the "
                             f"MLPs' mlp_hidden={cfg.mlp_hidden} (one intermediate_size)")
        period, offset = _layer_period(expert_idx, n, "MoE")
        out.update(intermediate_size=m["hidden"], num_experts=m["num_experts"], num_experts_per_tok=m["top_k"],
                   expert_layer_period=period, expert_layer_offset=offset)
    if attn_idx:
        u = _attention_info(model, rope=False)
        if u["qkv_bias"] or u["out_bias"] or u["head_dim"] * u["num_heads"] != cfg.d_model:
            raise ValueError("jamba export needs attention without biases and head_dim * num_heads == d_model")
        out.update(num_attention_heads=u["num_heads"], num_key_value_heads=u["num_kv_heads"])
    if len(attn_idx) < n:
        u = _uniform(model, "mamba", ["d_state", "d_conv", "d_inner", "dt_rank", "bcdt_rms_norm", "bcdt_norm_eps"])
        biases = {(b.mixer.conv_bias is not None, b.mixer.in_proj.use_bias, b.mixer.out_proj.use_bias)
                  for b in model.blocks if b.kind == "mamba"}
        if (not u["bcdt_rms_norm"] or not math.isclose(u["bcdt_norm_eps"], cfg.norm_eps) or len(biases) != 1
                or u["d_inner"] % cfg.d_model):
            raise ValueError("jamba export needs Mamba layers with bcdt_rms_norm=True, their eps equal to the model's "
                             "norm eps, d_inner a multiple of d_model and the same bias settings in every layer")
        (conv_bias, proj_bias, out_bias), = biases
        if proj_bias != out_bias:
            raise ValueError("jamba export needs the same bias setting on in_proj and out_proj (mamba_proj_bias)")
        out.update(mamba_d_state=u["d_state"], mamba_d_conv=u["d_conv"], mamba_expand=u["d_inner"] // cfg.d_model,
                   mamba_dt_rank=u["dt_rank"], mamba_conv_bias=conv_bias, mamba_proj_bias=proj_bias)
    if cfg.max_seq_len is not None:
        out["max_position_embeddings"] = cfg.max_seq_len
    return out
