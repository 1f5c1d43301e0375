"""segment_starts / segment_index: a segment starts where the id changes, never at t = 0, and a reused,
non-adjacent id is a new segment."""

from __future__ import annotations

import numpy as np

from seqmix_jax.ops import segment_index, segment_starts

IDS = np.asarray([[0, 0, 1, 1, 0, 0, 0],
                  [4, 2, 2, 2, 2, 9, 4]], np.int32)


def test_segment_starts_where_the_id_changes_never_at_t0():
    want = np.asarray([[0, 0, 1, 0, 1, 0, 0],
                       [0, 1, 0, 0, 0, 1, 1]], bool)
    assert np.array_equal(segment_starts(IDS), want)


def test_segment_index_counts_starts_so_reused_ids_differ():
    want = np.asarray([[0, 0, 1, 1, 2, 2, 2],
                       [0, 1, 1, 1, 1, 2, 3]], np.int32)
    got = segment_index(IDS)
    assert got.dtype == np.int32 and np.array_equal(got, want)
