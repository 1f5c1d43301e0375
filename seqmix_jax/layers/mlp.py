"""Gated MLP (GLU family): SwiGLU (Llama, StripedHyena-7B) and GeGLU (Evo 1 / Evo 2).

Axis letters: d model width, f hidden (MLP) width.

    y = down( act(gate(x)) * up(x) )         gate, up: d -> f;  down: f -> d

Name map: transformers Llama `gate_proj / up_proj / down_proj`; StripedHyena `ParallelGatedMLP` `l1 / l2 / l3`.
Activations: "silu" (SwiGLU), "gelu" (exact erf GELU, torch's `F.gelu` default), "gelu_tanh" (tanh approximation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from seqmix_jax.layers._init import check_dims, linear, shared_input_linears

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def mlp_hidden_size(d_model: int, multiple_of: int = 64, hidden: int | None = None) -> int:
    """StripedHyena's inner size: `hidden` when given, else int(2 * d_model * 4 / 3) rounded up to a multiple of
    `multiple_of` (the 8/3 factor keeps a gated MLP's parameter count at that of a 4x plain MLP)."""
    check_dims(d_model=d_model, multiple_of=multiple_of)
    if hidden is not None:
        check_dims(hidden=hidden)
        return hidden
    inner = int(2 * d_model * 4 / 3)
    return multiple_of * ((inner + multiple_of - 1) // multiple_of)


class GatedMLP(nnx.Module):
    """Gated MLP: (..., d_model) -> (..., d_model).

    Args:
      d_model: model width d.
      hidden: hidden width f (see `mlp_hidden_size`).
      activation: "silu", "gelu" or "gelu_tanh", applied to the gate branch.
      use_bias: biases on the three projections (False).
      dtype, param_dtype: compute and storage dtypes.
      rngs: nnx.Rngs (keyword only).
    """

    def __init__(self, d_model: int, hidden: int, *, activation: str = "silu", use_bias: bool = False, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_dims(d_model=d_model, hidden=hidden)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.d_model, self.hidden, self.activation = d_model, hidden, activation
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = linear(d_model, hidden, names=("embed", "mlp"), **common)
        self.up = linear(d_model, hidden, names=("embed", "mlp"), **common)
        self.down = linear(hidden, d_model, names=("mlp", "embed"), **common)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        if x.ndim < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"GatedMLP expects x of shape (..., d_model={self.d_model}), got {tuple(x.shape)}")
        gate, up = shared_input_linears((self.gate, self.up), x)
        return self.down(ACTIVATIONS[self.activation](gate) * up)
