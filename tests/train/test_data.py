"""Grain pipelines: stream definition, state save/restore, process sharding, text packing, memmaps, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix_jax.train import data as D
from seqmix_jax.train import tasks as T

MQAR = dict(task="mqar", seq_len=32, vocab_size=64, num_kv_pairs=4, seed=3)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(D.KEYS) == set(y)
        for k in D.KEYS:
            np.testing.assert_array_equal(x[k], y[k])
            assert x[k].dtype == y[k].dtype


def _cat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in D.KEYS}


# ------------------------------------------------------------------------------------ synthetic


def test_synthetic_batches_follow_the_stream_definition():
    it = D.make_dataset(**MQAR, batch_size=4)
    batches = _take(it, 3)
    for b, batch in enumerate(batches):
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            "inputs": ((4, 32), np.int32), "targets": ((4, 32), np.int32),
            "weights": ((4, 32), np.float32), "segment_ids": ((4, 32), np.int32)}
        np.testing.assert_array_equal(batch["segment_ids"], 1)
        for r in range(4):  # row r of global batch b is example b*B + r of the train stream
            ex = T.example("mqar", 4 * b + r, split="train", seed=3, seq_len=32, vocab_size=64, num_kv_pairs=4)
            for k in ("inputs", "targets", "weights"):
                np.testing.assert_array_equal(batch[k][r], ex[k])
    assert it.num_batches is None and it.local_batch_size == 4 and it.seq_len == 32


@pytest.mark.parametrize("worker_count", [0, 2])
def test_state_save_restore_repeats_the_stream(worker_count):
    it = D.make_dataset(**MQAR, batch_size=4, worker_count=worker_count)
    _take(it, 5)
    state = it.get_state()
    after = _take(it, 3)
    it.set_state(state)
    _assert_batches_equal(after, _take(it, 3))
    fresh = D.make_dataset(**MQAR, batch_size=4, worker_count=worker_count)
    fresh.set_state(state)
    _assert_batches_equal(after, _take(fresh, 3))
    print("state:", state)


def test_state_restore_with_epoch_shuffle():
    kw = dict(MQAR, batch_size=4, num_train_examples=10)
    it = D.make_dataset(**kw)
    _take(it, 5)
    state = it.get_state()
    after = _take(it, 3)
    fresh = D.make_dataset(**kw)
    fresh.set_state(state)
    _assert_batches_equal(after, _take(fresh, 3))


def test_epochs_visit_every_train_example_once_in_a_fresh_order():
    n, bs = 12, 4
    it = D.make_dataset(**MQAR, batch_size=bs, num_train_examples=n)
    examples = [T.example("mqar", i, split="train", seed=3, seq_len=32, vocab_size=64, num_kv_pairs=4)["inputs"]
                for i in range(n)]
    lookup = {e.tobytes(): i for i, e in enumerate(examples)}
    orders = []
    for _ in range(3):
        rows = _cat(_take(it, n // bs))["inputs"]
        orders.append([lookup[r.tobytes()] for r in rows])
    for order in orders:
        assert sorted(order) == list(range(n))
    print("epoch orders:", orders)
    assert orders[0] != orders[1] != orders[2]


@pytest.mark.parametrize("split,extra", [("train", {}), ("train", {"num_train_examples": 7}),
                                         ("test", {"num_test_examples": 17})])
def test_process_shards_concatenate_to_the_global_batch(split, extra):
    kw = dict(MQAR, batch_size=6, split=split, **extra)
    full = _take(D.make_dataset(**kw), 3)
    shards = [_take(D.make_dataset(**kw, process_index=p, process_count=3), 3) for p in range(3)]
    for b in range(3):
        assert shards[0][b]["inputs"].shape == (2, 32)
        _assert_batches_equal([full[b]], [_cat([shards[p][b] for p in range(3)])])


def test_state_transfers_across_process_counts():
    """The state counts global batches, so a 2-process position resumes in a 1-process run (and back)."""
    kw = dict(MQAR, batch_size=4, num_train_examples=9)
    two = [D.make_dataset(**kw, process_index=p, process_count=2) for p in range(2)]
    for it in two:
        _take(it, 4)
    state = two[0].get_state()
    assert state == two[1].get_state()
    one = D.make_dataset(**kw)
    one.set_state(state)
    _assert_batches_equal(_take(one, 2), [_cat([next(it) for it in two]) for _ in range(2)])


def test_test_split_is_finite_ordered_and_padded():
    it = D.make_dataset(**MQAR, batch_size=4, split="test", num_test_examples=10)
    batches = list(it)
    assert it.num_batches == 3 and len(batches) == 3
    rows = _cat(batches)
    for i in range(10):
        ex = T.example("mqar", i, split="test", seed=3, seq_len=32, vocab_size=64, num_kv_pairs=4)
        np.testing.assert_array_equal(rows["inputs"][i], ex["inputs"])
    for k in D.KEYS:  # padding rows: all zeros, weight 0, segment 0
        assert not rows[k][10:].any()
    np.testing.assert_array_equal(rows["segment_ids"][:10], 1)
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_every_task_through_the_pipeline(task):
    base = dict(T.BASELINES[task])
    kw = {k: base.pop(k) for k in list(base) if k not in ("seq_len", "vocab_size")}
    for split in ("train", "test"):
        batch = next(D.make_dataset(task=task, batch_size=2, split=split, num_test_examples=3, seed=1,
                                    task_kwargs=kw, **base))
        assert batch["inputs"].shape == (2, base["seq_len"]) and batch["weights"].sum() > 0


# ------------------------------------------------------------------------------------------- text


def _byte_pairs(text: bytes):
    seq = [256] + list(text) + [256]
    return list(zip(seq[:-1], seq[1:]))


def _write_docs(tmp_path, docs):
    d = tmp_path / "corpus"
    d.mkdir()
    for i, text in enumerate(docs):
        (d / f"doc{i:02d}.txt").write_bytes(text)
    return str(d / "*.txt")


DOCS = [b"alpha beta", b"x", "\u00fcber caf\u00e9 \u2603".encode(), b"the quick brown fox jumps over", b"ok"]


def test_text_packing_segments_never_cross_documents(tmp_path):
    path = _write_docs(tmp_path, DOCS)
    L = 7
    it = D.make_dataset(task="text", path=path, seq_len=L, batch_size=2, vocab_size=300, pack=True,
                        split="test", num_test_examples=0, task_kwargs={"test_path": path})
    rows = _cat(list(it))
    expected = [p for d in DOCS for p in _byte_pairs(d)]  # files are read in sorted order
    n_rows = -(-len(expected) // L)
    assert rows["inputs"].shape[0] == -(-n_rows // 2) * 2
    assert not rows["segment_ids"][n_rows:].any()  # batch padding rows
    got, pieces = [], []
    for r in range(n_rows):
        seg, w = rows["segment_ids"][r], rows["weights"][r]
        np.testing.assert_array_equal(w, seg > 0)
        valid = seg > 0
        assert valid[:valid.sum()].all()  # padding only at the end
        ids = seg[valid]
        assert ids[0] == 1 and set(np.diff(ids).tolist()) <= {0, 1}  # ids restart at 1 and count up by one
        for s in np.unique(ids):
            sel = seg == s
            pieces.append(list(zip(rows["inputs"][r][sel].tolist(), rows["targets"][r][sel].tolist())))
        got += list(zip(rows["inputs"][r][valid].tolist(), rows["targets"][r][valid].tolist()))
    assert got == expected
    # each segment is a contiguous piece of exactly one document's pairs
    doc_pairs = [_byte_pairs(d) for d in DOCS]
    for piece in pieces:
        assert any(any(dp[i:i + len(piece)] == piece for i in range(len(dp))) for dp in doc_pairs), piece


def test_text_unpacked_one_document_per_row(tmp_path):
    path = _write_docs(tmp_path, DOCS)
    L = 8
    it = D.make_dataset(task="text", path=path, seq_len=L, batch_size=5, vocab_size=257, pack=False,
                        split="test", task_kwargs={"test_path": path})
    (batch,) = list(it)
    for r, doc in enumerate(DOCS):
        pairs = _byte_pairs(doc)[:L]
        n = len(pairs)
        assert list(zip(batch["inputs"][r][:n].tolist(), batch["targets"][r][:n].tolist())) == pairs
        np.testing.assert_array_equal(batch["segment_ids"][r], np.r_[np.ones(n), np.zeros(L - n)])
        np.testing.assert_array_equal(batch["weights"][r], np.r_[np.ones(n), np.zeros(L - n)])


def test_text_separator_holdout_and_state(tmp_path):
    f = tmp_path / "one.txt"
    f.write_bytes(b"first doc\n\nsecond\n\n\n\nthird one here")
    kw = dict(task="text", path=str(f), seq_len=4, batch_size=2, vocab_size=257, num_test_examples=2,
              task_kwargs={"doc_separator": "\n\n"})
    pairs = [p for d in (b"first doc", b"second", b"third one here") for p in _byte_pairs(d)]  # empty piece dropped
    n_rows = -(-len(pairs) // 4)
    test_rows = _cat(list(D.make_dataset(**kw, split="test")))
    flat = list(zip(test_rows["inputs"].ravel().tolist(), test_rows["targets"].ravel().tolist()))
    tail = pairs[(n_rows - 2) * 4:]
    assert flat[:len(tail)] == tail  # the test split is the last num_test_examples rows
    train = D.make_dataset(**kw)
    seen = _cat(_take(train, n_rows - 2))  # one epoch of the n_rows - 2 train rows (batch 2 divides it)
    train_pairs = set(zip(seen["inputs"].ravel().tolist(), seen["targets"].ravel().tolist()))
    assert train_pairs == set(pairs[:(n_rows - 2) * 4])
    state = train.get_state()
    after = _take(train, 2)
    train.set_state(state)
    _assert_batches_equal(after, _take(train, 2))


def test_text_hf_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    path = _write_docs(tmp_path, [b"hello world", b"again hello zzz"])
    it = D.make_dataset(task="text", path=path, tokenizer=str(tok_path), seq_len=16, batch_size=1, vocab_size=5,
                        split="test", task_kwargs={"test_path": path})
    (batch,) = list(it)
    n = int(batch["weights"].sum())
    assert batch["inputs"][0][:n].tolist() == [1, 2, 3, 1, 4, 2, 0]
    assert batch["targets"][0][:n].tolist() == [2, 3, 1, 4, 2, 0, 1]
    assert batch["segment_ids"][0][:n].tolist() == [1, 1, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError, match=r"vocab_size=4 is smaller than the tokenizer's 5 ids"):
        D.make_dataset(task="text", path=path, tokenizer=str(tok_path), seq_len=16, batch_size=1, vocab_size=4)
    del vocab["</s>"]
    bare = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(ValueError, match=r"has none of the EOS tokens .*set data.task_kwargs.eos_id"):
        D.make_dataset(task="text", path=path, tokenizer=str(tmp_path / "bare.json"), seq_len=16, batch_size=1,
                       vocab_size=5)
    it = D.make_dataset(task="text", path=path, tokenizer=str(tmp_path / "bare.json"), seq_len=16, batch_size=1,
                        vocab_size=5, split="test", task_kwargs={"test_path": path, "eos_id": 0})
    assert next(it)["inputs"][0][0] == 0


# ----------------------------------------------------------------------------------------- memmap


def test_memmap_windows_npy_and_bin(tmp_path):
    L = 5
    a = np.arange(23, dtype=np.int32)  # (23 - 1) // 5 = 4 windows
    b = 1000 + np.arange(12, dtype=np.uint32)  # 2 windows
    np.save(tmp_path / "a.npy", a)
    b.tofile(tmp_path / "b.bin")
    it = D.make_dataset(task="memmap", path=str(tmp_path / "*.*"), seq_len=L, batch_size=3, vocab_size=2000,
                        split="test", task_kwargs={"dtype": "uint32", "test_path": str(tmp_path / "*.*")})
    rows = _cat(list(it))
    windows = [a[r * L:r * L + L + 1] for r in range(4)] + [b[r * L:r * L + L + 1] for r in range(2)]
    for r, w in enumerate(windows):  # contiguous seq_len+1 windows, never across files
        np.testing.assert_array_equal(rows["inputs"][r], w[:-1])
        np.testing.assert_array_equal(rows["targets"][r], w[1:])
    np.testing.assert_array_equal(rows["weights"], 1)
    np.testing.assert_array_equal(rows["segment_ids"], 1)
    u16 = np.arange(40, dtype=np.uint16)
    u16.tofile(tmp_path / "c.bin")  # the default raw dtype is uint16
    it = D.make_dataset(task="memmap", path=str(tmp_path / "c.bin"), seq_len=L, batch_size=2, vocab_size=64,
                        num_test_examples=1)
    rows = _cat(_take(it, 3))  # the 6 train windows of 7, one epoch
    assert sorted(rows["inputs"][:, 0].tolist()) == [0, 5, 10, 15, 20, 25]
    test = next(D.make_dataset(task="memmap", path=str(tmp_path / "c.bin"), seq_len=L, batch_size=2,
                               vocab_size=64, num_test_examples=1, split="test"))
    np.testing.assert_array_equal(test["inputs"][0], np.arange(30, 35))
    assert not test["weights"][1].any()


def test_memmap_errors(tmp_path):
    np.save(tmp_path / "m.npy", np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match=r"must be a 1-D integer token array, got shape \(3, 4\)"):
        D.make_dataset(task="memmap", path=str(tmp_path / "m.npy"), seq_len=2, batch_size=1, vocab_size=10)
    np.save(tmp_path / "big.npy", np.array([1, 2, 99, 3], np.int32))
    it = D.make_dataset(task="memmap", path=str(tmp_path / "big.npy"), seq_len=3, batch_size=1, vocab_size=10)
    with pytest.raises(ValueError, match=r"token 99 .* outside \[0, vocab_size=10\)"):
        next(it)
    np.save(tmp_path / "short.npy", np.array([1, 2], np.int32))
    with pytest.raises(ValueError, match=r"hold no window of seq_len\+1=4 tokens"):
        D.make_dataset(task="memmap", path=str(tmp_path / "short.npy"), seq_len=3, batch_size=1, vocab_size=10)
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"cannot read .*odd.bin' as raw uint16"):
        D.make_dataset(task="memmap", path=str(tmp_path / "odd.bin"), seq_len=1, batch_size=1, vocab_size=10)
    with pytest.raises(ValueError, match=r"task 'memmap' got unknown task_kwargs \['dtpye'\]"):
        D.make_dataset(task="memmap", path=str(tmp_path / "big.npy"), seq_len=1, batch_size=1, vocab_size=10,
                       task_kwargs={"dtpye": "uint32"})
    kw = dict(task="memmap", path=str(tmp_path / "big.npy"), seq_len=1, batch_size=1, vocab_size=100)
    with pytest.raises(ValueError, match=r"num_test_examples=3 leaves no training rows: .* has 3 rows"):
        D.make_dataset(**kw, num_test_examples=3)
    with pytest.raises(ValueError, match=r"num_test_examples=3 leaves no training rows"):
        D.make_dataset(**kw, num_test_examples=3, split="test")
    with pytest.raises(ValueError, match=r"test split of task 'memmap' needs task_kwargs.test_path or num_test"):
        D.make_dataset(**kw, split="test")


# ------------------------------------------------------------------------------------------ metric


def test_token_accuracy_against_a_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    batch = {"targets": rng.integers(0, 11, size=(3, 7)).astype(np.int32),
             "weights": (rng.random((3, 7)) < 0.5).astype(np.float32)}
    batch["targets"][0, :3] = logits[0, :3].argmax(-1)
    batch["weights"][0, :3] = 1
    correct = count = 0
    for i in range(3):
        for t in range(7):
            if batch["weights"][i, t] > 0:
                count += 1
                correct += int(np.argmax(logits[i, t]) == batch["targets"][i, t])
    fn = D.accuracy_fn("mqar")
    c, n = jax.jit(fn)(jnp.asarray(logits), batch)
    print(f"accuracy {int(c)}/{int(n)} (loop {correct}/{count})")
    assert (int(c), int(n)) == (correct, count) and correct >= 3
    c2, n2 = fn(logits.argmax(-1), batch)
    assert (int(c2), int(n2)) == (correct, count)
    for task in list(T.TASKS) + ["text", "memmap"]:
        assert D.accuracy_fn(task) is D.token_accuracy
    with pytest.raises(ValueError, match=r"predictions of shape \(3, 6\) do not match targets \(3, 7\)"):
        fn(np.zeros((3, 6), np.int32), batch)
    with pytest.raises(ValueError, match=r"unknown task 'foo'"):
        D.accuracy_fn("foo")


# ------------------------------------------------------------------------------------------ errors


def test_make_dataset_errors(tmp_path):
    kw = dict(MQAR, batch_size=4)
    cases = [
        (dict(kw, task="mqarr"), r"unknown task 'mqarr'; known: \["),
        (dict(kw, batch_size=6, process_count=4), r"batch_size=6 is not divisible by process_count=4"),
        (dict(kw, process_index=2, process_count=2), r"need 0 <= process_index < process_count, got process_index=2"),
        (dict(kw, split="valid"), r"split must be one of \['test', 'train'\], got 'valid'"),
        (dict(kw, split="test"), r"test split needs num_test_examples > 0, got None"),
        (dict(kw, seq_len=0), r"seq_len must be a positive int, got 0"),
        (dict(kw, batch_size=0), r"batch_size must be a positive int, got 0"),
        (dict(kw, worker_count=-1), r"worker_count must be >= 0, got -1"),
        (dict(kw, seed=-1), r"seed must be >= 0, got -1"),
        (dict(kw, num_train_examples=-5), r"num_train_examples must be >= 0 or None, got -5"),
        (dict(kw, task_kwargs={"num_kv_pairs": 2}), r"num_kv_pairs=4 conflicts with task_kwargs num_kv_pairs=2"),
        (dict(kw, task_kwargs={"num_kvpairs": 2}), r"task 'mqar' got unknown task_kwargs \['num_kvpairs'\]"),
        (dict(kw, vocab_size=8), r"mqar: vocab_size=8 too small for num_kv_pairs=4"),
        (dict(kw, task="text", path=str(tmp_path / "missing.txt")), r"no files match path='.*missing.txt'"),
        (dict(kw, task="text", path=str(tmp_path / "*.md")), r"no files match path='.*\*.md' \(task 'text'\)"),
        (dict(kw, task="memmap", path=None), r"task 'memmap' needs data.path"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            D.make_dataset(**args)
    (tmp_path / "a.txt").write_bytes(b"hi")
    (tmp_path / "empty.txt").write_bytes(b"")
    text = dict(kw, task="text", path=str(tmp_path / "a.txt"))
    text_cases = [
        (dict(text, vocab_size=256), r"vocab_size=256 is smaller than the tokenizer's 257 ids"),
        (dict(text, vocab_size=300, tokenizer=str(tmp_path / "nope.json")),
         r"tokenizer='.*nope.json' is neither 'byte' nor an existing tokenizer.json file"),
        (dict(text, vocab_size=300, task_kwargs={"eos_id": 3}), r"byte tokenizer's EOS id is 256; got .*eos_id=3"),
        (dict(text, vocab_size=300, task_kwargs={"pack": True}), r"task 'text' got unknown task_kwargs \['pack'\]"),
        (dict(text, vocab_size=300, path=str(tmp_path / "empty.txt")), r"contain no text"),
    ]
    for args, match in text_cases:
        with pytest.raises(ValueError, match=match):
            D.make_dataset(**args)
    it = D.make_dataset(**kw, unrelated_config_field=1)  # extra DataSection fields are ignored
    assert next(it)["inputs"].shape == (4, 32)
