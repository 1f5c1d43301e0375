"""Grain input pipelines: synthetic tasks, local text files, pre-tokenized memmaps -> per-process batches.

Batch contract (see the trainer layout): a dict of numpy arrays, all (local_batch, seq_len):
  inputs int32, targets int32, weights float32 (1 where loss/accuracy count), segment_ids int32 (1-based
  document ids inside a row, 0 = padding; all ones for unpacked rows).

Streams. Every source is a list of rows (examples); global batch b holds the rows at global stream positions
b*B .. b*B + B-1 (B = global batch_size) and process p of P takes positions b*B + p*B/P .. b*B + (p+1)*B/P - 1,
so the processes' batches, concatenated in process order, are the 1-process batch. The iterator is a grain
DatasetIterator over batch indices; its state (`{"next_index": b}`) is the number of global batches consumed, so
it is independent of the process count (a checkpoint taken with 8 processes resumes with 1).

- train: infinite. Synthetic tasks without num_train_examples: position j is example j (every example fresh).
  With num_train_examples N (MAD trains on fixed sets) or for file sources: position j is row
  perm_e[j mod N] with a fresh permutation perm_e = default_rng([seed, 2, e]).permutation(N) per epoch
  e = j // N; epochs run back to back (a batch may straddle two epochs).
- test: finite, rows 0..N-1 in order, ceil(N / B) batches; the last one is filled with padding rows
  (inputs/targets 0, weights 0, segment_ids 0) so shapes stay static. Iterate until StopIteration.

Sources (`task`):
- a synthetic task of `seqmix_jax.train.tasks.TASKS`: example i = tasks.example(task, i, split, seed, ...);
  `num_kv_pairs` feeds MQAR, `task_kwargs` the task's knobs.
- "text": files matching the glob `path`. Tokenizer "byte" (default, or None): token = the UTF-8 byte (0..255),
  EOS/separator id 256, so vocab_size >= 257. Otherwise `tokenizer` is a Hugging Face tokenizer.json read with
  the `tokenizers` package; its EOS id is task_kwargs["eos_id"] or the first of </s>, <|endoftext|>, <eos>,
  [SEP] it knows. A document is one file (or, with task_kwargs["doc_separator"], each piece of a file split
  on that string; empty documents are dropped). Document tokens t_1..t_n become the n+1 training pairs of
  EOS t_1 .. t_n EOS (input -> next token): the leading EOS acts as BOS, the trailing one ends the document.
  pack=True: the pairs of all documents are laid end to end and cut into rows of seq_len, a document
  continuing on the next row if it does not fit; segment_ids number the documents inside each row from 1.
  pack=False: one document per row, truncated to seq_len pairs, right-padded (segment 0, weight 0).
- "memmap": files matching `path`, each a 1-D integer token array: `.npy` (np.load mmap_mode="r") or raw
  binary (np.memmap, dtype task_kwargs["dtype"], default "uint16"). Row r of a file is the window
  tokens[r*L : r*L + L + 1] (L = seq_len; inputs = window[:-1], targets = window[1:]); windows never cross
  files. A token >= vocab_size raises ValueError when its row is read.
  File sources' test split: the rows of task_kwargs["test_path"] if given, else the last num_test_examples
  rows of `path` (which the train split then excludes). num_train_examples is ignored for file sources.

Metric: `accuracy_fn(task)` returns `token_accuracy` for every task: micro (token) accuracy of argmax over
positions with weight > 0. For MQAR this equals zoology's per-example mean (every example has exactly
num_kv_pairs weighted positions); MAD's torchmetrics default is macro-averaged over classes, which we do not
reproduce (REFERENCE_NOTES §6.1).

worker_count is the number of in-process grain reader threads (0 = read in the calling thread); grain's
multiprocessing workers are not used.
"""

from __future__ import annotations

import functools
import glob as globlib
import os
import sys
import threading
from collections.abc import Mapping

import grain
import jax.numpy as jnp
import numpy as np

from seqmix_jax.train import tasks as tasks_lib

BYTE_EOS = 256
BYTE_VOCAB = 257
FILE_TASKS = ("text", "memmap")
KEYS = ("inputs", "targets", "weights", "segment_ids")
_TEXT_KWARGS = ("doc_separator", "eos_id", "test_path")
_MEMMAP_KWARGS = ("dtype", "test_path")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "[SEP]")


# ------------------------------------------------------------------------------------------ metric


def token_accuracy(logits_or_preds, batch) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(correct, count): argmax hits and the number of positions with weight > 0 (int32 scalars; jit-safe).

    logits_or_preds: logits (b, l, v) (argmax taken) or integer predictions (b, l).
    """
    targets = jnp.asarray(batch["targets"])
    preds = jnp.asarray(logits_or_preds)
    if preds.ndim == targets.ndim + 1:
        preds = jnp.argmax(preds, axis=-1)
    if preds.shape != targets.shape:
        raise ValueError(f"predictions of shape {preds.shape} do not match targets {targets.shape}")
    counted = jnp.asarray(batch["weights"]) > 0
    correct = jnp.sum((preds == targets) & counted, dtype=jnp.int32)
    return correct, jnp.sum(counted, dtype=jnp.int32)


def accuracy_fn(task: str):
    """The accuracy metric of `task`: `token_accuracy` for every known task (see the module docstring)."""
    if task not in tasks_lib.TASKS and task not in FILE_TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(tasks_lib.TASKS) + list(FILE_TASKS)}")
    return token_accuracy


# ------------------------------------------------------------------------------------------ rows


def _pad_row(seq_len: int) -> dict[str, np.ndarray]:
    return {"inputs": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
            "weights": np.zeros(seq_len, np.float32), "segment_ids": np.zeros(seq_len, np.int32)}


class _SyntheticRows:
    def __init__(self, task, split, seed, seq_len, vocab_size, kwargs):
        self.task, self.split, self.seed = task, split, seed
        self.seq_len, self.vocab_size, self.kwargs = seq_len, vocab_size, kwargs

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        ex = tasks_lib.example(self.task, i, split=self.split, seed=self.seed, seq_len=self.seq_len,
                               vocab_size=self.vocab_size, **self.kwargs)
        ex["segment_ids"] = np.ones(self.seq_len, np.int32)
        return ex


class _ArrayRows:
    """Rows [start, start + n) of precomputed (R, seq_len) arrays (packed text)."""

    def __init__(self, arrays: dict[str, np.ndarray], start: int, n: int):
        self.arrays, self.start, self.n = arrays, start, n

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[self.start + i].copy() for k, v in self.arrays.items()}


class _WindowRows:
    """Rows [start, start + n) of the seq_len+1 windows over a list of 1-D token memmaps."""

    def __init__(self, files, arrays, seq_len, vocab_size, start, n):
        self.files, self.arrays, self.seq_len, self.vocab_size = files, arrays, seq_len, vocab_size
        counts = [max(len(a) - 1, 0) // seq_len for a in arrays]
        self.offsets = np.cumsum([0] + counts)
        self.start, self.n = start, n

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        r = self.start + i
        f = int(np.searchsorted(self.offsets, r, side="right")) - 1
        lo = (r - int(self.offsets[f])) * self.seq_len
        w = np.asarray(self.arrays[f][lo:lo + self.seq_len + 1]).astype(np.int64)
        if w.size and (w.max() >= self.vocab_size or w.min() < 0):
            bad = int(w.max()) if w.max() >= self.vocab_size else int(w.min())
            raise ValueError(f"memmap {self.files[f]!r}: token {bad} at offset >= {lo} is outside "
                             f"[0, vocab_size={self.vocab_size})")
        L = self.seq_len
        return {"inputs": w[:-1].astype(np.int32), "targets": w[1:].astype(np.int32),
                "weights": np.ones(L, np.float32), "segment_ids": np.ones(L, np.int32)}


# ------------------------------------------------------------------------------------- the source


class _BatchSource:
    """grain random-access source: item b = this process's slice of global batch b."""

    def __init__(self, row_fn, *, n_rows, split, seed, seq_len, global_batch, local_batch, process_index):
        self.row_fn, self.n_rows, self.split, self.seed = row_fn, n_rows, split, seed
        self.seq_len, self.global_batch, self.local_batch = seq_len, global_batch, local_batch
        self.first = process_index * local_batch
        if split == "test":
            self.num_batches = -(-n_rows // global_batch)
        else:
            self.num_batches = None
        self._perm_lock = threading.Lock()
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize if self.num_batches is None else self.num_batches

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        with self._perm_lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, 2, epoch]).permutation(self.n_rows)
                if len(self._perms) >= 2:
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

    def _row(self, j: int) -> dict[str, np.ndarray]:
        if self.split == "test":
            return self.row_fn(j) if j < self.n_rows else _pad_row(self.seq_len)
        if self.n_rows is None:
            return self.row_fn(j)
        return self.row_fn(int(self._epoch_perm(j // self.n_rows)[j % self.n_rows]))

    def __getitem__(self, b: int) -> dict[str, np.ndarray]:
        if not 0 <= b < len(self):
            raise IndexError(f"batch index {b} out of range [0, {len(self)})")
        start = b * self.global_batch + self.first
        rows = [self._row(start + r) for r in range(self.local_batch)]
        return {k: np.stack([row[k] for row in rows]) for k in KEYS}


class BatchIterator:
    """A grain DatasetIterator over batches, plus what the trainer wants to know about the stream.

    Iterate with next(); `get_state()` / `set_state(state)` save and restore the exact position (the state is
    a small JSON-able dict). `num_batches` is None for the infinite train stream, else the test batch count.
    """

    def __init__(self, source: _BatchSource, worker_count: int):
        self._source = source
        options = grain.ReadOptions(num_threads=worker_count, prefetch_buffer_size=2 * worker_count)
        self._iter = iter(grain.MapDataset.source(source).to_iter_dataset(options))
        self.num_batches = source.num_batches
        self.local_batch_size = source.local_batch
        self.global_batch_size = source.global_batch
        self.seq_len = source.seq_len

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        return self._iter.get_state()

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state)


# ------------------------------------------------------------------------------------------ files


def _match_files(path, what: str) -> list[str]:
    if not path:
        raise ValueError(f"task {what!r} needs data.path (a file or glob), got {path!r}")
    files = sorted(f for f in globlib.glob(os.path.expanduser(str(path)), recursive=True) if os.path.isfile(f))
    if not files:
        raise ValueError(f"no files match path={str(path)!r} (task {what!r})")
    return files


def _load_tokenizer(tokenizer, eos_id):
    """(encode: bytes -> int array, eos_id, vocab size needed)."""
    if tokenizer in (None, "", "byte"):
        if eos_id is not None and eos_id != BYTE_EOS:
            raise ValueError(f"the byte tokenizer's EOS id is {BYTE_EOS}; got task_kwargs eos_id={eos_id}")
        return (lambda data: np.frombuffer(data, np.uint8).astype(np.int32)), BYTE_EOS, BYTE_VOCAB
    if not os.path.isfile(str(tokenizer)):
        raise ValueError(f"tokenizer={str(tokenizer)!r} is neither 'byte' nor an existing tokenizer.json file")
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(tokenizer))
    if eos_id is None:
        eos_id = next((tok.token_to_id(n) for n in _EOS_NAMES if tok.token_to_id(n) is not None), None)
        if eos_id is None:
            raise ValueError(f"tokenizer {str(tokenizer)!r} has none of the EOS tokens {list(_EOS_NAMES)}; set "
                             "data.task_kwargs.eos_id")

    def encode(data: bytes) -> np.ndarray:
        return np.asarray(tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False).ids, np.int32)

    return encode, int(eos_id), max(tok.get_vocab_size(), int(eos_id) + 1)


@functools.lru_cache(maxsize=4)
def _documents(files: tuple[str, ...], stamps: tuple, tokenizer, eos_id, doc_separator) -> tuple[np.ndarray, ...]:
    """Each document as its pair sequence EOS t_1 .. t_n EOS (int32); cached per file set and tokenizer."""
    del stamps  # part of the cache key only: edited files are re-read
    encode, eos, _ = _load_tokenizer(tokenizer, eos_id)
    docs = []
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        pieces = data.split(doc_separator.encode()) if doc_separator else [data]
        for piece in pieces:
            toks = encode(piece)
            if toks.size:
                docs.append(np.concatenate([[eos], toks, [eos]]).astype(np.int32))
    return tuple(docs)


def _text_rows(files, *, seq_len, tokenizer, eos_id, doc_separator, pack) -> dict[str, np.ndarray]:
    stamps = tuple((os.path.getmtime(f), os.path.getsize(f)) for f in files)
    docs = _documents(tuple(files), stamps, tokenizer, eos_id, doc_separator)
    if not docs:
        raise ValueError(f"files {files[:3]}{'...' if len(files) > 3 else ''} contain no text")
    L = seq_len
    if pack:
        inputs = np.concatenate([d[:-1] for d in docs])
        targets = np.concatenate([d[1:] for d in docs])
        doc = np.concatenate([np.full(len(d) - 1, i, np.int64) for i, d in enumerate(docs)])
        n_rows = -(-len(inputs) // L)
        pad = n_rows * L - len(inputs)
        inputs = np.pad(inputs, (0, pad)).reshape(n_rows, L)
        targets = np.pad(targets, (0, pad)).reshape(n_rows, L)
        valid = np.pad(np.ones(len(doc), bool), (0, pad)).reshape(n_rows, L)
        doc = np.pad(doc, (0, pad), constant_values=-1).reshape(n_rows, L)
        # Inside each row, documents are numbered from 1 in order of appearance; padding gets 0.
        segment = (doc - doc[:, :1] + 1) * valid
    else:
        n_rows = len(docs)
        inputs = np.zeros((n_rows, L), np.int32)
        targets = np.zeros((n_rows, L), np.int32)
        valid = np.zeros((n_rows, L), bool)
        for r, d in enumerate(docs):
            n = min(len(d) - 1, L)
            inputs[r, :n], targets[r, :n], valid[r, :n] = d[:n], d[1:n + 1], True
        segment = valid
    return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32),
            "weights": valid.astype(np.float32), "segment_ids": segment.astype(np.int32)}


def _open_memmaps(files, dtype) -> list[np.ndarray]:
    arrays = []
    for f in files:
        if f.endswith(".npy"):
            a = np.load(f, mmap_mode="r")
        else:
            try:
                a = np.memmap(f, dtype=np.dtype(dtype), mode="r")
            except ValueError as e:  # e.g. empty file or size not a multiple of the item size
                raise ValueError(f"cannot read {f!r} as raw {dtype} tokens: {e}") from None
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"memmap {f!r} must be a 1-D integer token array, got shape {a.shape} dtype {a.dtype}")
        arrays.append(a)
    return arrays


# ------------------------------------------------------------------------------------ entry point


def make_dataset(*, task: str, seq_len: int, batch_size: int, vocab_size: int, num_kv_pairs: int | None = None,
                 task_kwargs: Mapping | None = None, num_train_examples: int | None = None,
                 num_test_examples: int | None = None, path: str | None = None, tokenizer: str | None = None,
                 pack: bool = True, seed: int = 0, worker_count: int = 0, split: str = "train",
                 process_index: int = 0, process_count: int = 1, **unused) -> BatchIterator:
    """This process's batch iterator for `split` (see the module docstring for sources and streams).

    The keywords are the config's DataSection fields plus split/process_index/process_count; fields a source
    does not use are ignored (so are unknown extra keywords: the config has validated them).
    Returns a BatchIterator yielding dicts of (batch_size // process_count, seq_len) arrays.
    """
    del unused
    kw = dict(task_kwargs or {})
    if split not in tasks_lib.SPLITS:
        raise ValueError(f"split must be one of {sorted(tasks_lib.SPLITS)}, got {split!r}")
    if not (isinstance(seq_len, (int, np.integer)) and seq_len >= 1):
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got process_index={process_index}, "
                         f"process_count={process_count}")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    for name, n in (("num_train_examples", num_train_examples), ("num_test_examples", num_test_examples)):
        if n is not None and n < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {n}")

    if task in FILE_TASKS:
        row_fn, n_rows = _file_rows(task, split=split, path=path, kw=kw, seq_len=seq_len, vocab_size=vocab_size,
                                    tokenizer=tokenizer, pack=pack, num_test_examples=num_test_examples)
    elif task in tasks_lib.TASKS:
        if task == "mqar" and num_kv_pairs is not None:
            if kw.setdefault("num_kv_pairs", num_kv_pairs) != num_kv_pairs:
                raise ValueError(f"num_kv_pairs={num_kv_pairs} conflicts with task_kwargs num_kv_pairs="
                                 f"{kw['num_kv_pairs']}")
        tasks_lib.check_task_kwargs(task, kw)
        row_fn = _SyntheticRows(task, split, seed, seq_len, vocab_size, kw)
        row_fn(0)  # validates seq_len / vocab_size / knobs now, with the task's own message
        if split == "test":
            if not num_test_examples:
                raise ValueError(f"the test split needs num_test_examples > 0, got {num_test_examples}")
            n_rows = num_test_examples
        else:
            n_rows = num_train_examples or None
    else:
        raise ValueError(f"unknown task {task!r}; known: {sorted(tasks_lib.TASKS) + list(FILE_TASKS)}")

    source = _BatchSource(row_fn, n_rows=n_rows, split=split, seed=seed, seq_len=seq_len, global_batch=batch_size,
                          local_batch=batch_size // process_count, process_index=process_index)
    return BatchIterator(source, worker_count)


def _file_rows(task, *, split, path, kw, seq_len, vocab_size, tokenizer, pack, num_test_examples):
    """(row_fn, n_rows) of a file source's split."""
    allowed = _TEXT_KWARGS if task == "text" else _MEMMAP_KWARGS
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(f"task {task!r} got unknown task_kwargs {unknown}; valid: {list(allowed)}")
    test_path = kw.get("test_path")
    read_path = test_path if (split == "test" and test_path) else path
    files = _match_files(read_path, task)
    if task == "text":
        _, _, needed = _load_tokenizer(tokenizer, kw.get("eos_id"))
        if vocab_size < needed:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {needed} ids "
                             f"(tokenizer={tokenizer!r})")
        arrays = _text_rows(files, seq_len=seq_len, tokenizer=tokenizer, eos_id=kw.get("eos_id"),
                            doc_separator=kw.get("doc_separator"), pack=pack)
        total = len(arrays["inputs"])
        make = functools.partial(_ArrayRows, arrays)
    else:
        windows = _WindowRows(files, _open_memmaps(files, kw.get("dtype", "uint16")), seq_len, vocab_size, 0, 0)
        total = windows.total
        if total == 0:
            raise ValueError(f"memmap files at path={str(read_path)!r} hold no window of seq_len+1={seq_len + 1} "
                             "tokens")

        def make(start, n):
            return _WindowRows(windows.files, windows.arrays, seq_len, vocab_size, start, n)

    if test_path:
        return make(0, total), total
    held_out = num_test_examples or 0
    if split == "test":
        if held_out < 1:
            raise ValueError(f"the test split of task {task!r} needs task_kwargs.test_path or num_test_examples > 0")
        if held_out >= total:
            raise ValueError(f"num_test_examples={held_out} leaves no training rows: path={str(path)!r} has "
                             f"{total} rows of seq_len={seq_len}")
        return make(total - held_out, held_out), held_out
    if held_out >= total:
        raise ValueError(f"num_test_examples={held_out} leaves no training rows: path={str(path)!r} has "
                         f"{total} rows of seq_len={seq_len}")
    return make(0, total - held_out), total - held_out
