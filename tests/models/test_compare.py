"""`python -m seqmix_jax.compare`: tiny random transformers Llama / Mamba and a stripedhyena model saved to disk,
compared in PyTorch and seqmix_jax.

  * a faithful checkpoint: exit 0, every row (3 layers + logits) within 1e-5 relative max error, in-process and
    through `python -m` once; bfloat16 within its default tolerance;
  * a PyTorch model whose block k (of 3) was perturbed in memory after saving: the report names layer k as the
    first to diverge (layers before it pass), exit code 1, the table marks that row;
  * bad input (missing directory, unsupported / mamba_ssm config, bad arguments, a missing PyTorch package):
    exit 2 with one line on stderr; the library errors are ValueErrors naming the value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seqmix_jax import compare
from tests.parity import torch_refs

FP32_TOL = 1e-5  # the whole-model parity tolerance; the CLI's default (1e-4) is looser
LAYERS, K = 3, 1  # three blocks, the middle one perturbed


def _save_hf(kind: str, path: Path) -> Path:
    torch = torch_refs.torch()
    tf = torch_refs.require("transformers")
    torch.manual_seed(0)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=12, attention_bias=True,
                             max_position_embeddings=64, tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(cfg)
    else:
        cfg = tf.MambaConfig(vocab_size=53, hidden_size=24, state_size=5, num_hidden_layers=LAYERS, expand=2,
                             conv_kernel=4, time_step_rank=3, tie_word_embeddings=True)
        model = tf.MambaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move norms and biases off their init so a mis-mapped one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return {kind: _save_hf(kind, root / kind) for kind in ("llama", "mamba")}


def _print_rows(report):
    print(compare.format_table(report))


def _perturb_layer(k):
    def hook(model):
        torch = torch_refs.torch()
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in compare.torch_layers(model)[k].parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
    return hook


@pytest.mark.parametrize("kind", ["llama", "mamba"])
def test_faithful_checkpoint_passes(ckpts, tmp_path, capsys, kind):
    out = tmp_path / "report.json"
    code = compare.main([str(ckpts[kind]), "--tokens", "11", "--batch", "2", "--json", str(out)])
    table = capsys.readouterr().out
    print(table)
    assert code == 0
    report = json.loads(out.read_text())
    assert report["format"] == kind and report["shape"] == [2, 11] and report["dtype"] == "float32"
    assert report["tol"] == compare.DEFAULT_TOL["float32"] and report["ok"] and report["first_divergent"] is None
    assert [r["layer"] for r in report["layers"]] == list(range(LAYERS))
    for r in report["layers"] + [report["logits"]]:
        assert r["max_rel"] <= FP32_TOL and r["mean_rel"] <= FP32_TOL, r
        assert 0 <= r["mean_abs"] <= r["max_abs"]
    for name in ("layer 0", f"layer {LAYERS - 1}", "logits", "OK"):
        assert name in table
    assert "above tol" not in table


def test_cli_subprocess(ckpts, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "seqmix_jax.compare", str(ckpts["llama"]), "--text", "hello, world"],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    print(proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == 0
    assert "llama, float32, batch 1, 12 tokens" in proc.stdout and "OK: every row within tolerance" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("layer", "logits"))]
    assert len(rows) == LAYERS + 1
    assert max(float(r[-2]) for r in rows) < FP32_TOL  # max rel column
    assert proc.stderr.strip() == "", proc.stderr  # transformers' notices and progress bars are silenced


@pytest.mark.parametrize("kind", ["llama", "mamba"])
def test_perturbed_layer_is_first_to_diverge(ckpts, kind):
    report = compare.compare_checkpoint(ckpts[kind], tokens=13, torch_model_hook=_perturb_layer(K))
    _print_rows(report)
    assert not report["ok"]
    assert report["first_divergent"] == f"layer {K}" and report["first_divergent_layer"] == K
    assert all(r["ok"] and r["max_rel"] <= FP32_TOL for r in report["layers"][:K])
    assert not report["layers"][K]["ok"] and report["layers"][K]["max_rel"] > 1e-3
    assert not report["logits"]["ok"]


def test_main_exit_1_marks_the_first_divergent_layer(ckpts, capsys, monkeypatch):
    load = compare.load_torch_model
    monkeypatch.setattr(compare, "load_torch_model",
                        lambda path, **kw: _apply(_perturb_layer(K), load(path, **kw)))
    code = compare.main([str(ckpts["mamba"])])
    table = capsys.readouterr().out
    print(table)
    assert code == 1
    marked = [line for line in table.splitlines() if "<- first above tol" in line]
    assert len(marked) == 1 and marked[0].startswith(f"layer {K}")
    assert f"FAIL: layer {K} is the first row above tol" in table


def _apply(hook, model):
    hook(model)
    return model


def test_bfloat16_both_sides(ckpts, capsys):
    code = compare.main([str(ckpts["llama"]), "--dtype", "bfloat16"])
    print(capsys.readouterr().out)
    assert code == 0
    report = compare.compare_checkpoint(ckpts["llama"], dtype="bfloat16")
    assert report["tol"] == compare.DEFAULT_TOL["bfloat16"]
    # two bfloat16 runs differ by bfloat16 rounding (eps 2^-8), not by fp32 round-off
    assert 1e-5 < report["logits"]["max_rel"] <= report["tol"]


def test_tight_tol_fails_on_round_off(ckpts, capsys):
    assert compare.main([str(ckpts["llama"]), "--tol", "1e-12"]) == 1
    assert "<- first above tol" in capsys.readouterr().out.splitlines()[2]  # layer 0, the first row


def test_striped_hyena_matches(tmp_path):
    torch = torch_refs.torch()
    from tests.parity.test_lm_parity import SH_CFG, _sh_model  # imports stripedhyena with its CPU stand-ins

    ref = _sh_model(SH_CFG)
    d = tmp_path / "sh"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SH_CFG))
    torch.save({"backbone." + k: v for k, v in ref.state_dict().items()}, d / "model.pt")
    report = compare.compare_checkpoint(d, tokens=17, seed=3)
    _print_rows(report)
    assert report["ok"] and report["format"] == "stripedhyena" and len(report["layers"]) == SH_CFG["num_layers"]
    for r in report["layers"] + [report["logits"]]:
        assert r["max_rel"] <= FP32_TOL, r


# ------------------------------------------------------------------ bad input

def _one_line_error(capsys, argv, match):
    code = compare.main(argv)
    cap = capsys.readouterr()
    with capsys.disabled():  # keep the printed line out of the next call's captured output
        print(cap.err.strip())
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqmix_jax.compare: error:") and match in lines[0], cap.err
    assert "Traceback" not in cap.err and cap.out == ""


def test_bad_input_exit_2(ckpts, tmp_path, capsys):
    _one_line_error(capsys, [str(tmp_path / "nope")], "checkpoint directory not found")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _one_line_error(capsys, [str(gpt2)], "unsupported model_type 'gpt2'")
    ssm = tmp_path / "mamba_ssm"
    ssm.mkdir()
    (ssm / "config.json").write_text(json.dumps({"d_model": 8, "n_layer": 1, "vocab_size": 11}))
    _one_line_error(capsys, [str(ssm)], "mamba_ssm-format checkpoints")
    _one_line_error(capsys, [str(ckpts["llama"]), "--dtype", "float16"], "invalid choice: 'float16'")
    _one_line_error(capsys, [str(ckpts["llama"]), "--tokens", "0"], "tokens must be >= 1")
    _one_line_error(capsys, [str(ckpts["llama"]), "--text", ""], "text must not be empty")
    _one_line_error(capsys, [str(ckpts["llama"]), "--tol", "-1"], "tol must be a positive number")
    _one_line_error(capsys, [str(ckpts["llama"]), "--tokens", "65"], "65 tokens exceed the model's max_seq_len=64")
    _one_line_error(capsys, [], "the following arguments are required: checkpoint")


def test_missing_torch_package_exit_2(ckpts, capsys, monkeypatch):
    torch_refs.require("transformers")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    _one_line_error(capsys, [str(ckpts["llama"])], "needs the PyTorch reference package 'transformers'")


def test_library_errors(ckpts):
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'bfloat16'\), got 'float16'"):
        compare.compare_checkpoint(ckpts["llama"], dtype="float16")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=61\), got min 0, max 61"):
        compare.compare_checkpoint(ckpts["llama"], tokens=np.array([0, 61]))
    with pytest.raises(ValueError, match="tokens must be a length"):
        compare.compare_checkpoint(ckpts["llama"], tokens=np.zeros((1, 2, 3), np.int64))
    with pytest.raises(ValueError, match="batch must be a positive int, got 0"):
        compare.compare_checkpoint(ckpts["llama"], batch=0)
    with pytest.raises(ValueError, match=r"shape mismatch: seqmix \(2, 3\) vs PyTorch \(2, 4\)"):
        compare.error_stats(np.zeros((2, 3)), np.zeros((2, 4)))


def test_make_ids():
    ids = compare.make_ids(7, text="ab", batch=2)
    np.testing.assert_array_equal(ids, [[97 % 7, 98 % 7]] * 2)
    a, b = compare.make_ids(50, tokens=9, seed=4), compare.make_ids(50, tokens=9, seed=4)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 9) and a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(compare.make_ids(50, tokens=[3, 4]), [[3, 4]])
