"""Mamba-1 selective scan as a Pallas kernel (GPU via Triton, TPU via Mosaic), forward and backward.

    y = selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias, block_sizes=BlockSizes(...), variant="gpu")

`supports(**call)` says whether a call can run (None) or why not; `selective_scan_reference` is the math in
plain jnp. See `_gpu.py` / `_tpu.py` for the kernels and `entry.py` for padding and the custom_vjp.
"""

from pallas_kernels.selective_scan._plan import BlockSizes
from pallas_kernels.selective_scan.entry import selective_scan, supports
from pallas_kernels.selective_scan.reference import selective_scan_reference

__all__ = ["BlockSizes", "selective_scan", "selective_scan_reference", "supports"]
