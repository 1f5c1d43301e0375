"""Checkpoints: an orbax `CheckpointManager` wrapper for exact resume that never loses work.

One checkpoint is one step directory `<directory>/<step>/` with four items:
  state   the train state: any pytree of (possibly sharded) jax arrays: params, optimizer state, step, RNG
  data    the grain iterator state (a JSON-serializable dict, or bytes), one file per process
  config  the run config (a JSON dict)
  meta    JSON: step, wall time, library versions, and per-leaf shapes/dtypes/checksums of `state`

Guarantees, and why:
- Nothing already on disk is deleted or overwritten by construction or restore. A directory holding
  anything that is not a checkpoint is refused (`check_directory`), so a mistyped path cannot clobber a run.
- Keep-last-K deletion runs only after a newer save has been committed and verified present (we prune
  ourselves rather than rely on the ordering inside orbax's `max_to_keep` finalize step).
- A state with a non-finite float leaf is refused before anything is written: a NaN never becomes a
  checkpoint, so "resume from the last good checkpoint" stays meaningful.
- orbax + tensorstore catch missing files and truncated chunks, but a flipped byte inside a compressed chunk
  can decode to wrong numbers without any error (measured with orbax 0.12.8). So `meta` records a checksum per
  leaf (a position-weighted sum of the raw bits, exact integer arithmetic, so it is the same under every
  sharding) and restore recomputes it. A step that fails to read or verify is reported with a warning and the
  previous step is used instead.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["Checkpointer", "Restored", "check_compatible", "check_directory"]

_ITEMS = ("state", "data", "config", "meta")
# Names orbax writes in a checkpoint root: `<step>`, `<step>.orbax-checkpoint-tmp...` (a save in flight or
# killed mid-way), and `<step>.corrupt-<time>` (a step we moved aside before re-saving that step).
_CKPT_ENTRY = re.compile(r"^\d+(\.orbax-checkpoint-tmp.*|\.corrupt-.*)?$")
_RESERVED_META = ("step", "time", "versions", "process_count", "device_count", "integrity")
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "seqmix_jax")


class Restored(NamedTuple):
    state: Any  # same pytree structure as the target, on the target's shardings
    data_state: Any  # dict / bytes / None, as given to save (None if saved by a different process count)
    config: dict
    meta: dict  # includes "step"


class _Unreadable(Exception):
    """A step that cannot be read or verified (missing/damaged files, bad metadata, checksum mismatch)."""


def _is_remote(path: str) -> bool:
    return "://" in path


def check_directory(directory: str | os.PathLike) -> None:
    """Raise ValueError if `directory` exists and is not a checkpoint directory; touch nothing.

    A checkpoint directory is absent, empty, or holds only step directories written by this module. Anything
    else (a run directory, source files, someone else's data) is refused so a failed start cannot clobber it.
    """
    path = epath.Path(directory)
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {str(directory)!r} exists and is a file, not a directory")
    foreign = sorted(p.name for p in path.iterdir() if not (_CKPT_ENTRY.match(p.name) and p.is_dir()))
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:5]) + (f" and {len(foreign) - 5} more" * (len(foreign) > 5))
        raise ValueError(
            f"{str(directory)!r} exists and is not a checkpoint directory (it holds {shown}); "
            "refusing to write checkpoints there"
        )


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_compatible(saved_config: dict, config: dict, *, section: str | None = "model") -> None:
    """Raise ValueError naming every key of `section` whose value differs between a checkpoint and a config.

    Both configs are compared after a JSON round trip (so a tuple in the live config equals the list the
    checkpoint holds). With `section=None`, or when neither config has `section`, whole dicts are compared.
    """
    saved, live = json.loads(json.dumps(saved_config)), json.loads(json.dumps(config))
    prefix = ""
    if section is not None and (section in saved or section in live):
        saved, live, prefix = saved.get(section, {}), live.get(section, {}), section + "."
    flat_saved, flat_live = _flatten(saved, prefix), _flatten(live, prefix)
    missing = object()
    diffs = [
        f"{k}: checkpoint has {flat_saved.get(k, '<absent>')!r}, config has {flat_live.get(k, '<absent>')!r}"
        for k in sorted(set(flat_saved) | set(flat_live))
        if flat_saved.get(k, missing) != flat_live.get(k, missing)
    ]
    if diffs:
        raise ValueError("a checkpoint from a different model: " + "; ".join(diffs))


# ---------------------------------------------------------------------------------------------------------
# Per-process data-iterator state (grain's iterator state differs per process, so each writes its own file).


@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    payload: str  # JSON text


@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    pass


_OTHER_LAYOUT = "__saved_by_a_different_process_count__"


class _DataHandler(ocp.CheckpointHandler):
    """Writes `process_<i>-of-<n>.json` on every process (orbax's JSON handler writes on the primary only)."""

    @staticmethod
    def _name() -> str:
        return f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: _DataSave) -> None:
        (directory / self._name()).write_text(args.payload)

    def restore(self, directory: epath.Path, args: _DataRestore | None = None) -> str:
        path = directory / self._name()
        if path.exists():
            return path.read_text()
        if any(directory.glob("process_*-of-*.json")):
            return _OTHER_LAYOUT
        raise FileNotFoundError(f"data iterator state {path} is missing")

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


ocp.args.register_with_handler(_DataHandler, for_save=True)(_DataSave)
ocp.args.register_with_handler(_DataHandler, for_restore=True)(_DataRestore)


def _encode_data_state(data_state: Any) -> str:
    if data_state is None:
        return json.dumps({"format": "none"})
    if isinstance(data_state, (bytes, bytearray)):
        return json.dumps({"format": "bytes", "value": bytes(data_state).hex()})
    try:
        text = json.dumps({"format": "json", "value": data_state}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"data_state must be a JSON-serializable dict or bytes: {e}") from None
    if json.loads(text)["value"] != data_state:
        raise ValueError(
            "data_state does not survive a JSON round trip unchanged (tuples, non-string keys?): "
            f"{str(data_state)[:200]}"
        )
    return text


def _decode_data_state(text: str) -> Any:
    record = json.loads(text)
    kind = record["format"]
    if kind == "none":
        return None
    if kind == "bytes":
        return bytes.fromhex(record["value"])
    if kind == "json":
        return record["value"]
    raise ValueError(f"unknown data state format {kind!r}")


# ---------------------------------------------------------------------------------------------------------
# Integrity: per-leaf finiteness and checksums, computed on device in one jitted call (works on sharded and
# multi-host arrays; only n booleans and n uint32 come back to the host).


def _bits(x: jax.Array) -> jax.Array:
    """The raw bits of `x` as uint32 (one extra trailing axis for 64-bit and complex dtypes)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    # sum_i bits_i * (2 i + 1) mod 2**32: the weights are odd, hence invertible mod 2**32, so changing any
    # single element always changes the sum; position weights also catch (almost all) swapped or shifted
    # data. The flat index is built from per-axis iotas (no reshape), so a sharded array is never gathered.
    u = _bits(x)
    idx = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(u.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= u.shape[axis]
    return jnp.sum(u * (2 * idx + 1), dtype=jnp.uint32)


def _is_finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.asarray(True)


@jax.jit
def _summary_jit(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    return jnp.stack([_is_finite(x) for x in leaves]), jnp.stack([_checksum(x) for x in leaves])


def _summary(leaves: list[jax.Array]) -> tuple[np.ndarray, np.ndarray]:
    """(finite, checksum) per leaf. One jitted call per device set: a state may mix arrays committed to
    different devices (e.g. a key on device 0 beside params on a mesh), which one jit call would reject."""
    groups: dict[frozenset, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault(frozenset(d.id for d in x.sharding.device_set), []).append(i)
    finite, sums = np.zeros(len(leaves), bool), np.zeros(len(leaves), np.uint32)
    for idx in groups.values():
        f, s = _summary_jit([leaves[i] for i in idx])
        finite[idx], sums[idx] = np.asarray(f), np.asarray(s)
    return finite, sums


def _leaves(state: Any, what: str) -> tuple[list[str], list[Any]]:
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    if not flat:
        raise ValueError(f"{what} has no arrays")
    return [jax.tree_util.keystr(p) for p, _ in flat], [leaf for _, leaf in flat]


def _describe(names: list[str], leaves: list[Any]) -> list[list]:
    return [[n, list(x.shape), str(x.dtype)] for n, x in zip(names, leaves)]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def _all_processes(ok: bool) -> bool:
    """True only if `ok` holds on every process, so all processes fall back to the same step."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _short(e: BaseException) -> str:
    """One line of an orbax/tensorstore error (they append a multi-line tensorstore spec)."""
    text = str(e).split(" See full TensorStore details")[0].strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _abstract_target(target_state: Any) -> Any:
    """jax arrays -> ShapeDtypeStruct on the same sharding; ShapeDtypeStructs must carry a sharding."""

    def one(path, leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            if leaf.sharding is None:
                raise ValueError(
                    f"target_state leaf {jax.tree_util.keystr(path)} is a ShapeDtypeStruct without a sharding; "
                    "pass sharding=... so restore knows where to place it"
                )
            return leaf
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        raise ValueError(
            f"target_state leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}; "
            "expected a jax.Array or jax.ShapeDtypeStruct"
        )

    return jax.tree_util.tree_map_with_path(one, target_state)


class Checkpointer:
    """Periodic (async) checkpoints with keep-last-K, integrity checks and fallback to the last good step.

    Args:
      directory: the checkpoint root (local path or a URL orbax understands). Refused if it holds anything
        but checkpoints; created if absent. Existing checkpoints are left untouched.
      keep: how many of the newest readable-looking steps to keep (None keeps all). Older steps are deleted
        only after a newer save has been committed.
      async_save: write in the background; `save` returns once the arrays are copied off the device.
      every_steps: `should_save(step)` is True on multiples of it; None means every step not yet saved.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3, async_save: bool = True,
                 every_steps: int | None = None):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got keep={keep}")
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"every_steps must be >= 1 or None, got every_steps={every_steps}")
        text = os.fspath(directory)
        check_directory(text)
        self.directory = text if _is_remote(text) else os.path.abspath(text)
        self.keep, self.every_steps = keep, every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # we prune ourselves, after a newer save is committed
            enable_async_checkpointing=async_save,
            save_root_metadata=False,
            cleanup_tmp_directories=False,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
        self._pending: set[int] = set()  # saved by us, commit not yet confirmed
        self._bad: set[int] = set()  # steps found unreadable by this instance

    # -- saving ------------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Step directories present (committed saves; readability is checked by `restore`)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        if step in self._manager.all_steps() and step not in self._bad:
            return False
        return self.every_steps is None or step % self.every_steps == 0

    def save(self, step: int, *, state: Any, data_state: Any, config: dict, meta: dict | None = None,
             force: bool = False) -> bool:
        """Start saving `step`; returns False (writing nothing) if it is not due or already saved.

        `force=True` saves off the `every_steps` schedule (a final or SIGTERM save), but never overwrites a
        readable existing step. Raises ValueError, writing nothing, if a float leaf of `state` is non-finite
        or `data_state`/`config`/`meta` are not JSON-serializable.
        """
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps() and step not in self._bad:
            return False
        names, leaves = _leaves(state, "state")
        for name, leaf in zip(names, leaves):
            if not isinstance(leaf, jax.Array):
                raise ValueError(
                    f"state leaf {name} is a {type(leaf).__name__}; checkpoints hold jax arrays "
                    "(wrap numbers with jnp.asarray)"
                )
        finite, sums = _summary(leaves)
        if not finite.all():
            bad = [n for n, ok in zip(names, finite) if not ok]
            raise ValueError(
                f"refusing to save step {step}: non-finite values in state leaves {', '.join(bad[:5])}"
                + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            )
        payload = _encode_data_state(data_state)
        meta = dict(meta or {})
        clash = sorted(set(meta) & set(_RESERVED_META))
        if clash:
            raise ValueError(f"meta keys {clash} are reserved (set by the checkpointer)")
        meta.update(
            step=int(step), time=time.time(), versions=_versions(), process_count=jax.process_count(),
            device_count=jax.device_count(),
            integrity={"leaves": _describe(names, leaves), "checksums": [int(s) for s in sums]},
        )
        for what, obj in (("config", config), ("meta", meta)):
            try:
                json.dumps(obj, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{what} must be JSON-serializable: {e}") from None

        self._manager.wait_until_finished()  # one save in flight at a time; surfaces its errors
        self._prune()
        if step in self._bad:
            self._move_aside(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=_DataSave(payload),
                config=ocp.args.JsonSave(config),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,  # the schedule was decided above
        )
        self._pending.add(step)
        return True

    def wait(self) -> None:
        """Block until the save in flight is committed (raising its error, if any), then prune."""
        self._manager.wait_until_finished()
        self._prune()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prune(self) -> None:
        if not self._pending:
            return
        self._manager.reload()
        steps = self.steps()
        if jax.process_count() > 1:
            # Every process must list the steps before any deletes one: otherwise they decide on different
            # deletions and meet orbax's barriers with different names.
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("seqmix_checkpoint_prune_listed")
        committed = self._pending & set(steps)
        self._pending.clear()
        if not committed or self.keep is None:
            return
        good = [s for s in steps if s not in self._bad]
        for old in good[: max(0, len(good) - self.keep)]:
            self._manager.delete(old)

    def _move_aside(self, step: int) -> None:
        """An unreadable step is about to be saved again: keep the damaged copy under another name."""
        if jax.process_index() == 0:
            src = epath.Path(self.directory) / str(step)
            if src.exists():
                src.rename(src.parent / f"{step}.corrupt-{int(time.time())}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"seqmix_checkpoint_move_aside_{step}")
        self._manager.reload()
        self._bad.discard(step)

    # -- restoring -----------------------------------------------------------------------------------------

    def _read_json(self, step: int, item: str) -> Any:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # noqa: BLE001 - any failure to read means the step is unusable
            raise _Unreadable(f"{item} unreadable: {_short(e)}") from e

    def _restore_step(self, step: int, target: Any, names: list[str], target_leaves: list) -> Restored:
        meta = self._read_json(step, "meta")
        try:
            saved_leaves, checksums = meta["integrity"]["leaves"], meta["integrity"]["checksums"]
        except (KeyError, TypeError) as e:
            raise _Unreadable(f"meta has no integrity record ({e!r})") from e
        self._check_target(step, saved_leaves, _describe(names, target_leaves))
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    data=_DataRestore(),
                    config=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # noqa: BLE001
            raise _Unreadable(_short(e)) from e
        state = out["state"]
        sums = _summary(jax.tree_util.tree_leaves(state))[1]
        wrong = [n for n, got, want in zip(names, sums, checksums) if int(got) != want]
        if wrong:
            raise _Unreadable(f"checksum mismatch in state leaves {', '.join(wrong[:5])}")
        if out["data"] == _OTHER_LAYOUT:
            warnings.warn(
                f"checkpoint step {step}: the data iterator state was saved by {meta.get('process_count')} "
                f"processes and this run has {jax.process_count()}; data_state is None (data order restarts)",
                stacklevel=3,
            )
            data_state = None
        else:
            try:
                data_state = _decode_data_state(out["data"])
            except (ValueError, KeyError, TypeError) as e:
                raise _Unreadable(f"data state unreadable: {e!r}") from e
        if not isinstance(out["config"], dict):
            raise _Unreadable("config is not a JSON object")
        return Restored(state, data_state, out["config"], meta)

    @staticmethod
    def _check_target(step: int, saved: list, wanted: list) -> None:
        """A structure/shape/dtype difference is a different model, not damage: raise, don't fall back."""
        saved_map, wanted_map = {s[0]: s[1:] for s in saved}, {w[0]: w[1:] for w in wanted}
        problems = [f"{k} missing from the checkpoint" for k in wanted_map if k not in saved_map]
        problems += [f"{k} unexpected in the checkpoint" for k in saved_map if k not in wanted_map]
        problems += [
            f"{k}: checkpoint {saved_map[k][0]} {saved_map[k][1]}, target {v[0]} {v[1]}"
            for k, v in wanted_map.items() if k in saved_map and saved_map[k] != v
        ]
        if problems:
            raise ValueError(
                f"checkpoint step {step} does not match the target state (a checkpoint from a different "
                f"model?): {'; '.join(problems[:6])}" + (f" and {len(problems) - 6} more" * (len(problems) > 6))
            )

    def restore(self, target_state: Any, step: int | None = None) -> Restored:
        """Restore `step` (default: the newest readable one) into the shardings of `target_state`.

        `target_state` is a pytree of jax arrays or of `jax.ShapeDtypeStruct(..., sharding=...)`; the result
        has its structure and shardings, whatever the device layout at save time. With `step=None`, a step
        that cannot be read or verified is reported with a warning and the previous step is tried; a
        ValueError lists every step and its reason if none is readable. An explicit `step` never falls back.
        A target whose leaf names, shapes or dtypes differ from the checkpoint's raises ValueError at once.
        """
        self.wait()
        target = _abstract_target(target_state)
        names, target_leaves = _leaves(target, "target_state")
        return self._first_readable(step, lambda s: self._restore_step(s, target, names, target_leaves), "")

    def read_config(self, step: int | None = None) -> dict:
        """The config saved with `step` (default: the newest one that reads), e.g. for `check_compatible`."""
        return self._first_readable(step, lambda s: self._read_json(s, "config"), " config")

    def _first_readable(self, step: int | None, read: Callable[[int], Any], what: str) -> Any:
        steps = self.steps()
        if not steps:
            raise ValueError(f"no checkpoint in {self.directory}")
        if step is not None and step not in steps:
            raise ValueError(f"no checkpoint for step {step} in {self.directory}; steps present: {steps}")
        failures = []
        for s in [step] if step is not None else steps[::-1]:
            reason = None
            try:
                result = read(s)
            except _Unreadable as e:
                reason = str(e)
            if _all_processes(reason is None):  # every process must fall back to the same step
                return result
            reason = reason or "unreadable on another process"
            if not what:
                self._bad.add(s)
            failures.append(f"step {s}: {reason}")
            if step is not None:
                raise ValueError(f"checkpoint step {s}{what} in {self.directory} is unreadable: {reason}")
            warnings.warn(f"checkpoint step {s}{what} in {self.directory} is unreadable ({reason}); "
                          "trying the previous step", stacklevel=3)
        raise ValueError(f"no readable checkpoint{what} in {self.directory}: " + " | ".join(failures))
