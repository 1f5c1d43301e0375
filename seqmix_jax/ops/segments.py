"""Packed sequences: `segment_ids (b, l)` marks documents; recurrences reset at segment starts."""

from __future__ import annotations

import jax.numpy as jnp

from seqmix_jax.ops._checks import check_int, check_shape


def check_segment_ids(segment_ids, b: int, l: int) -> None:
    check_int("segment_ids", segment_ids)
    check_shape("segment_ids", segment_ids, (b, l), "(b, l)")


def segment_starts(segment_ids) -> jnp.ndarray:
    """(b, l) bool, True where a new segment starts (never at t=0: an initial state feeds the first segment)."""
    first = jnp.zeros_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def segment_index(segment_ids) -> jnp.ndarray:
    """(b, l) int32 running count of segment starts: two positions share a segment iff their indices match.

    Unlike the raw ids, this is correct when an id is reused by a later, non-adjacent document."""
    return jnp.cumsum(segment_starts(segment_ids).astype(jnp.int32), axis=1)
