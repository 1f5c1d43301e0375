"""Move weights between a PyTorch Mamba / Mamba-2 mixer and ours, for the parity tests.

transformers `MambaMixer` / `Mamba2Mixer` and mamba_ssm `Mamba` / `Mamba2` share their state_dict keys
(`in_proj.weight`, `conv1d.weight`, `conv1d.bias`, `x_proj.weight`, `dt_proj.weight`, `dt_proj.bias`, `A_log`, `D`,
`dt_bias`, `norm.weight`, `out_proj.weight`). Our layout differs in three ways:

  * nnx.Linear kernels are (in, out) = torch `weight.T`;
  * `conv_weight` is (w, c) = torch `conv1d.weight[:, 0, :].T`;
  * Mamba-1 keeps the dt_proj bias apart as `dt_bias` (float32); Mamba-2's gated-norm weight is `norm_weight`.

Deliberately small and test-only; the checkpoint converter is a separate piece of work.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix_jax.layers.mamba import MambaMixer

# our top-level parameter name -> torch key (both mixers); submodule params are `<sub>.kernel` / `<sub>.bias`.
_RENAMES = {"conv_weight": "conv1d.weight", "conv_bias": "conv1d.bias", "norm_weight": "norm.weight",
            "A_log": "A_log", "D": "D", "dt_bias": "dt_bias"}


def torch_name(module, path: tuple) -> str:
    """The torch state_dict key of our parameter at `path` (a tuple from nnx.to_flat_state)."""
    path = tuple(str(p) for p in path)
    if len(path) == 2:  # a Linear: in_proj, x_proj, dt_proj, out_proj
        sub, leaf = path
        return f"{sub}.{'weight' if leaf == 'kernel' else leaf}"
    (name,) = path
    if name == "dt_bias" and isinstance(module, MambaMixer):
        return "dt_proj.bias"
    return _RENAMES[name]


def to_ours(path: tuple, value) -> np.ndarray:
    """A torch tensor (or array) in torch layout -> our layout."""
    value = np.asarray(value.detach().float().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
    leaf = str(path[-1])
    if leaf == "kernel":
        return value.T
    if leaf == "conv_weight":
        return value[:, 0, :].T
    return value


def to_torch_layout(path: tuple, value) -> np.ndarray:
    """An array in our layout -> torch layout (the inverse of `to_ours`)."""
    value = np.asarray(value, np.float32)
    leaf = str(path[-1])
    if leaf == "kernel":
        return value.T
    if leaf == "conv_weight":
        return value.T[:, None, :]
    return value


def load_torch_weights(module, state_dict) -> None:
    """Copy every tensor of `state_dict` into our mixer (in place); both sides must have exactly the same
    set of parameters."""
    params = nnx.to_flat_state(nnx.state(module, nnx.Param))
    names = {torch_name(module, path): (path, var) for path, var in params}
    missing, unused = set(names) - set(state_dict), set(state_dict) - set(names)
    if missing or unused:
        raise KeyError(f"parameter sets differ: ours without a torch tensor {sorted(missing)}, "
                       f"torch tensors we have no parameter for {sorted(unused)}")
    for key, (path, var) in names.items():
        value = to_ours(path, state_dict[key])
        if value.shape != var[...].shape:
            raise ValueError(f"{key}: torch shape {tuple(state_dict[key].shape)} -> ours {value.shape}, "
                             f"expected {var[...].shape} at {'.'.join(map(str, path))}")
        var[...] = jnp.asarray(value, var[...].dtype)


def grads_to_torch(module, grads) -> dict[str, np.ndarray]:
    """Our parameter gradients (an nnx.State of the module's Params) -> {torch key: array in torch layout}."""
    out = {}
    for path, g in nnx.to_flat_state(grads):
        out[torch_name(module, path)] = to_torch_layout(path, g[...] if isinstance(g, nnx.Variable) else g)
    return out
