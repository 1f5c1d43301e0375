"""Import and export of PyTorch checkpoints: Hugging Face `mamba`, `mamba2`, `llama`, `mixtral`, `jamba` directories,
mamba_ssm's own `MambaLMHeadModel` directories, and StripedHyena (togethercomputer/stripedhyena) state dicts.

    model = from_pretrained("path/to/dir")          # -> seqmix_jax.models.LM with an equivalent ModelConfig
    save_pretrained(model, "path/to/out")           # config.json + model.safetensors, loadable by transformers

Configs are translated by `_hf_config`; tensors are read by `_tensors` (safetensors, or
`torch.load(weights_only=True)`; never plain unpickling).

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
import re
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix_jax.layers.attention import split_fused_qkv
from seqmix_jax.models import _tensors
from seqmix_jax.models._hf_config import config_from_checkpoint, export_config
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
    config = export_config(model, fmt)
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
