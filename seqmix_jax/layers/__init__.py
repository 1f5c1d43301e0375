"""flax.nnx sequence mixers and the blocks around them.

Mixer contract: `__call__(x, *, segment_ids=None) -> (b, l, d)`; decoding through explicit state pytrees:
`init_state(batch_size, ...)`, `prefill(x, state=None, *, max_len=None, last_only=False) -> (y, state)` and
`step(x_t, state) -> (y_t, state)`. Without a state, `prefill` starts a fresh one able to hold `max_len` tokens;
with `last_only` it returns the last position's output only, (b, 1, d), and may skip work for the others (the
state still covers the whole prompt)."""

from seqmix_jax.layers.attention import Attention, KVCache, split_fused_qkv
from seqmix_jax.layers.hyena import HyenaFilter, HyenaOperator, HyenaState
from seqmix_jax.layers.mamba import MambaMixer, MambaState
from seqmix_jax.layers.mamba2 import Mamba2Mixer, Mamba2State
from seqmix_jax.layers.mlp import GatedMLP, mlp_hidden_size
from seqmix_jax.layers.moe import MoE, pop_moe_stats
from seqmix_jax.layers.norms import LayerNorm, RMSNorm
from seqmix_jax.layers.striped_hyena import StripedHyenaMixer, StripedHyenaState

__all__ = [
    "Attention", "GatedMLP", "HyenaFilter", "HyenaOperator", "HyenaState", "KVCache", "LayerNorm", "Mamba2Mixer",
    "Mamba2State", "MambaMixer", "MambaState", "mlp_hidden_size", "MoE", "pop_moe_stats", "RMSNorm",
    "split_fused_qkv", "StripedHyenaMixer", "StripedHyenaState"
]
