"""The train loop in process (the test process has 8 fake CPU devices; the mesh takes them all as data=8):
gradient accumulation equals the whole batch and the head computed only at weighted positions gives the full head's
loss (one shared base run), bf16 compute keeps float32 master weights, and the head positions cover every weighted
token."""

from __future__ import annotations

import numpy as np
import pytest

from seqmix_jax.train.config import load_config
from seqmix_jax.train.loop import _head_positions, train
from seqmix_jax.train.metrics import read_metrics

BASE = ["model.pattern=2A", "model.d_model=32", "model.mlp_hidden=64",
        "model.mixer_kwargs={attention: {num_heads: 2}, mamba2: {d_state: 16, headdim: 16, chunk_size: 8}}",
        "model.vocab_size=64", "data.vocab_size=64", "data.seq_len=32", "data.batch_size=16", "data.num_kv_pairs=4",
        "data.num_test_examples=16", "optimizer.warmup_steps=1", "run.steps=3", "checkpoint.every_steps=0",
        "logging.progress=false", "logging.plot=false", "logging.log_every=1", "logging.eval_every=0"]


def _losses(tmp_path, name, *extra):
    cfg = load_config(None, BASE + [f"logging.run_dir={tmp_path}", f"logging.name={name}", *extra])
    result = train(cfg)
    rows = {m["step"]: m for m in read_metrics(result.run_dir) if m["split"] == "train"}
    return np.array([rows[s]["loss"] for s in sorted(rows)]), result


def test_accumulation_and_the_sparse_head_equal_the_plain_run(tmp_path):
    """One base run (whole batch, head only at weighted positions) against two variants of it: gradient accumulation
    over 2 micro-batches, and the head on every position. All three must log the same losses."""
    base, _ = _losses(tmp_path, "base")
    accum, _ = _losses(tmp_path, "accum", "optimizer.grad_accum_steps=2")
    full, _ = _losses(tmp_path, "full", "model.head_only_at_weights=false")
    assert len(base) == 3
    for name, other in (("grad accumulation x2", accum), ("head on every position", full)):
        err = np.abs(other - base) / np.abs(base)
        print(f"base losses {base}, {name} {other}: max rel err {err.max():.2e} mean {err.mean():.2e}")
        assert err.max() < 1e-5, name


def test_bf16_compute_keeps_float32_master_weights(tmp_path):
    import jax
    import orbax.checkpoint as ocp

    losses, result = _losses(tmp_path, "bf16", "model.dtype=bfloat16")
    print("bf16 losses", losses)
    assert np.all(np.isfinite(losses))
    meta = ocp.StandardCheckpointer().metadata(result.run_dir / "checkpoints" / "3" / "state")
    dtypes = {str(getattr(x, "dtype", None)) for x in jax.tree.leaves(meta.item_metadata["params"]
                                                                       if hasattr(meta, "item_metadata") else meta)}
    print("stored param dtypes", dtypes)
    assert dtypes == {"float32"}


def test_head_positions_cover_every_weighted_token():
    rng = np.random.default_rng(0)
    w = (rng.random((4, 64)) < 0.1).astype(np.float32)
    w[2] = 0.0
    idx = _head_positions({"weights": w}, 64)
    assert idx.shape[1] == max(8, 1 << (int(w.sum(1).max()) - 1).bit_length())
    for row in range(4):
        assert set(np.flatnonzero(w[row])) <= set(idx[row].tolist())
    wide = np.ones((2, 64), np.float32)
    assert _head_positions({"weights": wide}, 64) is None  # more than half the row: the head runs everywhere


def test_bad_grad_accum_split_is_a_clear_error(tmp_path):
    cfg = load_config(None, BASE + [f"logging.run_dir={tmp_path}", "optimizer.grad_accum_steps=4"])
    with pytest.raises(ValueError, match="grad_accum_steps"):
        train(cfg)
    assert not any(tmp_path.iterdir())
