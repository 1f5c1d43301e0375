"""Input validation shared by the ops: every message names the argument and the values involved."""

from __future__ import annotations

import numbers

import jax.numpy as jnp

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def check_rank(name: str, a, ranks: int | tuple[int, ...], axes: str) -> None:
    ranks = (ranks,) if isinstance(ranks, int) else ranks
    if a.ndim not in ranks:
        raise ValueError(f"{name} must have rank {' or '.join(map(str, ranks))} {axes}, got shape {tuple(a.shape)}")


def check_shape(name: str, a, expected: tuple[int, ...], axes: str) -> None:
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {axes} = {tuple(expected)}, got {tuple(a.shape)}")


def check_float(name: str, a) -> None:
    if not any(jnp.dtype(a.dtype) == jnp.dtype(t) for t in FLOAT_DTYPES):
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got dtype {jnp.dtype(a.dtype).name}")


def check_int(name: str, a) -> None:
    if not jnp.issubdtype(a.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {jnp.dtype(a.dtype).name}")


def check_divides(small_name: str, small: int, big_name: str, big: int) -> None:
    if small <= 0 or big % small != 0:
        raise ValueError(f"{small_name}={small} must be positive and divide {big_name}={big}")


def check_positive_int(name: str, v) -> None:
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
