"""Block sizes and the static plan (padded sizes, flags) that both variants read.

Axis letters: b batch, l sequence, d channels, n state, g groups, e = d // g channels per group.
Padded sizes: L (l to a multiple of the chunk T), Dp = g * e_pad (each group's e to a multiple of the channel
block, so that a block never straddles two B/C groups), Np (n to 8 / the next power of two).
"""

from __future__ import annotations

import dataclasses
import math

from pallas_kernels._common import next_power_of_two, round_up


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tuning knobs; `None` fields take a default chosen per variant and shape (see `resolve_block_sizes`).

    block_d:        channels per program in the forward (GPU: a power of two; TPU: a multiple of 128 lanes).
    block_d_bwd:    channels per program in the backward (same rules).
    chunk:          T, steps between the states the forward saves for the backward; also the tile height of
                    the per-chunk work (GPU: a power of two, a multiple of `unroll` and `sub_chunk`;
                    TPU: a multiple of 8).
    unroll:         steps written out per loop iteration (their loads do not depend on the state).
    sub_chunk:      GPU: steps whose states and decays the backward keeps in registers.
    In interpret mode (CPU) `unroll` and `sub_chunk` default to 1 and 2: the written-out steps only add XLA compile
    time there (tests pass them explicitly to cover the unrolled indexing).
    num_warps, num_warps_bwd, num_stages: GPU (Triton) launch parameters.
    """

    block_d: int | None = None
    block_d_bwd: int | None = None
    chunk: int | None = None
    unroll: int | None = None
    sub_chunk: int | None = None
    num_warps: int | None = None
    num_warps_bwd: int | None = None
    num_stages: int = 1


# GPU defaults by padded d_state Np: (block_d, chunk, block_d_bwd, sub_chunk). One warp per program: a warp
# holds a (block_d, Np) state, 4-32 floats a thread; b * d / block_d programs (512 at b=2, d=2048) fill the
# SMs' schedulers. The backward keeps 2 * sub_chunk states and decays of that size in registers (<= ~255).
_GPU_DEFAULTS = {8: (8, 64, 8, 8), 16: (8, 64, 8, 8), 32: (8, 64, 8, 4), 64: (8, 64, 4, 4), 128: (4, 32, 4, 2),
                 256: (2, 32, 2, 2)}


def resolve_block_sizes(bs: BlockSizes | None, variant: str, b: int, d: int, n: int, g: int = 1,
                        interpret: bool = False) -> BlockSizes:
    """Fill the `None` fields of `bs` with defaults for this variant and shape (first guesses, to be tuned)."""
    bs = bs or BlockSizes()
    if variant == "gpu":
        block_d, chunk, block_d_bwd, sub_chunk = _GPU_DEFAULTS[max(8, next_power_of_two(n))]
        return _fill(bs, block_d=block_d, chunk=chunk, block_d_bwd=block_d_bwd, num_warps=1, num_warps_bwd=1,
                     unroll=1 if interpret else 8, sub_chunk=min(sub_chunk, 2) if interpret else sub_chunk)
    npad = round_up(n, 8)
    chunk = 128 if bs.chunk is None else bs.chunk
    e128 = round_up(d // g, 128)  # a group's channels, lane-padded: the largest block dividing it wastes nothing
    block_d = next(w for w in (512, 256, 128) if e128 % w == 0) if bs.block_d is None else bs.block_d
    # The backward keeps a chunk's T + 1 states (T + 1, Np, block_d) float32 in VMEM; keep that <= ~4 MiB.
    fit = 128
    vmem = lambda w: 4 * (chunk + 1) * npad * w
    while isinstance(block_d, int) and isinstance(chunk, int) and fit * 2 <= block_d and vmem(fit * 2) <= 4 << 20:
        fit *= 2
    return _fill(bs, block_d=block_d, block_d_bwd=fit, chunk=chunk, sub_chunk=8, unroll=1 if interpret else 8)


def _fill(bs: BlockSizes, **defaults) -> BlockSizes:
    """bs with its None fields set from defaults (a 0 or other bad value stays, for validation to report)."""
    return dataclasses.replace(bs, **{k: v for k, v in defaults.items() if getattr(bs, k) is None})


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call: sizes (true and padded), flags, block sizes, how to run."""

    variant: str
    interpret: bool
    bs: BlockSizes
    b: int
    l: int
    d: int
    n: int
    g: int
    T: int
    L: int
    e_pad: int
    Np: int
    softplus: bool
    has_D: bool
    has_z: bool
    has_bias: bool
    has_h0: bool
    has_keep: bool

    @property
    def e(self) -> int:
        return self.d // self.g

    @property
    def Dp(self) -> int:
        return self.g * self.e_pad

    @property
    def nc(self) -> int:
        return self.L // self.T

    @property
    def padded_steps(self) -> bool:
        return self.L != self.l


def make_plan(variant, interpret, bs: BlockSizes, *, b, l, d, n, g, softplus, has_D, has_z, has_bias, has_h0,
              has_keep) -> Plan:
    if variant == "gpu":  # Triton tiles (T, block_d): T a power of two, a multiple of unroll and sub_chunk
        Np = max(8, next_power_of_two(n))
        T = max(bs.unroll, bs.sub_chunk, min(bs.chunk, next_power_of_two(l)))
    else:
        Np = round_up(n, 8)
        T = min(bs.chunk, round_up(l, 8))  # a short sequence runs one short chunk
    e = d // g
    e_pad = round_up(e, math.lcm(bs.block_d, bs.block_d_bwd))
    return Plan(variant, interpret, bs, b, l, d, n, g, T, round_up(l, T), e_pad, Np, softplus, has_D, has_z,
                has_bias, has_h0, has_keep)
