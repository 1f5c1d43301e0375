"""Test harness: 8 fake CPU devices, deterministic seeds, markers slow/gpu/tpu.

The device count must be set before JAX initializes its backend, so this runs at conftest import."""

from __future__ import annotations

import os
import zlib

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# On the CPU, the suite's time is mostly XLA compiling small programs, and much of that is LLVM optimizing machine
# code: with the CPU backend at -O0 the default suite ran in 570 s instead of 886 s (2-core VM, clean clone). The flag
# changes only how the machine code is optimized, not XLA's HLO passes (fusion, layouts, memory planning). train.py
# children inherit it (tests/train/_launch.py); GPU/TPU runs do not get it, because XLA_FLAGS would reach the
# accelerator's backend too. Set --xla_backend_optimization_level yourself to test the optimized CPU backend.
if os.environ["JAX_PLATFORMS"] == "cpu" and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    backend = jax.default_backend()
    for item in items:
        if item.get_closest_marker("gpu") and backend != "gpu":
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
        if item.get_closest_marker("tpu") and backend != "tpu":
            item.add_marker(pytest.mark.skip(reason="needs a TPU"))


def _seed(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(autouse=True)
def _deterministic(request):
    """Seed numpy (and torch, when a parity test imported it) from the test id: reruns are reproducible."""
    seed = _seed(request)
    np.random.seed(seed % 2**32)
    torch = __import__("sys").modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)
    yield


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(_seed(request))


@pytest.fixture
def key(request):
    return jax.random.PRNGKey(_seed(request))
