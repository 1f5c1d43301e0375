"""Causal language model assembled from a `ModelConfig` layer pattern.

Axis letters: b batch, l sequence, d d_model, v padded vocabulary.

    r_0 = embed(ids)                                   (b, l, d); float32 when residual_in_fp32
    for each block i:
        r = r + mixer_i(norm_i(r))                      pre-norm residual (mamba_ssm's fused add -> norm, stripedhyena's
        r = r + mlp_i(mlp_norm_i(r))    (if spec.mlp)    pre_norm/post_norm blocks and Llama's layers are this math)
        r = r + moe_i(mlp_norm_i(r))    (if spec.moe)    mixture of experts (Mixtral, Jamba), position-wise
    h = norm_f(r)                                      (if final_norm)
    logits = h @ embed.embedding^T  (tied)   or  lm_head(h)  (untied)      (b, l, v) float32

Parameter paths (`nnx.state(model)`; H6's checkpoint mapping and the trainer's sharding rules rely on them):

    embed.embedding                   (v, d)   logical axes ("vocab", "embed"); v = config.padded_vocab_size
    blocks.{i}.norm.scale             (d,)     (+ norm.bias when config.norm == "layer")
    blocks.{i}.mixer.<...>                     the mixer's own parameters (see its module docstring):
        attention      q_proj, k_proj, v_proj, o_proj .{kernel (in, out), bias}
        mamba          in_proj, conv_weight (w, e), conv_bias, x_proj, dt_proj (no bias), dt_bias, A_log, D, out_proj
                       (+ dt_layernorm, b_layernorm, c_layernorm .scale with bcdt_rms_norm: Jamba)
        mamba2         in_proj, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, out_proj
        striped_hyena  projections, short_filter_weight (w, 3d), short_filter_bias, poles, residues (d, n, 2), D,
                       out_proj
        hyena          in_proj, short_filter.{weight,bias}, filter_fn.<...>, out_proj
    blocks.{i}.mlp_norm.scale (+bias) and blocks.{i}.mlp.{gate, up, down}.{kernel, bias}   only when spec.mlp
    blocks.{i}.mlp_norm.scale (+bias) and blocks.{i}.moe.{router.kernel (d, e), wi (e, d, 2f), wo (e, f, d)}
                                               only when spec.moe (see layers.MoE; + moe.shared.* with shared_hidden)
    norm_f.scale (+bias)                       only when config.final_norm
    lm_head.kernel                    (d, v)   only when not config.tie_embeddings (logical axes ("embed", "vocab"))

Reference names: mamba_ssm block `norm`/`mixer`/`norm2`/`mlp`, `norm_f`, `lm_head`; transformers Llama
`input_layernorm`/`self_attn`/`post_attention_layernorm`/`mlp`, `model.norm`; Mixtral the same with the MoE as `mlp`
(`block_sparse_moe` on disk); Jamba `input_layernorm`/`self_attn` or `mamba`/`pre_ff_layernorm`/`feed_forward`,
`model.final_layernorm`; stripedhyena `pre_norm`/`post_norm`/`mlp.l1,l2,l3` (= gate, up, down), `norm`, `unembed`.

Vocabulary padding: the embedding and the head have `padded_vocab_size` rows and logits are returned over the
padded vocabulary (as mamba_ssm and transformers' Mamba do); ids >= vocab_size are rejected as inputs and
`generate` never samples them.

Decoding: `init_state(b, max_len)` -> a tuple of per-layer mixer states (KV caches, SSM states, FIR + modal
states, Hyena histories); `prefill(ids, state)` and `step(tokens, state)` advance all layers (`prefill(ids,
max_len=..., last_only=True)` is what generation runs: fresh states, the last position's logits only). Every row of a
batch must be at the same position for Hyena layers (their state has one scalar position). MLP and MoE channel
mixers are position-wise and keep no state (a step runs the MoE on a length-1 sequence).

MoE statistics: each MoE layer sows its `MoEStats` (load-balancing loss, z-loss, drop fraction) as an
`nnx.Intermediate` on every call; read them with `seqmix_jax.layers.moe.pop_moe_stats(model)`. `segment_ids` reach
the MoE layers too: tokens of segment 0 are padding there (routed nowhere, left out of the statistics), so packed
rows number their documents from 1 (as `seqmix_jax.train.data` does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from seqmix_jax.layers import Attention, GatedMLP, HyenaOperator, LayerNorm, Mamba2Mixer, MambaMixer, RMSNorm
from seqmix_jax.layers import StripedHyenaMixer
from seqmix_jax.layers._init import axes, check_dims, linear
from seqmix_jax.layers.moe import MoE
from seqmix_jax.models.config import BlockSpec, ModelConfig
from seqmix_jax.parallel import constrain

MIXER_CLASSES = {"attention": Attention, "hyena": HyenaOperator, "striped_hyena": StripedHyenaMixer,
                 "mamba": MambaMixer, "mamba2": Mamba2Mixer}


def _dtype(name):
    return None if name is None else jnp.dtype(name)


def make_norm(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The model's norm: RMSNorm (eps inside or outside the sqrt) or LayerNorm, outputs in the compute dtype."""
    common = dict(eps=config.norm_eps, dtype=_dtype(config.dtype), param_dtype=_dtype(config.param_dtype), rngs=rngs)
    if config.norm == "layer":
        return LayerNorm(config.d_model, **common)
    return RMSNorm(config.d_model, eps_inside_sqrt=config.norm == "rms", **common)


def make_mixer(spec: BlockSpec, config: ModelConfig, *, rngs: nnx.Rngs, index: int = 0) -> nnx.Module:
    """The sequence mixer of one block. A Hyena mixer without `l_max` gets config.max_seq_len."""
    kwargs = dict(spec.mixer_kwargs)
    args = (config.d_model,)
    if spec.mixer == "hyena":
        args = (config.d_model, kwargs.pop("l_max", config.max_seq_len))
    elif spec.mixer in ("attention", "striped_hyena") and "num_heads" in kwargs:
        args = (config.d_model, kwargs.pop("num_heads"))
    elif spec.mixer in ("attention", "striped_hyena"):
        raise ValueError(f"blocks[{index}] ({spec.mixer}) needs num_heads in mixer_kwargs")
    try:
        return MIXER_CLASSES[spec.mixer](*args, **kwargs, dtype=_dtype(config.dtype),
                                         param_dtype=_dtype(config.param_dtype), rngs=rngs)
    except TypeError as e:  # a misspelled keyword: say which layer
        raise ValueError(f"blocks[{index}] ({spec.mixer}) mixer_kwargs {sorted(spec.mixer_kwargs)}: {e}") from None


def make_moe(spec: BlockSpec, config: ModelConfig, *, rngs: nnx.Rngs, index: int = 0) -> nnx.Module:
    """The mixture-of-experts channel mixer of one block; its `hidden` defaults to config.mlp_hidden."""
    kwargs = dict(spec.moe)
    hidden = kwargs.pop("hidden", None) or config.mlp_hidden
    try:
        return MoE(config.d_model, hidden, kwargs.pop("num_experts"), kwargs.pop("top_k"), **kwargs,
                   dtype=_dtype(config.dtype), param_dtype=_dtype(config.param_dtype), rngs=rngs)
    except TypeError as e:  # a misspelled keyword: say which layer
        raise ValueError(f"blocks[{index}] moe {sorted(spec.moe)}: {e}") from None


class Block(nnx.Module):
    """One layer on the residual stream r (b, l, d): r += mixer(norm(r)); then, with an MLP, r += mlp(mlp_norm(r)),
    or with a mixture of experts, r += moe(mlp_norm(r)).

    The mixer and channel-mixer inputs are in the compute dtype; their outputs are added to r in r's dtype (float32
    when residual_in_fp32, as mamba_ssm)."""

    def __init__(self, spec: BlockSpec, config: ModelConfig, *, rngs: nnx.Rngs, index: int = 0):
        self.kind = spec.mixer
        self.norm = make_norm(config, rngs=rngs)
        self.mixer = make_mixer(spec, config, rngs=rngs, index=index)
        has_moe = spec.moe is not None
        self.mlp_norm = make_norm(config, rngs=rngs) if spec.mlp or has_moe else None
        self.mlp = (GatedMLP(config.d_model, config.mlp_hidden, activation=config.mlp_activation,
                             use_bias=config.mlp_bias, dtype=_dtype(config.dtype),
                             param_dtype=_dtype(config.param_dtype), rngs=rngs) if spec.mlp else None)
        self.moe = make_moe(spec, config, rngs=rngs, index=index) if has_moe else None

    def __call__(self, r: Float[Array, "b l d"], *, segment_ids: Int[Array, "b l"] | None = None
                 ) -> Float[Array, "b l d"]:
        kw = {} if segment_ids is None else {"segment_ids": segment_ids}
        return self._channel(r + self.mixer(self.norm(r), **kw).astype(r.dtype), segment_ids)

    def prefill(self, r, state, *, max_len=None, last_only=False):
        """r (b, l, d) -> (r after this block, mixer state); state None = a fresh one of max_len tokens. With
        last_only, only the last position's output is computed: (b, 1, d), the state still covers all of r."""
        y, state = self.mixer.prefill(self.norm(r), state, max_len=max_len, last_only=last_only)
        if last_only:
            r = r[:, -1:]
        return self._channel(r + y.astype(r.dtype)), state

    def step(self, r_t: Float[Array, "b d"], state):
        y, state = self.mixer.step(self.norm(r_t), state)
        return self._channel(r_t + y.astype(r_t.dtype)), state

    def _channel(self, r, segment_ids=None):
        if self.mlp is not None:
            return r + self.mlp(self.mlp_norm(r)).astype(r.dtype)
        if self.moe is not None:
            h = self.mlp_norm(r)
            if h.ndim == 2:  # a decode step (b, d): the MoE is position-wise, run it on a length-1 sequence
                return r + self.moe(h[:, None])[:, 0].astype(r.dtype)
            kw = {} if segment_ids is None else {"segment_ids": segment_ids}
            return r + self.moe(h, **kw).astype(r.dtype)
        return r


class LM(nnx.Module):
    """Causal language model: ids (b, l) -> logits (b, l, padded_vocab_size) float32. See the module docstring.

    Args:
      config: a ModelConfig (see `seqmix_jax.models.config` for presets).
      rngs: nnx.Rngs (keyword only).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        dtype, param_dtype = _dtype(config.dtype), _dtype(config.param_dtype)
        v, d = config.padded_vocab_size, config.d_model
        self.embed = nnx.Embed(v, d, dtype=dtype, param_dtype=param_dtype,
                               embedding_init=jax.nn.initializers.normal(config.embed_init_std),
                               embedding_metadata=axes("vocab", "embed"), rngs=rngs)
        self.blocks = nnx.List([Block(spec, config, rngs=rngs, index=i) for i, spec in enumerate(config.blocks)])
        self.norm_f = make_norm(config, rngs=rngs) if config.final_norm else None
        self.lm_head = (None if config.tie_embeddings else
                        linear(d, v, use_bias=False, names=("embed", "vocab"), dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs))

    # --- full sequence
    def __call__(self, input_ids: Int[Array, "b l"], *, segment_ids: Int[Array, "b l"] | None = None,
                 return_hidden: bool = False, logits_at: Int[Array, "b n"] | None = None):
        """input_ids (b, l) -> logits (b, l, v) float32; with return_hidden, (logits, hidden) where hidden is the
        list of residual-stream states (b, l, d) after each block (before norm_f), as transformers'
        output_hidden_states[1:] for Mamba. `segment_ids (b, l)`: packed documents; every mixer resets at
        segment starts (Hyena layers raise NotImplementedError). `logits_at (b, n)`: positions per row; the head
        runs there only and the logits are (b, n, v) (a trainer whose loss covers few positions, e.g. MQAR
        queries, skips the rest of the head's matmul)."""
        self._check_ids(input_ids, ndim=2)
        # Residual stream sharded at block boundaries when the trainer activated mesh rules (identity otherwise).
        r = constrain(self._embed(input_ids), ("batch", "length", "embed"))
        hidden = []
        for block in self.blocks:
            r = constrain(block(r, segment_ids=segment_ids), ("batch", "length", "embed"))
            hidden.append(r)
        if logits_at is not None:
            if logits_at.ndim != 2 or logits_at.shape[0] != r.shape[0]:
                raise ValueError(f"logits_at must be (b={r.shape[0]}, n) positions, got {tuple(logits_at.shape)}")
            r = jnp.take_along_axis(r, logits_at[..., None].astype(jnp.int32), axis=1)
        logits = self._head(r)
        return (logits, hidden) if return_hidden else logits

    # --- decoding
    def init_state(self, batch_size: int, max_len: int) -> tuple:
        """Empty per-layer decoding states able to hold `max_len` tokens (prompt + generated)."""
        self._check_max_len(batch_size, max_len)
        return tuple(block.mixer.init_state(batch_size, max_len) for block in self.blocks)

    def prefill(self, input_ids: Int[Array, "b l"], state: tuple | None = None, *, max_len: int | None = None,
                last_only: bool = False):
        """Run a prompt (after whatever `state` holds); returns (logits (b, l, v), state). Without a state, one of
        `max_len` tokens (default l) is made: each mixer starts from its empty state (attention attends to the
        prompt's own keys, not to max_len cache slots). `last_only`: logits of the last position only, (b, 1, v)
        (what generation needs): the last block computes its output, and the head runs, at that position alone;
        every block still computes the whole prompt's state."""
        self._check_ids(input_ids, ndim=2)
        if state is None:
            b, l = input_ids.shape
            max_len = l if max_len is None else max_len
            self._check_max_len(b, max_len)
            if max_len < l:
                raise ValueError(f"max_len={max_len} cannot hold the prompt of l={l} tokens")
            state = (None,) * len(self.blocks)
        else:
            self._check_state(state)
        r = self._embed(input_ids)
        new = []
        for i, (block, s) in enumerate(zip(self.blocks, state)):
            r, s = block.prefill(r, s, max_len=max_len, last_only=last_only and i == len(self.blocks) - 1)
            new.append(s)
        return self._head(r[:, -1:] if last_only else r), tuple(new)

    def step(self, tokens: Int[Array, "b"], state: tuple):
        """One token per row: tokens (b,) -> (logits (b, v) float32, state)."""
        self._check_ids(tokens, ndim=1)
        self._check_state(state)
        r = self._embed(tokens)
        new = []
        for block, s in zip(self.blocks, state):
            r, s = block.step(r, s)
            new.append(s)
        return self._head(r), tuple(new)

    def save_pretrained(self, path, **kwargs) -> None:
        """Export to the Hugging Face / stripedhyena layout (see `seqmix_jax.models.checkpoints.save_pretrained`)."""
        from seqmix_jax.models.checkpoints import save_pretrained  # checkpoints imports this module

        save_pretrained(self, path, **kwargs)

    # --- internals
    def _embed(self, ids):
        r = self.embed(ids)
        if self.config.residual_in_fp32:
            r = r.astype(jnp.float32)
        return r

    def _head(self, r):
        h = r if self.norm_f is None else self.norm_f(r)
        if self.config.dtype is not None:
            h = h.astype(self.config.dtype)
        logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
        return logits.astype(jnp.float32)

    def _check_ids(self, ids, ndim):
        shape = "(b, l)" if ndim == 2 else "(b,)"
        if not hasattr(ids, "ndim") or ids.ndim != ndim or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"input ids must be an integer array of shape {shape}, got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        cfg = self.config
        if ndim == 2 and cfg.max_seq_len is not None and ids.shape[1] > cfg.max_seq_len:
            raise ValueError(f"sequence length l={ids.shape[1]} exceeds max_seq_len={cfg.max_seq_len}")
        concrete = _concrete(ids)
        if concrete is not None and concrete.size:
            lo, hi = int(concrete.min()), int(concrete.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token ids must lie in [0, vocab_size={cfg.vocab_size}), got min {lo}, max {hi}")

    def _check_max_len(self, batch_size, max_len):
        check_dims(batch_size=batch_size, max_len=max_len)
        if self.config.max_seq_len is not None and max_len > self.config.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={self.config.max_seq_len}")

    def _check_state(self, state):
        if not isinstance(state, (tuple, list)) or len(state) != len(self.blocks):
            n = len(state) if hasattr(state, "__len__") else "?"
            raise ValueError(f"state must be a tuple of {len(self.blocks)} per-layer states (from init_state or "
                             f"prefill), got {type(state).__name__} of length {n}")


def _concrete(a):
    """a as a numpy array, or None when it is a tracer (under jit / grad / vmap)."""
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
