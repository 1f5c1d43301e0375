"""Helpers for op-level parity: run a function and its VJP on the same numpy inputs in torch and in JAX.

Both sides take inputs in *our* (channel-last) layout; any layout change the torch reference needs is done
inside the torch function, so autograd returns gradients in our layout and they compare directly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import assert_close, rel_err
from tests.parity import torch_refs

OUT_TOL = 1e-5  # float32 outputs: max|ours - ref| / max|ref|
GRAD_TOL = 1e-4  # float32 gradients


def inv_softplus(y):
    return y + np.log(-np.expm1(-y))


def torch_run(fn, inputs: dict, cotangents=None, dtypes: dict | None = None):
    """Outputs (and, with `cotangents`, the VJP w.r.t. every input) of `fn(**tensors) -> tuple`.

    `dtypes` maps input names to a torch dtype the leaf is created in (default float32)."""
    torch = torch_refs.torch()
    dtypes = dtypes or {}
    leaves = {k: torch.tensor(np.asarray(v, np.float32)).to(dtypes.get(k, torch.float32)).requires_grad_(cotangents is not None)
              for k, v in inputs.items()}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    np_outs = [o.detach().float().numpy() for o in outs]
    if cotangents is None:
        return np_outs, None
    cts = [torch.tensor(np.asarray(c, np.float32)).to(o.dtype) for c, o in zip(cotangents, outs)]
    grads = torch.autograd.grad(outs, list(leaves.values()), cts, allow_unused=True)
    np_grads = {k: (np.zeros(inputs[k].shape, np.float32) if g is None else g.float().numpy())
                for k, g in zip(leaves, grads)}
    return np_outs, np_grads


def jax_run(fn, inputs: dict, cotangents=None, dtypes: dict | None = None):
    """The same for a JAX `fn(**arrays) -> tuple`, forward and VJP under one jit."""
    dtypes = dtypes or {}
    params = {k: jnp.asarray(np.asarray(v, np.float32)).astype(dtypes.get(k, jnp.float32)) for k, v in inputs.items()}

    def f(p):
        outs = fn(**p)
        return outs if isinstance(outs, tuple) else (outs,)

    if cotangents is None:
        return [np.asarray(o.astype(jnp.float32)) for o in jax.jit(f)(params)], None

    @jax.jit
    def run(p, ct):
        outs, vjp = jax.vjp(f, p)
        return outs, vjp(tuple(c.astype(o.dtype) for c, o in zip(ct, outs)))[0]

    outs, grads = run(params, tuple(jnp.asarray(np.asarray(c, np.float32)) for c in cotangents))
    return ([np.asarray(o.astype(jnp.float32)) for o in outs],
            {k: np.asarray(g.astype(jnp.float32)) for k, g in grads.items()})


def cotangents_for(rng, outs):
    return [rng.standard_normal(o.shape).astype(np.float32) for o in outs]


def check_parity(name, torch_fn, jax_fn, inputs, rng, *, out_names, grads=True, out_tol=OUT_TOL,
                 grad_tol=GRAD_TOL):
    """Compare outputs (and VJPs w.r.t. all inputs) of the torch reference and our op in float32."""
    ref_outs, _ = torch_run(torch_fn, inputs)
    cts = cotangents_for(rng, ref_outs) if grads else None
    ref_outs, ref_grads = torch_run(torch_fn, inputs, cts)
    ours, our_grads = jax_run(jax_fn, inputs, cts)
    assert len(ours) == len(ref_outs) == len(out_names)
    worst = {"out": 0.0, "grad": 0.0}
    for o_name, a, r in zip(out_names, ours, ref_outs):
        worst["out"] = max(worst["out"], assert_close(f"{name} {o_name}", a, r, out_tol))
    if grads:
        for k in inputs:
            assert np.isfinite(ref_grads[k]).all(), f"reference gradient d{k} is not finite"
            assert np.abs(ref_grads[k]).max() > 0, f"reference gradient d{k} is identically zero"
            worst["grad"] = max(worst["grad"], assert_close(f"{name} d{k}", our_grads[k], ref_grads[k], grad_tol))
    return worst


def check_bf16(name, torch_fn, jax_fn, inputs, rng, *, out_names, bf16_keys, grads=True, factor=2.0):
    """bf16 check: fp32 torch reference on the fp32 inputs; torch and ours on the inputs in `bf16_keys` cast to
    bfloat16 (the rest, the fp32 parameters of the real models, stay fp32). Our error vs the fp32 reference
    must be <= factor x torch-bf16's error vs it, for every output (and gradient)."""
    torch = torch_refs.torch()
    ref_outs, _ = torch_run(torch_fn, inputs)
    cts = cotangents_for(rng, ref_outs) if grads else None
    ref_outs, ref_grads = torch_run(torch_fn, inputs, cts)
    t_dt = {k: torch.bfloat16 for k in bf16_keys}
    j_dt = {k: jnp.bfloat16 for k in bf16_keys}
    tb_outs, tb_grads = torch_run(torch_fn, inputs, cts, t_dt)
    jb_outs, jb_grads = jax_run(jax_fn, inputs, cts, j_dt)
    pairs = [(o, jb, tb, r) for o, jb, tb, r in zip(out_names, jb_outs, tb_outs, ref_outs)]
    if grads:
        pairs += [(f"d{k}", jb_grads[k], tb_grads[k], ref_grads[k]) for k in inputs]
    ratios = {}
    for what, ours, theirs, ref in pairs:
        e_ours, e_torch = rel_err(ours, ref)[0], rel_err(theirs, ref)[0]
        print(f"{name} bf16 {what}: ours {e_ours:.3e}  torch-bf16 {e_torch:.3e}  (vs fp32 reference)")
        ratios[what] = (e_ours, e_torch)
    for what, (e_ours, e_torch) in ratios.items():
        assert e_ours <= factor * e_torch, f"{name} bf16 {what}: ours {e_ours:.3e} > {factor} x torch {e_torch:.3e}"
    return ratios
