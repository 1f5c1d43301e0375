"""Multi-head softmax attention with GQA, RoPE (full or partial), sliding window, soft-cap and a KV cache.

Axis letters: b batch, l sequence, d d_model, h query heads, g kv heads (g divides h), k head dim,
r rotary dim, s cache slots (max_len).

    q = rope(q_proj(x)) (b, l, h, k);  k = rope(k_proj(x)), v = v_proj(x) (b, l, g, k)
    o = attention(q, k, v)                       causal softmax attention, query head i reads kv head i // (h/g)
    y = o_proj(o.reshape(b, l, h*k))

Same function and parameters as transformers `LlamaAttention` / `MistralAttention` (q_proj, k_proj, v_proj,
o_proj; torch weights are (out, in) -> transpose for our (in, out) kernels), GLM (interleaved, partial RoPE),
mamba_ssm `MHA` and flash-attn `MHA` once their fused `Wqkv` / `in_proj` rows are split with `split_fused_qkv`.

Positions: 0..l-1 by default. With `segment_ids` the positions restart at each segment (the index within its
segment), as each packed document would see if run alone; a segment is a run of equal adjacent ids, so an id
reused by a later, non-adjacent document starts a new document (like the recurrent mixers' resets).

Decoding keeps an explicit `KVCache` of `max_len` slots per row. `prefill` and `step` write the new (rotated) keys
and values at slots length, length+1, ... and attend over the whole cache with `q_offset = length`: unfilled slots
lie after every query and are masked by causality, a sliding window by the window rule (a prefill without a state
attends to the prompt's own keys instead, then pads them into a fresh cache). The cache is not a ring buffer: a
windowed layer still holds max_len slots.

Capacity: writing past `max_len` raises ValueError when the lengths are concrete (eager code). Under `jit` the
lengths are tracers and nothing can raise, so an overflowing row's outputs are NaN (and stay NaN: its length keeps
counting); the other rows are unaffected, and no valid cache slot is overwritten.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from seqmix_jax.layers._init import check_dims, linear, shared_input_linears
from seqmix_jax.ops.attention import attention, attention_decode
from seqmix_jax.ops.rotary import apply_rotary, rotary_inv_freq
from seqmix_jax.ops.segments import check_segment_ids, segment_starts


class KVCache(NamedTuple):
    k: jax.Array  # (b, g, s, k) rotated keys, head-major (a decode step reads each head's keys contiguously);
    v: jax.Array  # (b, g, s, k)  slots >= length are unused
    length: jax.Array  # (b,) int32 tokens written per row


class Attention(nnx.Module):
    """Causal multi-head attention mixer: (b, l, d_model) -> (b, l, d_model).

    Args:
      d_model: model width d.
      num_heads: h query heads.
      num_kv_heads: g key/value heads (default h; 1 = multi-query); must divide h.
      head_dim: k (default d_model // h, which must then be exact).
      qkv_bias, out_bias: biases of the q/k/v projections and of o_proj (False, False).
      rotary_dim: channels of each head that RoPE rotates (None = head_dim; 0 = no RoPE); even, <= head_dim.
      rope_base: RoPE frequency base (10000).
      rope_interleaved: pairs (2i, 2i+1) instead of rotate-half (i, i + r/2).
      rope_position_scale: positions are divided by it (linear RoPE interpolation; Evo 131k: 16).
      causal: causal mask (True); decoding needs it.
      window: sliding window w >= 1: position p sees keys p - w < j <= p (transformers' `sliding_window`).
      softcap: attention-logit soft-cap c: scores -> c tanh(scores / c).
      scale: score scale (default 1 / sqrt(head_dim)).
      impl: backend of `seqmix_jax.ops.attention`.
      dtype, param_dtype: compute and storage dtypes; softmax statistics are float32 regardless.
      rngs: nnx.Rngs (keyword only).
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = False, rotary_dim: int | None = None,
                 rope_base: float = 10000.0, rope_interleaved: bool = False, rope_position_scale: float = 1.0,
                 causal: bool = True, window: int | None = None, softcap: float | None = None,
                 scale: float | None = None, impl: str = "auto", dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        check_dims(d_model=d_model, num_heads=num_heads)
        g = num_heads if num_kv_heads is None else num_kv_heads
        check_dims(num_kv_heads=g)
        if num_heads % g:
            raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={g}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads} when head_dim is None")
            head_dim = d_model // num_heads
        check_dims(head_dim=head_dim)
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if not isinstance(rotary_dim, numbers.Integral) or rotary_dim < 0 or rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim must be an even int in [0, head_dim={head_dim}], got {rotary_dim!r}")
        if window is not None:
            if not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 1:
                raise ValueError(f"window must be an int >= 1, got {window!r}")
            if not causal:
                raise ValueError(f"window={window} needs causal=True")
        if softcap is not None and not (isinstance(softcap, numbers.Real) and softcap > 0):
            raise ValueError(f"softcap must be a positive number, got {softcap!r}")
        if not (isinstance(rope_position_scale, numbers.Real) and rope_position_scale > 0):
            raise ValueError(f"rope_position_scale must be a positive number, got {rope_position_scale!r}")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, g, head_dim
        self.rotary_dim, self.rope_base, self.rope_interleaved = int(rotary_dim), float(rope_base), rope_interleaved
        self.rope_position_scale = float(rope_position_scale)
        self.causal, self.window, self.softcap, self.impl, self.dtype = causal, window, softcap, impl, dtype
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        if self.rotary_dim:
            rotary_inv_freq(self.rotary_dim, self.rope_base)  # validates the base
        common = dict(use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d_model, num_heads * head_dim, names=("embed", "heads"), **common)
        self.k_proj = linear(d_model, g * head_dim, names=("embed", "kv_heads"), **common)
        self.v_proj = linear(d_model, g * head_dim, names=("embed", "kv_heads"), **common)
        self.o_proj = linear(num_heads * head_dim, d_model, use_bias=out_bias, names=("heads", "embed"), dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

    # --- public API
    def __call__(self, x: Float[Array, "b l d"], *, segment_ids: Int[Array, "b l"] | None = None,
                 positions: Int[Array, "l"] | Int[Array, "b l"] | None = None) -> Float[Array, "b l d"]:
        """x (b, l, d) -> (b, l, d). `segment_ids (b, l)`: packed documents (no attention across a boundary,
        positions restart per segment). `positions (l,)` or `(b, l)` overrides the RoPE positions."""
        self._check_x(x)
        b, l, _ = x.shape
        seg = None
        if segment_ids is not None:
            check_segment_ids(segment_ids, b, l)
            starts = segment_starts(segment_ids)
            seg = jnp.cumsum(starts.astype(jnp.int32), axis=1)  # adjacent runs, robust to reused ids
            if positions is None:
                t = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
                positions = t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
        if positions is None:
            positions = np.arange(l, dtype=np.int32)  # concrete: RoPE tables become constants
        q, k, v = self._qkv(x, positions)
        o = attention(q, k, v, causal=self.causal, segment_ids=seg, window=self.window, softcap=self.softcap,
                      scale=self.scale, impl=self.impl)
        return self.o_proj(o.reshape(b, l, self.num_heads * self.head_dim))

    def init_state(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache of `max_len` slots per row (compute dtype, else param dtype)."""
        self._check_decodable()
        check_dims(batch_size=batch_size, max_len=max_len)
        dtype = self.dtype or self.k_proj.kernel[...].dtype
        shape = (batch_size, self.num_kv_heads, max_len, self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch_size,), jnp.int32))

    def prefill(self, x: Float[Array, "b l d"], state: KVCache | None = None, *, max_len: int | None = None,
                last_only: bool = False, segment_ids=None) -> tuple[Float[Array, "b l d"], KVCache]:
        """Run a prompt x (b, l, d) after the `state.length` cached tokens; returns (y, state with the prompt).

        Without a state, a fresh cache of `max_len` slots (default l: room for the prompt only) is made, and the
        prompt attends to its own keys (l of them, not the max_len slots). `last_only`: y is the last position's
        output only, (b, 1, d); the other queries are never computed (every key and value still is: the cache
        needs them). Packed prompts (`segment_ids`) are not supported: one cache row holds one sequence."""
        if segment_ids is not None:
            raise NotImplementedError("Attention.prefill does not take segment_ids: a KV cache row holds one "
                                      "sequence; prefill each document in its own row")
        self._check_x(x)
        if state is None:
            return self._fresh(x, x.shape[1] if max_len is None else max_len, last_only)
        return self._extend(x, state, last_only)

    def step(self, x: Float[Array, "b d"], state: KVCache) -> tuple[Float[Array, "b d"], KVCache]:
        """One token per row: x (b, d) at position `state.length` -> (y (b, d), state)."""
        if x.ndim != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"step expects x of shape (b, d_model={self.d_model}), got {tuple(x.shape)}")
        y, state = self._extend(x[:, None], state)
        return y[:, 0], state

    # --- internals
    def _fresh(self, x, max_len, last_only):
        """Prefill into an empty cache of max_len slots: attention over the prompt's own keys."""
        self._check_decodable()
        b, l, _ = x.shape
        check_dims(max_len=max_len)
        if l > max_len:
            raise ValueError(f"KV cache overflow: a prompt of {l} tokens does not fit max_len={max_len} slots")
        q, k, v = self._qkv(x, np.arange(l, dtype=np.int32), last_only=last_only)
        o = attention(q, k, v, causal=True, window=self.window, softcap=self.softcap, scale=self.scale,
                      q_offset=l - q.shape[1], impl=self.impl)
        dtype = self.dtype or self.k_proj.kernel[...].dtype
        pad = ((0, 0), (0, 0), (0, max_len - l), (0, 0))
        ks, vs = (jnp.pad(jnp.swapaxes(a, 1, 2).astype(dtype), pad) for a in (k, v))
        y = self.o_proj(o.reshape(b, q.shape[1], self.num_heads * self.head_dim))
        return y, KVCache(ks, vs, jnp.full((b,), l, jnp.int32))

    def _extend(self, x, state: KVCache, last_only=False):
        self._check_decodable()
        b, l, _ = x.shape
        ks, vs, length = state
        s = ks.shape[2]
        if ks.shape != (b, self.num_kv_heads, s, self.head_dim) or vs.shape != ks.shape or length.shape != (b,):
            raise ValueError(f"state does not fit this layer and batch {b}: k {tuple(ks.shape)}, v {tuple(vs.shape)}, "
                             f"length {tuple(length.shape)}; expected k, v (b, g={self.num_kv_heads}, max_len, "
                             f"k={self.head_dim}) and length ({b},)")
        concrete = _concrete(length)
        if concrete is not None and int(concrete.max()) + l > s:
            i = int(concrete.argmax())
            raise ValueError(f"KV cache overflow: row {i} has length={int(concrete[i])} cached tokens + {l} new tokens "
                             f"> max_len={s}; make the cache with init_state(batch_size, max_len) large enough")
        positions = length[:, None] + jnp.arange(l, dtype=length.dtype)  # (b, l)
        q, k, v = self._qkv(x, positions, last_only=last_only)
        ks, vs = _write_cache(ks, k, positions), _write_cache(vs, v, positions)
        if q.shape[1] == 1:  # one query per row (a decode step, or last_only) against the head-major cache
            o = attention_decode(q[:, 0], ks.astype(q.dtype), vs.astype(q.dtype), length + l - 1,
                                 window=self.window, softcap=self.softcap, scale=self.scale,
                                 impl=_decode_impl(self.impl))[:, None]
        else:
            o = attention(q, jnp.swapaxes(ks, 1, 2).astype(q.dtype), jnp.swapaxes(vs, 1, 2).astype(q.dtype),
                          causal=True, window=self.window, softcap=self.softcap, scale=self.scale, q_offset=length,
                          impl=self.impl)
        y = self.o_proj(o.reshape(b, q.shape[1], self.num_heads * self.head_dim))
        overflow = (length + l > s)[:, None, None]
        y = jnp.where(overflow, jnp.asarray(jnp.nan, y.dtype), y)
        return y, KVCache(ks, vs, length + l)

    def _qkv(self, x, positions, *, last_only=False):
        """Rotated q (b, l, h, k) and k, v (b, l, g, k); with last_only, q of the last position only (b, 1, h, k)."""
        b, l, _ = x.shape
        if last_only and l > 1:
            q, k, v = self.q_proj(x[:, -1:]), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = shared_input_linears((self.q_proj, self.k_proj, self.v_proj), x)
        q = q.reshape(b, q.shape[1], self.num_heads, self.head_dim)
        k = k.reshape(b, l, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, l, self.num_kv_heads, self.head_dim)
        if self.rotary_dim:
            rope = dict(rotary_dim=self.rotary_dim, base=self.rope_base, interleaved=self.rope_interleaved,
                        position_scale=self.rope_position_scale)
            q = apply_rotary(q, positions[..., -q.shape[1]:], **rope)
            k = apply_rotary(k, positions, **rope)
        return q, k, v

    def _check_x(self, x):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (b, l, d_model={self.d_model}), got {tuple(x.shape)}")

    def _check_decodable(self):
        if not self.causal:
            raise NotImplementedError("decoding with a KV cache needs causal=True (unfilled cache slots are masked "
                                      "by causality)")


def split_fused_qkv(w, num_heads: int, num_kv_heads: int, head_dim: int):
    """Split a fused qkv weight (or bias) in the flash-attn / mamba_ssm layout into (wq, wk, wv).

    The rows (axis 0) are [q: h*k | k: g*k | v: g*k] with heads contiguous (flash-attn `MHA.Wqkv`, StripedHyena
    `inner_mha_cls.Wqkv`, mamba_ssm `MHA.in_proj` without an MLP slice). A (rows, d) weight gives three torch
    (out, in) weights; a (rows,) bias gives three biases. Transpose the weights for our nnx kernels."""
    check_dims(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
    rows = head_dim * (num_heads + 2 * num_kv_heads)
    if w.ndim not in (1, 2) or w.shape[0] != rows:
        raise ValueError(f"fused qkv must have {rows} = head_dim {head_dim} * (num_heads {num_heads} + 2 * "
                         f"num_kv_heads {num_kv_heads}) rows (a (rows, d) weight or (rows,) bias), got shape "
                         f"{tuple(w.shape)}")
    nq, nkv = num_heads * head_dim, num_kv_heads * head_dim
    return w[:nq], w[nq:nq + nkv], w[nq + nkv:]


def _write_cache(cache, x, positions):
    """cache (b, g, s, k) with x (b, l, g, k) written at slots positions (b, l).

    The scatter runs on the (b * g, s, k) view with one index row per (row, kv head): measured on XLA:CPU, that
    keeps it an in-place update inside the decode loop, where the (b, g, s, k) form (rewritten to a
    dynamic-update-slice when b = 1) made XLA copy the whole cache several times per step. The barrier stops
    XLA from fusing a second copy of the update into the attention that reads the cache. An overflowing write
    (only possible under jit) lands wherever XLA puts out-of-range updates (dropped, or clamped onto the row's
    last slot); either way `_extend` makes that row's output NaN from then on, so nothing valid is lost."""
    b, g, s, dk = cache.shape
    l = x.shape[1]
    flat = cache.reshape(b * g, s, dk)
    rows = jnp.arange(b * g)[:, None]
    slots = jnp.repeat(positions, g, axis=0)  # (b * g, l)
    upd = jnp.swapaxes(x, 1, 2).reshape(b * g, l, dk).astype(cache.dtype)
    flat = flat.at[rows, slots].set(upd, mode="promise_in_bounds")
    return jax.lax.optimization_barrier(flat).reshape(b, g, s, dk)


def _decode_impl(impl: str) -> str:
    """The single-query decode op has reference and xla paths only (a kernel buys nothing for one query)."""
    return "reference" if impl == "reference" else "xla"


def _concrete(a):
    """a as a numpy array, or None when it is a tracer (under jit / grad / vmap)."""
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
