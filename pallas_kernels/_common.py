"""What every kernel entry shares: the variant (GPU/Triton or TPU/Mosaic) and interpret-mode choice, compiler
parameters across jax versions, and input checks whose messages name the argument and its values.

    variant = resolve_variant(variant)            # "gpu" | "tpu"; on CPU the default is "gpu" (interpreted)
    interpret = resolve_interpret(interpret)      # None -> True exactly when no accelerator runs the call
    pl.pallas_call(..., interpret=interpret_arg(variant, interpret),
                   compiler_params=compiler_params(variant, num_warps=4, num_stages=2))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

VARIANTS = ("gpu", "tpu")
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def platform() -> str:
    """"gpu", "tpu" or "cpu" for the default backend."""
    backend = jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "tpu" if backend == "tpu" else "cpu"


def resolve_variant(variant: str | None) -> str:
    """The kernel variant: the running accelerator's, or "gpu" (Triton semantics, interpreted) on CPU."""
    if variant is None:
        return "tpu" if platform() == "tpu" else "gpu"
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS} or None, got {variant!r}")
    return variant


def resolve_interpret(interpret: bool | None, variant: str) -> bool:
    """Interpret exactly when the variant's hardware is not the default backend (always on CPU)."""
    if interpret is None:
        return platform() != variant
    if not interpret and platform() != variant:
        raise ValueError(f"interpret=False needs a {variant.upper()} backend, but the default backend is "
                         f"{jax.default_backend()!r}; pass interpret=True (or None) to run in interpret mode")
    return bool(interpret)


def interpret_arg(variant: str, interpret: bool):
    """The value for `pallas_call(interpret=...)`: the TPU variant uses the TPU interpreter (it models Mosaic's
    memory spaces and grid semantics), the GPU variant the generic one."""
    if not interpret:
        return False
    if variant == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.InterpretParams()
    return True


def compiler_params(variant: str, *, num_warps: int | None = None, num_stages: int | None = None,
                    dimension_semantics: tuple[str, ...] | None = None):
    """Backend compiler parameters (Triton's for "gpu"; for "tpu", None when there is nothing to set)."""
    if variant == "gpu":
        from jax.experimental.pallas import triton as pltr
        # Always Triton's parameters: with none, jax >= 0.10 lowers a GPU pallas_call through Mosaic GPU instead.
        kw = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
        return pltr.CompilerParams(**kw)
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics) if dimension_semantics else None


def lowering_for(platform: str, device_kind: str = "NVIDIA H200", num_cores: int = 132):
    """A context in which `jit(f).trace(...).lower(lowering_platforms=(platform,))` can lower the GPU kernels
    on a host without that GPU (ahead-of-time lowering, the lowering tests, benchmarks/triton_ptx_check.py).

    Pallas-Triton asks the device for its compute capability while lowering; from jax 0.11 it raises when there
    is no GPU, unless an abstract mesh names one. For "cuda" without a GPU backend this enters such a mesh (one
    device of `device_kind`, an Auto axis); otherwise it does nothing. Trace and lower inside it."""
    import contextlib

    if platform not in ("cuda", "rocm", "gpu") or jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    sh = jax.sharding
    device = sh.AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="gpu")
    mesh = sh.AbstractMesh((1,), ("lowering",), axis_types=(sh.AxisType.Auto,), abstract_device=device)
    return sh.use_abstract_mesh(mesh)


def check_dtype(name: str, x, allowed=FLOAT_DTYPES) -> None:
    if jnp.dtype(x.dtype) not in tuple(jnp.dtype(a) for a in allowed):
        names = ", ".join(jnp.dtype(a).name for a in allowed)
        raise ValueError(f"{name} has dtype {jnp.dtype(x.dtype).name}; the kernel takes {names}")


def check_shape(name: str, x, shape: tuple[int, ...], axes: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {axes} = {tuple(shape)}, got {tuple(x.shape)}")


def check_block(name: str, value, *, multiple_of: int = 1, power_of_two: bool = False) -> None:
    """A block size: a positive int, optionally a multiple of the hardware tile or a power of two."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value % multiple_of:
        raise ValueError(f"{name}={value} must be a multiple of {multiple_of}")
    if power_of_two and value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two")


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def next_power_of_two(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())
