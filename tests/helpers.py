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


def check_mixer_input_errors(m, d_model: int, batch: int = 2):
    """The mixer contract's shape errors: wrong width for __call__ and step, segment_ids of the wrong length."""
    import pytest

    with pytest.raises(ValueError, match=rf"x must have shape \(b, l, d_model={d_model}\)"):
        m(jnp.zeros((batch, 5, d_model - 1)))
    with pytest.raises(ValueError, match=rf"step expects x of shape \(b, d_model={d_model}\)"):
        m.step(jnp.zeros((batch, 1, d_model)), m.init_state(batch))
    with pytest.raises(ValueError, match="segment_ids"):
        m(jnp.zeros((batch, 5, d_model)), segment_ids=jnp.zeros((batch, 4), jnp.int32))


class Jitted:
    """A module's `__call__`, `prefill` and `step` run as jitted programs (compiled once per input shape); other
    attributes come from the module. The module's own code runs unchanged inside: tests that loop over decode steps
    spend most of their time on eager op-by-op dispatch otherwise."""

    def __init__(self, module):
        from flax import nnx

        self._module = module
        graphdef, state = nnx.split(module)

        def method(name):
            fn = jax.jit(lambda state, *args, **kw: getattr(nnx.merge(graphdef, state), name)(*args, **kw))
            return lambda *args, **kw: fn(state, *args, **kw)

        self._call, self.prefill, self.step = method("__call__"), method("prefill"), method("step")

    def __call__(self, *args, **kw):
        return self._call(*args, **kw)

    def __getattr__(self, name):
        return getattr(self._module, name)
