#!/usr/bin/env bash
# Installs seqmix-jax with its `test` extra, then the PyTorch references that plain requirements cannot express.
# Recipe measured in ../shared/ENV_NOTES.md (CPU machine, Python 3.11).
set -euo pipefail
PIP="${PYTHON:-python}"
"$PIP" -m pip install --quiet -e ".[test]"
# mamba_ssm ships CUDA sources only. Skip its CUDA build (FORCE_BUILD avoids a wheel download, SKIP_CUDA_BUILD
# the nvcc step); build isolation would hide the torch its setup.py imports. Its pure-torch references
# (selective_scan_ref, ssd_minimal_discrete, ...) are what the parity tests compare against.
"$PIP" -m pip install --quiet wheel packaging ninja
MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE \
  "$PIP" -m pip install --quiet --no-build-isolation --no-deps "mamba-ssm~=2.3.2"
# mamba_ssm's ops/triton modules import triton at import time (CPU-only use here).
"$PIP" -m pip install --quiet triton
# stripedhyena's declared flash-attn dependency cannot build without CUDA: install it without dependencies. Its
# Hyena blocks run on CPU in float32 as they are; its AttentionBlock needs flash-attn's Python code (MHA, rotary),
# installed without the CUDA build (tests/parity/torch_refs.py stubs the extension and swaps in torch rotary/rmsnorm).
"$PIP" -m pip install --quiet --no-deps "stripedhyena~=0.2.2"
FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE \
  "$PIP" -m pip install --quiet --no-build-isolation --no-deps "flash-attn~=2.8.3"
