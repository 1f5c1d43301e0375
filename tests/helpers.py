"""Shared assertions: print the error before asserting a tolerance."""

from __future__ import annotations

import numpy as np


def rel_err(ours, ref) -> tuple[float, float]:
    """(max|ours - ref| / max|ref|, mean|ours - ref| / mean|ref|) in float64."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = np.abs(ours - ref)
    scale = max(np.abs(ref).max(), 1e-30)
    return float(diff.max() / scale), float(diff.mean() / max(np.abs(ref).mean(), 1e-30))


def assert_close(name: str, ours, ref, tol: float) -> float:
    """Relative max error (normalized by max|ref|) <= tol; prints max and mean error first."""
    mx, mean = rel_err(ours, ref)
    print(f"{name}: max rel err {mx:.3e}, mean rel err {mean:.3e} (tol {tol:.0e})")
    assert mx <= tol, f"{name}: max rel err {mx:.3e} > {tol:.0e}"
    return mx
