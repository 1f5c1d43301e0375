"""Importing the PyTorch references on CPU (see ../shared/ENV_NOTES.md).

Parity tests never skip in CI: with CI set, a missing reference package fails the test; on a developer
machine without the test extra it skips with the install command."""

from __future__ import annotations

import importlib
import os
import sys
import types

import pytest

INSTALL = "bash scripts/install_test_deps.sh"


def require(module: str):
    """Import `module` or fail (CI) / skip (local) naming the install script."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        msg = f"reference package missing ({err}); run `{INSTALL}`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def torch():
    t = require("torch")
    t.set_default_dtype(t.float32)
    return t


def mamba_ssm():
    """Import mamba_ssm's pure-torch references without its CUDA extension.

    transformers' Mamba modules are imported first: once the `selective_scan_cuda` stub is in sys.modules,
    transformers would pick the (stubbed) CUDA path."""
    require("transformers.models.mamba.modeling_mamba")
    require("transformers.models.mamba2.modeling_mamba2")
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    return require("mamba_ssm")
