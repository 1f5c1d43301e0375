"""Observability for the trainer: JSON-lines metrics, a progress bar with tokens/s and MFU, a FLOPs estimate and
a loss/accuracy plot.

    writer = MetricsWriter(run_dir, tensorboard=cfg.tensorboard)        # only process 0 writes
    progress = Progress(total_steps, initial=step, flops_per_token=model_flops_per_token(model_cfg, seq_len),
                        n_devices=jax.device_count(), peak_flops=peak_flops_per_device())
    ... progress.update(step, loss, tokens_in_step); writer.write(step, "train", {"loss": loss, **progress.rates()})
    writer.close(); progress.close(); plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png")

`run_dir/metrics.jsonl` holds one JSON object per line: {"step": int, "split": str, "time": unix seconds,
<metric>: value, ...}. Non-finite floats are written as the strings "nan", "inf", "-inf" (strict JSON has no NaN);
`read_metrics` turns them back into floats. A run resumed from a checkpoint appends to the same file, so a step
may appear twice for a split (the killed run wrote it, the resumed run wrote it again); `plot_metrics` keeps the
last record per (split, step).

MFU (model FLOPs utilization) = achieved model FLOPs per second / the hardware's peak, with model FLOPs from
`model_flops_per_token` (what the model needs, not what the implementation spends: rematerialization and padding
do not count).
"""

from __future__ import annotations

import collections
import importlib
import json
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

METRICS_FILE = "metrics.jsonl"
PEAK_FLOPS_ENV = "SEQMIX_PEAK_FLOPS"
_RESERVED = ("step", "split", "time")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _process_index() -> int:
    import jax

    return jax.process_index()


# --- JSON lines ----------------------------------------------------------------------------------------------------

def _json_value(name: str, v):
    """A metric value as a JSON-safe Python scalar: bools, ints and strings as they are, floats (also numpy / jax
    scalars and 0-d or size-1 arrays) as Python floats, non-finite floats as "nan" / "inf" / "-inf"."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        v = float(v)
    else:
        a = np.asarray(v)  # jax arrays and numpy arrays; forces the value to the host
        if a.size != 1 or a.dtype.kind not in "biuf":
            raise ValueError(f"metric {name!r} must be a number or a one-element numeric array, got "
                             f"{type(v).__name__} of shape {a.shape} and dtype {a.dtype}")
        a = a.reshape(())
        if a.dtype.kind == "b":
            return bool(a)
        if a.dtype.kind in "iu":
            return int(a)
        v = float(a)
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _decode(record: dict) -> dict:
    return {k: _NONFINITE.get(v, v) if isinstance(v, str) and k not in _RESERVED else v for k, v in record.items()}


class MetricsWriter:
    """Appends metric records to `run_dir/metrics.jsonl` (and TensorBoard event files in `run_dir/tensorboard`).

    Args:
      run_dir: the run directory (created if missing). An existing metrics file is appended to (resume).
      enabled: write at all. Only process 0 of a multi-process run writes, whatever `enabled` says.
      tensorboard: also write TensorBoard scalars `<split>/<metric>` when the optional `tensorboardX` package is
        importable; when it is not, warn once and write JSON lines only.
    """

    def __init__(self, run_dir, *, enabled: bool = True, tensorboard: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = bool(enabled) and _process_index() == 0
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A run killed mid-write can leave a partial last line; start ours on a fresh line so only that one
        # line is lost (read_metrics skips it with a warning).
        partial = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        self._file = open(self.path, "a", encoding="utf-8")
        if partial:
            self._file.write("\n")
        if tensorboard:
            try:
                tbx = importlib.import_module("tensorboardX")
            except ImportError:
                _warn_once("tensorboardX", "tensorboard=True but the tensorboardX package is not installed; "
                                           "writing metrics.jsonl only (pip install tensorboardX to get event files)")
            else:
                self._tb = tbx.SummaryWriter(logdir=str(self.run_dir / "tensorboard"))

    def write(self, step: int, split: str, metrics: Mapping) -> None:
        """Append {"step", "split", "time", **metrics} as one JSON line (flushed at once, so a killed run keeps
        every completed line). Values: numbers, one-element arrays, bools, strings or None."""
        if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a non-empty string, got {split!r}")
        if not isinstance(metrics, Mapping):
            raise ValueError(f"metrics must be a mapping of name -> value, got {type(metrics).__name__}")
        reserved = sorted(set(_RESERVED) & set(metrics))
        if reserved:
            raise ValueError(f"metric names {reserved} are reserved for the record's own fields {_RESERVED}")
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError(f"MetricsWriter for {self.run_dir} is closed")
        record = {"step": int(step), "split": split, "time": time.time()}
        record.update({str(k): _json_value(str(k), v) for k, v in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in _decode(record).items():
                if k not in _RESERVED and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{split}/{k}", v, int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close; calling it again does nothing."""
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path) -> list[dict]:
    """The records of a metrics file (or of `<run_dir>/metrics.jsonl` when `path` is a directory), in file order,
    with "nan" / "inf" / "-inf" strings turned back into floats. Lines that are not valid JSON objects (a line cut
    short by a killed process) are skipped with one warning naming them."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"metrics file {str(path)!r} does not exist")
    records, bad = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                bad.append(i)
                continue
            records.append(_decode(record))
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) {bad[:10]}", stacklevel=2)
    return records


# --- FLOPs and MFU -------------------------------------------------------------------------------------------------

def count_params(model_config) -> int:
    """Number of parameters (`nnx.Param` entries) of `LM(model_config)`, counted from shapes alone: the model is
    built abstractly with `nnx.eval_shape`, so nothing is allocated."""
    import jax
    from flax import nnx

    from seqmix_jax.models import LM

    abstract = nnx.eval_shape(lambda: LM(model_config, rngs=nnx.Rngs(0)))
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def _attention_keys_per_query(kwargs: Mapping, seq_len: int) -> float:
    """Mean number of keys each query scores against, by the usual convention l/2 for causal attention (the
    exact mean is (l+1)/2). A causal window w < l: w - w^2/(2l), which is l/2 at w = l."""
    if not kwargs.get("causal", True):
        return float(seq_len)
    w = kwargs.get("window")
    if w is None or w >= seq_len:
        return seq_len / 2
    return w - w * w / (2 * seq_len)


def model_flops_per_token(model_config, seq_len: int, *, n_params: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token of `LM(model_config)` on sequences of `seq_len` tokens.

        flops/token = 6 * N  +  sum over attention layers of 12 * h * k * keys(l)

    * N: non-embedding parameters plus the output head. Each parameter takes part in one multiply-add per token
      in the forward pass (2 FLOPs) and two in the backward pass (gradient w.r.t. the input and w.r.t. the
      weight: 4 FLOPs). The embedding table is a lookup and is excluded; the head (d * padded_vocab) is counted
      whether it is tied to the embedding or a separate `lm_head`. So N = n_params - v*d when untied and
      N = n_params when tied (the tied table is counted once, as the head).
    * Attention with h query heads of width k: scores q.k and the weighted sum of values each cost 2*h*k FLOPs
      per (query, key) pair forward, 3x that for forward + backward, so 12*h*k per pair; keys(l) is l/2 for
      causal attention (l without a mask; w - w^2/(2l) for a causal sliding window w < l).
    * Not counted: the sequence-mixing work of the recurrent and convolutional mixers that has no parameters
      (Mamba scans, Mamba-2's intra-chunk products, Hyena FFT convolutions) and elementwise activations. For
      models made mostly of those mixers the MFU is a slight under-estimate. Parameters used once per sequence
      rather than per token (Hyena implicit-filter MLPs, StripedHyena poles/residues) are counted as per-token,
      a slight over-estimate; both are small next to the projections at useful widths.

    Args:
      model_config: a `seqmix_jax.models.ModelConfig`.
      seq_len: training sequence length l.
      n_params: the model's total parameter count (`nnx.state(model, nnx.Param)` leaves, embedding included) if
        the caller has it; otherwise it is counted from the config with `count_params`.
    """
    from seqmix_jax.models.config import ModelConfig

    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    if not isinstance(seq_len, numbers.Integral) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if n_params is None:
        n_params = count_params(model_config)
    vd = model_config.padded_vocab_size * model_config.d_model
    if not isinstance(n_params, numbers.Integral) or isinstance(n_params, bool) or n_params < vd:
        raise ValueError(f"n_params must be an int >= the embedding size padded_vocab_size * d_model = {vd}, "
                         f"got {n_params!r}")
    dense = n_params if model_config.tie_embeddings else n_params - vd
    attn = 0.0
    for spec in model_config.blocks:
        if spec.mixer == "attention":
            kw = spec.mixer_kwargs
            h = kw["num_heads"]
            k = kw.get("head_dim") or model_config.d_model // h
            attn += 12 * h * k * _attention_keys_per_query(kw, int(seq_len))
    return float(6 * dense + attn)


# Dense bfloat16 peak FLOP/s per chip (vendor data sheets, without structured sparsity). Matched in order against
# `device.device_kind`, case-insensitively: "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "TPU v4",
# "TPU v5 lite" (v5e), "TPU v5" / "TPU v5p", "TPU v6 lite" / "TPU v6e".
PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("v5", 459e12),
    ("v6 lite", 918e12), ("v6e", 918e12), ("v4", 275e12),
)


def peak_flops_per_device(device=None) -> float | None:
    """Peak dense bf16 FLOP/s of one device (default: `jax.devices()[0]`), or None when unknown (CPUs, unlisted
    accelerators). The environment variable SEQMIX_PEAK_FLOPS (a number, e.g. 1.2e12) overrides the table for
    every device; that is how to get an MFU on a CPU or correct an entry (H100 PCIe peaks lower than SXM)."""
    env = os.environ.get(PEAK_FLOPS_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{PEAK_FLOPS_ENV} must be a positive number of FLOP/s, got {env!r}")
        return value
    if device is None:
        import jax

        device = jax.devices()[0]
    if getattr(device, "platform", None) == "cpu":
        return None
    kind = str(getattr(device, "device_kind", device)).lower()
    for pattern, peak in PEAK_FLOPS:
        if pattern in kind:
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilization tokens_per_s * flops_per_token / (n_devices * peak), or None when peak is None.

    `tokens_per_s` is the global throughput (all devices together) and `peak` the FLOP/s of one device."""
    if not isinstance(n_devices, numbers.Integral) or isinstance(n_devices, bool) or n_devices <= 0:
        raise ValueError(f"n_devices must be a positive int, got {n_devices!r}")
    for name, v in (("tokens_per_s", tokens_per_s), ("flops_per_token", flops_per_token)):
        if not isinstance(v, numbers.Real) or not v >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    if peak is None:
        return None
    if not isinstance(peak, numbers.Real) or not peak > 0:
        raise ValueError(f"peak must be a positive number of FLOP/s or None, got {peak!r}")
    return float(tokens_per_s) * float(flops_per_token) / (n_devices * float(peak))


# --- progress bar --------------------------------------------------------------------------------------------------

class Progress:
    """A tqdm bar over training steps whose postfix shows loss, tokens/s and MFU.

    Throughput is measured between `update` calls over the last `window` updates, so the time before the first
    update (compilation) never counts. Rates are computed on every process, so `rates()` can be logged even when
    the bar is hidden; the loss is only read (which waits for the device) when the bar is redrawn.

    Args:
      total: the last step (the bar runs from `initial` to `total`).
      initial: the step a resumed run starts from.
      enabled: show the bar (only on process 0 either way).
      flops_per_token: from `model_flops_per_token`; None hides the MFU.
      n_devices: devices sharing the work (for the MFU).
      peak_flops: peak FLOP/s of one device (`peak_flops_per_device`); None hides the MFU.
      window: number of updates the tokens/s average spans.
      desc: the bar's label.
      file: where the bar goes (default stderr). When it is not a terminal (a log file, CI), the bar redraws at
        most every 30 s in plain ASCII so logs stay readable.
    """

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True, flops_per_token: float | None = None,
                 n_devices: int = 1, peak_flops: float | None = None, window: int = 20, desc: str = "train",
                 file=None):
        from tqdm import tqdm

        for name, v in (("total", total), ("initial", initial)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 2:
            raise ValueError(f"window must be an int >= 2 (rates need two updates), got {window!r}")
        mfu(0.0, 0.0, n_devices, peak_flops)  # validates n_devices and peak_flops
        self.flops_per_token, self.n_devices, self.peak_flops = flops_per_token, n_devices, peak_flops
        self.tokens_per_s: float | None = None
        self.mfu: float | None = None
        self._points: collections.deque = collections.deque(maxlen=window)  # (time, cumulative tokens)
        self._tokens = 0
        self._step = int(initial)
        file = sys.stderr if file is None else file
        tty = bool(getattr(file, "isatty", lambda: False)())
        self.enabled = bool(enabled) and _process_index() == 0
        self._interval = 0.5 if tty else 30.0
        self._bar = tqdm(total=int(total), initial=int(initial), desc=desc, file=file, disable=not self.enabled,
                         dynamic_ncols=tty, ascii=not tty, ncols=None if tty else 100, mininterval=self._interval,
                         unit="step")
        self._last_postfix = -math.inf
        self._loss = None

    def update(self, step: int, loss=None, tokens: int = 0) -> None:
        """Record that training reached `step` after processing `tokens` more tokens (all devices together)
        since the previous update; `loss` (a float or a scalar array) is shown when the bar redraws."""
        if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < self._step:
            raise ValueError(f"step must be an int >= the previous step {self._step}, got {step!r}")
        if not isinstance(tokens, numbers.Integral) or isinstance(tokens, bool) or tokens < 0:
            raise ValueError(f"tokens must be an int >= 0, got {tokens!r}")
        now = time.perf_counter()
        self._tokens += int(tokens)
        self._points.append((now, self._tokens))
        (t0, n0) = self._points[0]
        if now > t0:
            self.tokens_per_s = (self._tokens - n0) / (now - t0)
            if self.flops_per_token is not None:
                self.mfu = mfu(self.tokens_per_s, self.flops_per_token, self.n_devices, self.peak_flops)
        if self.enabled:
            self._loss = loss
            if now - self._last_postfix >= self._interval:
                self._last_postfix = now
                self._bar.set_postfix_str(self._postfix(loss), refresh=False)
            self._bar.update(int(step) - self._step)
        self._step = int(step)

    def rates(self) -> dict:
        """{"tokens_per_s": ..., "mfu": ...} with the entries known so far (for the metrics file)."""
        out = {}
        if self.tokens_per_s is not None:
            out["tokens_per_s"] = self.tokens_per_s
        if self.mfu is not None:
            out["mfu"] = self.mfu
        return out

    def write(self, message: str) -> None:
        """Print a line without breaking the bar (process 0 only when the bar is enabled)."""
        if self.enabled:
            self._bar.write(message, file=self._bar.fp)

    def close(self) -> None:
        """Show the latest loss and rates one last time and close the bar."""
        if self.enabled and self._loss is not None:
            self._bar.set_postfix_str(self._postfix(self._loss), refresh=False)
        self._loss = None
        self._bar.close()

    def _postfix(self, loss) -> str:
        parts = []
        if loss is not None:
            parts.append(f"loss={float(np.asarray(loss)):.4g}")
        if self.tokens_per_s is not None:
            parts.append(f"tok/s={self.tokens_per_s:,.0f}")
        if self.mfu is not None:
            parts.append(f"mfu={100 * self.mfu:.1f}%")
        return " ".join(parts)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- plot ----------------------------------------------------------------------------------------------------------

def _series(records: list[dict], key: str) -> dict[str, tuple[list, list]]:
    """split -> (steps, values) of one metric, the last record per (split, step), steps ascending."""
    last: dict[str, dict[int, float]] = collections.defaultdict(dict)
    for r in records:
        v = r.get(key)
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and isinstance(r.get("step"), int):
            last[str(r.get("split"))][r["step"]] = float(v)
    return {split: (sorted(d), [d[s] for s in sorted(d)]) for split, d in sorted(last.items()) if d}


def plot_metrics(metrics_jsonl, out_png) -> Path:
    """Write a PNG with two panels: loss vs step (every split that logged "loss": train, eval, ...) and accuracy
    vs step (every split that logged "accuracy"). A panel with no data says so. Uses matplotlib's Agg canvas
    directly, so no display and no global pyplot state is involved. Returns the PNG's path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_jsonl)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, key, title in zip(fig.subplots(1, 2), ("loss", "accuracy"), ("loss", "accuracy")):
        series = _series(records, key)
        for split, (steps, values) in series.items():
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=split)
        if series:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.savefig(out_png, format="png")
    return out_png
