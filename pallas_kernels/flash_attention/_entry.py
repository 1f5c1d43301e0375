"""The public entry: validation, block sizes, padding to the kernels' layouts, and the custom_vjp.

    out = flash_attention(q, k, v, causal=True, segment_ids=None, window=None, softcap=None, scale=None,
                          q_offset=None, block_sizes=None, variant=None, interpret=None)

Everything the kernels cannot take is rejected here, before any pallas_call, with a ValueError naming the
argument and its values; `supports(...)` runs the same checks and returns the message instead of raising.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels import _common as c
from pallas_kernels.flash_attention import _gpu, _tpu
from pallas_kernels.flash_attention._blocks import Config

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
TPU_TILE = 128  # TPU blocks: sequence blocks are multiples of the 128-lane tile (they are lane dims of the
# segment-id and statistics blocks), the head dim is padded to it


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes; None picks the default for the variant and head dim (`BlockSizes.default`).

    block_q / block_k: forward query rows / keys per block (FlashAttention-2's B_r / B_c);
    block_q_dkv / block_k_dkv: the dK/dV kernel (a program owns block_k_dkv keys, loops over query blocks);
    block_q_dq / block_k_dq: the dQ kernel (a program owns block_q_dq queries, loops over key blocks);
    num_warps / num_stages (GPU): forward; num_warps_bwd: the dK/dV kernel (or the fused backward);
    num_warps_dq: the dQ kernel; num_stages_bwd: both backward kernels.
    GPU blocks are powers of two >= 16; TPU blocks are multiples of 128. Blocks longer than the (padded)
    sequence shrink to it; the sequence is padded to a multiple of every block, so no block has to divide l.

    Backward schedule (GPU only; the TPU variant refuses True):
    fused_bwd: one kernel computes dK, dV and adds each dQ tile into a float32 buffer with atomic adds
      (FA-2's schedule: 5 matmuls per tile instead of 7, dQ summed in a non-deterministic order; on sm_90a at
      head dim 128 it spills 508 B per thread with the default dS split, none with ds_in_input_dtype=True);
      False: a separate dQ kernel recomputes S and dP (deterministic).
    ds_in_input_dtype: round dS to the input dtype for dQ = dS K and dK = dS^T Q (one 16-bit dot each,
      FlashAttention-2's choice; measured up to ~2.2x the xla path's bf16 gradient error, and more where all keys
      share a component). False (the default) keeps 16 bits of dS: with bf16 inputs two bf16 dots (dS split in
      hi + lo, `_blocks.ds_dot`), with float16 a float32 dS (TF32 dots); the gradients then carry the xla
      path's error."""
    block_q: int | None = None
    block_k: int | None = None
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None
    num_warps_dq: int | None = None
    fused_bwd: bool = False
    ds_in_input_dtype: bool = False

    @staticmethod
    def default(variant: str, head_dim: int) -> BlockSizes:
        """Starting points, untimed, chosen by what ptxas makes of them for sm_90a (benchmarks/triton_ptx_check.py:
        registers, spills, instructions per exp2, wgmma kept). GPU: 128 x 128 forward tiles up to head dim 128
        (64 x 64 above, where the float32 accumulators would spill registers), backward tiles with the looped-over
        axis short. Head dim <= 64: 4 warps, and the dK/dV kernel owns 64 keys (with 128 its dK and dV
        accumulators spilled 1 KB per thread). Head dim > 128: the dQ kernel runs 4 warps (8 spilled 564 B per
        thread and issued twice the instructions per score); the dK/dV kernel still spills ~430 B there, and the
        tiles that avoid it (32 x 32) lose Hopper's wgmma for mma.sync, which the device has to weigh."""
        if variant == "tpu":
            return BlockSizes(128, 128, 128, 128, 128, 128)
        big, small = head_dim > 128, head_dim <= 64
        return BlockSizes(block_q=64 if big else 128, block_k=64 if big else 128,
                          block_q_dkv=32 if big else 64, block_k_dkv=64 if big or small else 128,
                          block_q_dq=64 if big else 128, block_k_dq=32 if big else 64,
                          num_warps=4 if small else 8, num_stages=3 if small else 2,
                          num_warps_bwd=4 if small else 8, num_stages_bwd=2,
                          num_warps_dq=4 if small or big else 8)


def _resolve_blocks(block_sizes: BlockSizes | None, variant: str, head_dim: int, l: int, s: int):
    """Validate the user's blocks, fill the defaults, shrink blocks to the sequence; returns (tuple, l_pad, s_pad)."""
    if block_sizes is None:
        block_sizes = BlockSizes()
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes or None, got {type(block_sizes).__name__}")
    default = BlockSizes.default(variant, head_dim)
    vals = {}
    for f in dataclasses.fields(BlockSizes):
        value = getattr(block_sizes, f.name)
        if f.type == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"block_sizes.{f.name} must be a bool, got {value!r}")
            if value and variant == "tpu":
                raise ValueError(f"block_sizes.{f.name}=True is a GPU option; the TPU variant does not take it")
        elif value is None:
            value = getattr(default, f.name)
        elif f.name.startswith("num_"):
            if variant == "gpu":
                c.check_block(f"block_sizes.{f.name}", value, power_of_two=f.name.startswith("num_warps"))
        elif variant == "gpu":
            c.check_block(f"block_sizes.{f.name}", value, power_of_two=True)
            if value < 16:
                raise ValueError(f"block_sizes.{f.name}={value} must be >= 16 (Triton dots need both dims >= 16)")
        else:
            c.check_block(f"block_sizes.{f.name}", value, multiple_of=TPU_TILE)
        vals[f.name] = value
    q_blocks, k_blocks = ("block_q", "block_q_dkv", "block_q_dq"), ("block_k", "block_k_dkv", "block_k_dq")
    cap = (lambda n: max(16, c.next_power_of_two(n))) if variant == "gpu" else (lambda n: c.round_up(n, TPU_TILE))
    for names, n in ((q_blocks, l), (k_blocks, s)):
        for name in names:
            vals[name] = min(vals[name], cap(n))
    l_pad = c.round_up(l, math.lcm(*(vals[n] for n in q_blocks)))
    s_pad = c.round_up(s, math.lcm(*(vals[n] for n in k_blocks)))
    return tuple(vals[f.name] for f in dataclasses.fields(BlockSizes)), l_pad, s_pad


def _segments(segment_ids, b: int, l: int, s: int):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"segment_ids as a pair must be (q_segment_ids, kv_segment_ids), got "
                             f"{len(segment_ids)} arrays")
        q_seg, kv_seg = segment_ids
    else:
        if l != s:
            raise ValueError(f"segment_ids as one (b, l) array needs l == s, got l={l}, s={s}; pass "
                             "(q_segment_ids, kv_segment_ids)")
        q_seg = kv_seg = segment_ids
    for name, seg, n in (("q_segment_ids", q_seg, l), ("kv_segment_ids", kv_seg, s)):
        if not jnp.issubdtype(seg.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {jnp.dtype(seg.dtype).name}")
        c.check_shape(name, seg, (b, n), "(b, l)" if name[0] == "q" else "(b, s)")
    return q_seg, kv_seg


def _validate(q, k, v, causal, segment_ids, window, softcap, scale, q_offset, block_sizes, variant, interpret):
    """All checks; returns (Config, q_seg, kv_seg). Takes arrays or ShapeDtypeStructs."""
    variant = c.resolve_variant(variant)
    interpret = c.resolve_interpret(interpret, variant)
    for name, a, axes in (("q", q, "(b, l, h, k)"), ("k", k, "(b, s, g, k)"), ("v", v, "(b, s, g, k)")):
        if len(a.shape) != 4:
            raise ValueError(f"{name} must have rank 4 {axes}, got shape {tuple(a.shape)}")
        c.check_dtype(name, a)
    b, l, h, dk = q.shape
    s, g = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != dk:
        raise ValueError(f"k must have shape (b, s, g, k) with b={b} and head dim k={dk} as in q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    c.check_shape("v", v, tuple(k.shape), "(b, s, g, k) like k")
    if g == 0 or h % g:
        raise ValueError(f"the number of query heads h={h} must be divisible by the number of kv heads g={g}")
    if not MIN_HEAD_DIM <= dk <= MAX_HEAD_DIM:
        raise ValueError(f"head dim k={dk} is not supported: the kernel takes {MIN_HEAD_DIM} <= k <= {MAX_HEAD_DIM}")
    if l == 0 or s == 0 or b == 0 or h == 0:
        raise ValueError(f"empty attention (b={b}, l={l}, h={h}, s={s}) is not supported by the kernel")
    if window is not None:
        if not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if not causal:
            raise ValueError(f"window={window} needs causal=True (a sliding window looks back from each query)")
    if softcap is not None and not (isinstance(softcap, numbers.Real) and softcap > 0):
        raise ValueError(f"softcap must be a positive number, got {softcap!r}")
    if q_offset is None:
        q_offset = s - l
    if not isinstance(q_offset, numbers.Integral) or isinstance(q_offset, bool):
        raise ValueError(f"q_offset must be a Python int for the kernel (a per-row or traced offset is not "
                         f"supported), got {type(q_offset).__name__}")
    q_seg, kv_seg = _segments(segment_ids, b, l, s)
    kp = c.next_power_of_two(dk) if variant == "gpu" else c.round_up(dk, TPU_TILE)
    blocks, l_pad, s_pad = _resolve_blocks(block_sizes, variant, dk, l, s)
    cfg = Config(bool(causal), None if window is None else int(window), None if softcap is None else float(softcap),
                 float(1.0 / math.sqrt(dk) if scale is None else scale), int(q_offset), l, s, l_pad, s_pad, h, g,
                 kp, q_seg is not None, variant, interpret, blocks)
    return cfg, q_seg, kv_seg


def supports(q, k, v, *, causal=True, segment_ids=None, window=None, softcap=None, scale=None, q_offset=None,
             block_sizes=None, variant=None) -> str | None:
    """None when `flash_attention` can run this call (arrays or ShapeDtypeStructs), else the reason."""
    try:
        _validate(q, k, v, causal, segment_ids, window, softcap, scale, q_offset, block_sizes, variant, None)
    except ValueError as e:
        return str(e)
    return None


def flash_attention(q, k, v, *, causal: bool = True, segment_ids=None, window: int | None = None,
                    softcap: float | None = None, scale: float | None = None, q_offset: int | None = None,
                    block_sizes: BlockSizes | None = None, variant: str | None = None,
                    interpret: bool | None = None):
    """FlashAttention-2 as Pallas kernels (forward, and a Pallas backward through `jax.custom_vjp`).

    Args:
      q: (b, l, h, k) queries; k, v: (b, s, g, k) keys and values, g dividing h (query head i reads kv head
        i // (h // g)). float32, bfloat16 or float16 (mixed dtypes are promoted); 16 <= k <= 256.
      causal: key j is visible from query i when j <= q_offset + i.
      segment_ids: None, an int (b, l) array when l == s, or (q_segment_ids (b, l), kv_segment_ids (b, s));
        a query attends keys with an equal id.
      window: sliding window w >= 1 (needs causal): keys q_offset + i - w < j.
      softcap: c > 0: scores -> c * tanh(scores / c).
      scale: score scale, default 1 / sqrt(k).
      q_offset: int, position of the first query; default s - l (bottom-right aligned).
      block_sizes: BlockSizes (None: defaults per variant and head dim).
      variant: "gpu" (Pallas-Triton), "tpu" (Pallas-Mosaic) or None (the running accelerator; "gpu" on CPU).
      interpret: None runs interpret mode exactly when the variant's hardware is absent.

    Returns:
      (b, l, h, k) in the promoted input dtype. A query with no visible key outputs 0.
    """
    cfg, q_seg, kv_seg = _validate(q, k, v, causal, segment_ids, window, softcap, scale, q_offset, block_sizes,
                                   variant, interpret)
    dt = jnp.result_type(q.dtype, k.dtype, v.dtype)
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    impl = _gpu if cfg.variant == "gpu" else _tpu
    qp, kp_, vp, segs = impl.to_layout(cfg, q, k, v, q_seg, kv_seg)
    out = _flash(cfg, qp, kp_, vp, *segs)
    return impl.from_layout(cfg, out, q.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_seg, kv_seg):
    impl = _gpu if cfg.variant == "gpu" else _tpu
    return impl.forward(cfg, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(cfg, q, k, v, q_seg, kv_seg):
    """Residuals: the inputs, the output, its rounding error for 16-bit inputs (`_blocks.store_output`; one more
    array of the output's size) and the log-sum-exp."""
    impl = _gpu if cfg.variant == "gpu" else _tpu
    out, lse, *lo = impl.forward(cfg, q, k, v, q_seg, kv_seg, with_lo=q.dtype != jnp.float32)
    return out, (q, k, v, q_seg, kv_seg, out, lo[0] if lo else None, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_seg, kv_seg, out, out_lo, lse = res
    impl = _gpu if cfg.variant == "gpu" else _tpu
    dq, dk, dv = impl.backward(cfg, q, k, v, q_seg, kv_seg, out, out_lo, lse, do)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
