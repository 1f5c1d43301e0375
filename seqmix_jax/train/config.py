"""Training configuration: YAML presets (configs/*.yaml) -> frozen dataclasses that validate themselves, plus
dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", ["model.d_model=128", "model.mixer_kwargs.attention.num_heads=2"])
    model = LM(cfg.model.to_model_config(), rngs=nnx.Rngs(cfg.run.seed))

A `TrainConfig` has seven sections: model, data, optimizer, mesh, checkpoint, logging, run. A YAML file sets any
subset of their fields (a missing field keeps its dataclass default; a field the file sets replaces the default
whole); overrides `section.key=value` are applied on top, and may reach inside the mapping fields
(`model.mixer_kwargs.<kind>.<arg>`, `data.task_kwargs.<key>`) without dropping their other entries. Override
values are parsed as YAML (`1e-3`, `true`, `null`, `{a: 1}`); a value that only fits the field as text (`mlp=0101`,
a numeric run name) is kept as the text. Every field is type-checked against its annotation: int is accepted for
float, "none"/null for an optional field, and a bool field takes only true/false.

Errors are ValueError naming the field and the values; an unknown key anywhere says which valid key is nearest:
"unknown config key 'model.d_modle'; did you mean 'model.d_model'?". `to_dict` / `from_dict` round-trip a config
exactly through plain JSON/YAML data (checkpoints store it). This module touches no devices: mesh sizes are
checked here for form only; `sharding.py` fills in the -1 against the device count.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from seqmix_jax.models.config import ACTIVATIONS, DTYPES, MIXERS, NORMS, PATTERN_LETTERS, ModelConfig, pattern_config

TASKS = ("mqar", "in_context_recall", "fuzzy_in_context_recall", "noisy_in_context_recall", "selective_copying",
         "compression", "memorization", "text", "memmap")
SYNTHETIC_TASKS = TASKS[:7]
NONFINITE_POLICIES = ("stop", "skip")
MESH_AXES = ("data", "fsdp", "tensor", "expert")
# Mixer constructor arguments that the model supplies, never the config.
_MODEL_SUPPLIED = {"self", "d_model", "dtype", "param_dtype", "rngs"}


# --- small helpers -----------------------------------------------------------------------------------------------

def _unknown_key(path: str, valid: Sequence[str]) -> ValueError:
    """"unknown config key 'a.b'; did you mean 'a.c'?" (the nearest of `valid`, full dotted paths)."""
    prefix, _, leaf = path.rpartition(".")
    siblings = {v.rpartition(".")[2]: v for v in valid if v.rpartition(".")[0] == prefix}
    if siblings:  # compare the last names only: a shared "section." prefix would make every key look close
        near = [siblings[n] for n in difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)]
    else:
        near = difflib.get_close_matches(path, list(valid), n=1, cutoff=0.6)
    if near:
        return ValueError(f"unknown config key {path!r}; did you mean {near[0]!r}?")
    return ValueError(f"unknown config key {path!r}; valid keys: {', '.join(valid)}")


def _choice(path: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), list(choices), n=1) if isinstance(value, str) else []
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"{path} must be one of {tuple(choices)}, got {value!r}{hint}")


def _plain(path: str, value):
    """A deep copy of YAML-like data as plain dicts (str keys), lists and scalars, so that configs compare, copy
    and serialize exactly (tuples become lists)."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path} keys must be strings, got {k!r} ({type(k).__name__})")
            out[k] = _plain(f"{path}.{k}", v)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(f"{path}[{i}]", v) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ValueError(f"{path} holds {value!r} ({type(value).__name__}); only mappings, lists, strings, numbers, "
                     "bools and null are allowed")


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Mapping or tp is Mapping:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(path: str, value, tp):
    """`value` checked against the annotation `tp` (and normalized: int -> float, mappings -> plain dicts)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() == "none")):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(path, value, a)
            except ValueError:
                pass
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{path} must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Mapping or typing.get_origin(tp) is Mapping:
        if isinstance(value, Mapping):
            return _plain(path, value)
    else:  # pragma: no cover - an annotation this module does not use
        raise TypeError(f"{path}: unsupported annotation {tp!r}")
    hint = " (quote it in YAML to keep it a string)" if _accepts_str(tp) and not isinstance(value, str) else ""
    raise ValueError(f"{path} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}")


def _accepts_str(tp) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return tp is str


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


class _Section:
    """Base of the sections: type-checks every field against its annotation, then runs `_validate`."""

    section: ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            path = f"{self.section}.{f.name}"
            object.__setattr__(self, f.name, _coerce(path, getattr(self, f.name), hints[f.name]))
        self._validate()

    def _validate(self) -> None:
        pass

    def _positive(self, *names: str, allow_zero: bool = False) -> None:
        for name in names:
            v = getattr(self, name)
            if v is not None and not (v >= 0 if allow_zero else v > 0):
                raise ValueError(f"{self.section}.{name} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")


# --- the sections -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSection(_Section):
    """The language model (see seqmix_jax.models.config): `pattern` has one letter per layer, M mamba,
    2 mamba2, A attention, H hyena, S striped_hyena. `mlp`: every layer (bool) or one character per layer:
    "1" a gated MLP, "0" none, "E" a mixture of experts (`layers.MoE` with the keywords `moe`, e.g.
    {num_experts: 8, top_k: 2, dispatch: capacity, capacity_factor: 1.25}; its `hidden` defaults to
    mlp_hidden). `moe_aux_loss_weight` / `moe_z_loss_weight` weigh the MoE layers' load-balancing loss and router
    z-loss (each averaged over the MoE layers) in the training objective. `mlp_hidden` None = 4 * d_model.
    `mixer_kwargs`: per mixer kind, its constructor keywords (e.g. {attention: {num_heads: 4}}).
    `head_only_at_weights`: the trainer may compute the LM head only at positions with weight > 0 (same loss,
    less work). The other fields are ModelConfig's."""

    section: ClassVar[str] = "model"
    pattern: str = "SA"
    vocab_size: int = 256
    d_model: int = 64
    mlp: bool | str = True
    mlp_hidden: int | None = None
    moe: Mapping[str, Any] = field(default_factory=dict, hash=False)
    moe_aux_loss_weight: float = 0.01
    moe_z_loss_weight: float = 0.001
    mlp_activation: str = "silu"
    mlp_bias: bool = False
    mixer_kwargs: Mapping[str, Any] = field(
        default_factory=lambda: {"attention": {"num_heads": 4}, "striped_hyena": {"num_heads": 4}}, hash=False)
    norm: str = "rms"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 1
    residual_in_fp32: bool = False
    final_norm: bool = True
    max_seq_len: int | None = None
    embed_init_std: float = 0.02
    dtype: str | None = None
    param_dtype: str = "float32"
    head_only_at_weights: bool = True

    def _validate(self):
        bad = sorted({c for c in self.pattern if c not in PATTERN_LETTERS})
        _check(bool(self.pattern) and not bad, f"model.pattern {self.pattern!r} must be a non-empty string of the "
               f"letters {PATTERN_LETTERS}" + (f"; unknown letters {bad}" if bad else ""))
        if isinstance(self.mlp, str):
            _check(len(self.mlp) == len(self.pattern) and not set(self.mlp) - {"0", "1", "E"},
                   f"model.mlp {self.mlp!r} must be true, false or {len(self.pattern)} characters of '0'/'1'/'E' "
                   f"(one per layer of model.pattern {self.pattern!r})")
        self._positive("vocab_size", "d_model", "mlp_hidden", "pad_vocab_size_multiple", "max_seq_len",
                       "embed_init_std")
        self._positive("norm_eps", "moe_aux_loss_weight", "moe_z_loss_weight", allow_zero=True)
        self._validate_moe()
        _choice("model.mlp_activation", self.mlp_activation, ACTIVATIONS)
        _choice("model.norm", self.norm, NORMS)
        _choice("model.param_dtype", self.param_dtype, DTYPES)
        if self.dtype is not None:
            _choice("model.dtype", self.dtype, DTYPES)
        self._validate_mixer_kwargs()
        try:
            self.to_model_config()
        except ValueError as e:
            raise ValueError(f"model: {e}") from None

    def _validate_mixer_kwargs(self):
        from seqmix_jax.models.lm import MIXER_CLASSES  # the constructors whose keywords these are

        for kind, kwargs in self.mixer_kwargs.items():
            if kind not in MIXERS:
                raise _unknown_key(f"model.mixer_kwargs.{kind}", [f"model.mixer_kwargs.{k}" for k in MIXERS])
            _check(isinstance(kwargs, Mapping), f"model.mixer_kwargs.{kind} must be a mapping of "
                   f"{MIXER_CLASSES[kind].__name__} arguments, got {kwargs!r}")
            params = inspect.signature(MIXER_CLASSES[kind].__init__).parameters
            valid = [p for p in params if p not in _MODEL_SUPPLIED]
            for name in kwargs:
                if name not in valid:
                    raise _unknown_key(f"model.mixer_kwargs.{kind}.{name}",
                                       [f"model.mixer_kwargs.{kind}.{p}" for p in valid])
        used = {PATTERN_LETTERS[c] for c in self.pattern}
        for kind in sorted(used):
            params = inspect.signature(MIXER_CLASSES[kind].__init__).parameters
            required = [p for p, v in params.items() if v.default is inspect.Parameter.empty
                        and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)
                        and p not in _MODEL_SUPPLIED and not (kind == "hyena" and p == "l_max")]
            missing = [p for p in required if p not in self.mixer_kwargs.get(kind, {})]
            _check(not missing, f"model.mixer_kwargs.{kind} needs {missing} (model.pattern {self.pattern!r} has "
                   f"{kind} layers)")

    def _validate_moe(self):
        from seqmix_jax.layers.moe import MoE

        valid = [p for p in inspect.signature(MoE.__init__).parameters if p not in _MODEL_SUPPLIED]
        for name in self.moe:
            if name not in valid:
                raise _unknown_key(f"model.moe.{name}", [f"model.moe.{p}" for p in valid])
        if self.uses_moe:
            missing = [p for p in ("num_experts", "top_k") if p not in self.moe]
            _check(not missing, f"model.moe needs {missing} (model.mlp {self.mlp!r} has MoE layers 'E')")

    @property
    def uses_mlp(self) -> bool:
        return self.mlp is True or (isinstance(self.mlp, str) and "1" in self.mlp)

    @property
    def uses_moe(self) -> bool:
        return isinstance(self.mlp, str) and "E" in self.mlp

    def to_model_config(self) -> ModelConfig:
        """The seqmix_jax.models.ModelConfig of this section (via pattern_config)."""
        mlp_hidden = (self.mlp_hidden if self.mlp_hidden is not None or not (self.uses_mlp or self.uses_moe)
                      else 4 * self.d_model)
        mlp = self.mlp.replace("E", "0") if isinstance(self.mlp, str) else self.mlp
        config = pattern_config(
            self.pattern, vocab_size=self.vocab_size, d_model=self.d_model, mlp=mlp,
            mixer_kwargs={k: dict(v) for k, v in self.mixer_kwargs.items()}, norm=self.norm, norm_eps=self.norm_eps,
            mlp_hidden=mlp_hidden, mlp_activation=self.mlp_activation, mlp_bias=self.mlp_bias,
            tie_embeddings=self.tie_embeddings, pad_vocab_size_multiple=self.pad_vocab_size_multiple,
            residual_in_fp32=self.residual_in_fp32, final_norm=self.final_norm, max_seq_len=self.max_seq_len,
            embed_init_std=self.embed_init_std, dtype=self.dtype, param_dtype=self.param_dtype)
        if not self.uses_moe:
            return config
        blocks = tuple(dataclasses.replace(b, moe=dict(self.moe)) if c == "E" else b
                       for b, c in zip(config.blocks, self.mlp))
        return dataclasses.replace(config, blocks=blocks)


@dataclass(frozen=True)
class DataSection(_Section):
    """The data. Synthetic tasks (REFERENCE_NOTES §6-7) are generated on the fly from `seed` (`vocab_size`,
    `num_kv_pairs` and `task_kwargs` shape them; `num_train_examples` None = a fresh example every step);
    "text" reads the files matching the glob `path` with `tokenizer` ("byte" or a tokenizer.json path);
    "memmap" reads pre-tokenized ids from the .npy/.bin file `path`. `batch_size` is global (all processes);
    `pack` packs documents into rows with segment_ids; `worker_count` grain reader threads (0 = read in the main thread)."""

    section: ClassVar[str] = "data"
    task: str = "mqar"
    seq_len: int = 128
    batch_size: int = 32
    vocab_size: int = 256
    num_kv_pairs: int = 8
    task_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    num_train_examples: int | None = None
    num_test_examples: int = 1000
    path: str | None = None
    tokenizer: str = "byte"
    pack: bool = True
    seed: int = 0
    worker_count: int = 0

    def _validate(self):
        _choice("data.task", self.task, TASKS)
        self._positive("seq_len", "batch_size", "vocab_size", "num_kv_pairs", "num_train_examples",
                       "num_test_examples")
        self._positive("seed", "worker_count", allow_zero=True)
        if self.task in ("text", "memmap"):
            _check(bool(self.path), f"data.path is required for data.task={self.task!r} "
                   f"({'a glob of text files' if self.task == 'text' else 'a .npy or .bin file of token ids'})")
        _check(self.tokenizer == "byte" or self.tokenizer.endswith(".json"),
               f"data.tokenizer must be 'byte' or the path of a tokenizer.json, got {self.tokenizer!r}")
        if self.task == "mqar":
            # Room for the 2 * kv context tokens and one query per key (zoology's 4 * kv <= seq_len).
            _check(4 * self.num_kv_pairs <= self.seq_len, f"data.num_kv_pairs={self.num_kv_pairs} needs "
                   f"data.seq_len >= 4 * num_kv_pairs = {4 * self.num_kv_pairs} for mqar, got {self.seq_len}")


@dataclass(frozen=True)
class OptimizerSection(_Section):
    """AdamW with linear warmup over `warmup_steps` then cosine decay to `min_lr_ratio * lr` at run.steps;
    global-norm clipping at `clip_norm` (0 or null: none); `grad_accum_steps` micro-batches per update
    (dividing data.batch_size); `decay_embeddings`: apply weight decay to the embedding too."""

    section: ClassVar[str] = "optimizer"
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    grad_accum_steps: int = 1
    decay_embeddings: bool = False

    def _validate(self):
        self._positive("lr", "eps", "grad_accum_steps")
        self._positive("warmup_steps", "weight_decay", "clip_norm", allow_zero=True)
        _check(0 <= self.min_lr_ratio <= 1, f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("b1", "b2"):
            v = getattr(self, name)
            _check(0 <= v < 1, f"optimizer.{name} must be in [0, 1), got {v}")


@dataclass(frozen=True)
class MeshSection(_Section):
    """Device-mesh axis sizes; one of them may be -1 (= the devices left over, filled in by sharding.py)."""

    section: ClassVar[str] = "mesh"
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def _validate(self):
        for name in MESH_AXES:
            v = getattr(self, name)
            _check(v == -1 or v >= 1, f"mesh.{name} must be a positive int or -1 (auto), got {v}")
        auto = [name for name in MESH_AXES if getattr(self, name) == -1]
        _check(len(auto) <= 1, f"at most one mesh axis may be -1 (auto), got {auto}")

    @property
    def shape(self) -> dict[str, int]:
        """{axis name: size (-1 = auto)} in mesh order (data, fsdp, tensor, expert)."""
        return {name: getattr(self, name) for name in MESH_AXES}


@dataclass(frozen=True)
class CheckpointSection(_Section):
    """Orbax checkpoints in the run directory: every `every_steps` steps (0: only at the end and on SIGTERM),
    the last `keep` kept, saved asynchronously if `async_save`; `init_from` a from_pretrained directory for the
    initial weights; `resume` from the run directory's latest checkpoint when there is one."""

    section: ClassVar[str] = "checkpoint"
    every_steps: int = 500
    keep: int = 3
    async_save: bool = True
    init_from: str | None = None
    resume: bool = True

    def _validate(self):
        self._positive("keep")
        self._positive("every_steps", allow_zero=True)
        _check(self.init_from is None or bool(self.init_from), "checkpoint.init_from must be null or a path, got ''")


@dataclass(frozen=True)
class LoggingSection(_Section):
    """Outputs go to `run_dir`/<name> (name null: derived from the config, see `run_name`). Metrics every
    `log_every` steps; evaluation every `eval_every` steps (0: only at the end) over `eval_batches` batches
    (null: the whole test split)."""

    section: ClassVar[str] = "logging"
    run_dir: str = "runs"
    name: str | None = None
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int | None = None
    progress: bool = True
    plot: bool = True
    tensorboard: bool = False

    def _validate(self):
        _check(bool(self.run_dir), "logging.run_dir must be a non-empty path")
        if self.name is not None:
            _check(bool(self.name) and "/" not in self.name and "\\" not in self.name and self.name not in (".", ".."),
                   f"logging.name must be a plain directory name (no path separators), got {self.name!r}")
        self._positive("log_every", "eval_batches")
        self._positive("eval_every", allow_zero=True)


@dataclass(frozen=True)
class RunSection(_Section):
    """`steps` optimizer updates from `seed`; `nonfinite` loss policy: "stop" (exit non-zero, last good
    checkpoint kept) or "skip" (drop the update). Multi-host: `distributed` null = decided from the environment;
    coordinator_address ("host:port"), num_processes and process_id null = from the environment."""

    section: ClassVar[str] = "run"
    steps: int = 1000
    seed: int = 0
    nonfinite: str = "stop"
    distributed: bool | None = None
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def _validate(self):
        self._positive("steps", "num_processes")
        self._positive("seed", "process_id", allow_zero=True)
        _choice("run.nonfinite", self.nonfinite, NONFINITE_POLICIES)
        if self.coordinator_address is not None:
            host, _, port = self.coordinator_address.rpartition(":")
            _check(bool(host) and port.isdigit(),
                   f"run.coordinator_address must be 'host:port', got {self.coordinator_address!r}")
        if self.num_processes is not None and self.process_id is not None:
            _check(self.process_id < self.num_processes, f"run.process_id={self.process_id} must be < "
                   f"run.num_processes={self.num_processes}")


SECTIONS: dict[str, type[_Section]] = {"model": ModelSection, "data": DataSection, "optimizer": OptimizerSection,
                                       "mesh": MeshSection, "checkpoint": CheckpointSection,
                                       "logging": LoggingSection, "run": RunSection}


@dataclass(frozen=True)
class TrainConfig:
    """A whole training job; checks what spans sections (sequence length vs the model's limit, synthetic
    vocabulary vs the model's, batch vs gradient accumulation)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            _check(isinstance(getattr(self, name), cls),
                   f"TrainConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        m, d, o = self.model, self.data, self.optimizer
        if m.max_seq_len is not None:
            _check(d.seq_len <= m.max_seq_len,
                   f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        l_max = m.mixer_kwargs.get("hyena", {}).get("l_max")
        if "H" in m.pattern and l_max is not None:
            _check(d.seq_len <= l_max, f"data.seq_len={d.seq_len} exceeds model.mixer_kwargs.hyena.l_max={l_max}")
        if d.task in SYNTHETIC_TASKS:
            _check(d.vocab_size <= m.vocab_size, f"data.vocab_size={d.vocab_size} exceeds "
                   f"model.vocab_size={m.vocab_size} (task {d.task!r} uses ids in [0, data.vocab_size))")
        _check(d.batch_size % o.grad_accum_steps == 0, f"data.batch_size={d.batch_size} must be divisible by "
               f"optimizer.grad_accum_steps={o.grad_accum_steps}")


# --- dicts, YAML and overrides ------------------------------------------------------------------------------------

def _field_paths(section: str) -> list[str]:
    return [f"{section}.{f.name}" for f in dataclasses.fields(SECTIONS[section])]


def to_dict(cfg: TrainConfig) -> dict:
    """Plain nested dict {section: {field: value}} (JSON- and YAML-serializable); from_dict inverts it."""
    return {name: {f.name: _plain(f"{name}.{f.name}", getattr(getattr(cfg, name), f.name))
                   for f in dataclasses.fields(SECTIONS[name])} for name in SECTIONS}


def from_dict(d: Mapping) -> TrainConfig:
    """A TrainConfig from {section: {field: value}}; missing sections/fields take their defaults, unknown keys are
    errors naming the nearest valid key."""
    _check(isinstance(d, Mapping), f"a config must be a mapping of sections {tuple(SECTIONS)}, got {d!r}")
    sections = {}
    for name, values in d.items():
        if name not in SECTIONS:
            raise _unknown_key(str(name), list(SECTIONS))
        values = {} if values is None else values
        _check(isinstance(values, Mapping), f"config section {name!r} must be a mapping, got {values!r}")
        valid = _field_paths(name)
        for key in values:
            if f"{name}.{key}" not in valid:
                raise _unknown_key(f"{name}.{key}", valid)
        sections[name] = SECTIONS[name](**values)
    return TrainConfig(**sections)


def _default(section: str, key: str):
    f = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == key)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _set_override(raw: dict, override: str) -> None:
    """Apply one "section.key[.subkey...]=value" to the nested dict `raw` (in place)."""
    _check(isinstance(override, str) and "=" in override,
           f"malformed override {override!r}: expected section.key=value (e.g. model.d_model=128)")
    lhs, rhs = override.split("=", 1)
    parts = lhs.strip().split(".")
    _check(len(parts) >= 2 and all(parts), f"malformed override {override!r}: the key must be section.key, e.g. "
           "model.d_model=128")
    section, key, rest = parts[0], parts[1], parts[2:]
    if section not in SECTIONS:
        raise _unknown_key(lhs.strip(), [p for s in SECTIONS for p in _field_paths(s)])
    if f"{section}.{key}" not in _field_paths(section):
        raise _unknown_key(f"{section}.{key}", _field_paths(section))
    tp = typing.get_type_hints(SECTIONS[section])[key]
    try:
        value = yaml.safe_load(rhs) if rhs.strip() else None
        parsed = True
    except yaml.YAMLError:
        value, parsed = rhs, False
    if not rest:
        if not parsed and not _accepts_str(tp):
            raise ValueError(f"override {override!r}: cannot parse {rhs!r} as a value for {section}.{key}")
        if _accepts_str(tp) and not isinstance(value, str):
            try:
                _coerce(lhs, value, tp)
            except ValueError:
                value = rhs.strip()  # e.g. model.mlp=0101, which YAML 1.1 reads as an octal int
    sec = raw.setdefault(section, {})
    if sec is None:
        sec = raw[section] = {}
    _check(isinstance(sec, dict), f"config section {section!r} must be a mapping, got {sec!r}")
    if not rest:
        sec[key] = value
        return
    _check(tp is Mapping or typing.get_origin(tp) is Mapping,
           f"override {override!r}: {section}.{key} is not a mapping, so it has no key {'.'.join(rest)!r}")
    base = sec[key] if key in sec else _default(section, key)
    node = {} if base is None else _plain(f"{section}.{key}", base)
    _check(isinstance(node, dict), f"override {override!r}: {section}.{key} is {base!r}, not a mapping")
    sec[key] = node
    for i, part in enumerate(rest[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        _check(isinstance(child, dict), f"override {override!r}: {'.'.join(parts[:3 + i])} is {child!r}, "
               "not a mapping")
        node = child
    node[rest[-1]] = value


def apply_overrides(raw: Mapping, overrides: Sequence[str]) -> dict:
    """A copy of the nested dict `raw` with the dotted overrides applied in order (the last one wins)."""
    out = _plain("config", raw) if raw is not None else {}
    _check(isinstance(out, dict), f"a config must be a mapping of sections {tuple(SECTIONS)}, got {raw!r}")
    if isinstance(overrides, str):
        overrides = [overrides]
    for o in overrides:
        _set_override(out, o)
    return out


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The TrainConfig of a YAML file (None: the dataclass defaults) with dotted overrides on top."""
    raw = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except FileNotFoundError:
            raise ValueError(f"config file {path!r} not found") from None
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path!r} is not valid YAML: {' '.join(str(e).split())}") from None
        raw = {} if raw is None else raw
        _check(isinstance(raw, Mapping), f"config file {path!r} must hold a mapping of sections "
               f"{tuple(SECTIONS)}, got {type(raw).__name__}")
    return from_dict(apply_overrides(raw, overrides))


def run_name(cfg: TrainConfig) -> str:
    """logging.name, or a name derived from what defines the experiment (model, data, optimizer and run.seed;
    not mesh, checkpointing, logging or run length), so rerunning a command finds and resumes its own run:
    "<task>-<pattern>-d<d_model>-<8 hex digits>"."""
    if cfg.logging.name is not None:
        return cfg.logging.name
    d = to_dict(cfg)
    d["data"].pop("worker_count")
    ident = {"model": d["model"], "data": d["data"], "optimizer": d["optimizer"], "seed": cfg.run.seed}
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
    p = cfg.model.pattern
    short = p if len(p) <= 8 else f"{''.join(dict.fromkeys(p))}x{len(p)}"
    return f"{cfg.data.task}-{short}-d{cfg.model.d_model}-{digest}"
