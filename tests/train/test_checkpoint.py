"""Checkpointer: exact round trips, keep-last-K, async saves, damaged-step fallback, NaN refusal, restore
across device layouts (8 fake CPU devices <-> 1), and never clobbering a directory it does not own."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from seqmix_jax.train import checkpoint as ckpt_lib
from seqmix_jax.train.checkpoint import Checkpointer, check_compatible, check_directory

# orbax leaves a failed read's coroutines un-awaited; Python reports them (at a later garbage collection,
# possibly during another test) as unraisable exceptions
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
CONFIG = {"model": {"d_model": 64, "pattern": ["hyena", "attention"], "vocab": 256}, "optimizer": {"lr": 3e-3}}


def _mesh8() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))


def _one() -> SingleDeviceSharding:
    return SingleDeviceSharding(jax.devices()[0])


def _state(seed: int, sharded: bool = True) -> dict:
    """A train-state-like pytree: sharded float32/bf16 params, Adam moments, a step, RNG key data, a typed key."""
    rng = np.random.default_rng(seed)
    big = NamedSharding(_mesh8(), P("data", "fsdp")) if sharded else _one()
    rep = NamedSharding(_mesh8(), P()) if sharded else _one()
    w = rng.standard_normal((24, 40), np.float32)
    put = jax.device_put
    return {
        "params": {"w": put(w, big), "b": put(rng.standard_normal(40, np.float32).astype(jnp.bfloat16), rep)},
        "opt": {"mu": put(w * 0.1, big), "count": put(np.int32(seed), rep)},
        "step": put(np.int32(100 + seed), rep),
        "rng": put(np.asarray(jax.random.key_data(jax.random.PRNGKey(seed))), rep),
        "key": jax.random.key(seed),
    }


def _raw(x) -> np.ndarray:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _assert_bitwise(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        rx, ry = _raw(x), _raw(y)
        assert rx.tobytes() == ry.tobytes(), "restored leaf differs bitwise"


def _save(ck: Checkpointer, step: int, seed: int | None = None, **kw) -> dict:
    state = _state(step if seed is None else seed)
    assert ck.save(step, state=state, data_state={"next_index": step * 7}, config=CONFIG, **kw)
    return state


def test_round_trip_bitwise(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep=3)
    state = _state(1)
    data = {"next_index": 17, "epoch": 2, "nested": {"seed": [1, 2, 3]}}
    assert ck.save(5, state=state, data_state=data, config=CONFIG, meta={"loss": 1.25})
    ck.wait()
    out = ck.restore(state)  # into the same shardings
    _assert_bitwise(out.state, state)
    assert out.data_state == data and out.config == CONFIG
    assert out.meta["step"] == 5 and out.meta["loss"] == 1.25 and "jax" in out.meta["versions"]
    assert out.state["params"]["w"].sharding == state["params"]["w"].sharding
    ck.close()
    # a new Checkpointer on the same directory sees it (no construction side effects), bytes data state too
    ck2 = Checkpointer(tmp_path / "ck")
    assert ck2.steps() == [5] and ck2.latest_step() == 5
    assert ck2.save(6, state=state, data_state=b"\x00grain\xff", config=CONFIG)
    assert ck2.restore(state).data_state == b"\x00grain\xff"
    assert ck2.read_config() == CONFIG
    ck2.close()


def test_async_save_then_wait(tmp_path):
    ck = Checkpointer(tmp_path, keep=None, async_save=True)
    state = _state(3)
    t0 = time.perf_counter()
    ck.save(1, state=state, data_state=None, config=CONFIG)
    blocking = time.perf_counter() - t0
    ck.wait()
    print(f"async save: {blocking * 1e3:.1f} ms blocking, {(time.perf_counter() - t0) * 1e3:.1f} ms total")
    assert sorted(os.listdir(tmp_path)) == ["1"]  # committed: the temporary directory was renamed
    out = ck.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
    _assert_bitwise(out.state, state)
    assert out.data_state is None
    ck.close()


def test_keep_last_k_deletes_only_after_a_newer_commit(tmp_path):
    ck = Checkpointer(tmp_path, keep=2, async_save=True)
    for step in (1, 2):
        _save(ck, step)
    ck.wait()
    assert ck.steps() == [1, 2]
    _save(ck, 3)
    assert 1 in [int(n.split(".")[0]) for n in os.listdir(tmp_path)]  # step 3 not confirmed: nothing deleted
    ck.wait()
    assert ck.steps() == [2, 3]
    _save(ck, 4)
    ck.close()
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]
    # constructing on a directory with more steps than `keep` deletes nothing
    ck = Checkpointer(tmp_path, keep=1)
    assert ck.steps() == [3, 4]
    ck.close()
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]


def test_should_save_schedule(tmp_path):
    ck = Checkpointer(tmp_path, every_steps=10, async_save=False)
    assert [s for s in range(0, 31) if ck.should_save(s)] == [0, 10, 20, 30]
    state = _state(0)
    assert not ck.save(7, state=state, data_state=None, config=CONFIG)  # off schedule
    assert ck.steps() == []
    assert ck.save(7, state=state, data_state=None, config=CONFIG, force=True)  # e.g. on SIGTERM
    assert not ck.should_save(7)
    assert not ck.save(7, state=_state(9), data_state=None, config=CONFIG, force=True)  # never overwrites
    _assert_bitwise(ck.restore(state).state, state)
    ck.close()


def _damage(step_dir: Path, how: str) -> None:
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest = files[-1]
    if how == "delete_chunk":
        biggest.unlink()
    elif how == "truncate_chunk":
        with open(biggest, "r+b") as f:
            f.truncate(biggest.stat().st_size // 2)
    elif how == "flip_byte":  # silent for zstd/tensorstore: only the checksum catches it
        with open(biggest, "r+b") as f:
            f.seek(biggest.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x5A]))
    elif how == "bad_meta":
        (step_dir / "meta" / "metadata").write_text("{not json")
    elif how == "missing_data_state":
        for p in (step_dir / "data").glob("process_*.json"):
            p.unlink()
    else:
        raise AssertionError(how)


def _big_state(seed: int) -> dict:
    """Incompressible float32 data, large enough that the chunk file is mostly raw bytes."""
    sh = NamedSharding(_mesh8(), P("data", None))
    w = np.random.default_rng(seed).standard_normal((512, 256), np.float32)
    return {"w": jax.device_put(w, sh), "step": jnp.asarray(seed, jnp.int32)}


@pytest.mark.parametrize("how", ["delete_chunk", "truncate_chunk", "flip_byte", "bad_meta", "missing_data_state"])
def test_damaged_latest_falls_back_with_warning(tmp_path, how):
    ck = Checkpointer(tmp_path, keep=None, async_save=False)
    states = {}
    for step in (1, 2, 3):
        states[step] = _big_state(step)
        ck.save(step, state=states[step], data_state={"next_index": step}, config=CONFIG)
    _damage(tmp_path / "3", how)
    with pytest.warns(UserWarning, match=r"checkpoint step 3 .* is unreadable") as rec:
        out = ck.restore(states[1])
    print(how, "->", [str(w.message)[-160:] for w in rec])
    if how == "flip_byte":
        assert any("checksum mismatch" in str(w.message) for w in rec)
    assert out.meta["step"] == 2 and out.data_state == {"next_index": 2}
    _assert_bitwise(out.state, states[2])
    with pytest.raises(ValueError, match="checkpoint step 3 .* is unreadable"):
        ck.restore(states[1], step=3)  # an explicit step never falls back
    # resuming from 2 and saving step 3 again keeps the damaged copy aside and writes a good one
    assert ck.save(3, state=states[3], data_state={"next_index": 3}, config=CONFIG)
    assert any(n.startswith("3.corrupt-") for n in os.listdir(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_bitwise(ck.restore(states[1]).state, states[3])
    ck.close()


def test_leftovers_of_a_killed_save_are_ignored(tmp_path):
    """SIGKILL during a save leaves `<step>.orbax-checkpoint-tmp`: not a step, not foreign, replaced on re-save."""
    ck = Checkpointer(tmp_path, async_save=False)
    state = _save(ck, 1)
    ck.close()
    partial = tmp_path / "2.orbax-checkpoint-tmp" / "state"
    partial.mkdir(parents=True)
    (partial / "manifest.ocdbt").write_bytes(b"\x00" * 10)
    ck = Checkpointer(tmp_path, async_save=False)
    assert ck.steps() == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_bitwise(ck.restore(state).state, state)
    state2 = _save(ck, 2)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    _assert_bitwise(ck.restore(state).state, state2)
    ck.close()


def test_all_steps_damaged_is_a_clear_error(tmp_path):
    ck = Checkpointer(tmp_path, keep=None, async_save=False)
    for step in (1, 2):
        ck.save(step, state=_big_state(step), data_state=None, config=CONFIG)
    _damage(tmp_path / "1", "delete_chunk")
    _damage(tmp_path / "2", "bad_meta")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"no readable checkpoint .*step 2: .*step 1: "):
        ck.restore(_big_state(0))
    for step in (1, 2):
        (tmp_path / str(step) / "config" / "metadata").unlink()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable checkpoint config"):
        ck.read_config()
    ck.close()
    with pytest.raises(ValueError, match="no checkpoint in"):
        Checkpointer(tmp_path / "empty").restore(_big_state(0))


def test_nan_is_never_written(tmp_path):
    ck = Checkpointer(tmp_path, keep=1, async_save=True)
    good = _save(ck, 1)
    ck.wait()
    for bad_value in (np.nan, np.inf):
        bad = _state(2)
        bad["opt"]["mu"] = bad["opt"]["mu"].at[3, 5].set(bad_value)
        with pytest.raises(ValueError, match=r"refusing to save step 2: non-finite .*\['opt'\]\['mu'\]"):
            ck.save(2, state=bad, data_state=None, config=CONFIG)
    ck.wait()
    assert sorted(os.listdir(tmp_path)) == ["1"]  # nothing for step 2, and keep=1 deleted nothing
    _assert_bitwise(ck.restore(good).state, good)
    ck.close()


@pytest.mark.parametrize("direction", ["8_to_1", "1_to_8"])
def test_restore_across_device_layouts(tmp_path, direction):
    src_sharded = direction == "8_to_1"
    state = _state(4, sharded=src_sharded)
    assert len(state["params"]["w"].sharding.device_set) == (8 if src_sharded else 1)
    ck = Checkpointer(tmp_path)
    ck.save(1, state=state, data_state={"next_index": 1}, config=CONFIG)
    ck.wait()
    other = _state(0, sharded=not src_sharded)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), other)
    out = ck.restore(target)
    for got, want in zip(jax.tree_util.tree_leaves(out.state), jax.tree_util.tree_leaves(other)):
        assert got.sharding == want.sharding
    assert len(out.state["params"]["w"].sharding.device_set) == (1 if src_sharded else 8)
    _assert_bitwise(out.state, state)
    ck.close()


def test_foreign_directory_is_refused_and_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("my results")
    (run / "data").mkdir()
    before = sorted(os.listdir(run))
    with pytest.raises(ValueError, match=r"exists and is not a checkpoint directory .*'data', 'notes.txt'"):
        Checkpointer(run)
    with pytest.raises(ValueError, match="is not a checkpoint directory"):
        check_directory(run)
    assert sorted(os.listdir(run)) == before and (run / "notes.txt").read_text() == "my results"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="exists and is a file"):
        Checkpointer(tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "x"
    check_directory(tmp_path / "absent")  # absent or empty directories are fine
    assert not (tmp_path / "absent").exists()


def test_check_compatible():
    check_compatible(CONFIG, {**CONFIG, "model": {**CONFIG["model"], "pattern": ("hyena", "attention")},
                              "optimizer": {"lr": 1.0}})  # tuples == lists; other sections ignored
    other = {**CONFIG, "model": {"d_model": 128, "pattern": ["hyena", "attention"], "vocab": 256, "bias": True}}
    with pytest.raises(ValueError, match=r"different model: model.bias: .*absent.*; "
                                         r"model.d_model: checkpoint has 64, config has 128"):
        check_compatible(CONFIG, other)
    with pytest.raises(ValueError, match="different model: lr"):
        check_compatible({"lr": 1}, {"lr": 2}, section=None)


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 1"):
        Checkpointer(tmp_path / "a", keep=0)
    with pytest.raises(ValueError, match="every_steps must be >= 1"):
        Checkpointer(tmp_path / "a", every_steps=0)
    ck = Checkpointer(tmp_path / "c", async_save=False)
    state = _state(1)
    with pytest.raises(ValueError, match="data_state must be a JSON-serializable"):
        ck.save(1, state=state, data_state={"x": np.int64(3)}, config=CONFIG)
    with pytest.raises(ValueError, match="does not survive a JSON round trip"):
        ck.save(1, state=state, data_state={"x": (1, 2)}, config=CONFIG)
    with pytest.raises(ValueError, match="config must be JSON-serializable"):
        ck.save(1, state=state, data_state=None, config={"x": object()})
    with pytest.raises(ValueError, match=r"meta keys \['step'\] are reserved"):
        ck.save(1, state=state, data_state=None, config=CONFIG, meta={"step": 3})
    with pytest.raises(ValueError, match=r"state leaf \['n'\] is a int"):
        ck.save(1, state={"n": 3, "w": jnp.ones(2)}, data_state=None, config=CONFIG)
    with pytest.raises(ValueError, match="state has no arrays"):
        ck.save(1, state={}, data_state=None, config=CONFIG)
    assert ck.steps() == [] and os.listdir(tmp_path / "c") == []
    ck.save(1, state=state, data_state=None, config=CONFIG)
    with pytest.raises(ValueError, match=r"target_state leaf \['w'\] is a ShapeDtypeStruct without a sharding"):
        ck.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(ValueError, match=r"target_state leaf \['w'\] is a ndarray"):
        ck.restore({"w": np.ones(2)})
    wrong = _state(1)
    wrong["params"]["w"] = jnp.zeros((24, 41))
    wrong["extra"] = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"does not match the target state .*\['extra'\] missing from the checkpoint"
                                         r".*\['params'\]\['w'\]: checkpoint \[24, 40\] float32, target \[24, 41\]"):
        ck.restore(wrong)
    with pytest.raises(ValueError, match="no checkpoint for step 9 .* steps present: \\[1\\]"):
        ck.restore(state, step=9)
    ck.close()


def test_data_state_from_another_process_count_warns(tmp_path):
    ck = Checkpointer(tmp_path, async_save=False)
    state = _state(2)
    ck.save(1, state=state, data_state={"next_index": 4}, config=CONFIG)
    data_dir = tmp_path / "1" / "data"
    (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
    with pytest.warns(UserWarning, match="saved by 1 processes and this run has 1"):
        out = ck.restore(state)
    assert out.data_state is None
    _assert_bitwise(out.state, state)
    ck.close()


def test_checksum_matches_a_numpy_restatement():
    """Integrity sum = sum_i bits_i * (2 i + 1) mod 2**32 over the row-major flat index, on any sharding."""
    rng = np.random.default_rng(0)
    cases = [rng.standard_normal((8, 12), np.float32), rng.integers(-9, 9, (5, 3, 2), np.int32),
             rng.standard_normal(7).astype(jnp.bfloat16), np.array(True), rng.integers(0, 255, 11, np.uint8)]
    for x in cases:
        bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64).ravel()
        want = int(np.sum(bits * (2 * np.arange(bits.size, dtype=np.uint64) + 1)) % 2**32)
        assert int(ckpt_lib._checksum(jnp.asarray(x))) == want
    sharded = jax.device_put(cases[0], NamedSharding(_mesh8(), P("data", "fsdp")))
    assert int(ckpt_lib._checksum(sharded)) == int(ckpt_lib._checksum(jnp.asarray(cases[0])))


def test_timing_10m_params(tmp_path):
    """Save/restore time of ~10M float32 parameters sharded over 8 fake devices (printed for BENCHMARKS.md)."""
    sh = NamedSharding(_mesh8(), P("data", "fsdp"))
    rng = np.random.default_rng(0)
    shapes = [(1024, 2048)] * 4 + [(256, 4096), (1024, 1024)]
    state = {f"w{i}": jax.device_put(rng.standard_normal(s, np.float32), sh) for i, s in enumerate(shapes)}
    n = sum(int(np.prod(s)) for s in shapes)
    ck = Checkpointer(tmp_path, keep=2, async_save=True)
    ck.save(0, state=state, data_state=None, config=CONFIG)  # compiles the integrity summary
    ck.wait()
    t0 = time.perf_counter()
    ck.save(1, state=state, data_state={"next_index": 1}, config=CONFIG)
    t1 = time.perf_counter()
    ck.wait()
    t2 = time.perf_counter()
    ck.restore(state, step=0)  # warm-up
    t3 = time.perf_counter()
    out = ck.restore(state)
    jax.block_until_ready(out.state)
    t4 = time.perf_counter()
    print(f"{n / 1e6:.1f}M float32 params ({n * 4 / 2**20:.0f} MiB) over 8 devices: async save blocking "
          f"{(t1 - t0) * 1e3:.0f} ms, save total {(t2 - t0) * 1e3:.0f} ms, restore {(t4 - t3) * 1e3:.0f} ms")
    _assert_bitwise(out.state, state)
    ck.close()
