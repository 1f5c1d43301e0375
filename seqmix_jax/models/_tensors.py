"""Reading and writing checkpoint directories safely: config files and state dicts as numpy arrays.

Tensors are read with `safetensors` (numpy; bfloat16 tensors through its flax reader, as numpy has no bfloat16) or,
for PyTorch `.bin` / `.pt` files, `torch.load(weights_only=True)` — never plain unpickling, which can run code.
Every failure is a ValueError naming the file (and the key, where there is one).

Layouts recognised in a directory, in this order:
  * `model.safetensors.index.json` + the shards it names (Hugging Face sharded safetensors);
  * `model.safetensors`;
  * `pytorch_model.bin.index.json` + shards;
  * `pytorch_model.bin`;
  * otherwise exactly one `*.safetensors`, `*.pt`, `*.pth` or `*.bin` file (e.g. a StripedHyena `torch.save`d
    state dict).

Mixture-of-experts layouts (`fuse_experts` / `unfuse_experts`): transformers (5.x) keeps the experts of a layer as
two fused tensors, `{base}.gate_up_proj (e, 2f, d)` (each expert's gate rows, then its up rows) and
`{base}.down_proj (e, d, f)`, but its `save_pretrained` writes (and the Hub holds) the per-expert layout,
`{base}.{j}.{gate}.weight (f, d)`, `{base}.{j}.{up}.weight (f, d)`, `{base}.{j}.{down}.weight (d, f)` with
(gate, up, down) = (w1, w3, w2) for Mixtral and (gate_proj, up_proj, down_proj) for Jamba.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def read_json(file: Path, what: str) -> dict:
    """A JSON object from `file`; a ValueError naming the file when it is missing, unreadable or not an object."""
    file = Path(file)
    if not file.is_file():
        raise ValueError(f"{what} not found: {file}")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {file} must hold a JSON object, got {type(data).__name__}")
    return data


def read_yaml(file: Path, what: str) -> dict:
    """A mapping from a YAML file (yaml.safe_load: no Python objects are constructed)."""
    import yaml

    try:
        data = yaml.safe_load(Path(file).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{what} {file} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {file} must hold a mapping, got {type(data).__name__}")
    return data


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory (see the module docstring for the order)."""
    directory = Path(directory)
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS), (TORCH_BIN_INDEX, TORCH_BIN)):
        if (directory / index_name).exists():
            return _shards(directory / index_name)
        if (directory / single).exists():
            return [directory / single]
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found
    if not found:
        raise ValueError(f"no weight file in {directory}: expected {SAFETENSORS} (or {SAFETENSORS_INDEX} with "
                         f"shards), {TORCH_BIN} (or {TORCH_BIN_INDEX}), or one *.safetensors / *.pt file")
    raise ValueError(f"several weight files in {directory} and no index to say which belong together: "
                     f"{[p.name for p in found]}")


def _shards(index_file: Path) -> list[Path]:
    index = read_json(index_file, "weight index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"weight index {index_file} has no 'weight_map' object")
    names = sorted(set(weight_map.values()))
    files = [index_file.parent / n for n in names]
    for f in files:
        if not f.is_file():
            raise ValueError(f"shard {f.name} named by {index_file.name} is missing from {index_file.parent}")
    return files


def load_state_dict(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint in `directory`, as numpy arrays in the stored dtype (bfloat16 via
    ml_dtypes). A key present in two shards is an error."""
    out: dict[str, np.ndarray] = {}
    for f in weight_files(Path(directory)):
        tensors = read_safetensors(f) if f.suffix == ".safetensors" else read_torch(f)
        for k, v in tensors.items():
            if k in out:
                raise ValueError(f"tensor {k!r} appears in more than one weight file (again in {f.name})")
            out[k] = v
    return out


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file; corrupt or truncated files are a ValueError naming the file."""
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(file), framework="numpy") as f:
            bf16 = [k for k in f.keys() if f.get_slice(k).get_dtype() == "BF16"]
            for k in f.keys():
                if k not in bf16:
                    out[k] = f.get_tensor(k)
        if bf16:  # numpy has no bfloat16; the flax reader returns jax arrays of ml_dtypes' bfloat16
            with safe_open(str(file), framework="flax") as f:
                for k in bf16:
                    out[k] = np.asarray(f.get_tensor(k))
    except Exception as err:  # safetensors raises its own error type (and OSError / TypeError)
        raise ValueError(f"cannot read weight file {file}: {err} (corrupt or truncated?)") from None
    return out


def read_torch(file: Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict via `torch.load(weights_only=True)` (tensors and plain containers only)."""
    try:
        import torch
    except ImportError:
        raise ValueError(f"reading {file} needs PyTorch (pip install torch==2.13.0); or convert the checkpoint "
                         f"to safetensors") from None
    try:
        sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors, truncated zip archives, refused globals
        raise ValueError(f"cannot read weight file {file} with torch.load(weights_only=True): {err}") from None
    for wrapper in ("state_dict", "model", "module"):  # common torch.save({"model": sd}) wrappers
        if isinstance(sd, dict) and set(sd) == {wrapper} and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise ValueError(f"weight file {file} does not hold a state dict (got {type(sd).__name__})")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"weight file {file}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = _torch_to_numpy(v, torch)
    return out


def _torch_to_numpy(t, torch) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def write_safetensors(file: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write tensors (contiguous numpy arrays, bfloat16 allowed) with the metadata transformers expects."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


_PER_EXPERT = re.compile(r"^(?P<base>.+\.experts)\.(?P<j>\d+)\.(?P<name>[A-Za-z0-9_]+)\.weight$")


def fuse_experts(sd: dict[str, np.ndarray], num_experts: dict[str, int], names: tuple[str, str, str]) -> dict:
    """The state dict with every per-expert group `{base}.{j}.{gate|up|down}.weight` of the bases in `num_experts`
    (base -> the config's expert count e) replaced by the fused `{base}.gate_up_proj` / `{base}.down_proj` (see the
    module docstring). Either layout is accepted per base. ValueError naming the key for: both layouts under one
    base, a fused tensor or an expert index that disagrees with e, a missing expert tensor, an unknown per-expert
    name, experts of different shapes."""
    out = dict(sd)
    groups: dict[str, dict[tuple[int, str], str]] = {}
    for k in sd:
        m = _PER_EXPERT.match(k)
        if m and m["base"] in num_experts:
            groups.setdefault(m["base"], {})[(int(m["j"]), m["name"])] = k
    for base, e in num_experts.items():
        fused = [f"{base}.{n}" for n in ("gate_up_proj", "down_proj") if f"{base}.{n}" in sd]
        per = groups.get(base, {})
        if fused and per:
            raise ValueError(f"mixed expert layouts under {base!r}: fused {fused[0]!r} and per-expert "
                             f"{min(per.values())!r}; a checkpoint holds one layout per layer")
        for k in fused:
            if np.ndim(sd[k]) != 3 or np.shape(sd[k])[0] != e:
                raise ValueError(f"{k!r} has shape {tuple(np.shape(sd[k]))}: expected ({e}, ...) for the config's "
                                 f"{e} experts")
        if per:
            _fuse_group(out, base, e, per, names)
    return out


def _fuse_group(out, base, e, per, names):
    for (j, name), k in sorted(per.items()):
        if name not in names:
            raise ValueError(f"unexpected tensor {k!r}: the expert weights are named {list(names)}")
        if j >= e:
            raise ValueError(f"unexpected tensor {k!r}: expert index {j}, but the config has {e} experts")
    for j in range(e):
        for name in names:
            if (j, name) not in per:
                raise ValueError(f"checkpoint is missing {base}.{j}.{name}.weight (the config has {e} experts under "
                                 f"{base})")
    gate, up, down = ([out.pop(per[(j, n)]) for j in range(e)] for n in names)
    for role, arrs, key_name in (("gate", gate, names[0]), ("up", up, names[1]), ("down", down, names[2])):
        want = np.shape(gate[0])[::-1] if role == "down" else np.shape(gate[0])
        for j, a in enumerate(arrs):
            if np.ndim(a) != 2 or np.shape(a) != want:
                raise ValueError(f"{base}.{j}.{key_name}.weight has shape {tuple(np.shape(a))}, expected {tuple(want)} "
                                 f"(all experts of a layer have the same shape)")
    out[f"{base}.gate_up_proj"] = np.stack([np.concatenate([g, u], axis=0) for g, u in zip(gate, up)])
    out[f"{base}.down_proj"] = np.stack(down)


def unfuse_experts(tensors: dict[str, np.ndarray], names: tuple[str, str, str]) -> dict:
    """The inverse of `fuse_experts` for every `{base}.gate_up_proj` / `{base}.down_proj` pair in `tensors`."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(".experts.down_proj"):
            continue
        if not k.endswith(".experts.gate_up_proj"):
            out[k] = v
            continue
        base = k[:-len(".gate_up_proj")]
        down = tensors[f"{base}.down_proj"]
        f = v.shape[1] // 2
        for j in range(v.shape[0]):
            out[f"{base}.{j}.{names[0]}.weight"] = v[j, :f]
            out[f"{base}.{j}.{names[1]}.weight"] = v[j, f:]
            out[f"{base}.{j}.{names[2]}.weight"] = down[j]
    return out
