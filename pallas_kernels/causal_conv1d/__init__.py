"""Depthwise causal conv1d (Mamba's conv1d, Hyena's short filter): forward, backward and decode update kernels.

    y[t, c] = act( bias[c] + sum_{j<w} weight[j, c] * x[t - (w - 1) + j, c] )

GPU variant (Triton): `_gpu.py`; TPU variant (Mosaic): `_tpu.py`; entries, validation and the custom_vjp:
`entry.py`; the plain-jnp definition: `reference.py`.
"""

from pallas_kernels.causal_conv1d.entry import (MAX_WIDTH, BlockSizes, causal_conv1d, causal_conv1d_update,
                                                supports, supports_update)
from pallas_kernels.causal_conv1d.reference import (causal_conv1d_reference, causal_conv1d_update_reference,
                                                    tap_allowance)

__all__ = ["MAX_WIDTH", "BlockSizes", "causal_conv1d", "causal_conv1d_reference", "causal_conv1d_update",
           "causal_conv1d_update_reference", "supports", "supports_update", "tap_allowance"]
