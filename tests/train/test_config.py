"""seqmix_jax.train.config: defaults, presets, dotted overrides, validation errors, dict round trip."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import yaml

from seqmix_jax.train.config import (DataSection, MeshSection, ModelSection, OptimizerSection, TrainConfig,
                                     apply_overrides, from_dict, load_config, run_name, to_dict)

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
PRESETS = ("tiny", "mamba_130m", "llama", "striped_hyena", "mamba2_attn", "jamba_tiny")


def preset(name: str, *overrides: str) -> TrainConfig:
    return load_config(str(CONFIGS / f"{name}.yaml"), list(overrides))


def write_yaml(tmp_path, text: str) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return str(p)


# --- defaults ------------------------------------------------------------------------------------------------------

def test_defaults():
    cfg = load_config(None, [])
    assert cfg == TrainConfig()
    assert (cfg.data.task, cfg.data.seq_len, cfg.data.batch_size, cfg.data.vocab_size, cfg.data.num_kv_pairs) == (
        "mqar", 128, 32, 256, 8)
    assert cfg.data.num_train_examples is None and cfg.data.num_test_examples == 1000 and cfg.data.tokenizer == "byte"
    o = cfg.optimizer
    assert (o.lr, o.min_lr_ratio, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm, o.grad_accum_steps) == (
        3e-3, 0.1, 0.9, 0.95, 1e-8, 0.1, 1.0, 1)
    assert cfg.mesh.shape == {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1}
    assert (cfg.checkpoint.keep, cfg.checkpoint.async_save, cfg.checkpoint.resume) == (3, True, True)
    assert (cfg.logging.run_dir, cfg.logging.name, cfg.run.seed, cfg.run.nonfinite) == ("runs", None, 0, "stop")
    assert cfg.model.head_only_at_weights is True
    mc = cfg.model.to_model_config()
    assert [b.mixer for b in mc.blocks] == ["striped_hyena", "attention"]
    assert mc.mlp_hidden == 4 * mc.d_model  # mlp_hidden None -> 4 d
    hash(cfg)  # usable as a dict key / static argument despite the mapping fields
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 3  # type: ignore[misc]


# --- presets -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads(name):
    cfg = preset(name)
    mc = cfg.model.to_model_config()
    assert mc.num_layers == len(cfg.model.pattern)
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_tiny_is_the_default_job():
    cfg = preset("tiny")
    mc = cfg.model.to_model_config()
    kinds = {b.mixer for b in mc.blocks}
    assert "attention" in kinds and kinds & {"hyena", "striped_hyena", "mamba", "mamba2"}  # a striped hybrid
    assert all(b.mlp for b in mc.blocks)
    assert cfg.data.task == "mqar" and cfg.data.num_kv_pairs >= 8 and cfg.data.seq_len >= 128
    assert cfg.data.vocab_size == mc.vocab_size and cfg.data.batch_size == 32


def test_jamba_tiny_is_a_moe_hybrid():
    mc = preset("jamba_tiny").model.to_model_config()
    assert [b.mixer for b in mc.blocks] == ["mamba", "mamba", "attention", "mamba"]
    assert [b.mlp for b in mc.blocks] == [True, False, True, False]
    assert [b.moe is not None for b in mc.blocks] == [False, True, False, True]
    assert mc.blocks[1].moe["num_experts"] == 4 and mc.blocks[1].moe["renormalize"] is False


def test_mamba_130m_shape():
    from flax import nnx

    from seqmix_jax.models import LM

    cfg = preset("mamba_130m")
    mc = cfg.model.to_model_config()
    assert [b.mixer for b in mc.blocks] == ["mamba"] * 24 and not any(b.mlp for b in mc.blocks)
    assert (mc.d_model, mc.vocab_size, mc.padded_vocab_size, mc.tie_embeddings) == (768, 50277, 50280, True)
    # Parameter count restated from the Mamba-1 block: in_proj d->2e, conv (w, e) + bias, x_proj e->(r + 2n),
    # dt_proj r->e, dt_bias, A_log (e, n), D, out_proj e->d, one norm; plus the tied embedding and norm_f.
    d, e, n, w, r, v = 768, 1536, 16, 4, 48, 50280
    per_layer = d * 2 * e + w * e + e + e * (r + 2 * n) + r * e + e + e * n + e + e * d + d
    expected = v * d + 24 * per_layer + d
    abstract = nnx.eval_shape(lambda: LM(mc, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(nnx.state(abstract, nnx.Param)))
    print(f"mamba_130m parameters: {count:,} (expected {expected:,})")
    assert count == expected


def test_other_presets_shape():
    llama = preset("llama").model.to_model_config()
    assert all(b.mixer == "attention" and b.mlp for b in llama.blocks) and not llama.tie_embeddings
    assert llama.mlp_activation == "silu" and llama.blocks[0].mixer_kwargs.get("rotary_dim", None) != 0
    sh = preset("striped_hyena").model.to_model_config()
    assert [b.mixer for b in sh.blocks[:4]] == ["striped_hyena", "attention"] * 2 and all(b.mlp for b in sh.blocks)
    m2 = preset("mamba2_attn").model.to_model_config()
    kinds = [b.mixer for b in m2.blocks]
    assert set(kinds) == {"mamba2", "attention"} and kinds.count("attention") < kinds.count("mamba2")


# Scaled-down versions of each preset (same mixer kinds and options, tiny widths) build and run an LM.
SCALED = {
    "tiny": [],
    "mamba_130m": ["model.pattern=MM"],
    "llama": ["model.pattern=AA"],
    "striped_hyena": ["model.pattern=SA"],
    "mamba2_attn": ["model.pattern=2A", "model.mixer_kwargs.mamba2.headdim=16", "model.mixer_kwargs.mamba2.d_state=8",
                    "model.mixer_kwargs.attention.rotary_dim=2"],
    "jamba_tiny": ["model.pattern=MA", "model.mlp=1E", "data.num_kv_pairs=4"],
}


@pytest.mark.parametrize("name", PRESETS)
def test_scaled_preset_builds_an_lm(name):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from seqmix_jax.models import LM

    small = ["model.d_model=48", "model.vocab_size=97", "model.mlp_hidden=64", "model.dtype=float32",
             "data.seq_len=16", "data.vocab_size=97"]
    if name == "tiny":
        small = ["model.d_model=32", "model.mlp_hidden=48", "model.mixer_kwargs.striped_hyena.num_heads=2",
                 "data.seq_len=32", "data.num_kv_pairs=4"]
    cfg = preset(name, *small, *SCALED[name])
    model = LM(cfg.model.to_model_config(), rngs=nnx.Rngs(cfg.run.seed))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.data.vocab_size, (2, cfg.data.seq_len)), jnp.int32)
    graphdef, state = nnx.split(model)
    # one compiled program: an eager forward dispatches (and compiles) every primitive separately, ~2x slower here
    logits = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))(state, ids)
    assert logits.shape == (2, cfg.data.seq_len, cfg.model.to_model_config().padded_vocab_size)
    assert bool(jnp.all(jnp.isfinite(logits)))


# --- overrides -----------------------------------------------------------------------------------------------------

def test_override_types():
    cfg = load_config(None, ["optimizer.lr=1", "optimizer.eps=1e-6", "optimizer.weight_decay=0.0",
                             "model.d_model=96", "model.mlp=yes", "model.max_seq_len=none", "logging.name=123",
                             "run.distributed=false", "optimizer.clip_norm=null", "data.path=", "model.dtype=bfloat16"])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)  # int accepted for float
    assert cfg.optimizer.eps == 1e-6  # YAML 1.1 reads "1e-6" as a string; a float field parses it
    assert cfg.model.d_model == 96 and cfg.model.mlp is True and cfg.model.max_seq_len is None
    assert cfg.logging.name == "123"  # text field: the number stays text
    assert cfg.run.distributed is False and cfg.optimizer.clip_norm is None and cfg.data.path is None
    assert cfg.model.dtype == "bfloat16"
    # "0101" is an octal int to YAML 1.1; model.mlp takes it as the per-layer string.
    assert load_config(None, ["model.pattern=SASA", "model.mlp=0101"]).model.mlp == "0101"
    assert load_config(None, ["model.pattern=2222"]).model.pattern == "2222"
    # the last override of a key wins
    assert load_config(None, ["model.d_model=32", "model.d_model=48"]).model.d_model == 48


def test_override_nested_mappings():
    cfg = preset("tiny", "model.mixer_kwargs.attention.num_heads=2", "model.mixer_kwargs.attention.rope_base=500",
                 "data.task_kwargs.power_a=0.01", "data.task_kwargs.nested.x=[1, 2]")
    assert cfg.model.mixer_kwargs["attention"] == {"num_heads": 2, "rope_base": 500}
    assert cfg.model.mixer_kwargs["striped_hyena"] == preset("tiny").model.mixer_kwargs["striped_hyena"]  # kept
    assert cfg.data.task_kwargs == {"power_a": 0.01, "nested": {"x": [1, 2]}}
    assert cfg.model.to_model_config().blocks[1].mixer_kwargs["num_heads"] == 2
    # a new mixer kind on top of the defaults, and a whole mapping replaced
    cfg = load_config(None, ["model.pattern=MA", "model.mixer_kwargs.mamba.d_state=4"])
    assert cfg.model.mixer_kwargs == {"attention": {"num_heads": 4}, "striped_hyena": {"num_heads": 4},
                                      "mamba": {"d_state": 4}}
    cfg = load_config(None, ["model.pattern=A", "model.mixer_kwargs={attention: {num_heads: 2}}"])
    assert cfg.model.mixer_kwargs == {"attention": {"num_heads": 2}}
    # overrides on top of a YAML value that is null
    path_cfg = {"data": {"task_kwargs": None}}
    assert from_dict(apply_overrides(path_cfg, ["data.task_kwargs.a=1"])).data.task_kwargs == {"a": 1}


def test_yaml_merges_over_defaults(tmp_path):
    p = write_yaml(tmp_path, "model:\n  d_model: 32\noptimizer:\n  lr: 1e-3\nmesh:\nrun: {steps: 7}\n")
    cfg = load_config(p, ["run.seed=3"])
    assert cfg.model.d_model == 32 and cfg.model.pattern == ModelSection().pattern
    assert cfg.optimizer.lr == 1e-3 and cfg.mesh == MeshSection() and (cfg.run.steps, cfg.run.seed) == (7, 3)
    assert load_config(write_yaml(tmp_path, ""), []) == TrainConfig()  # an empty file = the defaults


# --- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (["model.d_modle=3"], r"unknown config key 'model.d_modle'; did you mean 'model.d_model'\?"),
    (["modle.d_model=3"], r"unknown config key 'modle.d_model'; did you mean 'model.d_model'\?"),
    (["optimizer.learning_rate=3"], r"unknown config key 'optimizer.learning_rate'; valid keys: optimizer.lr"),
    (["model.mixer_kwargs.attention.num_head=2"],
     r"unknown config key 'model.mixer_kwargs.attention.num_head'; did you mean "
     r"'model.mixer_kwargs.attention.num_heads'\?"),
    (["model.mixer_kwargs.atention.num_heads=2"],
     r"unknown config key 'model.mixer_kwargs.atention'; did you mean 'model.mixer_kwargs.attention'\?"),
    (["model.d_model"], r"malformed override 'model.d_model': expected section.key=value"),
    (["model=3"], r"malformed override 'model=3': the key must be section.key"),
    (["model..x=3"], r"malformed override 'model..x=3'"),
    (["model.d_model.x=1"], r"model.d_model is not a mapping, so it has no key 'x'"),
    (["model.mixer_kwargs.attention=3", "model.mixer_kwargs.attention.num_heads=2"],
     r"model.mixer_kwargs.attention is 3, not a mapping"),
    (["model.d_model=abc"], r"model.d_model must be int, got 'abc' \(str\)"),
    (["model.d_model=1.5"], r"model.d_model must be int, got 1.5 \(float\)"),
    (["model.d_model=[1"], r"cannot parse '\[1' as a value for model.d_model"),
    (["run.distributed=1"], r"run.distributed must be bool or null, got 1 \(int\)"),
    (["model.tie_embeddings=none"], r"model.tie_embeddings must be bool, got 'none'"),
    (["optimizer.lr=.nan"], r"optimizer.lr must be a finite number, got nan"),
])
def test_override_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_yaml_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'model.d_modle'; did you mean 'model.d_model'\?"):
        load_config(write_yaml(tmp_path, "model:\n  d_modle: 3\n"), [])
    with pytest.raises(ValueError, match=r"unknown config key 'optimiser'; did you mean 'optimizer'\?"):
        load_config(write_yaml(tmp_path, "optimiser:\n  lr: 1\n"), [])
    with pytest.raises(ValueError, match=r"model.pattern must be str, got 22 \(int\) \(quote it in YAML"):
        load_config(write_yaml(tmp_path, "model:\n  pattern: 22\n"), [])
    with pytest.raises(ValueError, match=r"config section 'model' must be a mapping, got 3"):
        load_config(write_yaml(tmp_path, "model: 3\n"), [])
    with pytest.raises(ValueError, match=r"must hold a mapping of sections .* got list"):
        load_config(write_yaml(tmp_path, "- 1\n"), [])
    with pytest.raises(ValueError, match=r"is not valid YAML"):
        load_config(write_yaml(tmp_path, "model: {d_model: [\n"), [])
    with pytest.raises(ValueError, match=r"config file '.*nope.yaml' not found"):
        load_config(str(tmp_path / "nope.yaml"), [])
    with pytest.raises(ValueError, match=r"data.task_kwargs keys must be strings, got 1 \(int\)"):
        load_config(write_yaml(tmp_path, "data:\n  task_kwargs: {1: 2}\n"), [])
    with pytest.raises(ValueError, match=r"a config must be a mapping of sections"):
        from_dict([1])


@pytest.mark.parametrize("overrides, match", [
    # model
    (["model.pattern=SX"], r"model.pattern 'SX' must be a non-empty string of the letters .*unknown letters \['X'\]"),
    (["model.pattern=''"], r"model.pattern '' must be a non-empty string"),
    (["model.mlp=011"], r"model.mlp '011' must be true, false or 2 characters of '0'/'1'"),
    (["model.vocab_size=0"], r"model.vocab_size must be > 0, got 0"),
    (["model.embed_init_std=0"], r"model.embed_init_std must be > 0, got 0.0"),
    (["model.norm_eps=-1"], r"model.norm_eps must be >= 0, got -1.0"),
    (["model.norm=rsm"], r"model.norm must be one of \('rms', 'rms_eps_outside', 'layer'\), got 'rsm'; "
                         r"did you mean 'rms'\?"),
    (["model.dtype=float64"], r"model.dtype must be one of \('float32', 'bfloat16', 'float16'\), got 'float64'"),
    (["model.param_dtype=half"], r"model.param_dtype must be one of"),
    (["model.mlp_activation=relu"], r"model.mlp_activation must be one of \('silu', 'gelu', 'gelu_tanh'\)"),
    (["model.mixer_kwargs={attention: {num_heads: 4}}"],
     r"model.mixer_kwargs.striped_hyena needs \['num_heads'\] \(model.pattern 'SA' has striped_hyena layers\)"),
    (["model.mixer_kwargs.attention=[1]"], r"model.mixer_kwargs.attention must be a mapping of Attention arguments"),
    (["model.mixer_kwargs.attention.d_model=3"], r"unknown config key 'model.mixer_kwargs.attention.d_model'"),
    (["model.pattern=HA"], r"model: hyena blocks \[0\] need l_max in mixer_kwargs or max_seq_len"),
    # data
    (["data.task=mqr"], r"data.task must be one of \(.*\), got 'mqr'; did you mean 'mqar'\?"),
    (["data.task=text"], r"data.path is required for data.task='text' \(a glob of text files\)"),
    (["data.task=memmap"], r"data.path is required for data.task='memmap' \(a .npy or .bin file of token ids\)"),
    (["data.tokenizer=gpt2"], r"data.tokenizer must be 'byte' or the path of a tokenizer.json, got 'gpt2'"),
    (["data.num_kv_pairs=40"], r"data.num_kv_pairs=40 needs data.seq_len >= 4 \* num_kv_pairs = 160 for mqar, "
                               r"got 128"),
    (["data.batch_size=0"], r"data.batch_size must be > 0, got 0"),
    (["data.num_train_examples=-5"], r"data.num_train_examples must be > 0, got -5"),
    (["data.worker_count=-1"], r"data.worker_count must be >= 0, got -1"),
    # optimizer
    (["optimizer.lr=0"], r"optimizer.lr must be > 0, got 0.0"),
    (["optimizer.b2=1"], r"optimizer.b2 must be in \[0, 1\), got 1.0"),
    (["optimizer.min_lr_ratio=1.5"], r"optimizer.min_lr_ratio must be in \[0, 1\], got 1.5"),
    (["optimizer.clip_norm=-1"], r"optimizer.clip_norm must be >= 0, got -1.0"),
    (["optimizer.warmup_steps=-1"], r"optimizer.warmup_steps must be >= 0, got -1"),
    (["optimizer.grad_accum_steps=0"], r"optimizer.grad_accum_steps must be > 0, got 0"),
    # mesh
    (["mesh.fsdp=-1"], r"at most one mesh axis may be -1 \(auto\), got \['data', 'fsdp'\]"),
    (["mesh.tensor=0"], r"mesh.tensor must be a positive int or -1 \(auto\), got 0"),
    # checkpoint, logging, run
    (["checkpoint.keep=0"], r"checkpoint.keep must be > 0, got 0"),
    (["checkpoint.every_steps=-1"], r"checkpoint.every_steps must be >= 0, got -1"),
    (["checkpoint.init_from=''"], r"checkpoint.init_from must be null or a path"),
    (["logging.name=a/b"], r"logging.name must be a plain directory name \(no path separators\), got 'a/b'"),
    (["logging.run_dir=''"], r"logging.run_dir must be a non-empty path"),
    (["logging.log_every=0"], r"logging.log_every must be > 0, got 0"),
    (["logging.eval_batches=0"], r"logging.eval_batches must be > 0, got 0"),
    (["run.steps=0"], r"run.steps must be > 0, got 0"),
    (["run.nonfinite=ignore"], r"run.nonfinite must be one of \('stop', 'skip'\), got 'ignore'"),
    (["run.coordinator_address=localhost"], r"run.coordinator_address must be 'host:port', got 'localhost'"),
    (["run.num_processes=2", "run.process_id=2"], r"run.process_id=2 must be < run.num_processes=2"),
    (["run.seed=-1"], r"run.seed must be >= 0, got -1"),
    # across sections
    (["model.max_seq_len=64"], r"data.seq_len=128 exceeds model.max_seq_len=64"),
    (["model.pattern=HA", "model.mixer_kwargs.hyena.l_max=64"],
     r"data.seq_len=128 exceeds model.mixer_kwargs.hyena.l_max=64"),
    (["model.vocab_size=100"], r"data.vocab_size=256 exceeds model.vocab_size=100 \(task 'mqar'"),
    (["optimizer.grad_accum_steps=3"], r"data.batch_size=32 must be divisible by optimizer.grad_accum_steps=3"),
])
def test_validation_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_validation_errors_direct_construction():
    with pytest.raises(ValueError, match=r"model.mixer_kwargs.attention.f holds <object object"):
        ModelSection(pattern="A", mixer_kwargs={"attention": {"num_heads": 4, "f": object()}})
    with pytest.raises(ValueError, match=r"optimizer.lr must be a finite number, got inf"):
        OptimizerSection(lr=float("inf"))
    with pytest.raises(ValueError, match=r"TrainConfig.data must be a DataSection, got dict"):
        TrainConfig(data={"task": "mqar"})
    with pytest.raises(ValueError, match=r"mesh.data must be int, got True \(bool\)"):
        MeshSection(data=True)
    with pytest.raises(ValueError, match=r"unknown config key 'data.seqlen'; did you mean 'data.seq_len'\?"):
        from_dict({"data": {"seqlen": 3}})


# --- dict round trip and run names ---------------------------------------------------------------------------------

def test_dict_round_trip(tmp_path):
    cfg = preset("mamba2_attn", "model.mixer_kwargs.mamba2.dt_limit=[0.0, .inf]", "data.task_kwargs.a.b=[1, x]",
                 "optimizer.clip_norm=null", "run.num_processes=2", "model.mlp=" + "1" * 24)
    d = to_dict(cfg)
    assert from_dict(d) == cfg
    assert from_dict(json.loads(json.dumps(d))) == cfg  # what a checkpoint stores
    p = tmp_path / "dumped.yaml"
    p.write_text(yaml.safe_dump(d))
    assert load_config(str(p), []) == cfg
    # tuples in a Python-built section become lists, so a config equals its round trip
    m = ModelSection(pattern="2", mixer_kwargs={"mamba2": {"A_init_range": (1.0, 8.0)}})
    assert m.mixer_kwargs["mamba2"]["A_init_range"] == [1.0, 8.0]
    full = TrainConfig(model=m)
    assert from_dict(json.loads(json.dumps(to_dict(full)))) == full
    # the dict is a copy: mutating it leaves the config alone
    d["model"]["mixer_kwargs"]["attention"]["num_heads"] = 1
    assert cfg.model.mixer_kwargs["attention"]["num_heads"] == 12
    # so is what the constructor stored
    src = {"attention": {"num_heads": 4}}
    m = ModelSection(pattern="A", mixer_kwargs=src)
    src["attention"]["num_heads"] = 3
    assert m.mixer_kwargs["attention"]["num_heads"] == 4


def test_run_name():
    base = preset("tiny")
    name = run_name(base)
    assert name.startswith("mqar-SA-d64-") and name == run_name(preset("tiny"))
    # the run length, mesh and logging do not change the experiment; the model, data, optimizer and seed do
    assert run_name(preset("tiny", "run.steps=10", "mesh.fsdp=2", "logging.log_every=1")) == name
    for o in ("model.d_model=32", "optimizer.lr=1e-3", "data.seed=1", "run.seed=1"):
        assert run_name(preset("tiny", o)) != name, o
    assert run_name(preset("tiny", "logging.name=mine")) == "mine"
    assert run_name(preset("mamba_130m")).startswith("text-Mx24-d768-")


def test_data_section_defaults_standalone():
    d = DataSection(task="text", path="x/*.txt")
    assert d.tokenizer == "byte" and d.pack is True and d.worker_count == 0
