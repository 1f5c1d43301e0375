"""Compare a checkpoint run in PyTorch with the same checkpoint run in seqmix_jax, layer by layer.

    python -m seqmix_jax.compare CHECKPOINT_DIR [--tokens N | --text "..."] [--seed S] [--batch B]
                                 [--dtype float32|bfloat16] [--tol T] [--json PATH]

The checkpoint is loaded twice: in PyTorch on CPU (transformers `AutoModelForCausalLM` for model_type mamba,
mamba2, llama, mixtral and jamba; the `stripedhyena` package's `StripedHyena` for StripedHyena configs) and with
`seqmix_jax.from_pretrained`. Both get the same token ids (random ids in [0, vocab_size) drawn with `--seed`, or
the UTF-8 bytes of `--text` modulo vocab_size), and the table lists, for the residual stream after every block
(before the final norm) and for the logits,

    max_abs  = max |ours - ref|           mean_abs = mean |ours - ref|
    max_rel  = max_abs / max |ref|        mean_rel = mean_abs / mean |ref|

with `ref` the PyTorch side (all in float64). A row fails when max_rel > tol; the first failing block is reported
as the layer where the two implementations diverge (a later layer inherits the error of an earlier one, so the
first one is the one to look at). Exit code: 0 all rows within tol, 1 some row above, 2 bad input (missing or
unreadable directory, unsupported model type, a missing PyTorch package) with one line on stderr.

Hidden states are taken with forward hooks on the PyTorch blocks (`base_model.layers[i]` for transformers,
`blocks[i]` for stripedhyena) rather than `output_hidden_states`, whose last entry is after the final norm in
some transformers models: both sides then report the residual stream after block i.

Mixture-of-experts checkpoints (mixtral, jamba) run with the MoE dispatch `from_pretrained` configures, "dropless":
every token reaches its top-k experts, as in transformers (no capacity drops to explain away); the PyTorch side uses
transformers' "eager" experts implementation (its per-expert loop, the modeling file's definition).

Precision: `--dtype bfloat16` loads both sides with bfloat16 parameters and compute (seqmix keeps its float32
parts: SSM A_log/D/dt_bias, StripedHyena poles/residues, the fp32 residual stream where the config asks for it)
and compares the two bfloat16 runs with each other. The differences are then those of two bfloat16
implementations, hence the looser default tolerance (DEFAULT_TOL).

The PyTorch packages (torch, transformers, stripedhyena) are test extras: they are imported inside the functions
that need them, and a missing one is a one-line error. stripedhyena's attention blocks need flash-attn; on a
machine without its CUDA build, import `tests.parity.torch_refs.stripedhyena()` first (it installs CPU
stand-ins) and call `compare_checkpoint` in the same process.

Library use (the whole-model parity tests do this):

    report = compare_checkpoint(path, tokens=ids_or_length, dtype="float32")
    report["ok"], report["first_divergent"], report["logits"]["max_rel"], report["layers"][i]["max_rel"]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

DTYPES = ("float32", "bfloat16")
DEFAULT_TOL = {"float32": 1e-4, "bfloat16": 5e-2}
DEFAULT_TOKENS = 16
TRANSFORMERS_FORMATS = ("mamba", "mamba2", "llama", "mixtral", "jamba")
MOE_FORMATS = ("mixtral", "jamba")


class MissingDependency(ImportError):
    """A PyTorch reference package (torch, transformers, stripedhyena) is not installed."""


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(f"comparing needs the PyTorch reference package {module!r} ({err}); install the "
                                f"test extra: pip install 'seqmix-jax[test]'") from None


# ================================================================ the PyTorch side

def load_torch_model(path, *, dtype: str = "float32", quiet: bool = False):
    """The checkpoint in `path` as an eval-mode PyTorch module on CPU (transformers or stripedhyena). `quiet`
    silences transformers' logging and progress bars (process-wide; the CLI sets it)."""
    from seqmix_jax.models.checkpoints import read_config

    fmt, raw = read_config(path)
    _check_format(fmt)
    torch = _import("torch")
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[_check_dtype(dtype)]
    if fmt in TRANSFORMERS_FORMATS:
        tf = _import("transformers")
        if quiet:
            tf.logging.set_verbosity_error()
            tf.logging.disable_progress_bar()
        # MoE experts: transformers' "eager" loop over experts (the modeling file's definition) rather than its
        # default grouped_mm kernel, which needs 16-byte aligned strides (small bf16 experts fail there)
        extra = {"experts_implementation": "eager"} if fmt in MOE_FORMATS else {}
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=tdtype, **extra)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"transformers cannot load {path}: {_one_line(err)}") from None
        return model.eval()
    return _load_striped_hyena(Path(path), raw, torch, tdtype).eval()


def _load_striped_hyena(path: Path, raw: dict, torch, tdtype):
    from seqmix_jax.models import _tensors

    sh_model = _import("stripedhyena.model")
    utils = _import("stripedhyena.utils")
    cfg = utils.dotdict(raw, params_dtype=tdtype, hyena_block_dtype=tdtype, mlp_dtype=tdtype,
                        attn_block_dtype=tdtype)
    try:
        model = sh_model.StripedHyena(cfg)
    except (NameError, ImportError) as err:  # flash_attn's MHA is only defined when flash-attn imports
        raise MissingDependency(f"stripedhyena cannot build this model ({_one_line(err)}); its attention needs "
                                f"flash-attn") from None
    sd = {}
    for k, v in _tensors.load_state_dict(path).items():
        k = k[len("backbone."):] if k.startswith("backbone.") else k
        sd[k] = torch.from_numpy(np.asarray(v, np.float32))  # load_state_dict casts to each parameter's dtype
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ValueError(f"stripedhyena cannot load the weights in {path}: {_one_line(err)}") from None
    return model


def torch_layers(model) -> list:
    """The PyTorch model's blocks, in order (the modules whose outputs are the per-layer residual streams)."""
    if hasattr(model, "blocks"):  # stripedhyena
        return list(model.blocks)
    return list(model.base_model.layers)


def torch_forward(model, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(logits (b, l, v), [residual stream after block i, (b, l, d)]) as float32 numpy arrays."""
    torch = _import("torch")
    hidden, handles = [], []

    def hook(module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        hidden.append(out.detach().float().numpy().copy())

    for layer in torch_layers(model):
        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(np.asarray(ids), dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    logits = out[0] if isinstance(out, (tuple, list)) else out.logits
    return logits.detach().float().numpy(), hidden


# ================================================================ the seqmix side

def load_seqmix_model(path, *, dtype: str = "float32"):
    """`from_pretrained(path)` with parameters and compute in `dtype` (float32 parts stay float32)."""
    import jax.numpy as jnp

    from seqmix_jax.models.checkpoints import from_pretrained

    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[_check_dtype(dtype)]
    return from_pretrained(path, dtype=jdtype, param_dtype=jdtype)


def seqmix_forward(model, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(logits (b, l, v), [residual stream after block i, (b, l, d)]) as float32 numpy arrays, one jitted call."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, return_hidden=True))
    logits, hidden = fwd(state, jnp.asarray(ids, jnp.int32))
    return np.asarray(logits, np.float32), [np.asarray(h.astype(jnp.float32)) for h in hidden]


# ================================================================ comparing

def error_stats(ours, ref) -> dict:
    """max/mean absolute error and the same relative to max|ref| / mean|ref| (float64)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: seqmix {ours.shape} vs PyTorch {ref.shape}")
    diff = np.abs(ours - ref)
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    return dict(max_abs=max_abs, mean_abs=mean_abs, max_rel=max_abs / max(float(np.abs(ref).max()), 1e-30),
                mean_rel=mean_abs / max(float(np.abs(ref).mean()), 1e-30))


def make_ids(vocab_size: int, *, tokens=DEFAULT_TOKENS, text: str | None = None, seed: int = 0,
             batch: int = 1) -> np.ndarray:
    """Token ids (b, l) int64: `tokens` as given (an array of ids), the UTF-8 bytes of `text` modulo vocab_size,
    or `tokens` (an int) random ids in [0, vocab_size) from numpy's default_rng(seed)."""
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if text is not None:
        if not text:
            raise ValueError("text must not be empty")
        row = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64) % vocab_size
        return np.tile(row, (batch, 1))
    if isinstance(tokens, (int, np.integer)) and not isinstance(tokens, bool):
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        return np.random.default_rng(seed).integers(0, vocab_size, (batch, int(tokens)))
    ids = np.asarray(tokens)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"tokens must be a length (int) or a non-empty integer array (l,) or (b, l), got "
                         f"{ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, vocab_size={vocab_size}), got min {ids.min()}, max {ids.max()}")
    return ids.astype(np.int64)


def compare_checkpoint(path, *, tokens=DEFAULT_TOKENS, text: str | None = None, seed: int = 0, batch: int = 1,
                       dtype: str = "float32", tol: float | None = None,
                       torch_model_hook: Callable | None = None, quiet: bool = False) -> dict:
    """Run the checkpoint in PyTorch and in seqmix_jax on the same ids and compare (see the module docstring).

    Args:
      path: checkpoint directory (Hugging Face mamba / mamba2 / llama / mixtral / jamba, or StripedHyena).
      tokens: the number of random ids per row (int), or the ids themselves ((l,) or (b, l) integers).
      text: instead of random ids, the UTF-8 bytes of this text modulo vocab_size.
      seed: seed of the random ids.
      batch: rows of random / text ids.
      dtype: "float32" or "bfloat16" (both sides).
      tol: relative max error allowed per row (default DEFAULT_TOL[dtype]).
      torch_model_hook: called with the loaded PyTorch model before it runs (tests use it to perturb a layer).
      quiet: silence transformers' logging (see load_torch_model).
    Returns a JSON-serializable report: checkpoint, format, dtype, tol, shape (b, l), layers (one dict of
    error_stats + "layer" + "ok" per block), logits (error_stats + "ok"), first_divergent (the first failing
    row's name: "layer i" or "logits"; None when all pass), first_divergent_layer (int or None), ok.
    Raises ValueError (bad input), MissingDependency (a PyTorch package is missing)."""
    from seqmix_jax.models.checkpoints import read_config

    dtype = _check_dtype(dtype)
    tol = DEFAULT_TOL[dtype] if tol is None else tol
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    fmt, _ = read_config(path)
    _check_format(fmt)
    ours = load_seqmix_model(path, dtype=dtype)
    ids = make_ids(ours.config.vocab_size, tokens=tokens, text=text, seed=seed, batch=batch)
    if ours.config.max_seq_len is not None and ids.shape[1] > ours.config.max_seq_len:
        raise ValueError(f"{ids.shape[1]} tokens exceed the model's max_seq_len={ours.config.max_seq_len}")
    ref_model = load_torch_model(path, dtype=dtype, quiet=quiet)
    if torch_model_hook is not None:
        torch_model_hook(ref_model)
    ref_logits, ref_hidden = torch_forward(ref_model, ids)
    logits, hidden = seqmix_forward(ours, ids)
    if len(ref_hidden) != len(hidden):
        raise ValueError(f"the PyTorch model has {len(ref_hidden)} blocks, the seqmix model {len(hidden)}")
    v = min(logits.shape[-1], ref_logits.shape[-1])  # padded vocabulary rows: compare the common ones
    layers = [dict(layer=i, **error_stats(h, r)) for i, (h, r) in enumerate(zip(hidden, ref_hidden))]
    rows = layers + [dict(error_stats(logits[..., :v], ref_logits[..., :v]))]
    for row in rows:
        row["ok"] = bool(row["max_rel"] <= tol)  # NaN fails
    first = next((r for r in rows if not r["ok"]), None)
    return dict(checkpoint=str(path), format=fmt, dtype=dtype, tol=float(tol), shape=list(ids.shape),
                layers=layers, logits=rows[-1],
                first_divergent=None if first is None else ("logits" if "layer" not in first
                                                            else f"layer {first['layer']}"),
                first_divergent_layer=None if first is None else first.get("layer"),
                ok=first is None)


def format_table(report: dict) -> str:
    """The report as a text table; the first row above tolerance is marked."""
    b, l = report["shape"]
    lines = [f"{report['checkpoint']} ({report['format']}, {report['dtype']}, batch {b}, {l} tokens): seqmix_jax "
             f"vs PyTorch, rel = abs / max|ref| (max) or mean|ref| (mean); tol {report['tol']:.0e} on max rel",
             f"{'':<10}{'max abs':>12}{'mean abs':>12}{'max rel':>12}{'mean rel':>12}"]
    rows = [(f"layer {r['layer']}", r) for r in report["layers"]] + [("logits", report["logits"])]
    for name, r in rows:
        mark = "  <- first above tol" if name == report["first_divergent"] else ("  above tol" if not r["ok"] else "")
        lines.append(f"{name:<10}{r['max_abs']:>12.3e}{r['mean_abs']:>12.3e}{r['max_rel']:>12.3e}"
                     f"{r['mean_rel']:>12.3e}{mark}")
    lines.append("OK: every row within tolerance" if report["ok"] else
                 f"FAIL: {report['first_divergent']} is the first row above tol {report['tol']:.0e}")
    return "\n".join(lines)


# ================================================================ CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default adds the usage)
        print(f"seqmix_jax.compare: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m seqmix_jax.compare",
                description="Compare a checkpoint's logits and per-layer hidden states in PyTorch and seqmix_jax.")
    p.add_argument("checkpoint", help="checkpoint directory (Hugging Face mamba / mamba2 / llama / mixtral / jamba, "
                                      "or StripedHyena)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"random ids per row (default "
                     f"{DEFAULT_TOKENS})")
    src.add_argument("--text", help="use the UTF-8 bytes of this text (modulo vocab_size) as ids")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ids (default 0)")
    p.add_argument("--batch", type=int, default=1, help="rows (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="both sides' parameter and compute dtype (default float32)")
    p.add_argument("--tol", type=float, default=None,
                   help=f"max relative error per row (default {DEFAULT_TOL['float32']:.0e} for float32, "
                        f"{DEFAULT_TOL['bfloat16']:.0e} for bfloat16)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    return p


def main(argv=None) -> int:
    """The CLI; returns the exit code (0 within tolerance, 1 above, 2 bad input)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return int(e.code or 0)
    try:
        report = compare_checkpoint(args.checkpoint, tokens=args.tokens, text=args.text, seed=args.seed,
                                    batch=args.batch, dtype=args.dtype, tol=args.tol, quiet=True)
    except (ValueError, ImportError, NotImplementedError) as err:
        print(f"seqmix_jax.compare: error: {_one_line(err)}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as err:
            print(f"seqmix_jax.compare: error: cannot write {args.json}: {_one_line(err)}", file=sys.stderr)
            return 2
    return 0 if report["ok"] else 1


# ================================================================ helpers

def _check_dtype(dtype) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype


def _check_format(fmt: str) -> None:
    if fmt == "mamba_ssm":
        raise ValueError("mamba_ssm-format checkpoints (config.json with d_model / n_layer) have no transformers "
                         "class to compare against; compare supports Hugging Face mamba, mamba2, llama, mixtral, "
                         "jamba and StripedHyena directories")


def _one_line(err) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
