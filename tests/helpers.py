"""Shared assertions: print the error before asserting a tolerance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SCAN_POSITIONAL = ("x", "dt", "A", "B", "C")


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


def call_scan(op, args: dict, **kw):
    """selective_scan / ssd on a dict of inputs: x, dt, A, B, C positionally, the rest as keywords."""
    args = dict(args)
    pos = [args.pop(k) for k in SCAN_POSITIONAL]
    return op(*pos, **args, **kw)


def scan_forward_and_grads(op, args: dict, key, **kw):
    """(y, final_state) and the gradient of a random projection of both w.r.t. every input, jitted."""
    ky, kh = jax.random.split(key)

    def loss(a):
        y, s = call_scan(op, a, return_final_state=True, **kw)
        return jnp.sum(y * jax.random.normal(ky, y.shape)) + jnp.sum(s * jax.random.normal(kh, s.shape)), (y, s)

    (_, (y, s)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
    return y, s, grads
