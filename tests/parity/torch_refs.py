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

    transformers' Mamba, Mamba-2 and Jamba modules are imported first: they pick mamba_ssm's functions when it
    imports (at their own import), and once the `selective_scan_cuda` stub is in sys.modules it does, so they
    would run the (stubbed) CUDA path."""
    require("transformers.models.mamba.modeling_mamba")
    require("transformers.models.mamba2.modeling_mamba2")
    require("transformers.models.jamba.modeling_jamba")
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    return require("mamba_ssm")


def stripedhyena():
    """Import stripedhyena 0.2.2's `stripedhyena.model` on CPU, with flash-attn's Python code (installed without
    its CUDA build, see scripts/install_test_deps.sh) made runnable:

      * `flash_attn_2_cuda` is stubbed (flash_attn/__init__ imports the extension unconditionally);
      * `flash_attn.ops.rms_norm` (a CUDA layer-norm extension) is replaced by a module whose `rms_norm` restates
        that kernel in torch, x * rsqrt(mean(x^2) + eps) * weight in float32 cast back to x's dtype (flash-attn's
        own `rms_norm_ref` lives in a Triton module that cannot be imported without CUDA), so configs with
        `use_flash_rmsnorm=True` run;
      * the rotary embedding's Triton kernels (`apply_rotary_emb_qkv_`, `apply_rotary_emb_func`,
        `apply_rotary_emb_kv_`, used by flash-attn's MHA) are replaced by out-of-place versions built on
        flash-attn's `apply_rotary_emb_torch`.
    Attention blocks additionally need `use_flash_attn=False` in the config (torch softmax attention)."""
    torch()
    sys.modules.setdefault("flash_attn_2_cuda", types.ModuleType("flash_attn_2_cuda"))
    require("flash_attn")
    if not getattr(sys.modules.get("flash_attn.ops.rms_norm"), "_seqmix_stub", False):
        stub = types.ModuleType("flash_attn.ops.rms_norm")

        def rms_norm(x, weight, epsilon):
            xf = x.float()
            return (xf * (xf.square().mean(-1, keepdim=True) + epsilon).rsqrt() * weight.float()).to(x.dtype)

        stub.rms_norm = rms_norm
        stub._seqmix_stub = True
        sys.modules["flash_attn.ops.rms_norm"] = stub
    rotary = require("flash_attn.layers.rotary")
    _patch_rotary(rotary)
    return require("stripedhyena.model")


def _patch_rotary(rotary) -> None:
    if getattr(rotary, "_seqmix_patched", False):
        return

    def rot(x, cos, sin, interleaved, offset):
        if not isinstance(offset, int):
            raise NotImplementedError("the torch rotary patch supports integer seqlen offsets only")
        s = x.shape[1]
        return rotary.apply_rotary_emb_torch(x, cos[offset:offset + s], sin[offset:offset + s], interleaved)

    def qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, seqlen_offsets=0, num_heads_q=None):
        if cos_k is not None or sin_k is not None:
            raise NotImplementedError("the torch rotary patch does not implement XPos scaling")
        if qkv.dim() == 5:  # (b, s, 3, h, d)
            q, k, v = qkv.unbind(2)
            return rotary.torch.stack([rot(q, cos, sin, interleaved, seqlen_offsets),
                                       rot(k, cos, sin, interleaved, seqlen_offsets), v], 2)
        hk = (qkv.shape[2] - num_heads_q) // 2  # (b, s, hq + 2 hk, d)
        q, k, v = qkv.split([num_heads_q, hk, hk], dim=2)
        return rotary.torch.cat([rot(q, cos, sin, interleaved, seqlen_offsets),
                                 rot(k, cos, sin, interleaved, seqlen_offsets), v], 2)

    def func(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None):
        if cu_seqlens is not None:
            raise NotImplementedError("the torch rotary patch does not take cu_seqlens")
        return rot(x, cos, sin, interleaved, seqlen_offsets)

    def kv_(kv, cos, sin, interleaved=False, seqlen_offsets=0):
        k, v = kv.unbind(2)  # (b, s, 2, hk, d)
        return rotary.torch.stack([rot(k, cos, sin, interleaved, seqlen_offsets), v], 2)

    rotary.apply_rotary_emb_qkv_, rotary.apply_rotary_emb_func, rotary.apply_rotary_emb_kv_ = qkv_, func, kv_
    rotary._seqmix_patched = True
