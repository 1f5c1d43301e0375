"""Op-level parity with the PyTorch references (mamba_ssm pure-torch refs, torch conv1d), float32 and bf16.

Every test checks outputs (max|ours - ref| / max|ref| <= 1e-5) and the VJP w.r.t. every input and parameter
(<= 1e-4) for every implementation path. Axis sizes are distinct and mostly prime so that a transposed or
mis-grouped axis cannot pass. Layout changes needed by the references live inside the torch functions, so
gradients come back in our (channel-last) layout.

Facts about the references these tests rely on (mamba_ssm 2.3.2.post1):
  * `selective_scan_ref` is channel-first: u, delta, z (b, d, l); B, C (b, n, l) or (b, g, n, l); it has no
    initial state, so initial-state parity uses a loop of `selective_state_update_ref` steps instead.
  * `selective_state_update_ref` updates `state` in place (`state.copy_`), which breaks autograd through the
    state; saved tensors are therefore cloned at pack time (`saved_tensors_hooks`).
  * `ssd_chunk_scan_combined_ref` pads only dt; `chunk_scan_ref` asserts l == nchunks * chunk_size, so x, B, C,
    z are zero-padded in torch (ours always takes the unpadded l). It has no initial state and no dt_limit, and
    its gradients are not usable (NaN for dt/A/dt_bias), so it is used for the forward pass only.
  * `ssd_minimal_discrete` (gradient reference) takes x*delta, A*delta, per-head B/C and l % block_len == 0;
    padding with zeros (no decay, no input) leaves the final state unchanged. D*x and the z gate are added here.
  * dt_limit is checked against `ssd_selective_scan` with its `selective_scan_fn` (CUDA) patched to
    `selective_scan_ref`.
"""

from __future__ import annotations

import numpy as np
import pytest

from seqmix_jax.ops import (causal_conv1d, causal_conv1d_update, rms_norm, rms_norm_gated, selective_scan,
                            selective_state_update, ssd, ssd_state_update)
from tests.parity import torch_refs
from tests.parity._convert import check_bf16, check_parity, inv_softplus, jax_run, torch_run

SCAN_IMPLS = ("reference", "associative", "xla")
CONV_IMPLS = ("reference", "xla")


@pytest.fixture(scope="module")
def T():
    return torch_refs.torch()


@pytest.fixture(scope="module")
def M():
    """mamba_ssm's pure-torch references."""
    torch_refs.mamba_ssm()
    import mamba_ssm.modules.ssd_minimal as ssd_minimal
    import mamba_ssm.ops.selective_scan_interface as ssi
    import mamba_ssm.ops.triton.layer_norm as layer_norm
    import mamba_ssm.ops.triton.layernorm_gated as layernorm_gated
    import mamba_ssm.ops.triton.selective_state_update as ssu
    import mamba_ssm.ops.triton.ssd_combined as ssd_combined

    class Refs:
        selective_scan_ref = staticmethod(ssi.selective_scan_ref)
        selective_state_update_ref = staticmethod(ssu.selective_state_update_ref)
        ssd_chunk_scan_combined_ref = staticmethod(ssd_combined.ssd_chunk_scan_combined_ref)
        ssd_selective_scan = staticmethod(ssd_combined.ssd_selective_scan)
        ssd_minimal_discrete = staticmethod(ssd_minimal.ssd_minimal_discrete)
        rms_norm_gated_ref = staticmethod(layernorm_gated.rms_norm_ref)
        rms_norm_ref = staticmethod(layer_norm.rms_norm_ref)
        scan_interface = ssi

    return Refs


# ----------------------------------------------------------------------------------------------------------
# Mamba-1 selective scan
# b 3, l 97, d 40 (= 2 groups x 20 channels), n 7.

SB, SL, SD, SN, SG = 3, 97, 40, 7, 2


def _scan_inputs(rng, *, grouped, full, l=SL, b=SB, d=SD, n=SN, g=SG):
    inp = {
        "x": rng.standard_normal((b, l, d)),
        "A": -rng.uniform(0.5, 8.0, (d, n)),
        "B": rng.standard_normal((b, l, g, n) if grouped else (b, l, n)),
        "C": rng.standard_normal((b, l, g, n) if grouped else (b, l, n)),
    }
    if full:  # softplus(dt + dt_bias), as Mamba: dt_bias = softplus^-1(log-uniform [1e-3, 1e-1])
        inp["dt"] = rng.standard_normal((b, l, d))
        inp["dt_bias"] = inv_softplus(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), d)))
        inp["D"] = rng.standard_normal(d)
        inp["z"] = rng.standard_normal((b, l, d))
    else:  # delta given directly (no bias, no softplus)
        inp["dt"] = rng.uniform(0.005, 0.3, (b, l, d))
    return {k: v.astype(np.float32) for k, v in inp.items()}


def _scan_torch(M, full):
    def fn(x, dt, A, B, C, D=None, z=None, dt_bias=None):
        perm = (0, 2, 3, 1) if B.dim() == 4 else (0, 2, 1)
        out, last = M.selective_scan_ref(
            x.permute(0, 2, 1), dt.permute(0, 2, 1), A, B.permute(*perm), C.permute(*perm), D=D,
            z=None if z is None else z.permute(0, 2, 1), delta_bias=dt_bias, delta_softplus=full,
            return_last_state=True)
        return out.permute(0, 2, 1), last
    return fn


def _scan_jax(impl, full, chunk_size=16):
    def fn(x, dt, A, B, C, D=None, z=None, dt_bias=None):
        return selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=full, return_final_state=True,
                              impl=impl, chunk_size=chunk_size)
    return fn


@pytest.mark.parametrize("impl", SCAN_IMPLS)
@pytest.mark.parametrize("variant", ["grouped_z_bias_D", "ungrouped_plain"])
def test_selective_scan(M, rng, impl, variant):
    """Outputs, last state and gradients vs `selective_scan_ref` (l 97; xla chunk 16 does not divide l)."""
    grouped = full = variant == "grouped_z_bias_D"
    inputs = _scan_inputs(rng, grouped=grouped, full=full)
    check_parity(f"selective_scan[{impl},{variant}]", _scan_torch(M, full), _scan_jax(impl, full), inputs, rng,
                 out_names=["y", "last_state"])


def _heads(t, H):
    """(b, [l,] H*P) -> (b, [l,] H, P)."""
    return t.reshape(*t.shape[:-1], H, t.shape[-1] // H)


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_selective_scan_initial_state(M, T, rng, impl):
    """With an initial state (not supported by `selective_scan_ref`): the reference is a loop of
    `selective_state_update_ref` steps in its heads form (H 4 heads x P 10, 2 groups), l 13."""
    l, H = 13, 4
    inputs = _scan_inputs(rng, grouped=True, full=True, l=l)
    inputs["h0"] = rng.standard_normal((SB, SD, SN)).astype(np.float32)

    def t_fn(x, dt, A, B, C, D, z, dt_bias, h0):
        state = h0.reshape(SB, H, SD // H, SN)
        ys = []
        with T.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            for t in range(l):
                state = state.clone()
                ys.append(M.selective_state_update_ref(
                    state, _heads(x[:, t], H), _heads(dt[:, t], H), A.reshape(H, SD // H, SN), B[:, t], C[:, t],
                    D=D.reshape(H, -1), z=_heads(z[:, t], H), dt_bias=dt_bias.reshape(H, -1), dt_softplus=True))
        return T.stack(ys, 1).reshape(SB, l, SD), state.reshape(SB, SD, SN)

    def j_fn(x, dt, A, B, C, D, z, dt_bias, h0):
        return selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias, initial_state=h0, return_final_state=True,
                              impl=impl, chunk_size=5)

    check_parity(f"selective_scan_h0[{impl}]", t_fn, j_fn, inputs, rng, out_names=["y", "last_state"])


@pytest.mark.parametrize("form", ["plain", "heads_grouped"])
def test_selective_state_update(M, T, rng, form):
    """One decode step vs `selective_state_update_ref`: output, new state and gradients (state included).

    plain: state (b, d, n), B/C (b, n). heads_grouped: the ref's (b, H, P, n) form with B/C (b, g, n), which is
    ours with d = H*P flattened and B/C grouped (head h -> group h // (H/g))."""
    b, d, n, H, g = SB, SD, SN, 4, SG
    inp = {
        "state": rng.standard_normal((b, d, n)), "x": rng.standard_normal((b, d)), "dt": rng.standard_normal((b, d)),
        "A": -rng.uniform(0.5, 8.0, (d, n)),
        "B": rng.standard_normal((b, n) if form == "plain" else (b, g, n)),
        "C": rng.standard_normal((b, n) if form == "plain" else (b, g, n)),
        "D": rng.standard_normal(d), "z": rng.standard_normal((b, d)),
        "dt_bias": inv_softplus(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), d))),
    }
    inp = {k: v.astype(np.float32) for k, v in inp.items()}

    def t_fn(state, x, dt, A, B, C, D, z, dt_bias):
        with T.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            if form == "plain":
                s = state.clone()
                y = M.selective_state_update_ref(s, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
                return y, s
            s = state.reshape(b, H, d // H, n).clone()
            y = M.selective_state_update_ref(s, _heads(x, H), _heads(dt, H), A.reshape(H, d // H, n), B, C,
                                             D=D.reshape(H, -1), z=_heads(z, H), dt_bias=dt_bias.reshape(H, -1),
                                             dt_softplus=True)
            return y.reshape(b, d), s.reshape(b, d, n)

    def j_fn(state, x, dt, A, B, C, D, z, dt_bias):
        return selective_state_update(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)

    check_parity(f"selective_state_update[{form}]", t_fn, j_fn, inp, rng, out_names=["y", "state"])


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_selective_scan_bf16(M, rng, impl):
    """bf16 activations (x, dt, B, C, z), fp32 A, D, dt_bias: error vs the fp32 reference <= 2x torch-bf16's.

    Outputs on every path; gradients on the reference path only (the bf16 casts around the scan are shared by
    all paths, whose fp32 gradients are checked above; this keeps two slow vjp compilations out)."""
    inputs = _scan_inputs(rng, grouped=True, full=True)
    check_bf16(f"selective_scan[{impl}]", _scan_torch(M, True), _scan_jax(impl, True), inputs, rng,
               out_names=["y", "last_state"], bf16_keys=("x", "dt", "B", "C", "z"), grads=impl == "reference")


# ----------------------------------------------------------------------------------------------------------
# Mamba-2 SSD
# b 3, l 97, h 10 heads (2 groups x 5), p 6, n 7.

DB, DL, DH, DP, DN, DG = 3, 97, 10, 6, 7, 2


def _ssd_inputs(rng, *, D_hdim=False, init=False, l=DL):
    inp = {
        "x": rng.standard_normal((DB, l, DH, DP)),
        "dt": rng.standard_normal((DB, l, DH)),
        "A": -rng.uniform(1.0, 16.0, DH),  # Mamba-2's A_init_range
        "B": rng.standard_normal((DB, l, DG, DN)),
        "C": rng.standard_normal((DB, l, DG, DN)),
        "D": rng.standard_normal((DH, DP) if D_hdim else DH),
        "z": rng.standard_normal((DB, l, DH, DP)),
        "dt_bias": inv_softplus(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), DH))),
    }
    if init:
        inp["h0"] = rng.standard_normal((DB, DH, DP, DN))
    return {k: v.astype(np.float32) for k, v in inp.items()}


def _pad_l(T, t, lp):
    """Zero-pad axis 1 of t to length lp."""
    pad = [0, 0] * (t.dim() - 2) + [0, lp - t.shape[1]]
    return T.nn.functional.pad(t, pad)


def _ssd_combined_torch(M, T, chunk):
    def fn(x, dt, A, B, C, D, z, dt_bias):
        l = x.shape[1]
        lp = -(-l // chunk) * chunk
        x, dt, B, C, z = (_pad_l(T, t, lp) for t in (x, dt, B, C, z))
        y = M.ssd_chunk_scan_combined_ref(x, dt, A, B, C, chunk, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
        return y[:, :l]
    return fn


def _ssd_jax(impl, chunk, **kw):
    def fn(x, dt, A, B, C, D, z, dt_bias, h0=None):
        return ssd(x, dt, A, B, C, chunk_size=chunk, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                   initial_state=h0, impl=impl, **kw)
    return fn


@pytest.mark.parametrize("impl", SCAN_IMPLS)
@pytest.mark.parametrize("D_hdim", [False, True], ids=["D_h", "D_hp"])
def test_ssd_vs_chunk_scan_combined_ref(M, T, rng, impl, D_hdim):
    """Forward vs `ssd_chunk_scan_combined_ref` (chunk 32, torch pads l 97 -> 128); ours chunk 16, unpadded."""
    inputs = _ssd_inputs(rng, D_hdim=D_hdim)
    check_parity(f"ssd_combined_ref[{impl},{'D_hp' if D_hdim else 'D_h'}]", _ssd_combined_torch(M, T, 32),
                 _ssd_jax(impl, 16), inputs, rng, out_names=["y"], grads=False)


def _ssd_minimal_torch(M, T, block_len, dt_limit=None):
    """ssd_minimal_discrete on x*delta, A*delta, per-head B/C (zero-padded to a multiple of block_len),
    plus D*x and the z gate; returns (y, final_state)."""
    F = T.nn.functional

    def fn(x, dt, A, B, C, D, z, dt_bias, h0=None):
        b, l, h, p = x.shape
        delta = F.softplus(dt + dt_bias)
        if dt_limit is not None:
            delta = delta.clamp(min=dt_limit[0], max=dt_limit[1])
        rep = h // B.shape[2]
        Bh, Ch = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)
        lp = -(-l // block_len) * block_len
        X, Adt, Bh, Ch = (_pad_l(T, t, lp) for t in (x * delta[..., None], A * delta, Bh, Ch))
        Y, final = M.ssd_minimal_discrete(X, Adt, Bh, Ch, block_len,
                                          initial_states=None if h0 is None else h0[:, None])
        Dx = x * (D[:, None] if D.dim() == 1 else D)
        return (Y[:, :l] + Dx) * F.silu(z), final
    return fn


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_ssd_vs_minimal(M, T, rng, impl):
    """Outputs, final state and gradients (x, dt, A, B, C, D, z, dt_bias, initial state) vs
    `ssd_minimal_discrete` (block 16, torch pads l 97 -> 112); ours chunk 32 on the unpadded l."""
    inputs = _ssd_inputs(rng, init=True)
    check_parity(f"ssd_minimal[{impl}]", _ssd_minimal_torch(M, T, 16),
                 _ssd_jax(impl, 32, return_final_state=True), inputs, rng, out_names=["y", "final_state"])


@pytest.mark.parametrize("impl", ["reference"])
def test_ssd_dt_limit(M, T, rng, impl, monkeypatch):
    """dt_limit (clamp after softplus), D (h, p): vs `ssd_selective_scan` with its CUDA `selective_scan_fn`
    replaced by `selective_scan_ref`; outputs and gradients. The clamp is applied before the path dispatch,
    so one path suffices (every path's gradients are checked in test_ssd_vs_minimal; each extra path here
    costs ~10 s of vjp compilation)."""
    monkeypatch.setattr(M.scan_interface, "selective_scan_fn", M.selective_scan_ref)
    lim = (0.01, 0.06)
    inputs = _ssd_inputs(rng, D_hdim=True)

    def t_fn(x, dt, A, B, C, D, z, dt_bias):
        return M.ssd_selective_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, dt_limit=lim)

    delta = np.log1p(np.exp(inputs["dt"] + inputs["dt_bias"]))
    assert (delta < lim[0]).any() and (delta > lim[1]).any() and ((delta > lim[0]) & (delta < lim[1])).any()
    check_parity(f"ssd_dt_limit[{impl}]", t_fn, _ssd_jax(impl, 16, dt_limit=lim), inputs, rng, out_names=["y"])


def test_ssd_state_update(M, T, rng):
    """Mamba-2 decode step vs `selective_state_update_ref` in its heads form with the per-head A, dt, dt_bias,
    D broadcast over (p, n) as mamba2.py's step does; B/C grouped (b, g, n). Output, state and gradients."""
    b, h, p, n, g = DB, DH, DP, DN, DG
    inp = {
        "state": rng.standard_normal((b, h, p, n)), "x": rng.standard_normal((b, h, p)),
        "dt": rng.standard_normal((b, h)), "A": -rng.uniform(1.0, 16.0, h),
        "B": rng.standard_normal((b, g, n)), "C": rng.standard_normal((b, g, n)),
        "D": rng.standard_normal(h), "z": rng.standard_normal((b, h, p)),
        "dt_bias": inv_softplus(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), h))),
    }
    inp = {k: v.astype(np.float32) for k, v in inp.items()}

    def t_fn(state, x, dt, A, B, C, D, z, dt_bias):
        with T.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            s = state.clone()
            y = M.selective_state_update_ref(
                s, x, dt[..., None].expand(b, h, p), A[:, None, None].expand(h, p, n), B, C,
                D=D[:, None].expand(h, p), z=z, dt_bias=dt_bias[:, None].expand(h, p), dt_softplus=True)
            return y, s

    def j_fn(state, x, dt, A, B, C, D, z, dt_bias):
        return ssd_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)

    check_parity("ssd_state_update", t_fn, j_fn, inp, rng, out_names=["y", "state"])


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_ssd_bf16(M, T, rng, impl):
    """bf16 x, dt, B, C, z (fp32 A, D, dt_bias) vs `ssd_chunk_scan_combined_ref` run in fp32 and in bf16."""
    inputs = _ssd_inputs(rng)
    check_bf16(f"ssd[{impl}]", _ssd_combined_torch(M, T, 32), _ssd_jax(impl, 16), inputs, rng, out_names=["y"],
               bf16_keys=("x", "dt", "B", "C", "z"), grads=False)


# ----------------------------------------------------------------------------------------------------------
# Norms: x (3, 7, 40); groups of 8 (5 groups).

NORM_SHAPE, NORM_GROUP, EPS = (3, 7, 40), 8, 1e-5


def _norm_inputs(rng, gated=True, bias=False):
    d = NORM_SHAPE[-1]
    inp = {"x": rng.standard_normal(NORM_SHAPE), "weight": 1.0 + 0.3 * rng.standard_normal(d)}
    if gated:
        inp["z"] = rng.standard_normal(NORM_SHAPE)
    if bias:
        inp["bias"] = 0.3 * rng.standard_normal(d)
    return {k: v.astype(np.float32) for k, v in inp.items()}


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, NORM_GROUP], ids=["full", "grouped"])
def test_rms_norm_gated(M, rng, group_size, norm_before_gate):
    """vs layernorm_gated.rms_norm_ref: outputs and gradients for x, z, weight."""
    inputs = _norm_inputs(rng)

    def t_fn(x, weight, z):
        return M.rms_norm_gated_ref(x, weight, None, z=z, eps=EPS, group_size=group_size,
                                    norm_before_gate=norm_before_gate)

    def j_fn(x, weight, z):
        return rms_norm_gated(x, weight, z, eps=EPS, group_size=group_size, norm_before_gate=norm_before_gate)

    check_parity(f"rms_norm_gated[{group_size},{norm_before_gate}]", t_fn, j_fn, inputs, rng, out_names=["y"])


@pytest.mark.parametrize("bias", [False, True])
def test_rms_norm(M, rng, bias):
    """Plain RMSNorm vs layer_norm.rms_norm_ref (upcast, as the Triton kernel computes): outputs and grads."""
    inputs = _norm_inputs(rng, gated=False, bias=bias)

    def t_fn(x, weight, bias=None):
        return M.rms_norm_ref(x, weight, bias, eps=EPS, upcast=True)

    def j_fn(x, weight, bias=None):
        return rms_norm(x, weight, eps=EPS, bias=bias)

    check_parity(f"rms_norm[bias={bias}]", t_fn, j_fn, inputs, rng, out_names=["y"])


def test_rms_norm_gated_bf16(M, rng):
    """bf16 x, z, weight (Mamba-2's norm weight is in model dtype), grouped, gate before norm."""
    inputs = _norm_inputs(rng)

    def t_fn(x, weight, z):
        return M.rms_norm_gated_ref(x, weight, None, z=z, eps=EPS, group_size=NORM_GROUP, norm_before_gate=False)

    def j_fn(x, weight, z):
        return rms_norm_gated(x, weight, z, eps=EPS, group_size=NORM_GROUP, norm_before_gate=False)

    check_bf16("rms_norm_gated", t_fn, j_fn, inputs, rng, out_names=["y"], bf16_keys=("x", "weight", "z"))


# ----------------------------------------------------------------------------------------------------------
# Causal depthwise conv1d vs torch conv1d(groups=c): b 3, l 97, c 41, w 4.

CB, CL, CC, CW = 3, 97, 41, 4


def _conv_inputs(rng, bias=True, state=False):
    inp = {"x": rng.standard_normal((CB, CL, CC)), "weight": 0.5 * rng.standard_normal((CW, CC))}
    if bias:
        inp["bias"] = rng.standard_normal(CC)
    if state:
        inp["state"] = rng.standard_normal((CB, CW - 1, CC))
    return {k: v.astype(np.float32) for k, v in inp.items()}


def _torch_conv(T, x, weight, bias, activation, padding):
    """x (b, l, c), weight (w, c) -> torch Conv1d layout (c, 1, w), channel-first conv, back to (b, l', c)."""
    F = T.nn.functional
    l = x.shape[1]
    y = F.conv1d(x.permute(0, 2, 1), weight.t()[:, None, :], bias, padding=padding, groups=x.shape[2])
    y = y[..., :l] if padding else y
    if activation == "silu":
        y = F.silu(y)
    return y.permute(0, 2, 1)


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_causal_conv1d(T, rng, impl, activation, bias):
    """vs F.conv1d(groups=c, padding=w-1)[..., :l] (+ SiLU): outputs and gradients (x, weight, bias)."""
    inputs = _conv_inputs(rng, bias=bias)

    def t_fn(x, weight, bias=None):
        return _torch_conv(T, x, weight, bias, activation, CW - 1)

    def j_fn(x, weight, bias=None):
        return causal_conv1d(x, weight, bias, activation=activation, impl=impl)

    check_parity(f"causal_conv1d[{impl},{activation},{bias}]", t_fn, j_fn, inputs, rng, out_names=["y"])


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_causal_conv1d_initial_state(T, rng, impl):
    """A (b, w-1, c) prefix: torch conv (no padding) over concat(state, x); final state = last w-1 inputs."""
    inputs = _conv_inputs(rng, state=True)

    def t_fn(x, weight, bias, state):
        xs = T.cat([state, x], 1)
        return _torch_conv(T, xs, weight, bias, "silu", 0), xs[:, -(CW - 1):]

    def j_fn(x, weight, bias, state):
        return causal_conv1d(x, weight, bias, activation="silu", initial_state=state, return_final_state=True,
                             impl=impl)

    check_parity(f"causal_conv1d_state[{impl}]", t_fn, j_fn, inputs, rng, out_names=["y", "final_state"])


def test_causal_conv1d_update(T, rng):
    """One decode step vs torch conv over concat(state, x); the new state is an exact shift."""
    inputs = _conv_inputs(rng, state=True)
    inputs["x"] = inputs["x"][:, 0]

    def t_fn(x, weight, bias, state):
        xs = T.cat([state, x[:, None]], 1)
        return _torch_conv(T, xs, weight, bias, "silu", 0)[:, 0], xs[:, 1:]

    def j_fn(x, weight, bias, state):
        return causal_conv1d_update(state, x, weight, bias, activation="silu")

    check_parity("causal_conv1d_update", t_fn, j_fn, inputs, rng, out_names=["y", "state"])
    (_, ref_state), _ = torch_run(t_fn, inputs)
    (_, our_state), _ = jax_run(j_fn, inputs)
    np.testing.assert_array_equal(our_state, ref_state)
