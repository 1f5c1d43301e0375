"""flax.nnx sequence mixers. Contract: `__call__(x, *, segment_ids=None) -> (b, l, d)`; recurrent mixers add
`init_state(batch_size)`, `prefill(x, state=None) -> (y, state)` and `step(x_t, state) -> (y_t, state)`."""

from seqmix_jax.layers.mamba import MambaMixer, MambaState
from seqmix_jax.layers.mamba2 import Mamba2Mixer, Mamba2State

__all__ = ["Mamba2Mixer", "Mamba2State", "MambaMixer", "MambaState"]
