"""Checkpoint configs <-> ModelConfig, for `seqmix_jax.models.checkpoints`: reading a Hugging Face / mamba_ssm /
stripedhyena config dict into an equivalent ModelConfig (`config_from_checkpoint`), and writing the config dict
of a model in one of those formats (`export_config`). The tensors' key maps stay in `checkpoints`.
"""

from __future__ import annotations

import math

from seqmix_jax.models.config import (BlockSpec, ModelConfig, jamba_preset, llama_preset, mamba2_preset,
                                      mamba_preset, mixtral_preset, striped_hyena_preset)


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


# ================================================================ export: our config -> the checkpoint's

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


_EXPORTERS = {"mamba": _export_mamba, "mamba2": _export_mamba2, "llama": _export_llama, "mixtral": _export_mixtral,
              "jamba": _export_jamba, "stripedhyena": _export_striped_hyena}


def export_config(model, fmt: str) -> dict:
    """The config dict of `model` in checkpoint format `fmt` (one of `checkpoints.SUPPORTED`)."""
    return _EXPORTERS[fmt](model)
