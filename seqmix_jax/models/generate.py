"""Autoregressive generation with explicit per-layer decoding states.

    logits, state = prefill(prompt, max_len=max_len, last_only=True)     one jitted call over the whole prompt
    t_0 = sample(logits[:, -1])
    repeat: logits, state = step(t_{i-1}, state); t_i = sample(logits)     one jitted lax.while_loop

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k (keep the k largest,
ties at the k-th value kept), then top-p (keep the smallest prefix of the descending-probability order whose
mass reaches p, always at least the top token), then a categorical draw with key fold_in(PRNGKey(seed), i) for
the i-th new token — the same seed gives the same tokens. Padded vocabulary rows (ids >= vocab_size) are never
produced. With `eos_id`, a row that has produced eos keeps producing eos, and the loop stops once every row has.

The model is split once (`nnx.split`) and the jitted functions `nnx.merge` it inside (cheaper than nnx.jit on
small models; the decode loop merges inside its body, where MoE layers sow their statistics); they are cached on the
graph definition and the static sampling settings, so repeated calls with the same model structure and shapes do not
recompile.

Limits: every row's prompt has the same length (no left padding / attention masks).
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Int

from seqmix_jax.models.lm import LM


def generate(model: LM, input_ids: Int[Array, "b l"], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
             max_len: int | None = None) -> Int[Array, "b t"]:
    """Prompt + `max_new_tokens` generated ids, (b, l + max_new_tokens) int32.

    Args:
      model: an LM.
      input_ids: prompt (b, l) integer ids in [0, vocab_size), l >= 1.
      max_new_tokens: tokens to generate (>= 0).
      temperature: 0 = greedy; > 0 scales the logits before sampling.
      top_k: keep the k most likely tokens (>= 1; k >= vocab_size is no filter).
      top_p: nucleus mass in (0, 1].
      seed: PRNG seed of the sampling.
      eos_id: end-of-sequence id: after it a row is padded with eos_id.
      max_len: decoding-state capacity (default l + max_new_tokens; at least that).
    """
    if not isinstance(model, LM):
        raise ValueError(f"model must be a seqmix_jax LM, got {type(model).__name__}")
    cfg = model.config
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a non-empty integer array of shape (b, l), got {ids.dtype} "
                         f"{tuple(ids.shape)}")
    b, l = ids.shape
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, numbers.Real) or isinstance(top_p, bool) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < cfg.vocab_size):
        raise ValueError(f"eos_id must be None or an int in [0, vocab_size={cfg.vocab_size}), got {eos_id!r}")
    need = l + max_new_tokens
    if max_len is None:
        max_len = need
    elif not _is_int(max_len) or max_len < need:
        raise ValueError(f"max_len must be an int >= prompt length {l} + max_new_tokens {max_new_tokens} = {need}, "
                         f"got {max_len!r}")
    if cfg.max_seq_len is not None and need > cfg.max_seq_len:
        raise ValueError(f"prompt length {l} + max_new_tokens {max_new_tokens} = {need} exceeds the model's "
                         f"max_seq_len={cfg.max_seq_len}")
    model._check_ids(jnp.asarray(ids), ndim=2)  # ids in [0, vocab_size), while they are concrete
    ids = jnp.asarray(ids, jnp.int32)
    if max_new_tokens == 0:
        return ids
    sampling = _Sampling(temperature=float(temperature), top_k=None if top_k is None else int(top_k),
                         top_p=None if top_p is None or top_p == 1 else float(top_p), vocab_size=cfg.vocab_size)
    graphdef, params = nnx.split(model)
    key = jax.random.key(int(seed))
    first, state = _prefill(graphdef, params, ids, key, int(max_len), sampling)
    new = _decode_for(model)(graphdef, params, first, state, key, int(max_new_tokens), sampling, eos_id)
    return jnp.concatenate([ids, new], axis=1)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


class _Sampling(tuple):
    """Hashable static sampling settings (a jit static argument)."""

    def __new__(cls, *, temperature, top_k, top_p, vocab_size):
        return super().__new__(cls, (temperature, top_k, top_p, vocab_size))

    temperature = property(lambda s: s[0])
    top_k = property(lambda s: s[1])
    top_p = property(lambda s: s[2])
    vocab_size = property(lambda s: s[3])


def sample(logits, key, sampling: _Sampling):
    """logits (b, v_padded) -> ids (b,) int32 under the settings (see the module docstring)."""
    logits = logits[:, :sampling.vocab_size].astype(jnp.float32)  # never emit padded rows
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly ahead of each token
        keep = before < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)  # smallest kept logit
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "sampling"))
def _prefill(graphdef, params, ids, key, max_len, sampling):
    model = nnx.merge(graphdef, params)
    logits, state = model.prefill(ids, max_len=max_len, last_only=True)
    return sample(logits[:, -1], jax.random.fold_in(key, 0), sampling), state


def _decode_loop(graphdef, params, first, state, key, n, sampling, eos_id):
    b = first.shape[0]
    out = jnp.full((b, n), 0 if eos_id is None else eos_id, jnp.int32).at[:, 0].set(first)
    done = jnp.zeros((b,), bool) if eos_id is None else first == eos_id

    def cond(carry):
        i, _, _, _, done = carry
        return (i < n) & ~jnp.all(done) if eos_id is not None else i < n

    def body(carry):
        i, tok, state, out, done = carry
        # Merged inside the loop body: layers that record something on a call (MoE layers sow their routing
        # statistics) may only mutate modules created at the trace level they run in.
        model = nnx.merge(graphdef, params)
        logits, new_state = model.step(tok, state)
        # Keep the carry's dtypes fixed (a mixer may return a state leaf in another float dtype).
        new_state = jax.tree.map(lambda a, s: a.astype(s.dtype), new_state, state)
        nxt = sample(logits, jax.random.fold_in(key, i), sampling)
        if eos_id is not None:
            nxt = jnp.where(done, eos_id, nxt)
            done = done | (nxt == eos_id)
        return i + 1, nxt, new_state, out.at[:, i].set(nxt), done

    carry = (jnp.asarray(1, jnp.int32), first, state, out, done)
    return jax.lax.while_loop(cond, body, carry)[3]


_DECODE_STATIC = ("graphdef", "n", "sampling", "eos_id")
_decode = jax.jit(_decode_loop, static_argnames=_DECODE_STATIC)
# XLA:CPU hands small elementwise and reduction fusions to YNNPACK by default. In the decode loop of a model without
# attention layers (the Mamba step: a (b, d, n) state update and its readout per layer) those YNNPACK fusions were
# the slow part: keeping YNNPACK to the matmuls made the loop 1.5x (b=8) to 1.9x (b=1) faster (Mamba d 256, 4
# layers, 127 steps, medians of paired runs on the 2-core CI machine), with identical tokens. Attention models keep
# the default: their softmax reductions gained from YNNPACK (Llama b=8: 7% slower without).
_CPU_DOT_ONLY = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
_decode_cpu_dot_only = jax.jit(_decode_loop, static_argnames=_DECODE_STATIC, compiler_options=_CPU_DOT_ONLY)


def _decode_for(model: LM):
    """The jitted decode loop for this model on the default backend (see _CPU_DOT_ONLY)."""
    if (jax.default_backend() == "cpu" and all(block.kind != "attention" for block in model.blocks)
            and _cpu_option_supported()):
        return _decode_cpu_dot_only
    return _decode


@functools.cache
def _cpu_option_supported() -> bool:
    """Whether this jaxlib's XLA:CPU accepts _CPU_DOT_ONLY (an experimental option; a jaxlib without it decodes with
    the default options)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_DOT_ONLY).lower(jnp.zeros((), jnp.float32)).compile()
    except Exception:  # noqa: BLE001 -- any refusal (unknown option or value) means: do not use it
        return False
    return True
