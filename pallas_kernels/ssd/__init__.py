"""Mamba-2 SSD (chunked state-space duality) as Pallas kernels: a GPU (Triton) and a TPU (Mosaic) variant.

    from pallas_kernels.ssd import ssd, BlockSizes, supports, ssd_reference
"""

from pallas_kernels.ssd.kernel import BlockSizes, ssd, supports
from pallas_kernels.ssd.reference import ssd_reference

__all__ = ["BlockSizes", "ssd", "ssd_reference", "supports"]
