"""pallas_kernels._common: variant and interpret choice, compiler parameters, and the shared input checks."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from pallas_kernels import _common as c


def test_variant_and_interpret_on_cpu():
    assert c.platform() == "cpu"
    assert c.resolve_variant(None) == "gpu"  # Triton semantics, interpreted
    assert c.resolve_variant("tpu") == "tpu"
    assert c.resolve_interpret(None, "gpu") is True and c.resolve_interpret(None, "tpu") is True
    assert c.interpret_arg("gpu", True) is True and c.interpret_arg("gpu", False) is False
    assert type(c.interpret_arg("tpu", True)).__name__ == "InterpretParams"


def test_bad_variant_and_compiling_without_the_hardware_raise():
    with pytest.raises(ValueError, match=r"variant must be one of \('gpu', 'tpu'\) or None, got 'cuda'"):
        c.resolve_variant("cuda")
    with pytest.raises(ValueError, match=r"interpret=False needs a GPU backend, but the default backend is 'cpu'"):
        c.resolve_interpret(False, "gpu")


def test_compiler_params():
    assert ".triton" in type(c.compiler_params("gpu")).__module__  # never None: that would mean Mosaic GPU
    assert c.compiler_params("gpu", num_warps=4, num_stages=2).num_warps == 4
    tpu = c.compiler_params("tpu", dimension_semantics=("parallel", "arbitrary"))
    assert tuple(tpu.dimension_semantics) == ("parallel", "arbitrary")


def test_checks_name_the_argument_and_the_values():
    c.check_dtype("q", jnp.zeros(2, jnp.bfloat16))
    with pytest.raises(ValueError, match=r"^q has dtype int32; the kernel takes float32, bfloat16, float16$"):
        c.check_dtype("q", jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match=r"^k must have shape \(b, s\) = \(2, 3\), got \(2, 4\)$"):
        c.check_shape("k", jnp.zeros((2, 4)), (2, 3), "(b, s)")
    c.check_block("block_q", 64, multiple_of=8, power_of_two=True)
    for value, msg in [(0, "block_q must be a positive int, got 0"), (True, "must be a positive int, got True"),
                       (12, "block_q=12 must be a multiple of 8"), (24, "block_q=24 must be a power of two")]:
        with pytest.raises(ValueError, match=msg):
            c.check_block("block_q", value, multiple_of=8 if value != 24 else 1, power_of_two=True)
    assert (c.round_up(97, 32), c.next_power_of_two(72), c.next_power_of_two(64), c.next_power_of_two(1)) == \
        (128, 128, 64, 1)
