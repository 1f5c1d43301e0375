"""Language-model configuration: a layer pattern of block specs, and presets for the reference architectures.

A model is `embedding -> blocks -> final norm -> head`; each block is a `BlockSpec`: a sequence mixer
("attention", "hyena", "striped_hyena", "mamba", "mamba2") with its constructor keyword arguments, and an
optional channel mixer: a gated MLP sized by the model-wide `mlp_hidden` / `mlp_activation` / `mlp_bias`, or a
mixture-of-experts layer (`moe`: keywords of `layers.MoE`, its `hidden` defaulting to `mlp_hidden`).

Presets (the math of the PyTorch reference; parameter names are mapped by `seqmix_jax.models.checkpoints`):
  * `mamba_preset`         mamba_ssm `MambaLMHeadModel` (Mamba-1) / transformers `MambaForCausalLM`
  * `mamba2_preset`        the same with Mamba-2 mixers, plus mamba_ssm `attn_layer_idx` hybrids (mamba2attn)
  * `llama_preset`         transformers `LlamaForCausalLM` (attention + SwiGLU MLP per layer)
  * `striped_hyena_preset` togethercomputer/stripedhyena `StripedHyena` (SH-7B striping)
  * `mixtral_preset`       transformers `MixtralForCausalLM` (RoPE attention + top-k MoE in every layer)
  * `jamba_preset`         transformers `JambaForCausalLM` (Mamba / attention hybrid, MoE every other layer)
  * `pattern_config`       any user pattern, e.g. "MMAMMA"

Every config validates itself on construction and raises ValueError naming the offending values.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

MIXERS = ("attention", "hyena", "striped_hyena", "mamba", "mamba2")
NORMS = ("rms", "rms_eps_outside", "layer")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
DTYPES = ("float32", "bfloat16", "float16")
PATTERN_LETTERS = {"M": "mamba", "2": "mamba2", "A": "attention", "H": "hyena", "S": "striped_hyena"}


def _pos_int(name: str, v) -> None:
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class BlockSpec:
    """One layer: a sequence mixer and an optional channel mixer (a gated MLP or a mixture of experts).

    Args:
      mixer: "attention" | "hyena" | "striped_hyena" | "mamba" | "mamba2".
      mlp: follow the mixer with a (pre-normed, residual) gated MLP.
      mixer_kwargs: keyword arguments of the mixer's constructor (layers.Attention, HyenaOperator,
        StripedHyenaMixer, MambaMixer, Mamba2Mixer) other than d_model, dtype, param_dtype and rngs.
        Excluded from the hash (dicts are not hashable); equality compares it.
      moe: follow the mixer with a (pre-normed, residual) mixture-of-experts layer instead of an MLP: keyword
        arguments of `layers.MoE` other than d_model, dtype, param_dtype and rngs — `num_experts` and `top_k`
        are required, `hidden` defaults to ModelConfig.mlp_hidden (e.g. dict(num_experts=8, top_k=2,
        dispatch="dropless")). None: no MoE. Excluded from the hash like mixer_kwargs.
    """

    mixer: str
    mlp: bool = False
    mixer_kwargs: Mapping = field(default_factory=dict, hash=False)
    moe: Mapping | None = field(default=None, hash=False)

    def __post_init__(self):
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        if not isinstance(self.mlp, bool):
            raise ValueError(f"mlp must be a bool, got {self.mlp!r}")
        if not isinstance(self.mixer_kwargs, Mapping):
            raise ValueError(f"mixer_kwargs must be a mapping, got {type(self.mixer_kwargs).__name__}")
        bad = sorted({"d_model", "dtype", "param_dtype", "rngs"} & set(self.mixer_kwargs))
        if bad:
            raise ValueError(f"mixer_kwargs must not set {bad}: they come from the ModelConfig")
        object.__setattr__(self, "mixer_kwargs", dict(self.mixer_kwargs))
        if self.moe is not None:
            _check_moe(self.moe)
            if self.mlp:
                raise ValueError("a block has either mlp=True or moe (a gated MLP or a mixture of experts as its "
                                 "channel mixer), not both")
            object.__setattr__(self, "moe", dict(self.moe))


def _check_moe(moe) -> None:
    """The parts of a BlockSpec.moe mapping a config can check without building the layer (a misspelled keyword
    is reported when the model is built)."""
    if not isinstance(moe, Mapping):
        raise ValueError(f"moe must be None or a mapping of layers.MoE keywords, got {type(moe).__name__}")
    bad = sorted({"d_model", "dtype", "param_dtype", "rngs"} & set(moe))
    if bad:
        raise ValueError(f"moe must not set {bad}: they come from the ModelConfig")
    missing = [k for k in ("num_experts", "top_k") if k not in moe]
    if missing:
        raise ValueError(f"moe needs {missing} (got keys {sorted(moe)})")
    _pos_int("moe num_experts", moe["num_experts"])
    _pos_int("moe top_k", moe["top_k"])
    if moe["top_k"] > moe["num_experts"]:
        raise ValueError(f"moe top_k={moe['top_k']} exceeds num_experts={moe['num_experts']}")
    if moe.get("hidden") is not None:
        _pos_int("moe hidden", moe["hidden"])


@dataclass(frozen=True)
class ModelConfig:
    """A language model: embedding -> blocks -> final norm -> head.

    Args:
      vocab_size: V, number of real tokens; ids must lie in [0, V).
      d_model: model width d.
      blocks: the layer pattern, one BlockSpec per layer (at least one).
      norm: "rms" (eps inside the sqrt: mamba_ssm, Llama, SH-7B flash rmsnorm), "rms_eps_outside"
        (StripedHyena's non-flash RMSNorm) or "layer" (LayerNorm with bias).
      norm_eps: epsilon of every norm in the model.
      mlp_hidden: hidden width f of the gated MLPs (required when any block has mlp=True) and the default
        expert width of MoE blocks.
      mlp_activation: "silu" (SwiGLU), "gelu" (erf) or "gelu_tanh".
      mlp_bias: biases on the MLP projections.
      tie_embeddings: logits = h @ embedding^T (no separate lm_head).
      pad_vocab_size_multiple: the embedding (and head) have `padded_vocab_size` rows, V rounded up to this.
      residual_in_fp32: keep the residual stream in float32 whatever the compute dtype.
      final_norm: apply `norm_f` before the head.
      max_seq_len: longest sequence the model accepts (None: unlimited unless a mixer limits it).
      embed_init_std: std of the normal embedding init (0.02 as mamba_ssm / transformers).
      dtype: compute dtype name ("float32", "bfloat16", "float16") or None (from inputs and params).
      param_dtype: storage dtype name ("float32").
    """

    vocab_size: int
    d_model: int
    blocks: tuple[BlockSpec, ...]
    norm: str = "rms"
    norm_eps: float = 1e-5
    mlp_hidden: int | None = None
    mlp_activation: str = "silu"
    mlp_bias: bool = False
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 1
    residual_in_fp32: bool = False
    final_norm: bool = True
    max_seq_len: int | None = None
    embed_init_std: float = 0.02
    dtype: str | None = None
    param_dtype: str = "float32"

    def __post_init__(self):
        _pos_int("vocab_size", self.vocab_size)
        _pos_int("d_model", self.d_model)
        _pos_int("pad_vocab_size_multiple", self.pad_vocab_size_multiple)
        if isinstance(self.blocks, BlockSpec) or not isinstance(self.blocks, Sequence) or not self.blocks:
            raise ValueError(f"blocks must be a non-empty sequence of BlockSpec, got {self.blocks!r}")
        for i, b in enumerate(self.blocks):
            if not isinstance(b, BlockSpec):
                raise ValueError(f"blocks[{i}] must be a BlockSpec, got {type(b).__name__}")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not isinstance(self.norm_eps, numbers.Real) or isinstance(self.norm_eps, bool) or not self.norm_eps >= 0:
            raise ValueError(f"norm_eps must be a number >= 0, got {self.norm_eps!r}")
        if self.mlp_activation not in ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {ACTIVATIONS}, got {self.mlp_activation!r}")
        uses_mlp = [i for i, b in enumerate(self.blocks) if b.mlp]
        if self.mlp_hidden is None:
            if uses_mlp:
                raise ValueError(f"mlp_hidden is None but blocks {uses_mlp} have mlp=True")
            moe_no_hidden = [i for i, b in enumerate(self.blocks) if b.moe is not None and b.moe.get("hidden") is None]
            if moe_no_hidden:
                raise ValueError(f"mlp_hidden is None but the moe of blocks {moe_no_hidden} has no hidden width "
                                 f"(set moe hidden or mlp_hidden)")
        else:
            _pos_int("mlp_hidden", self.mlp_hidden)
        if self.max_seq_len is not None:
            _pos_int("max_seq_len", self.max_seq_len)
        if not isinstance(self.embed_init_std, numbers.Real) or not self.embed_init_std > 0:
            raise ValueError(f"embed_init_std must be a positive number, got {self.embed_init_std!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be None or one of {DTYPES}, got {self.dtype!r}")
        if self.param_dtype not in DTYPES:
            raise ValueError(f"param_dtype must be one of {DTYPES}, got {self.param_dtype!r}")
        for name in ("mlp_bias", "tie_embeddings", "residual_in_fp32", "final_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        hyena = [i for i, b in enumerate(self.blocks) if b.mixer == "hyena" and "l_max" not in b.mixer_kwargs]
        if hyena and self.max_seq_len is None:
            raise ValueError(f"hyena blocks {hyena} need l_max in mixer_kwargs or max_seq_len in the config")

    @property
    def padded_vocab_size(self) -> int:
        """V rounded up to a multiple of pad_vocab_size_multiple (mamba_ssm: 50277 -> 50280 with 8)."""
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# --- helpers and presets ---------------------------------------------------------------------------------------

def pattern_config(pattern: str, *, vocab_size: int, d_model: int, mlp: bool | str = False,
                   mixer_kwargs: Mapping[str, Mapping] | None = None, **config_kwargs) -> ModelConfig:
    """A config from a pattern string, one letter per layer: M mamba, 2 mamba2, A attention, H hyena,
    S striped_hyena (e.g. "MMAMMA").

    Args:
      pattern: the layer letters.
      vocab_size, d_model: as ModelConfig.
      mlp: True/False for every layer, or a string of the pattern's length of "1"/"0" per layer.
      mixer_kwargs: per mixer kind ("attention", "mamba", ...) constructor keywords shared by its layers.
      **config_kwargs: the other ModelConfig fields (mlp_hidden, norm, max_seq_len, ...).
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty string of {sorted(PATTERN_LETTERS)}, got {pattern!r}")
    bad = sorted({c for c in pattern if c not in PATTERN_LETTERS})
    if bad:
        raise ValueError(f"pattern {pattern!r} has unknown letters {bad}; valid: {PATTERN_LETTERS}")
    if isinstance(mlp, str):
        if len(mlp) != len(pattern) or set(mlp) - {"0", "1"}:
            raise ValueError(f"mlp string {mlp!r} must be {len(pattern)} characters of '0'/'1' "
                             f"(one per layer of {pattern!r})")
        mlps = [c == "1" for c in mlp]
    else:
        mlps = [bool(mlp)] * len(pattern)
    mixer_kwargs = dict(mixer_kwargs or {})
    unknown = sorted(set(mixer_kwargs) - set(MIXERS))
    if unknown:
        raise ValueError(f"mixer_kwargs keys {unknown} are not mixer kinds {MIXERS}")
    blocks = tuple(BlockSpec(PATTERN_LETTERS[c], m, dict(mixer_kwargs.get(PATTERN_LETTERS[c], {})))
                   for c, m in zip(pattern, mlps))
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, blocks=blocks, **config_kwargs)


def mamba_preset(*, d_model: int = 768, n_layer: int = 24, vocab_size: int = 50277, d_intermediate: int = 0,
                 ssm_cfg: Mapping | None = None, rms_norm: bool = True, norm_epsilon: float = 1e-5,
                 residual_in_fp32: bool = True, pad_vocab_size_multiple: int = 8, tie_embeddings: bool = True,
                 **config_kwargs) -> ModelConfig:
    """mamba_ssm `MambaLMHeadModel` with Mamba-1 mixers (defaults: mamba-130m), = transformers `MambaForCausalLM`.

    Pre-norm residual blocks `r += mixer(norm(r))` (mamba_ssm's fused add -> norm is the same math), no MLP
    unless d_intermediate > 0 (then mamba_ssm's GatedMLP with SiLU, hidden rounded up to a multiple of 128),
    RMSNorm (eps inside), tied head, vocabulary padded to a multiple of 8, float32 residual stream.
    `ssm_cfg` holds MambaMixer keywords (mamba_ssm names d_state, d_conv, expand, dt_rank, ... are ours too).
    For transformers configs pass vocab_size already padded and pad_vocab_size_multiple=1 (HF pads at export).
    """
    kw = dict(ssm_cfg or {})
    kw.pop("layer", None)
    return _mamba_family("mamba", kw, d_model=d_model, n_layer=n_layer, vocab_size=vocab_size,
                         d_intermediate=d_intermediate, rms_norm=rms_norm, norm_epsilon=norm_epsilon,
                         residual_in_fp32=residual_in_fp32, pad_vocab_size_multiple=pad_vocab_size_multiple,
                         tie_embeddings=tie_embeddings, attn_layer_idx=(), attn_cfg=None, **config_kwargs)


def mamba2_preset(*, d_model: int = 768, n_layer: int = 24, vocab_size: int = 50277, d_intermediate: int = 0,
                  ssm_cfg: Mapping | None = None, attn_layer_idx: Sequence[int] = (), attn_cfg: Mapping | None = None,
                  rms_norm: bool = True, norm_epsilon: float = 1e-5, residual_in_fp32: bool = True,
                  pad_vocab_size_multiple: int = 16, tie_embeddings: bool = True, **config_kwargs) -> ModelConfig:
    """mamba_ssm `MambaLMHeadModel` with Mamba-2 mixers (defaults: mamba2-130m), = transformers
    `Mamba2ForCausalLM`; layers in `attn_layer_idx` are mamba_ssm `MHA` attention layers configured by
    `attn_cfg` (mamba_ssm names: num_heads, num_heads_kv, head_dim, qkv_proj_bias, out_proj_bias,
    rotary_emb_dim, rotary_emb_base, rotary_emb_interleaved, softmax_scale, causal, d_conv, mlp_dim), e.g.
    mamba2attn-2.7b. `d_conv > 0` (a depthwise conv on qkv) and `mlp_dim > 0` inside MHA are not supported
    (NotImplementedError)."""
    kw = dict(ssm_cfg or {})
    kw.pop("layer", None)
    return _mamba_family("mamba2", kw, d_model=d_model, n_layer=n_layer, vocab_size=vocab_size,
                         d_intermediate=d_intermediate, rms_norm=rms_norm, norm_epsilon=norm_epsilon,
                         residual_in_fp32=residual_in_fp32, pad_vocab_size_multiple=pad_vocab_size_multiple,
                         tie_embeddings=tie_embeddings, attn_layer_idx=attn_layer_idx, attn_cfg=attn_cfg,
                         **config_kwargs)


def _mamba_family(kind, ssm_kw, *, d_model, n_layer, vocab_size, d_intermediate, rms_norm, norm_epsilon,
                  residual_in_fp32, pad_vocab_size_multiple, tie_embeddings, attn_layer_idx, attn_cfg,
                  **config_kwargs) -> ModelConfig:
    _pos_int("n_layer", n_layer)
    attn_idx = sorted(set(int(i) for i in attn_layer_idx))
    out_of_range = [i for i in attn_idx if not 0 <= i < n_layer]
    if out_of_range:
        raise ValueError(f"attn_layer_idx {out_of_range} out of range for n_layer={n_layer}")
    attn_kw = mamba_mha_kwargs(d_model, attn_cfg or {}) if attn_idx else {}
    if not isinstance(d_intermediate, numbers.Integral) or d_intermediate < 0:
        raise ValueError(f"d_intermediate must be an int >= 0, got {d_intermediate!r}")
    mlp = d_intermediate > 0
    blocks = tuple(BlockSpec("attention", mlp, attn_kw) if i in attn_idx else BlockSpec(kind, mlp, ssm_kw)
                   for i in range(n_layer))
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, blocks=blocks, norm="rms" if rms_norm else "layer",
                       norm_eps=norm_epsilon, mlp_hidden=-(-d_intermediate // 128) * 128 if mlp else None,
                       mlp_activation="silu", tie_embeddings=tie_embeddings,
                       pad_vocab_size_multiple=pad_vocab_size_multiple, residual_in_fp32=residual_in_fp32,
                       **config_kwargs)


def mamba_mha_kwargs(d_model: int, attn_cfg: Mapping) -> dict:
    """mamba_ssm `MHA` keywords (an `attn_cfg`) -> `layers.Attention` keywords."""
    cfg = dict(attn_cfg)
    if cfg.pop("d_conv", 0):
        raise NotImplementedError("attn_cfg d_conv > 0 (mamba_ssm MHA's depthwise conv on qkv) is not supported")
    if cfg.pop("mlp_dim", 0):
        raise NotImplementedError("attn_cfg mlp_dim > 0 (mamba_ssm MHA's fused MLP slice) is not supported")
    known = {"num_heads", "num_heads_kv", "head_dim", "qkv_proj_bias", "out_proj_bias", "rotary_emb_dim",
             "rotary_emb_base", "rotary_emb_interleaved", "softmax_scale", "causal"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"attn_cfg keys {unknown} are not known mamba_ssm MHA arguments {sorted(known)}")
    if "num_heads" not in cfg:
        raise ValueError("attn_cfg needs num_heads")
    out = dict(num_heads=cfg["num_heads"], num_kv_heads=cfg.get("num_heads_kv"), head_dim=cfg.get("head_dim"),
               qkv_bias=cfg.get("qkv_proj_bias", True), out_bias=cfg.get("out_proj_bias", True),
               rotary_dim=cfg.get("rotary_emb_dim", 0), rope_base=cfg.get("rotary_emb_base", 10000.0),
               rope_interleaved=cfg.get("rotary_emb_interleaved", False), scale=cfg.get("softmax_scale"),
               causal=cfg.get("causal", True))
    return {k: v for k, v in out.items() if v is not None}


def llama_preset(*, vocab_size: int = 32000, hidden_size: int = 4096, intermediate_size: int = 11008,
                 num_hidden_layers: int = 32, num_attention_heads: int = 32, num_key_value_heads: int | None = None,
                 head_dim: int | None = None, rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0,
                 attention_bias: bool = False, mlp_bias: bool = False, hidden_act: str = "silu",
                 tie_word_embeddings: bool = False, max_position_embeddings: int | None = None,
                 **config_kwargs) -> ModelConfig:
    """transformers `LlamaForCausalLM` (names as its config): every layer is
    `r += attn(input_layernorm(r)); r += mlp(post_attention_layernorm(r))` with RoPE attention (rotate-half,
    full head dim) and a SwiGLU MLP; RMSNorm eps inside; final norm; untied head by default."""
    act = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}.get(hidden_act)
    if act is None:
        raise ValueError(f"hidden_act {hidden_act!r} is not supported (silu, gelu, gelu_pytorch_tanh)")
    _pos_int("num_hidden_layers", num_hidden_layers)
    attn = dict(num_heads=num_attention_heads, num_kv_heads=num_key_value_heads, head_dim=head_dim,
                qkv_bias=attention_bias, out_bias=attention_bias, rope_base=rope_theta)
    attn = {k: v for k, v in attn.items() if v is not None}
    blocks = tuple(BlockSpec("attention", True, attn) for _ in range(num_hidden_layers))
    return ModelConfig(vocab_size=vocab_size, d_model=hidden_size, blocks=blocks, norm="rms", norm_eps=rms_norm_eps,
                       mlp_hidden=intermediate_size, mlp_activation=act, mlp_bias=mlp_bias,
                       tie_embeddings=tie_word_embeddings, max_seq_len=max_position_embeddings, **config_kwargs)


def striped_hyena_preset(*, vocab_size: int = 32000, hidden_size: int = 4096, num_layers: int = 32,
                         attn_layer_idxs: Sequence[int] | None = None, hyena_layer_idxs: Sequence[int] | None = None,
                         num_attention_heads: int = 32, proj_groups: int = 4, state_size: int = 2,
                         short_filter_length: int = 3, short_filter_bias: bool = True, eps: float = 1e-5,
                         rotary_emb_base: float = 500000.0, inner_mlp_size: int | None = 14336,
                         mlp_activation: str = "silu", tie_embeddings: bool = False, mha_out_proj_bias: bool = False,
                         qkv_proj_bias: bool = False, column_split_hyena: bool = True, max_seqlen: int | None = None,
                         final_norm: bool = True, use_flash_rmsnorm: bool = True, make_vocab_size_divisible_by: int = 1,
                         **config_kwargs) -> ModelConfig:
    """togethercomputer/stripedhyena `StripedHyena` (names as its config; defaults: SH-7B). Default striping:
    attention at odd layers, StripedHyena gated convolutions at even layers. Every block is
    `r += mixer(pre_norm(r)); r += mlp(post_norm(r))` with a gated MLP l3(act(l1 x) * l2 x) (inner size
    `inner_mlp_size`, else int(2 * d * 4/3) rounded up to 64); RMSNorm with the eps inside the sqrt when
    `use_flash_rmsnorm`, else outside (stripedhyena's own RMSNorm); attention with num_heads / proj_groups kv
    heads and RoPE over the full head dim. `max_seqlen` is not a hard limit in stripedhyena (decoding caches are
    sized by it), so it is not copied to `max_seq_len`; pass max_seq_len= to set one."""
    _pos_int("num_layers", num_layers)
    _pos_int("proj_groups", proj_groups)
    if attn_layer_idxs is None:
        attn_layer_idxs = range(1, num_layers, 2)
    attn = {int(i) for i in attn_layer_idxs}
    hyena = {int(i) for i in (hyena_layer_idxs if hyena_layer_idxs is not None else range(num_layers))} - attn
    hyena = {i for i in hyena if i < num_layers}  # SH-7B's list also names layer 32 (unused)
    bad = sorted(i for i in attn if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"attn_layer_idxs {bad} out of range for num_layers={num_layers}")
    missing = [i for i in range(num_layers) if i not in attn and i not in hyena]
    if missing:
        raise ValueError(f"layers {missing} are neither in attn_layer_idxs nor hyena_layer_idxs")
    if num_attention_heads % proj_groups:
        raise ValueError(f"proj_groups={proj_groups} must divide num_attention_heads={num_attention_heads}")
    attn_kw = dict(num_heads=num_attention_heads, num_kv_heads=num_attention_heads // proj_groups,
                   qkv_bias=qkv_proj_bias, out_bias=mha_out_proj_bias, rope_base=rotary_emb_base)
    sh_kw = dict(num_heads=num_attention_heads, state_size=state_size, short_filter_length=short_filter_length,
                 short_filter_bias=short_filter_bias, column_split=column_split_hyena)
    blocks = tuple(BlockSpec("attention", True, attn_kw) if i in attn else BlockSpec("striped_hyena", True, sh_kw)
                   for i in range(num_layers))
    if inner_mlp_size is None:
        inner = int(2 * hidden_size * 4 / 3)
        inner_mlp_size = 64 * ((inner + 63) // 64)
    return ModelConfig(vocab_size=vocab_size, d_model=hidden_size, blocks=blocks,
                       norm="rms" if use_flash_rmsnorm else "rms_eps_outside", norm_eps=eps,
                       mlp_hidden=inner_mlp_size, mlp_activation=mlp_activation, tie_embeddings=tie_embeddings,
                       pad_vocab_size_multiple=make_vocab_size_divisible_by, final_norm=final_norm, **config_kwargs)


MOE_DISPATCH_DEFAULT = "dropless"


def mixtral_preset(*, vocab_size: int = 32000, hidden_size: int = 4096, intermediate_size: int = 14336,
                   num_hidden_layers: int = 32, num_attention_heads: int = 32, num_key_value_heads: int | None = 8,
                   head_dim: int | None = None, hidden_act: str = "silu", max_position_embeddings: int | None = 131072,
                   rms_norm_eps: float = 1e-5, rope_theta: float = 1e6, tie_word_embeddings: bool = False,
                   sliding_window: int | None = None, num_experts_per_tok: int = 2, num_local_experts: int = 8,
                   router_jitter_noise: float = 0.0, moe_dispatch: str = MOE_DISPATCH_DEFAULT,
                   capacity_factor: float = 1.25, **config_kwargs) -> ModelConfig:
    """transformers `MixtralForCausalLM` (names as its config; defaults: Mixtral-8x7B). Every layer is
    `r += attn(input_layernorm(r)); r += moe(post_attention_layernorm(r))`: Llama's attention (RoPE rotate-half
    over the full head dim, GQA, no biases; a causal sliding window of `sliding_window` keys when set) and a
    mixture of `num_local_experts` SwiGLU experts of width `intermediate_size`, each token sent to its
    `num_experts_per_tok` most probable experts with the softmax probabilities renormalized over those k.

    `moe_dispatch` / `capacity_factor` choose how layers.MoE runs the experts ("dropless" computes exactly what
    transformers does; "capacity" drops overflow tokens). `router_jitter_noise` (multiplicative input noise in
    training) is not implemented: a value > 0 is a ValueError (checkpoints trained with it load through
    `from_pretrained`, which drops it — inference never applies it)."""
    act = _swiglu_only("mixtral", hidden_act)
    _pos_int("num_hidden_layers", num_hidden_layers)
    if not isinstance(router_jitter_noise, numbers.Real) or router_jitter_noise != 0:
        raise ValueError(f"router_jitter_noise={router_jitter_noise!r} is not supported (training-time input noise "
                         f"is not implemented; use 0)")
    if sliding_window is not None:
        _pos_int("sliding_window", sliding_window)
    attn = dict(num_heads=num_attention_heads, num_kv_heads=num_key_value_heads, head_dim=head_dim, qkv_bias=False,
                out_bias=False, rope_base=rope_theta, window=sliding_window)
    attn = {k: v for k, v in attn.items() if v is not None}
    moe = _moe_kwargs(num_local_experts, num_experts_per_tok, renormalize=True, dispatch=moe_dispatch,
                      capacity_factor=capacity_factor)
    blocks = tuple(BlockSpec("attention", False, attn, moe=moe) for _ in range(num_hidden_layers))
    return ModelConfig(vocab_size=vocab_size, d_model=hidden_size, blocks=blocks, norm="rms", norm_eps=rms_norm_eps,
                       mlp_hidden=intermediate_size, mlp_activation=act, tie_embeddings=tie_word_embeddings,
                       max_seq_len=max_position_embeddings, **config_kwargs)


def jamba_preset(*, vocab_size: int = 65536, tie_word_embeddings: bool = False, hidden_size: int = 4096,
                 intermediate_size: int = 14336, num_hidden_layers: int = 32, num_attention_heads: int = 32,
                 num_key_value_heads: int | None = 8, hidden_act: str = "silu", rms_norm_eps: float = 1e-6,
                 max_position_embeddings: int | None = 262144, num_experts_per_tok: int = 2, num_experts: int = 16,
                 expert_layer_period: int = 2, expert_layer_offset: int = 1, attn_layer_period: int = 8,
                 attn_layer_offset: int = 4, mamba_d_state: int = 16, mamba_d_conv: int = 4, mamba_expand: int = 2,
                 mamba_dt_rank: int | str = "auto", mamba_conv_bias: bool = True, mamba_proj_bias: bool = False,
                 moe_dispatch: str = MOE_DISPATCH_DEFAULT, capacity_factor: float = 1.25,
                 **config_kwargs) -> ModelConfig:
    """transformers `JambaForCausalLM` (names as its config; defaults: Jamba-v0.1). Layer i is attention when
    `i % attn_layer_period == attn_layer_offset`, else a Mamba-1 mixer with RMSNorms on dt, B and C (Jamba's
    `JambaMambaMixer`: MambaMixer(bcdt_rms_norm=True, bcdt_norm_eps=rms_norm_eps)); its channel mixer is a mixture
    of `num_experts` SwiGLU experts with top-`num_experts_per_tok` softmax routing (weights NOT renormalized)
    when `i % expert_layer_period == expert_layer_offset` and num_experts > 1, else a SwiGLU MLP
    (`JambaMLP`). Attention has no positional encoding (rotary_dim=0), GQA, no biases. Blocks are
    `r += mixer(input_layernorm(r)); r += ffn(pre_ff_layernorm(r))`; RMSNorm eps inside; untied head by default.
    `moe_dispatch` / `capacity_factor` as in `mixtral_preset`."""
    act = _swiglu_only("jamba", hidden_act)
    _pos_int("num_hidden_layers", num_hidden_layers)
    for name, period, offset in (("attn", attn_layer_period, attn_layer_offset),
                                 ("expert", expert_layer_period, expert_layer_offset)):
        _pos_int(f"{name}_layer_period", period)
        if not isinstance(offset, numbers.Integral) or isinstance(offset, bool) or not 0 <= offset < period:
            raise ValueError(f"{name}_layer_offset={offset!r} must be an int in [0, {name}_layer_period={period})")
    _pos_int("num_experts", num_experts)
    dt_rank = math.ceil(hidden_size / 16) if mamba_dt_rank == "auto" else mamba_dt_rank
    ssm = dict(d_state=mamba_d_state, d_conv=mamba_d_conv, expand=mamba_expand, dt_rank=dt_rank,
               conv_bias=mamba_conv_bias, bias=mamba_proj_bias, bcdt_rms_norm=True, bcdt_norm_eps=rms_norm_eps)
    attn = dict(num_heads=num_attention_heads, num_kv_heads=num_key_value_heads, qkv_bias=False, out_bias=False,
                rotary_dim=0)
    attn = {k: v for k, v in attn.items() if v is not None}
    moe = (_moe_kwargs(num_experts, num_experts_per_tok, renormalize=False, dispatch=moe_dispatch,
                       capacity_factor=capacity_factor) if num_experts > 1 else None)
    blocks = []
    for i in range(num_hidden_layers):
        is_attn = i % attn_layer_period == attn_layer_offset
        expert = moe is not None and i % expert_layer_period == expert_layer_offset
        blocks.append(BlockSpec("attention" if is_attn else "mamba", not expert, attn if is_attn else ssm,
                                moe=moe if expert else None))
    return ModelConfig(vocab_size=vocab_size, d_model=hidden_size, blocks=tuple(blocks), norm="rms",
                       norm_eps=rms_norm_eps, mlp_hidden=intermediate_size, mlp_activation=act,
                       tie_embeddings=tie_word_embeddings, max_seq_len=max_position_embeddings, **config_kwargs)


def _swiglu_only(kind: str, hidden_act: str) -> str:
    if hidden_act != "silu":  # Jamba also uses it as the Mamba conv activation, which is SiLU here
        raise ValueError(f"{kind}: hidden_act {hidden_act!r} is not supported (only 'silu')")
    return "silu"


def _moe_kwargs(num_experts, top_k, *, renormalize, dispatch, capacity_factor) -> dict:
    _pos_int("num_experts", num_experts)
    _pos_int("num_experts_per_tok", top_k)
    if top_k > num_experts:
        raise ValueError(f"num_experts_per_tok={top_k} exceeds the number of experts {num_experts}")
    kw = dict(num_experts=num_experts, top_k=top_k, scoring="softmax", renormalize=renormalize, dispatch=dispatch,
              activation="silu")
    if dispatch == "capacity":
        kw["capacity_factor"] = capacity_factor
    return kw
