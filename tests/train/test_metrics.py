"""Metrics file, FLOPs / MFU arithmetic, progress bar and plot of seqmix_jax.train.metrics."""

from __future__ import annotations

import io
import json
import math
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix_jax.models import LM
from seqmix_jax.models.config import pattern_config
from seqmix_jax.train import metrics as M


def _strict_loads(line: str):
    """json.loads that refuses the non-standard NaN / Infinity tokens, as strict parsers do."""
    def reject(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(line, parse_constant=reject)


# --- JSON lines ----------------------------------------------------------------------------------------------------

def test_jsonl_round_trip_with_nonfinite_values(tmp_path):
    run = tmp_path / "run"
    with M.MetricsWriter(run) as w:
        w.write(1, "train", {"loss": jnp.float32(2.5), "lr": np.float64(1e-3), "n": np.int32(7), "nan": math.nan,
                             "big": np.float32(np.inf), "neg": -math.inf, "flag": np.bool_(True), "note": "warm",
                             "arr": jnp.ones((1,)) * 0.25, "none": None})
        w.write(2, "eval", {"loss": float("nan"), "accuracy": 0.75})
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    raw = [_strict_loads(line) for line in lines]  # valid strict JSON
    assert raw[0]["nan"] == "nan" and raw[0]["big"] == "inf" and raw[0]["neg"] == "-inf"
    assert type(raw[0]["loss"]) is float and type(raw[0]["n"]) is int and raw[0]["flag"] is True
    recs = M.read_metrics(run)  # a directory resolves to its metrics.jsonl
    assert [r["step"] for r in recs] == [1, 2] and [r["split"] for r in recs] == ["train", "eval"]
    r = recs[0]
    assert r["loss"] == 2.5 and r["lr"] == 1e-3 and r["n"] == 7 and r["arr"] == 0.25 and r["note"] == "warm"
    assert math.isnan(r["nan"]) and r["big"] == math.inf and r["neg"] == -math.inf and r["none"] is None
    assert math.isnan(recs[1]["loss"]) and recs[1]["accuracy"] == 0.75
    assert all(isinstance(x["time"], float) for x in recs)


def test_resume_appends_and_partial_line_is_skipped(tmp_path):
    with M.MetricsWriter(tmp_path) as w:
        w.write(1, "train", {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "split": "tr')  # a process killed mid-line
    with M.MetricsWriter(tmp_path) as w:
        w.write(2, "train", {"loss": 0.5})
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable line\(s\) \[2\]"):
        recs = M.read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 0.5)]


def test_disabled_writer_writes_nothing(tmp_path, monkeypatch):
    w = M.MetricsWriter(tmp_path / "off", enabled=False)
    w.write(1, "train", {"loss": 1.0})
    w.flush()
    w.close()
    assert not (tmp_path / "off").exists()
    monkeypatch.setattr(M, "_process_index", lambda: 1)  # not process 0: silent even when enabled
    w = M.MetricsWriter(tmp_path / "p1")
    w.write(1, "train", {"loss": 1.0})
    w.close()
    assert not w.enabled and not (tmp_path / "p1").exists()


@pytest.mark.parametrize("args, match", [
    ((-1, "train", {}), r"step must be an int >= 0, got -1"),
    ((1.5, "train", {}), r"step must be an int >= 0, got 1.5"),
    ((1, "", {}), r"split must be a non-empty string"),
    ((1, "train", [1.0]), r"metrics must be a mapping"),
    ((1, "train", {"step": 3}), r"metric names \['step'\] are reserved"),
    ((1, "train", {"x": np.ones(3)}), r"metric 'x' must be a number or a one-element numeric array.*\(3,\)"),
    ((1, "train", {"x": object()}), r"metric 'x' must be a number"),
])
def test_write_errors(tmp_path, args, match):
    with M.MetricsWriter(tmp_path) as w:
        with pytest.raises(ValueError, match=match):
            w.write(*args)
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # nothing half-written


def test_write_after_close_and_missing_file(tmp_path):
    w = M.MetricsWriter(tmp_path)
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="is closed"):
        w.write(1, "train", {"loss": 1.0})
    with pytest.raises(ValueError, match="metrics file .*nope.jsonl' does not exist"):
        M.read_metrics(tmp_path / "nope.jsonl")


def test_tensorboard_missing_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
    monkeypatch.setattr(M, "_warned", set())
    with pytest.warns(UserWarning, match="tensorboardX package is not installed"):
        M.MetricsWriter(tmp_path / "a", tensorboard=True).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with M.MetricsWriter(tmp_path / "b", tensorboard=True) as w:  # second time: silent
            w.write(1, "train", {"loss": 1.0})
    assert len(M.read_metrics(tmp_path / "b")) == 1


def test_tensorboard_scalars_when_available(tmp_path, monkeypatch):
    calls = []

    class FakeSummaryWriter:
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    with M.MetricsWriter(tmp_path, tensorboard=True) as w:
        w.write(3, "eval", {"loss": 0.5, "accuracy": np.float32(0.25), "note": "x", "flag": True})
    assert calls[0] == ("init", str(tmp_path / "tensorboard"))
    assert calls[1:] == [("eval/loss", 0.5, 3), ("eval/accuracy", 0.25, 3), ("close",)]


# --- FLOPs ---------------------------------------------------------------------------------------------------------

V, D, F, L_SEQ = 37, 24, 40, 64


def _n_params(model) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_restated_on_tiny_llama(tied):
    """Parameters restated by hand for attention + SwiGLU layers, then 6 N + 12 h k l/2 per attention layer."""
    h, g, k, layers = 4, 2, 10, 2  # head_dim 10 != d/h on purpose
    cfg = pattern_config("AA", vocab_size=V, d_model=D, mlp=True, mlp_hidden=F, tie_embeddings=tied,
                         pad_vocab_size_multiple=8, mixer_kwargs={"attention": dict(num_heads=h, num_kv_heads=g,
                                                                                    head_dim=k)})
    vp = 40  # 37 padded to a multiple of 8
    per_layer = 2 * D + D * h * k + 2 * D * g * k + h * k * D + 3 * D * F  # norms, q, k, v, o, gate/up/down
    restated = vp * D + layers * per_layer + D + (0 if tied else D * vp)
    model = LM(cfg, rngs=nnx.Rngs(0))
    n = _n_params(model)
    print(f"params: model {n}, restated {restated}, count_params {M.count_params(cfg)}")
    assert n == restated == M.count_params(cfg)
    dense = layers * per_layer + D + D * vp  # everything but the embedding lookup, plus the head
    expected = 6 * dense + layers * 12 * h * k * L_SEQ / 2
    got = M.model_flops_per_token(cfg, L_SEQ)
    print(f"flops/token: got {got}, expected {expected}")
    assert got == expected
    assert M.model_flops_per_token(cfg, L_SEQ, n_params=n) == expected


def test_flops_per_token_hybrid_window_and_noncausal():
    """A hybrid: only attention layers add sequence terms; a sliding window and a non-causal layer change them."""
    cfg = pattern_config("MA2", vocab_size=V, d_model=D, mlp="010", mlp_hidden=F,
                         mixer_kwargs={"attention": dict(num_heads=3, window=16), "mamba": dict(d_state=4),
                                       "mamba2": dict(d_state=8, headdim=8)})
    n = _n_params(LM(cfg, rngs=nnx.Rngs(1)))
    w, hk = 16, D  # head_dim = 24 / 3, so h k = d
    expected = 6 * n + 12 * hk * (w - w * w / (2 * L_SEQ))  # tied: the table counts once, as the head
    got = M.model_flops_per_token(cfg, L_SEQ, n_params=n)
    print(f"hybrid flops/token: got {got}, expected {expected}")
    assert got == pytest.approx(expected, rel=1e-12)
    # a window at least as long as the sequence is plain causal attention
    assert M.model_flops_per_token(cfg, 16, n_params=n) == 6 * n + 12 * hk * 16 / 2
    full = pattern_config("A", vocab_size=V, d_model=D, mixer_kwargs={"attention": dict(num_heads=3, causal=False)})
    nf = _n_params(LM(full, rngs=nnx.Rngs(2)))
    assert M.model_flops_per_token(full, L_SEQ, n_params=nf) == 6 * nf + 12 * D * L_SEQ


def test_flops_errors():
    cfg = pattern_config("A", vocab_size=V, d_model=D, mixer_kwargs={"attention": dict(num_heads=3)})
    with pytest.raises(ValueError, match="model_config must be a ModelConfig, got dict"):
        M.model_flops_per_token({}, 8)
    with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
        M.model_flops_per_token(cfg, 0)
    with pytest.raises(ValueError, match=r"n_params must be an int >= .* = 888, got 10"):
        M.model_flops_per_token(cfg, 8, n_params=10)


# --- peak FLOPs and MFU --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("Some New Chip", None),
])
def test_peak_flops_table(kind, peak, monkeypatch):
    monkeypatch.delenv(M.PEAK_FLOPS_ENV, raising=False)
    assert M.peak_flops_per_device(types.SimpleNamespace(platform="gpu", device_kind=kind)) == peak


def test_peak_flops_cpu_and_env(monkeypatch):
    monkeypatch.delenv(M.PEAK_FLOPS_ENV, raising=False)
    assert M.peak_flops_per_device() is None  # the test machine's CPU
    monkeypatch.setenv(M.PEAK_FLOPS_ENV, "1.5e12")
    assert M.peak_flops_per_device() == 1.5e12
    monkeypatch.setenv(M.PEAK_FLOPS_ENV, "fast")
    with pytest.raises(ValueError, match="SEQMIX_PEAK_FLOPS must be a positive number of FLOP/s, got 'fast'"):
        M.peak_flops_per_device()
    monkeypatch.setenv(M.PEAK_FLOPS_ENV, "-1")
    with pytest.raises(ValueError, match="SEQMIX_PEAK_FLOPS must be a positive"):
        M.peak_flops_per_device()


def test_mfu_arithmetic():
    # 50k tokens/s * 6e9 FLOPs/token = 3e14 FLOP/s over 4 chips of 1e14 peak -> 0.75
    assert M.mfu(5e4, 6e9, 4, 1e14) == pytest.approx(0.75, rel=1e-15)
    assert M.mfu(5e4, 6e9, 1, None) is None
    with pytest.raises(ValueError, match="n_devices must be a positive int, got 0"):
        M.mfu(1.0, 1.0, 0, 1.0)
    with pytest.raises(ValueError, match="tokens_per_s must be a number >= 0, got -1"):
        M.mfu(-1, 1.0, 1, 1.0)
    with pytest.raises(ValueError, match="peak must be a positive number of FLOP/s or None, got 0"):
        M.mfu(1.0, 1.0, 1, 0)


# --- progress ------------------------------------------------------------------------------------------------------

def test_progress_rates_and_postfix_without_tty(monkeypatch):
    clock = iter([10.0, 12.0, 13.0, 15.0])
    monkeypatch.setattr(M.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()  # not a TTY
    p = M.Progress(10, initial=2, flops_per_token=1e6, n_devices=2, peak_flops=4e9, window=3, file=out)
    p.update(3, jnp.float32(3.25), tokens=1000)  # t=10: one point, no rate yet (compilation excluded)
    assert p.rates() == {}
    p.update(4, 3.0, tokens=1000)  # t=12: 1000 tokens in 2 s
    assert p.tokens_per_s == 500.0 and p.mfu == pytest.approx(500 * 1e6 / 8e9)
    p.update(5, 2.0, tokens=2000)  # t=13: 3000 tokens since t=10
    assert p.tokens_per_s == 1000.0
    p.update(7, 1.0, tokens=4000)  # t=15: the window of 3 drops t=10: 6000 tokens since t=12
    assert p.rates() == {"tokens_per_s": 2000.0, "mfu": pytest.approx(2000 * 1e6 / 8e9)}
    p.write("eval done")
    p.close()
    text = out.getvalue()
    print(repr(text))
    assert "loss=3.25" in text and "7/10" in text and "eval done" in text and "\x1b" not in text
    assert text.rstrip().endswith("loss=1 tok/s=2,000 mfu=25.0%]")  # close() shows the latest values


def test_progress_disabled_and_errors(monkeypatch):
    out = io.StringIO()
    p = M.Progress(5, enabled=False, file=out)
    p.update(1, 1.0, tokens=10)
    p.update(2, 1.0, tokens=10)
    assert p.tokens_per_s is not None and p.mfu is None  # rates still measured; no FLOPs -> no MFU
    p.write("hidden")
    p.close()
    assert out.getvalue() == ""
    monkeypatch.setattr(M, "_process_index", lambda: 3)
    p = M.Progress(5, file=out)
    p.update(1, 1.0, tokens=1)
    p.close()
    assert out.getvalue() == "" and not p.enabled
    with pytest.raises(ValueError, match="window must be an int >= 2"):
        M.Progress(5, window=1, file=out)
    with pytest.raises(ValueError, match="total must be an int >= 0, got -5"):
        M.Progress(-5, file=out)
    with pytest.raises(ValueError, match="n_devices must be a positive int"):
        M.Progress(5, n_devices=0, file=out)
    p = M.Progress(5, initial=3, enabled=False, file=out)
    with pytest.raises(ValueError, match="step must be an int >= the previous step 3, got 2"):
        p.update(2, 1.0, tokens=1)
    with pytest.raises(ValueError, match="tokens must be an int >= 0, got -1"):
        p.update(4, 1.0, tokens=-1)


# --- plot ----------------------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_png(tmp_path):
    with M.MetricsWriter(tmp_path) as w:
        for s in range(1, 21):
            w.write(s, "train", {"loss": 3.0 / s})
            if s % 5 == 0:
                w.write(s, "eval", {"loss": 3.5 / s, "accuracy": s / 20})
        w.write(20, "eval", {"loss": math.nan, "accuracy": 1.0})  # a resumed run's repeat, and a NaN
    out = M.plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots" / "metrics.png")
    data = out.read_bytes()
    print(f"png bytes: {len(data)}")
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    series = M._series(M.read_metrics(tmp_path), "accuracy")
    assert list(series) == ["eval"] and series["eval"] == ([5, 10, 15, 20], [0.25, 0.5, 0.75, 1.0])


def test_plot_with_missing_series(tmp_path):
    with M.MetricsWriter(tmp_path / "a") as w:
        w.write(1, "train", {"loss": 1.0})  # no eval, no accuracy
    assert M.plot_metrics(tmp_path / "a", tmp_path / "a.png").read_bytes()[:8] == PNG_SIGNATURE
    M.MetricsWriter(tmp_path / "b").close()  # an empty file
    assert M.plot_metrics(tmp_path / "b", tmp_path / "b.png").read_bytes()[:8] == PNG_SIGNATURE
