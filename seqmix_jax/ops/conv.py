"""Depthwise causal conv1d in PyTorch's cross-correlation convention (Mamba "conv1d", Hyena short filter).

Axis letters: b batch, l sequence, c channels, w kernel width.

    y[t, c] = bias[c] + sum_{j<w} weight[j, c] * x[t - (w - 1) + j, c]        (x at t < 0 is 0)

so the last tap `weight[w - 1]` multiplies the current input. Weights are stored (w, c) here; a PyTorch
`Conv1d` weight (c, 1, w) converts with `weight[:, 0, :].T`.

impl="pallas" runs `pallas_kernels.causal_conv1d` (interpret mode on CPU): a bandwidth-bound kernel that reads x
once and writes y once, with bias, silu and the segment masking fused, a Pallas backward that recomputes the
pre-activation, and a decode-update kernel. It takes float32 / bfloat16 / float16 and widths 1 <= w <= 16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

import pallas_kernels.causal_conv1d as conv_kernels
from seqmix_jax.ops import _checks as ck
from seqmix_jax.ops.dispatch import Impl, register_pallas, resolve_impl
from seqmix_jax.ops.segments import check_segment_ids, segment_index


def causal_conv1d(x: Float[Array, "b l c"], weight: Float[Array, "w c"], bias: Float[Array, "c"] | None = None, *,
                  activation: str | None = None, segment_ids: Int[Array, "b l"] | None = None,
                  initial_state: Float[Array, "b w1 c"] | None = None, return_final_state: bool = False,
                  impl: Impl = "auto"):
    """Causal depthwise conv.

    Args:
      x: (b, l, c).
      weight: (w, c) taps, last tap on the current input.
      bias: optional (c,).
      activation: None or "silu".
      segment_ids: optional (b, l) int; taps never reach into an earlier segment.
      initial_state: optional (b, w - 1, c) inputs that precede x (a decoding prefix); they belong to the first
        segment.
      return_final_state: also return the last w - 1 inputs (b, w - 1, c) (zeros before a segment start), the
        state `causal_conv1d_update` continues from.
      impl: "auto", "reference" (a sum of shifted slices per tap, also the fast form on XLA), "xla" or "pallas"
        (the kernel in `pallas_kernels.causal_conv1d`: one pass over x with the w - 1 preceding rows as a halo,
        bias, silu and segment masking fused; its backward is a Pallas kernel too).

    Returns:
      y (b, l, c) in x.dtype (accumulated in float32), or (y, state).
    """
    ck.check_rank("x", x, 3, "(b, l, c)")
    b, l, c = x.shape
    w = _check_conv_args(x, weight, bias, activation)
    if initial_state is not None:
        ck.check_shape("initial_state", initial_state, (b, w - 1, c), "(b, w - 1, c)")
    if segment_ids is not None:
        check_segment_ids(segment_ids, b, l)
    path = resolve_impl("causal_conv1d", impl, ("reference", "xla", "pallas"), x=x, weight=weight, bias=bias,
                        activation=activation, segment_ids=segment_ids, initial_state=initial_state)
    if path == "pallas":
        return conv_kernels.causal_conv1d(x, weight, bias, activation=activation, segment_ids=segment_ids,
                                          initial_state=initial_state, return_final_state=return_final_state)
    # "Pad once, add w shifted slices": ~20x faster than lax.conv_general_dilated with feature groups on
    # XLA:CPU, and already the readable definition, so reference and xla share it.
    prefix = jnp.zeros((b, w - 1, c), x.dtype) if initial_state is None else initial_state.astype(x.dtype)
    xp = jnp.concatenate([prefix, x], axis=1).astype(jnp.float32)
    if segment_ids is not None:
        r = segment_index(segment_ids)
        rp = jnp.concatenate([jnp.zeros((b, w - 1), r.dtype), r], axis=1)
    wf = weight.astype(jnp.float32)
    y = jnp.zeros((b, l, c), jnp.float32) if bias is None else jnp.broadcast_to(bias.astype(jnp.float32), (b, l, c))
    for j in range(w):
        tap = xp[:, j:j + l] * wf[j]
        if segment_ids is not None and j < w - 1:
            tap = tap * (rp[:, j:j + l] == r)[..., None]
        y = y + tap
    if activation is not None:
        y = jax.nn.silu(y)
    y = y.astype(x.dtype)
    if not return_final_state:
        return y
    state = xp[:, l:]  # the last w - 1 inputs
    if segment_ids is not None:
        state = state * (rp[:, l:] == r[:, -1:])[..., None]
    return y, state.astype(x.dtype)


def causal_conv1d_reference(x, weight, bias=None, *, activation=None, segment_ids=None, initial_state=None,
                            return_final_state=False):
    """The definition (see `causal_conv1d`)."""
    return causal_conv1d(x, weight, bias, activation=activation, segment_ids=segment_ids,
                         initial_state=initial_state, return_final_state=return_final_state, impl="reference")


def causal_conv1d_update(state: Float[Array, "b w1 c"], x: Float[Array, "b c"], weight: Float[Array, "w c"],
                         bias: Float[Array, "c"] | None = None, *, activation: str | None = None,
                         impl: Impl = "auto"):
    """One decoding step. state: (b, w - 1, c) previous inputs, oldest first; x: (b, c).

    impl: "auto", "reference" / "xla" (products over the (b, w, c) window, summed over w; the same code) or
    "pallas" (the decode-update kernel in `pallas_kernels.causal_conv1d`).

    Returns (y (b, c), new_state (b, w - 1, c)), both in x.dtype. The new state is an exact shift (no
    arithmetic), so it equals the prefill's final state bit for bit."""
    ck.check_rank("x", x, 2, "(b, c)")
    b, c = x.shape
    w = _check_conv_args(x, weight, bias, activation)
    ck.check_shape("state", state, (b, w - 1, c), "(b, w - 1, c)")
    path = resolve_impl("causal_conv1d_update", impl, ("reference", "xla", "pallas"), state=state, x=x,
                        weight=weight, bias=bias, activation=activation)
    if path == "pallas":
        return conv_kernels.causal_conv1d_update(state, x, weight, bias, activation=activation)
    window = jnp.concatenate([state.astype(x.dtype), x[:, None]], axis=1)  # (b, w, c)
    # An elementwise product summed over the w taps: XLA:CPU lowered the equivalent einsum to a dot batched over the
    # c channels, behind a transposing copy of the window (~2x the time of this form in a decode step).
    y = jnp.sum(window.astype(jnp.float32) * weight.astype(jnp.float32), axis=1)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if activation is not None:
        y = jax.nn.silu(y)
    return y.astype(x.dtype), window[:, 1:]


def _check_conv_args(x, weight, bias, activation) -> int:
    """Validate what the forward and the decode step share; returns the width w."""
    ck.check_float("x", x)
    c = x.shape[-1]
    ck.check_rank("weight", weight, 2, "(w, c)")
    if weight.shape[1] != c:
        raise ValueError(f"weight must have shape (w, c) with c={c} (from x), got {tuple(weight.shape)}")
    ck.check_float("weight", weight)
    if bias is not None:
        ck.check_shape("bias", bias, (c,), "(c,)")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    return weight.shape[0]


def _pallas_supports(*, x, weight, bias=None, activation=None, segment_ids=None, initial_state=None) -> str | None:
    return conv_kernels.supports(x, weight, bias, activation=activation, segment_ids=segment_ids,
                                 initial_state=initial_state)


def _pallas_update_supports(*, state, x, weight, bias=None, activation=None) -> str | None:
    return conv_kernels.supports_update(state, x, weight, bias, activation=activation)


register_pallas("causal_conv1d", _pallas_supports)
register_pallas("causal_conv1d_update", _pallas_update_supports)
