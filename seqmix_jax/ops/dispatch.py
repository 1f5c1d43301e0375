"""Backend choice for every op, in one place.

`impl` is one of "auto", "reference", "associative", "xla", "pallas":
  reference    the definition (sequential scan, direct convolution), slow on purpose;
  associative  `jax.lax.associative_scan` over the sequence (recurrences only);
  xla          the fast pure-JAX path;
  pallas       the kernel in `pallas_kernels` (interpret mode on CPU);
  auto         pallas on GPU/TPU when a kernel supports the call, otherwise xla.
Policy (as levanter): an explicitly requested backend that cannot run raises ValueError with the reason;
"auto" falls back to xla and warns once per (op, reason).
SEQMIX_AUTO_PALLAS=0 in the environment makes "auto" mean xla everywhere (read at each call, i.e. at trace time):
the switch to keep a GPU/TPU run on the XLA paths without touching code; `impl="pallas"` still runs the kernels.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Literal

import jax

Impl = Literal["auto", "reference", "associative", "xla", "pallas"]
IMPLS = ("auto", "reference", "associative", "xla", "pallas")

# op name -> callable(args...) returning None when the Pallas kernel can run, else the reason it cannot.
_PALLAS_SUPPORT: dict[str, Callable[..., str | None]] = {}
_WARNED: set[tuple[str, str]] = set()


def register_pallas(op: str, supports: Callable[..., str | None]) -> None:
    """Declare a Pallas kernel for `op`; `supports(**call)` returns None or the reason it cannot run."""
    _PALLAS_SUPPORT[op] = supports


def resolve_impl(op: str, impl: str, allowed: tuple[str, ...], **call) -> str:
    """Return the concrete backend for `op`; `allowed` lists the non-auto paths the op has."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if impl != "auto" and impl not in allowed:
        raise ValueError(f"impl={impl!r} is not available for {op}; choose from {('auto',) + allowed}")
    if impl == "pallas":
        reason = _pallas_unavailable(op, **call)
        if reason is not None:
            raise ValueError(f"impl='pallas' cannot run {op}: {reason}")
        return "pallas"
    if impl != "auto":
        return impl
    if "pallas" in allowed and jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") and \
            os.environ.get("SEQMIX_AUTO_PALLAS", "1") != "0":
        reason = _pallas_unavailable(op, **call)
        if reason is None:
            return "pallas"
        key = (op, reason)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"{op}: falling back to the xla path on {jax.default_backend()} ({reason})", stacklevel=3)
    return "xla"


def _pallas_unavailable(op: str, **call) -> str | None:
    supports = _PALLAS_SUPPORT.get(op)
    if supports is None:
        return f"no Pallas kernel is registered for {op} yet"
    return supports(**call)
