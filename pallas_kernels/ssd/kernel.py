"""The SSD kernel entry: validation, padding, the delta / D / z plumbing in XLA, and the custom VJP.

    y = ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, block_sizes=BlockSizes(chunk=64), variant="gpu")

What runs where:
  XLA      delta = clamp(softplus(dt + dt_bias)) and a = delta A (b, l, h): tiny next to x, and autodiff
           carries their gradients back to dt, dt_bias and A; padding; the z gate y *= silu(z).
  kernel   xbar = delta x, the chunked scan, + D x (fused: x is already loaded), the final state; the backward
           kernels recompute the chunk-start states (not saved by default: BlockSizes.save_states) and return
           dx, d delta (through xbar), da = d(delta A), dB, dC, dD and d initial_state.
Padding makes every shape work: l up to a multiple of the chunk with delta = 0 (no decay, no input), n to the
padded state width with zero B / C, p to the head-dim block with zero x; all sliced back.
With z, the kernel emits y in float32 and the gate is applied in XLA before the one cast to x.dtype (no
double rounding; the kernel's backward then does not need y).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common as cm
from pallas_kernels.ssd import _gpu, _tpu

MAX_STATE = {"gpu": 256, "tpu": 512}  # padded d_state the variant takes (GPU: registers; TPU: VMEM)
MAX_HEAD_DIM_TPU = 512  # the TPU variant keeps the whole head dim in one block


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes of the SSD kernel; None picks the variant's default.

    chunk: Q, steps per chunk. GPU: a power of two >= 16 (default 64, or less for short sequences);
      TPU: a multiple of 8 (default 128, or less for short sequences).
    block_p, block_p_bwd: head-dim block of one GPU forward / backward program, a power of two >= 16.
      Defaults: backward min(64, next_pow2(p)) (each program writes its own dB / dC partial, so fewer
      blocks move fewer bytes); forward the same, halved (down to 16) while b * h * (p blocks) < 128
      programs, so a small batch still fills the GPU (the chunk walk is sequential inside a program). The
      chunk-parallel kernels (block_p_bwd) have b * h * (l / Q) * (p blocks) programs and need no halving.
      The TPU variant takes the whole (8-padded) head dim and accepts only None.
    num_warps, num_stages: Triton launch parameters (GPU only) of the kernels that walk the chunks (block_p):
      the forward, the state walk that recomputes the chunk-start states, the backward's dS walk.
      num_warps_bwd, num_stages_bwd: those of the chunk-parallel kernels (block_p_bwd): the backward's two and
      the two-pass forward's y. At the defaults (Q = 64, p = 64) benchmarks/triton_ptx_check.py
      measures, for sm_90a: forward spill-free at n = 64 and 72 B spilled per thread at n = 128; backward
      spill-free except 4 B (n = 64) and 208 B (n = 128) in the B / C kernel (4 or 16 warps spill more).
    split_operands: with 16-bit inputs the matmuls take bf16 / f16 operands; the float32 ones that are not
      exact in 16 bits - the state S and its adjoint dS (whose rounding compounds over the chunks), the decayed
      scores M in M x and M^T dy, and a float32 cotangent dy (with z, y leaves the kernel in float32) - go in
      as hi + lo pairs of 16-bit parts (one more matmul each; ~16 mantissa bits). That keeps the bf16 error
      within the bf16 rule (<= 2x the xla path's); False rounds them once (fewer matmuls: the forward's 7
      become 4), which roughly doubles the error of the state and of some gradients.
    save_states: what the backward gets the chunk-start states (b, h, l / Q, p, n) from. False (default): the
      forward saves only its inputs and the backward recomputes the states, with a walk over the chunks that does
      one product per chunk (`ssd_states`; like mamba_ssm, which recomputes its chunk states). True: the forward
      writes them and they stay alive until the backward: float32 (p, n) per head and chunk, 4x the bytes of a
      bf16 x at n = 128, Q = 64 (8 bytes per element of x), in every layer of a model at once.
    two_pass (GPU only): the forward as the state walk alone (`ssd_states`, one product per chunk) writing the
      chunk-start states, then a chunk-parallel kernel for y (`ssd_y`, block_p_bwd, num_warps_bwd), instead of
      one walk that also computes y (default). It trades a float32 round trip of the states through HBM for
      b * h * (l / Q) * (p blocks) programs where the fused walk has b * h * (p blocks): which is faster depends
      on the shape and the GPU (benchmarks/gpu_check.py times both).
    """
    chunk: int | None = None
    block_p: int | None = None
    block_p_bwd: int | None = None
    num_warps: int = 8
    num_warps_bwd: int = 8
    num_stages: int = 2
    num_stages_bwd: int = 1
    split_operands: bool = True
    save_states: bool = False
    two_pass: bool = False


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static the kernels need (hashable: the custom VJP's non-differentiable argument)."""
    variant: str
    interpret: bool
    chunk: int
    block_p: int
    block_p_bwd: int
    mm: str  # matmul operand precision, see _gpu.dot
    split_state: str  # "b": S / dS enter their products as hi + lo 16-bit pairs (see _gpu.dot); "": rounded
    split_m: str  # "a": the same for the decayed scores M = (C B^T o L) in M x and M^T dy
    split_dy: str  # "a": the same for a float32 cotangent dy (gated: y leaves the kernel in float32)
    out_dtype: jnp.dtype
    num_warps: int
    num_warps_bwd: int
    num_stages: int
    num_stages_bwd: int
    save_states: bool
    two_pass: bool


def ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=True, dt_limit=None, initial_state=None,
        return_final_state=False, segment_ids=None, block_sizes: BlockSizes | None = None,
        variant: str | None = None, interpret: bool | None = None):
    """Mamba-2 SSD scan (the semantics of `seqmix_jax.ops.ssd`), as a Pallas kernel with a Pallas backward.

    Args:
      x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n) with g dividing h.
      D: optional (h,) or (h, p) skip; z: optional (b, l, h, p) gate; dt_bias: optional (h,).
      dt_softplus, dt_limit: delta = clamp(softplus(dt + dt_bias), *dt_limit).
      initial_state: optional (b, h, p, n); return_final_state: also return the (b, h, p, n) float32 state.
      segment_ids: optional (b, l) int; the state restarts from zero where it changes.
      block_sizes, variant ("gpu" | "tpu" | None = the running accelerator), interpret (None = on CPU).

    Returns y (b, l, h, p) in x.dtype, or (y, final_state). Arithmetic in float32 inside the kernel; matmul
    operands in bf16 / f16 when x, B and C all are (float32 accumulation).
    """
    variant = cm.resolve_variant(variant)
    interpret = cm.resolve_interpret(interpret, variant)
    b, l, h, p, g, n = _validate(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_state, segment_ids)
    cfg, Lp, Pp, Np = _configure(block_sizes, variant, interpret, x, B, C, l, p, n, z is not None)
    f32 = lambda t: t.astype(jnp.float32)
    delta = f32(dt) if dt_bias is None else f32(dt) + f32(dt_bias)
    if dt_softplus:
        delta = jax.nn.softplus(delta)
    if dt_limit is not None and tuple(dt_limit) != (0.0, float("inf")):
        delta = jnp.clip(delta, dt_limit[0], dt_limit[1])
    a = delta * f32(A)  # log decay per step
    bc = jnp.result_type(B.dtype, C.dtype)
    args = (
        _pad(x, {1: Lp, 3: Pp}),
        _pad(jnp.moveaxis(delta, 1, 2), {2: Lp}),  # (b, h, Lp); delta = 0 on padding: no input
        _pad(jnp.moveaxis(a, 1, 2), {2: Lp}),  # a = 0 on padding: no decay
        _pad(B.astype(bc), {1: Lp, 3: Np}),
        _pad(C.astype(bc), {1: Lp, 3: Np}),
        _pad(jnp.zeros((h, p), jnp.float32) if D is None else jnp.broadcast_to(
            f32(D)[:, None] if D.ndim == 1 else f32(D), (h, p)), {1: Pp}),
        None if initial_state is None else _pad(f32(initial_state), {2: Pp, 3: Np}),  # None: zeros in _scan
    ) + _segment_indices(segment_ids, Lp, cfg.chunk)
    y, S = _scan(cfg, *args)
    y = y[:, :l, :, :p]
    if z is not None:
        y = y * jax.nn.silu(f32(z))
    y = y.astype(x.dtype)
    return (y, S[:, :, :p, :n]) if return_final_state else y


def supports(x, B, *, variant: str | None = None, block_sizes: BlockSizes | None = None, **_) -> str | None:
    """None when the kernel can run on x (b, l, h, p) and B (b, l, g, n), else the reason (cheap: shapes and
    dtypes only; the op validates the rest)."""
    try:
        variant = cm.resolve_variant(variant)
        for name, t in (("x", x), ("B", B)):
            cm.check_dtype(name, t)
        if x.ndim != 4 or B.ndim != 4:
            return f"x and B must have rank 4, got shapes {tuple(x.shape)} and {tuple(B.shape)}"
        _configure(block_sizes, variant, True, x, B, B, x.shape[1], x.shape[3], B.shape[3], False)
    except ValueError as err:
        return str(err)
    return None


# --- the differentiable core on canonical padded arrays (see _gpu.py for the layout) ------------------------

def _variant(cfg):
    return _gpu if cfg.variant == "gpu" else _tpu


def _initial(x, B, S0):
    """S0, or the zero state (b, h, Pp, Np) when there is none: built where it is used, never a residual."""
    return jnp.zeros((x.shape[0], x.shape[2], x.shape[3], B.shape[3]), jnp.float32) if S0 is None else S0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, x, delta, a, B, C, D, S0, r, r0):
    y, S, _ = _variant(cfg).forward(cfg, x, delta, a, B, C, D, _initial(x, B, S0), r, r0, save_states=False)
    return y, S


def _scan_fwd(cfg, x, delta, a, B, C, D, S0, r, r0):
    y, S, states = _variant(cfg).forward(cfg, x, delta, a, B, C, D, _initial(x, B, S0), r, r0,
                                         save_states=cfg.save_states)
    return (y, S), (x, delta, a, B, C, D, S0, states, r, r0)  # S0 None (no initial state): no residual


def _scan_bwd(cfg, res, cts):
    x, delta, a, B, C, D, S0, states, r, r0 = res
    if states is None:  # recompute the chunk-start states (the walk alone, no y)
        _, _, states = _variant(cfg).forward(cfg, x, delta, a, B, C, D, _initial(x, B, S0), r, r0,
                                             save_states=True, emit_y=False)
    dy, dS = cts
    dx, ddelta, da, dB, dC, dD, dS0 = _variant(cfg).backward(
        cfg, x, delta, a, B, C, D, states, r, r0, dy.astype(cfg.out_dtype), dS.astype(jnp.float32))
    return dx, ddelta, da, dB.astype(B.dtype), dC.astype(C.dtype), dD, None if S0 is None else dS0, None, None


_scan.defvjp(_scan_fwd, _scan_bwd)


# --- helpers -----------------------------------------------------------------------------------------------

def _pad(t, sizes: dict[int, int]):
    """Zero-pad axis -> size for each entry (no copy when nothing grows)."""
    widths = [(0, sizes.get(ax, d) - d) for ax, d in enumerate(t.shape)]
    return jnp.pad(t, widths) if any(w for _, w in widths) else t


def _segment_indices(segment_ids, Lp: int, Q: int):
    """(r, r0) (b, Lp) int32, or (None, None): r = running count of segment starts (two steps share a
    segment iff equal; robust to reused ids), r0 = r just before the step's chunk (the state's segment).
    Padding continues the last segment."""
    if segment_ids is None:
        return None, None
    b, l = segment_ids.shape
    starts = jnp.concatenate([jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    r = jnp.cumsum(starts.astype(jnp.int32), axis=1)
    r = jnp.pad(r, [(0, 0), (0, Lp - l)], mode="edge")
    before = jnp.concatenate([r[:, :1], r[:, :-1]], axis=1)  # r[t - 1] (0 at t = 0)
    r0 = jnp.repeat(before[:, ::Q], Q, axis=1)
    return r, r0


def _configure(block_sizes, variant, interpret, x, B, C, l, p, n, gated):
    """(_Config, Lp, Pp, Np) after checking the block sizes and what the variant can take."""
    bs = BlockSizes() if block_sizes is None else block_sizes
    if not isinstance(bs, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes or None, got {type(bs).__name__}")
    if l < 1:
        raise ValueError(f"the sequence length l={l} must be >= 1")
    for name in ("num_warps", "num_warps_bwd", "num_stages", "num_stages_bwd"):
        cm.check_block(f"block_sizes.{name}", getattr(bs, name))
    if variant == "gpu":  # Triton: power-of-two tiles, 2-D dots with every dim >= 16
        Q = bs.chunk if bs.chunk is not None else min(64, max(16, cm.next_power_of_two(l)))
        cm.check_block("block_sizes.chunk", Q, power_of_two=True)
        bpb = bs.block_p_bwd if bs.block_p_bwd is not None else min(64, max(16, cm.next_power_of_two(p)))
        for name, v in (("block_sizes.chunk", Q), ("block_sizes.block_p_bwd", bpb), ("block_sizes.block_p", None)):
            if v is None:  # the forward's default depends on the backward's block
                v = bp = bs.block_p if bs.block_p is not None else _forward_block_p(bpb, x.shape[0] * x.shape[2], p)
            cm.check_block(name, v, power_of_two=True)
            if v < 16:
                raise ValueError(f"{name}={v} must be >= 16 on the GPU variant (Triton dots need dims >= 16)")
        Pp, Np = cm.round_up(p, max(bp, bpb)), max(16, cm.next_power_of_two(n))
    else:  # Mosaic: (8, 128) tiles; the head dim is one block (second-minor of the state), n on lanes
        Q = bs.chunk if bs.chunk is not None else min(128, cm.round_up(l, 8))
        cm.check_block("block_sizes.chunk", Q, multiple_of=8)
        if bs.block_p is not None:
            raise ValueError(f"block_sizes.block_p={bs.block_p} is GPU-only; the TPU variant takes the whole "
                             "head dim (pass None)")
        if bs.block_p_bwd is not None:
            raise ValueError(f"block_sizes.block_p_bwd={bs.block_p_bwd} is GPU-only (pass None)")
        Pp, Np = cm.round_up(p, 8), cm.round_up(n, 128)
        bp = bpb = Pp
        if Pp > MAX_HEAD_DIM_TPU:
            raise ValueError(f"head dim p={p} exceeds the TPU variant's limit {MAX_HEAD_DIM_TPU}")
    if Np > MAX_STATE[variant]:
        raise ValueError(f"d_state n={n} (padded to {Np}) exceeds the {variant} variant's limit "
                         f"{MAX_STATE[variant]}")
    dt = jnp.result_type(x.dtype, B.dtype, C.dtype)
    if dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        mm = dt.name
    else:  # compiled Triton: 3 TF32 passes (IEEE float32 dots spill heavily); elsewhere exact float32
        mm = "tf32x3" if variant == "gpu" and not interpret else "float32"
    split = bs.split_operands  # which operand of which product goes in as a hi + lo pair (see _gpu.dot)
    split_state, split_m, split_dy = ("b" if split else ""), ("a" if split else ""), ("a" if split and gated else "")
    out = jnp.dtype(jnp.float32) if gated else jnp.dtype(x.dtype)
    for name in ("save_states", "two_pass"):
        if not isinstance(getattr(bs, name), bool):
            raise ValueError(f"block_sizes.{name} must be a bool, got {getattr(bs, name)!r}")
    if bs.two_pass and variant != "gpu":
        raise ValueError("block_sizes.two_pass=True is GPU-only (the TPU variant runs its chunks in sequence on "
                         "one core anyway); pass False")
    cfg = _Config(variant, bool(interpret), Q, bp, bpb, mm, split_state, split_m, split_dy, out, bs.num_warps,
                  bs.num_warps_bwd, bs.num_stages, bs.num_stages_bwd, bs.save_states, bs.two_pass)
    return cfg, cm.round_up(l, Q), Pp, Np


def _forward_block_p(bp: int, heads: int, p: int, programs: int = 128) -> int:
    """Halve the forward's head-dim block (not below 16) while b * h * (p blocks) < `programs`."""
    while bp > 16 and heads * (cm.round_up(p, bp) // bp) < programs:
        bp //= 2
    return bp


def _validate(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_state, segment_ids):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x must have rank 4 (b, l, h, p), got shape {tuple(jnp.shape(x))}")
    b, l, h, p = x.shape
    if getattr(B, "ndim", None) != 4:
        raise ValueError(f"B must have rank 4 (b, l, g, n), got shape {tuple(jnp.shape(B))}")
    g, n = B.shape[2], B.shape[3]
    cm.check_shape("dt", dt, (b, l, h), "(b, l, h)")
    cm.check_shape("A", A, (h,), "(h,)")
    cm.check_shape("B", B, (b, l, g, n), "(b, l, g, n)")
    cm.check_shape("C", C, (b, l, g, n), "(b, l, g, n) like B")
    if g < 1 or h % g:
        raise ValueError(f"ngroups g={g} (B.shape[2]) must divide the heads h={h}")
    optional = (("z", z, (b, l, h, p), "(b, l, h, p)"), ("dt_bias", dt_bias, (h,), "(h,)"),
                ("initial_state", initial_state, (b, h, p, n), "(b, h, p, n)"))
    for name, t, shape, axes in optional:
        if t is not None:
            cm.check_shape(name, t, shape, axes)
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"D must have shape (h,) = ({h},) or (h, p) = ({h}, {p}), got {tuple(D.shape)}")
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("dt_bias", dt_bias), ("initial_state", initial_state)):
        if t is not None:
            cm.check_dtype(name, t)
    if dt_limit is not None and (len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]):
        raise ValueError(f"dt_limit must be a pair (lo, hi) with lo <= hi, got {dt_limit!r}")
    if segment_ids is not None:
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be an integer array, got dtype {jnp.dtype(segment_ids.dtype).name}")
        cm.check_shape("segment_ids", segment_ids, (b, l), "(b, l)")
    return b, l, h, p, g, n
