"""resolve_impl's policy (as levanter): explicit backends that cannot run raise and say why; "auto" picks
pallas on GPU/TPU when a kernel supports the call, else xla, warning once per (op, reason) — and on CPU it is
xla, silently. Also: every op called with impl="auto" is its xla path."""

from __future__ import annotations

import typing
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix_jax.ops import IMPLS, Impl, causal_conv1d, fftconv, resolve_impl, selective_scan, ssd
from seqmix_jax.ops import dispatch

RECURRENCE = ("reference", "associative", "xla")


def test_impls_lists_the_literal():
    assert IMPLS == typing.get_args(Impl) == ("auto", "reference", "associative", "xla", "pallas")


@pytest.mark.parametrize("op, allowed", [("selective_scan", RECURRENCE), ("ssd", RECURRENCE),
                                         ("causal_conv1d", ("reference", "xla"))])
def test_auto_resolves_to_xla_on_cpu_without_warning(op, allowed):
    assert jax.default_backend() == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_impl(op, "auto", allowed) == "xla"


def test_ops_with_auto_are_their_xla_path_without_warning(rng):
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    b, l = 2, 11
    ss_args = (f32(b, l, 6), f32(b, l, 6), -jnp.exp(f32(6, 5)), f32(b, l, 5), f32(b, l, 5))
    ssd_args = (f32(b, l, 3, 4), f32(b, l, 3), -jnp.exp(f32(3)), f32(b, l, 1, 5), f32(b, l, 1, 5))
    conv_args = (f32(b, l, 7), f32(4, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pairs = [(selective_scan(*ss_args, chunk_size=4), selective_scan(*ss_args, impl="xla", chunk_size=4)),
                 (ssd(*ssd_args, chunk_size=4), ssd(*ssd_args, impl="xla", chunk_size=4)),
                 (causal_conv1d(*conv_args), causal_conv1d(*conv_args, impl="xla"))]
    for auto, xla in pairs:
        assert np.array_equal(auto, xla)


def test_unknown_impl_raises_listing_the_choices():
    with pytest.raises(ValueError, match=r"^impl='nope' is not one of \('auto', 'reference', 'associative', "
                                         r"'xla', 'pallas'\)"):
        resolve_impl("ssd", "nope", RECURRENCE)


def test_impl_the_op_lacks_raises_listing_its_choices():
    with pytest.raises(ValueError, match=r"^impl='associative' is not available for causal_conv1d; "
                                         r"choose from \('auto', 'reference', 'xla'\)"):
        resolve_impl("causal_conv1d", "associative", ("reference", "xla"))


@pytest.mark.parametrize("impl", ["reference", "associative", "xla"])
def test_explicit_impl_is_returned_as_is(impl):
    assert resolve_impl("ssd", impl, RECURRENCE) == impl


def test_pallas_without_a_registered_kernel_raises_with_the_reason(monkeypatch):
    monkeypatch.setattr(dispatch, "_PALLAS_SUPPORT", {})
    with pytest.raises(ValueError, match=r"^impl='pallas' cannot run myop: "
                                         r"no Pallas kernel is registered for myop yet"):
        resolve_impl("myop", "pallas", ("xla", "pallas"))


def _multiple_of_8(**call):
    return None if call["l"] % 8 == 0 else f"l={call['l']} must be a multiple of 8"


def test_pallas_runs_when_the_kernel_supports_the_call_and_raises_its_reason_otherwise(monkeypatch):
    monkeypatch.setattr(dispatch, "_PALLAS_SUPPORT", {})
    dispatch.register_pallas("myop", _multiple_of_8)
    assert resolve_impl("myop", "pallas", ("xla", "pallas"), l=16) == "pallas"
    with pytest.raises(ValueError, match=r"^impl='pallas' cannot run myop: l=13 must be a multiple of 8"):
        resolve_impl("myop", "pallas", ("xla", "pallas"), l=13)


def test_auto_on_cpu_stays_xla_even_with_a_supporting_kernel(monkeypatch):
    monkeypatch.setattr(dispatch, "_PALLAS_SUPPORT", {})
    dispatch.register_pallas("myop", _multiple_of_8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_impl("myop", "auto", ("xla", "pallas"), l=16) == "xla"


# ids must not be "gpu"/"tpu": conftest would read them as markers and skip the test on CPU
@pytest.mark.parametrize("backend", ["gpu", "tpu"], ids=["fake_gpu_backend", "fake_tpu_backend"])
def test_auto_on_accelerator_uses_pallas_or_warns_once_and_falls_back(monkeypatch, backend):
    monkeypatch.setattr(dispatch, "_PALLAS_SUPPORT", {})
    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: backend)
    dispatch.register_pallas("myop", _multiple_of_8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_impl("myop", "auto", ("xla", "pallas"), l=16) == "pallas"
    with pytest.warns(UserWarning, match=rf"^myop: falling back to the xla path on {backend} "
                                         r"\(l=13 must be a multiple of 8\)"):
        assert resolve_impl("myop", "auto", ("xla", "pallas"), l=13) == "xla"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same (op, reason) warns only once
        assert resolve_impl("myop", "auto", ("xla", "pallas"), l=13) == "xla"
    with pytest.warns(UserWarning, match=r"l=21 must be a multiple of 8"):  # a new reason warns again
        assert resolve_impl("myop", "auto", ("xla", "pallas"), l=21) == "xla"


def test_auto_never_picks_pallas_for_a_call_that_lists_no_pallas_path(monkeypatch):
    """attention_decode shares the "attention" kernel registration but has no Pallas branch."""
    monkeypatch.setattr(dispatch, "_PALLAS_SUPPORT", {})
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    dispatch.register_pallas("myop", lambda **_: None)
    assert resolve_impl("myop", "auto", ("xla", "pallas")) == "pallas"
    assert resolve_impl("myop", "auto", ("reference", "xla")) == "xla"


def test_environment_switch_keeps_auto_on_xla(monkeypatch):
    monkeypatch.setattr(dispatch, "_PALLAS_SUPPORT", {})
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "tpu")
    dispatch.register_pallas("myop", lambda **_: None)
    monkeypatch.setenv("SEQMIX_AUTO_PALLAS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deliberate choice, not a fallback: no warning
        assert resolve_impl("myop", "auto", ("xla", "pallas")) == "xla"
    assert resolve_impl("myop", "pallas", ("xla", "pallas")) == "pallas"
    monkeypatch.setenv("SEQMIX_AUTO_PALLAS", "1")
    assert resolve_impl("myop", "auto", ("xla", "pallas")) == "pallas"


def test_ops_without_a_kernel_refuse_pallas(rng):
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    with pytest.raises(ValueError, match=r"^impl='pallas' cannot run fftconv: no Pallas kernel"):
        fftconv(f(2, 16, 3), f(16, 3), impl="pallas")
