"""The generation CLI (`python -m seqmix_jax.generate`, seqmix_jax/cli/generate.py): the greedy completion equals an
independent argmax loop over the full forward of the saved model, decoded as UTF-8 bytes or with a tokenizer.json
(and its config eos_token_id); the byte tokenizer restated; every bad input is one stderr line with exit code 2;
a real `python -m` subprocess; and `seqmix_jax.generate` stays the generate function whether the CLI module runs
with -m or is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix_jax.cli import generate as cli
from seqmix_jax.models import LM, llama_preset, save_pretrained
from tests.parity import torch_refs

ROOT = Path(__file__).resolve().parents[2]
MAX_POS = 64
NEW = 6


def tiny_llama(vocab=256, seed=0):
    cfg = llama_preset(vocab_size=vocab, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                       embed_init_std=1.0)
    return LM(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_llama()
    path = save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "byte_llama")
    return model, path


def run_main(capsys, *argv):
    before = capsys.readouterr()  # the test's own prints so far: pass them on, keep them out of the CLI's output
    with capsys.disabled():
        sys.stdout.write(before.out)
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def expected_new_ids(model, ids, n):
    """The definition of greedy decoding: n times append the argmax of the full forward's last logits (over the
    real vocabulary). One jitted forward on a fixed-size buffer; causality makes the unwritten tail irrelevant."""
    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    buf = np.zeros((1, len(ids) + n), np.int32)
    buf[0, :len(ids)] = ids
    for i in range(n):
        logits = np.asarray(fwd(params, jnp.asarray(buf)))[0, len(ids) + i - 1, :model.config.vocab_size]
        buf[0, len(ids) + i] = logits.argmax()
    return [int(t) for t in buf[0, len(ids):]]


def test_byte_tokenizer_restated():
    tok = cli.ByteTokenizer()
    assert tok.encode("hé€") == [104, 0xC3, 0xA9, 0xE2, 0x82, 0xAC]
    # valid UTF-8 runs decode; a lone 0xFF and an id >= 256 (no byte) each become U+FFFD
    assert tok.decode([104, 105, 0xE2, 0x82, 0xAC, 300, 0xFF, 33]) == "hi€\ufffd\ufffd!"
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # truncated sequence


def test_greedy_bytes_equals_full_forward_argmax(saved, capsys):
    model, path = saved
    prompt = "Hi there"
    rc, out, err = run_main(capsys, "--checkpoint", path, "--prompt", prompt, "--max-new-tokens", NEW)
    assert rc == 0, err
    new = expected_new_ids(model, list(prompt.encode()), NEW)
    print("new ids", new)
    assert out == bytes(new).decode("utf-8", errors="replace") + "\n"
    assert err == ""


def test_tokenizer_json_and_config_eos(tmp_path, capsys):
    tokenizers = torch_refs.require("tokenizers")  # fails under CI when missing, skips locally
    model = tiny_llama(seed=1)
    vocab = {f"t{i}": i for i in range(256)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    prompt, ids = "t5 t17 t3 t200", [5, 17, 3, 200]
    new = expected_new_ids(model, ids, NEW)
    print("new ids", new)
    eos = new[3]
    cut = new[:new.index(eos)]
    path = save_pretrained(model, tmp_path / "ck", extra_config={"eos_token_id": eos})
    tok.save(str(path / "tokenizer.json"))
    assert tok.encode(prompt).ids == ids
    rc, out, err = run_main(capsys, "--checkpoint", path, "--prompt", prompt, "--max-new-tokens", NEW)
    assert rc == 0, err
    assert out == " ".join(f"t{i}" for i in cut) + "\n"  # stops before config.json's eos_token_id
    # an explicit --eos-id that never occurs: the full completion
    never = next(i for i in range(256) if i not in new)
    rc, out, _ = run_main(capsys, "--checkpoint", path, "--prompt", prompt, "--max-new-tokens", NEW, "--eos-id", never)
    assert rc == 0 and out == " ".join(f"t{i}" for i in new) + "\n"
    # --tokenizer bytes ignores tokenizer.json
    rc, out, _ = run_main(capsys, "--checkpoint", path, "--prompt", "ab", "--max-new-tokens", 2, "--tokenizer", "bytes")
    assert rc == 0 and out == bytes(expected_new_ids(model, [97, 98], 2)).decode("utf-8", "replace") + "\n"


def _bad_dirs(tmp, saved_path):
    no_config = tmp / "no_config"
    no_config.mkdir()
    truncated = tmp / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((saved_path / "config.json").read_text())
    (truncated / "model.safetensors").write_bytes((saved_path / "model.safetensors").read_bytes()[:100])
    small = save_pretrained(tiny_llama(vocab=61), tmp / "small_vocab")
    no_tok = tmp / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((saved_path / f).read_bytes())
    bad_tok = tmp / "bad_tok"
    bad_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bad_tok / f).write_bytes((saved_path / f).read_bytes())
    (bad_tok / "tokenizer.json").write_text("{not json")
    return dict(no_config=no_config, truncated=truncated, small=small, no_tok=no_tok, bad_tok=bad_tok)


BAD = {
    "missing dir": (lambda d, p: ["--checkpoint", d["no_config"] / "nope", "--prompt", "x"],
                    "checkpoint directory not found"),
    "no config": (lambda d, p: ["--checkpoint", d["no_config"], "--prompt", "x"], "cannot load checkpoint.*config"),
    "truncated weights": (lambda d, p: ["--checkpoint", d["truncated"], "--prompt", "x"], "cannot load checkpoint"),
    "prompt too long": (lambda d, p: ["--checkpoint", p, "--prompt", "x" * (MAX_POS + 1)],
                        f"prompt is {MAX_POS + 1} tokens, longer than the model's maximum max_seq_len={MAX_POS}"),
    "prompt + new too long": (lambda d, p: ["--checkpoint", p, "--prompt", "x" * 60, "--max-new-tokens", "10"],
                              "exceeds the model's max_seq_len=64"),
    "vocab < 256": (lambda d, p: ["--checkpoint", d["small"], "--prompt", "x"], "needs vocab_size >= 256.*61"),
    "empty prompt": (lambda d, p: ["--checkpoint", p, "--prompt", ""], "prompt is empty"),
    "bad top_p": (lambda d, p: ["--checkpoint", p, "--prompt", "x", "--top-p", "1.5"], "top_p must be"),
    "negative new tokens": (lambda d, p: ["--checkpoint", p, "--prompt", "x", "--max-new-tokens", "-1"],
                            "max_new_tokens must be"),
    "argparse": (lambda d, p: ["--checkpoint", p, "--max-new-tokens", "many"], "invalid int value|required"),
    "hf without tokenizer.json": (lambda d, p: ["--checkpoint", d["no_tok"], "--prompt", "x", "--tokenizer", "hf"],
                                  "no tokenizer.json"),
    "corrupt tokenizer.json": (lambda d, p: ["--checkpoint", d["bad_tok"], "--prompt", "x"], "cannot read .*tokenizer"),
}


def test_bad_input_one_line_exit_2(saved, tmp_path, capsys):
    import re

    _, path = saved
    dirs = _bad_dirs(tmp_path, path)
    capsys.readouterr()
    for name, (argv, pattern) in BAD.items():
        rc, out, err = run_main(capsys, *argv(dirs, path))
        print(f"{name}: {err.strip()}")
        assert rc == 2, name
        assert out == "", name
        assert err.count("\n") == 1 and err.startswith(cli.PROG + ": error: "), (name, err)
        assert re.search(pattern, err), (name, err)


def test_missing_tokenizers_package(saved, tmp_path, capsys, monkeypatch):
    _, path = saved
    d = tmp_path / "with_tok"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        (d / f).write_bytes((path / f).read_bytes())
    (d / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    rc, out, err = run_main(capsys, "--checkpoint", d, "--prompt", "x")
    print(err.strip())
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "needs the `tokenizers` package" in err and "--tokenizer bytes" in err


def _python(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
                          **kw)


def test_python_dash_m_subprocess(saved, capsys):
    model, path = saved
    r = _python("-m", "seqmix_jax.generate", "--checkpoint", str(path), "--prompt", "abc", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout == bytes(expected_new_ids(model, [97, 98, 99], 5)).decode("utf-8", "replace") + "\n"
    r = _python("-m", "seqmix_jax.generate", "--checkpoint", str(path / "missing"), "--prompt", "abc")
    print(r.stderr)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "checkpoint directory not found" in r.stderr


def test_package_attribute_stays_the_function():
    script = textwrap.dedent("""
        import contextlib, io, runpy, sys
        import numpy as np
        from flax import nnx
        import seqmix_jax
        from seqmix_jax.models import LM, generate as fn, llama_preset
        assert seqmix_jax.generate is fn, seqmix_jax.generate
        # what `python -m seqmix_jax.generate` does: run as __main__, never imported as seqmix_jax.generate
        sys.argv = ["seqmix_jax.generate", "--help"]
        with contextlib.redirect_stdout(io.StringIO()) as buf:
            try:
                runpy.run_module("seqmix_jax.generate", run_name="__main__", alter_sys=True)
            except SystemExit as e:
                assert e.code == 0, e.code
        assert "--checkpoint" in buf.getvalue()
        assert seqmix_jax.generate is fn and "seqmix_jax.generate" not in sys.modules
        # an explicit import rebinds the attribute to the module, which stays callable as the function
        import seqmix_jax.generate as mod
        from seqmix_jax.cli.generate import main
        assert seqmix_jax.generate is mod and mod.main is main
        m = LM(llama_preset(vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                            num_attention_heads=2), rngs=nnx.Rngs(0))
        ids = np.array([[1, 2, 3]], np.int32)
        a = np.asarray(seqmix_jax.generate(m, ids, max_new_tokens=4))
        b = np.asarray(fn(m, ids, max_new_tokens=4))
        assert a.shape == (1, 7) and (a == b).all(), (a, b)
        print("ok")
    """)
    r = _python("-c", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
