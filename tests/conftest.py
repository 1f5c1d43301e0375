"""Test harness: 8 fake CPU devices, deterministic seeds, markers slow/gpu/tpu.

The device count must be set before JAX initializes its backend, so this runs at conftest import."""

from __future__ import annotations

import os
import zlib

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


# Members of parametrized sweeps that run only with `-m slow`, to keep the default suite within CI's ~15 minutes on
# 2 cores; the case left in each sweep is its representative (measured on the 2-core VM, seconds).
SLOW_CASES = frozenset({
    "tests/ops/test_ssd.py::test_paths_agree_outputs_states_and_every_gradient[l_shorter_than_chunk]",  # 26
    "tests/ops/test_ssd.py::test_paths_agree_outputs_states_and_every_gradient[l_1]",  # 20
    "tests/ops/test_ssd.py::test_packed_equals_per_segment[reference]",  # 15
    "tests/ops/test_selective_scan.py::test_paths_agree_outputs_states_and_every_gradient[l_shorter_than_chunk]",  # 11
    "tests/parity/test_ops_parity.py::test_ssd_vs_minimal[associative]",  # 13
    "tests/parity/test_mixers_parity.py::test_mamba2_vs_transformers[associative]",  # 11
    "tests/parity/test_mixers_parity.py::test_mamba2_vs_transformers[reference]",  # 11
    "tests/parity/test_mixers_parity.py::test_mamba_vs_transformers[reference]",  # 10
    "tests/parity/test_lm_parity.py::test_striped_hyena_loads_matches_and_exports[backbone_prefix]",  # 9
    "tests/models/test_checkpoints.py::test_round_trip_params_and_logits[mamba2]",  # 10
    "tests/layers/test_mamba_layers.py::test_inside_a_linen_module_via_bridge[mamba2]",  # 13
})


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    backend = jax.default_backend()
    for item in items:
        if item.nodeid in SLOW_CASES:
            item.add_marker(pytest.mark.slow)
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
