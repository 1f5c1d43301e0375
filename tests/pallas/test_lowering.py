"""The scan kernels lower through Pallas-Triton (cuda) and Pallas-Mosaic (tpu) on this CPU, forward and backward.

Lowering is where an unsupported block shape, a non-power-of-two Triton dim or a dynamic lane slice fails; compiling
and running need the hardware (benchmarks/gpu_check.py). Attention and the causal conv have the same check in their
own test files."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import _common as common
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.ssd import ssd

S = jax.ShapeDtypeStruct
CALL = {"gpu": ("cuda", "triton"), "tpu": ("tpu", "tpu_custom_call")}


def _lowered_kernel_calls(monkeypatch, variant, fn, *avals) -> int:
    monkeypatch.setattr(common, "platform", lambda: variant)  # interpret=None then means compiled
    platform, marker = CALL[variant]
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
    grads = jax.grad(loss, argnums=tuple(range(len(avals))))
    with common.lowering_for(platform):
        text = jax.jit(grads).trace(*avals).lower(lowering_platforms=(platform,)).as_text()
    return text.count(marker)


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_selective_scan_lowers(monkeypatch, variant):
    b, l, d, n, g = 2, 1000, 160, 16, 2
    bf = jnp.bfloat16
    fn = lambda x, dt, A, B, C, z: selective_scan(x, dt, A, B, C, jnp.ones((d,)), z=z, dt_bias=jnp.zeros((d,)),
                                                  segment_ids=jnp.ones((b, l), jnp.int32), variant=variant)
    calls = _lowered_kernel_calls(monkeypatch, variant, fn, S((b, l, d), bf), S((b, l, d), bf), S((d, n), jnp.float32),
                                  S((b, l, g, n), bf), S((b, l, g, n), bf), S((b, l, d), bf))
    assert calls >= 2, f"forward and backward kernels expected, found {calls} kernel calls"


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_ssd_lowers(monkeypatch, variant):
    b, l, h, p, g, n = 2, 1000, 8, 64, 2, 128
    bf = jnp.bfloat16
    fn = lambda x, dt, A, B, C, z: ssd(x, dt, A, B, C, D=jnp.ones((h,)), z=z, dt_bias=jnp.zeros((h,)),
                                       segment_ids=jnp.ones((b, l), jnp.int32), variant=variant)
    calls = _lowered_kernel_calls(monkeypatch, variant, fn, S((b, l, h, p), bf), S((b, l, h), bf), S((h,), jnp.float32),
                                  S((b, l, g, n), bf), S((b, l, g, n), bf), S((b, l, h, p), bf))
    assert calls >= 2, f"forward and backward kernels expected, found {calls} kernel calls"
