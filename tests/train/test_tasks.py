"""Synthetic tasks: shapes, determinism, and each task's structure checked against a plain restatement."""

from __future__ import annotations

import numpy as np
import pytest

from seqmix_jax.train import tasks as T

ALL = sorted(T.TASKS)


def _ex(task, i, split="train", seed=7, **kw):
    base = dict(T.BASELINES[task])
    base.update(kw)
    return T.example(task, i, split=split, seed=seed, **base)


# ------------------------------------------------------------------------------------------ generic


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("task", ALL)
def test_shapes_dtypes_and_ranges(task, split):
    base = T.BASELINES[task]
    for i in range(3):
        ex = _ex(task, i, split)
        assert set(ex) == {"inputs", "targets", "weights"}
        for k, dt in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32)):
            assert ex[k].shape == (base["seq_len"],) and ex[k].dtype == dt, (k, ex[k].shape, ex[k].dtype)
        assert ex["inputs"].min() >= 0 and ex["inputs"].max() < base["vocab_size"]
        w = ex["weights"] > 0
        assert set(np.unique(ex["weights"])) <= {0.0, 1.0} and w.any()
        assert ex["targets"][w].min() >= 0 and ex["targets"][w].max() < base["vocab_size"]


@pytest.mark.parametrize("task", ALL)
def test_deterministic_and_streams_disjoint(task):
    a, b = _ex(task, 5), _ex(task, 5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    others = [_ex(task, 6), _ex(task, 5, split="test"), _ex(task, 5, seed=8)]
    for o in others:
        assert not np.array_equal(a["inputs"], o["inputs"])


@pytest.mark.parametrize("task", ALL)
def test_global_numpy_rng_neither_used_nor_touched(task):
    np.random.seed(1)
    state = np.random.get_state()[1].copy()
    a = _ex(task, 2)
    assert np.array_equal(np.random.get_state()[1], state)
    np.random.seed(2)
    b = _ex(task, 2)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_example_uses_seed_split_index_rng():
    """Example i is the generator called with default_rng([seed, split_id, i]) (the documented contract)."""
    ex = T.example("mqar", 11, split="test", seed=3, seq_len=64, vocab_size=100, num_kv_pairs=4)
    ref = T.mqar(np.random.default_rng([3, 1, 11]), seq_len=64, vocab_size=100, num_kv_pairs=4)
    np.testing.assert_array_equal(ex["inputs"], ref["inputs"])


# --------------------------------------------------------------------------------------------- MQAR


def _check_mqar(ex, V, kv, passes=1, random_non_queries=False):
    x, y, w = ex["inputs"], ex["targets"], ex["weights"]
    L = len(x)
    ctx = 2 * kv * passes
    keys, vals = x[0:2 * kv:2], x[1:2 * kv:2]
    assert len(set(keys.tolist())) == kv and len(set(vals.tolist())) == kv
    assert keys.min() >= 1 and keys.max() < V // 2 and vals.min() >= V // 2 and vals.max() < V
    for p in range(1, passes):
        np.testing.assert_array_equal(x[p * 2 * kv:(p + 1) * 2 * kv], x[:2 * kv])
    value_of = dict(zip(keys.tolist(), vals.tolist()))
    qpos = np.flatnonzero(w)
    assert len(qpos) == kv
    assert sorted(x[qpos].tolist()) == sorted(keys.tolist())  # every key queried exactly once
    for p in qpos:
        assert p >= ctx and (p - ctx) % 2 == 0 and p <= L - 2
        assert y[p] == value_of[x[p]]  # the weighted target is the value paired with that key earlier
    filler = np.ones(L, bool)
    filler[:ctx] = False
    filler[qpos] = False
    if not random_non_queries:
        assert (x[filler] == 0).all()
    return (qpos - ctx) // 2


def test_mqar_structure():
    for i in range(20):
        _check_mqar(T.example("mqar", i, split="train", seed=1, seq_len=128, vocab_size=256, num_kv_pairs=8),
                    256, 8)
    for i in range(5):
        _check_mqar(T.example("mqar", i, split="test", seed=1, seq_len=64, vocab_size=30, num_kv_pairs=4,
                              num_passes=2, random_non_queries=True), 30, 4, passes=2, random_non_queries=True)


def test_mqar_gaps_follow_power_law_sampling_without_replacement():
    """Gap inclusion frequencies match successive weighted draws without replacement (numpy's choice with p)."""
    seq_len, kv, a, n = 64, 4, 0.01, 3000
    space = (seq_len - 2 * kv) // 2
    ours = np.zeros(space)
    for i in range(n):
        ex = T.example("mqar", i, split="train", seed=5, seq_len=seq_len, vocab_size=64, num_kv_pairs=kv)
        ours[_check_mqar(ex, 64, kv)] += 1
    p = a * np.arange(1, space + 1, dtype=np.float64) ** (a - 1)
    p /= p.sum()
    rng = np.random.default_rng(0)
    ref = np.zeros(space)
    for _ in range(n):
        ref[rng.choice(space, size=kv, replace=False, p=p)] += 1
    diff = np.abs(ours - ref) / n
    print(f"gap inclusion freq: max abs diff {diff.max():.4f}, mean {diff.mean():.4f}; P(gap 0) ours "
          f"{ours[0] / n:.3f} ref {ref[0] / n:.3f}")
    assert diff.max() < 0.05


# ------------------------------------------------------------------------------------- MAD recall


def _check_recall(ex, V, split, noise_vocab=0):
    x, y, w = ex["inputs"], ex["targets"], ex["weights"]
    L = len(x)
    np.testing.assert_array_equal(y[:-1], x[1:])  # targets are the next tokens
    content = V - noise_vocab
    half = content // 2
    value_of, expect_w, n_noise = {}, np.zeros(L), 0
    for i in range(0, L, 2):
        k, v = int(x[i]), int(x[i + 1])
        if k >= content:
            assert v >= content and i < L - 2  # a noise pair (never the probe)
            n_noise += 1
            continue
        assert k < half and half <= v < content, (i, k, v)
        if k in value_of:
            assert value_of[k] == v  # one value per key within a sequence
            expect_w[i] = 1.0
        value_of[k] = v
    assert expect_w[L - 2] == 1.0  # the probe's key was presented before
    if split == "train":
        np.testing.assert_array_equal(w, np.r_[np.ones(L - 1), 0.0])
    else:
        np.testing.assert_array_equal(w, expect_w)
    return n_noise


@pytest.mark.parametrize("split", ["train", "test"])
def test_in_context_recall_structure(split):
    for i in range(20):
        _check_recall(_ex("in_context_recall", i, split), 16, split)
    _check_recall(_ex("in_context_recall", 0, split, vocab_size=64, seq_len=256), 64, split)


@pytest.mark.parametrize("split", ["train", "test"])
def test_noisy_in_context_recall_structure(split):
    n_noise = 0
    for i in range(40):
        n_noise += _check_recall(_ex("noisy_in_context_recall", i, split), 32, split, noise_vocab=16)
    frac = n_noise / (40 * 63)
    print(f"noise pair fraction {frac:.3f} (frac_noise 0.2, one slot always real)")
    assert 0.15 < frac < 0.25
    for i in range(10):  # heavy noise still leaves a real pair and a valid probe
        _check_recall(_ex("noisy_in_context_recall", i, split, seq_len=8, frac_noise=0.8), 32, split, noise_vocab=16)


def _parse_fuzzy(ex, V):
    """Full token sequence -> (n_pad, [(key, value, start of value)]) by splitting key-token and value-token runs."""
    x, y = ex["inputs"], ex["targets"]
    seq = np.r_[x, y[-1]].tolist()
    pad, half = V - 1, (V - 1) // 2
    n_pad = 0
    while seq[n_pad] == pad:
        n_pad += 1
    assert pad not in seq[n_pad:]
    pairs, i = [], n_pad
    while i < len(seq):
        j = i
        while j < len(seq) and seq[j] < half:
            j += 1
        m = j
        while m < len(seq) and half <= seq[m] < pad:
            m += 1
        assert i < j < m, "runs must alternate key, value"
        pairs.append((tuple(seq[i:j]), tuple(seq[j:m]), j))
        i = m
    return n_pad, pairs


@pytest.mark.parametrize("split", ["train", "test"])
def test_fuzzy_in_context_recall_structure(split):
    V, km, vm = 16, 3, 3
    for i in range(20):
        ex = _ex("fuzzy_in_context_recall", i, split)
        np.testing.assert_array_equal(ex["targets"][:-1], ex["inputs"][1:])
        L = len(ex["inputs"])
        _, pairs = _parse_fuzzy(ex, V)
        value_of, expect = {}, np.zeros(L + 1)
        for k, v, vstart in pairs:
            assert 1 <= len(k) <= km and 1 <= len(v) <= vm
            assert len(set(k)) == len(k) and len(set(v)) == len(v)
            if split == "test":
                assert len(k) == km
            if k in value_of:
                assert value_of[k] == v
                expect[vstart:vstart + len(v)] = 1.0
            value_of[k] = v
        assert pairs[-1][0] in [p[0] for p in pairs[:-1]]  # the final probe was presented
        assert (expect[-len(pairs[-1][1]):] == 1).all()
        if split == "train":
            np.testing.assert_array_equal(ex["weights"], np.ones(L))
        else:
            np.testing.assert_array_equal(ex["weights"], expect[1:])  # target t is sequence token t+1


# --------------------------------------------------------------------------------- copying, compression


def test_selective_copying_structure():
    V, n, L = 16, 16, 256
    for i in range(20):
        ex = _ex("selective_copying", i, "test" if i % 2 else "train")
        x, y, w = ex["inputs"], ex["targets"], ex["weights"]
        blank, copy = V - 2, V - 1
        assert x[L - n - 1] == copy and (x[L - n:] == blank).all()
        body = x[:L - n - 1]
        content = [t for t in body.tolist() if t != blank]
        assert len(content) == n and max(content) < V - 2
        np.testing.assert_array_equal(w, np.r_[np.zeros(L - n), np.ones(n)])
        assert y[L - n:].tolist() == content  # the non-blank tokens, in order
    ex = _ex("selective_copying", 0, seq_len=33, num_tokens_to_copy=16)  # no blanks at all: plain copy
    assert ex["targets"][-16:].tolist() == ex["inputs"][:16].tolist()


def test_compression_structure():
    V = 16
    for m, L in ((31, 64), (3, 10), (5, 10)):
        ex = _ex("compression", m, seq_len=L, num_tokens=m)
        x, y, w = ex["inputs"], ex["targets"], ex["weights"]
        assert (x[:m] < V - 1).all() and (x[m:] == V - 1).all()
        expect_w = np.zeros(L)
        expect_w[m:2 * m] = 1
        np.testing.assert_array_equal(w, expect_w)
        np.testing.assert_array_equal(y[m:2 * m], x[:m])
    ex = T.example("compression", 0, split="train", seed=0, seq_len=32, vocab_size=16)
    assert ex["weights"].sum() == 16  # default num_tokens = seq_len // 2


def test_memorization_map_is_fixed_and_shared_by_splits():
    V, L = 256, 32
    n_keys = (V - 1) // 2
    seen: dict[int, int] = {}
    for split in ("train", "test"):
        for i in range(30):
            ex = T.example("memorization", i, split=split, seed=4, seq_len=L, vocab_size=V)
            x, y, w = ex["inputs"], ex["targets"], ex["weights"]
            assert (x[1::2] == V - 1).all() and (x[0::2] < n_keys).all()
            np.testing.assert_array_equal(w, np.tile([0.0, 1.0], L // 2))
            for k, v in zip(x[0::2].tolist(), y[1::2].tolist()):
                assert seen.setdefault(k, v) == v  # one value per key across examples and splits
    assert len(seen) > 100
    vals = T.memorization_map(V, 4)
    assert sorted(vals) == list(range(n_keys))
    assert len(set(vals.values())) == n_keys and min(vals.values()) >= n_keys and max(vals.values()) < V - 1
    assert all(vals[k] == v for k, v in seen.items())
    assert T.memorization_map(V, 5) != vals  # the task seed picks the map


# --------------------------------------------------------------------------------------------- errors

BAD = [
    ("mqar", dict(seq_len=63, vocab_size=256), "seq_len must be even"),
    ("mqar", dict(seq_len=30, vocab_size=256, num_kv_pairs=8), r"seq_len=30 too short for num_kv_pairs=8"),
    ("mqar", dict(seq_len=128, vocab_size=16, num_kv_pairs=8), r"vocab_size=16 too small for num_kv_pairs=8"),
    ("mqar", dict(seq_len=128, vocab_size=256, num_kv_pairs=0), r"num_kv_pairs=0 .* must be >= 1"),
    ("mqar", dict(seq_len=128, vocab_size=256, power_a=0.0), r"power_a must be > 0, got 0.0"),
    ("mqar", dict(seq_len=0, vocab_size=256), r"seq_len must be a positive int, got 0"),
    ("mqar", dict(seq_len=64, vocab_size=0), r"vocab_size must be a positive int, got 0"),
    ("in_context_recall", dict(seq_len=7, vocab_size=16), r"seq_len must be even and >= 4, got 7"),
    ("in_context_recall", dict(seq_len=8, vocab_size=16, frac_noise=1.0), r"frac_noise must be in \[0, 1\)"),
    ("in_context_recall", dict(seq_len=8, vocab_size=16, frac_noise=0.5),
     r"frac_noise=0.5 > 0 needs noise_vocab_size > 0"),
    ("in_context_recall", dict(seq_len=8, vocab_size=16, noise_vocab_size=-1), r"noise_vocab_size must be >= 0"),
    ("noisy_in_context_recall", dict(seq_len=8, vocab_size=17), r"vocab_size=17 minus noise_vocab_size=16 leaves 1"),
    ("fuzzy_in_context_recall", dict(seq_len=128, vocab_size=6), r"vocab_size=6 gives 2 key and 3 value tokens"),
    ("fuzzy_in_context_recall", dict(seq_len=10, vocab_size=16), r"seq_len=10 too short .* need seq_len >= 11"),
    ("fuzzy_in_context_recall", dict(seq_len=64, vocab_size=16, k_motif_size=0), r"k_motif_size=0 .* must be >= 1"),
    ("selective_copying", dict(seq_len=32, vocab_size=16), r"seq_len=32 too short for num_tokens_to_copy=16"),
    ("selective_copying", dict(seq_len=64, vocab_size=2), r"vocab_size=2 must be >= 3"),
    ("selective_copying", dict(seq_len=64, vocab_size=16, num_tokens_to_copy=0), r"num_tokens_to_copy must be >= 1"),
    ("compression", dict(seq_len=10, vocab_size=16, num_tokens=6), r"num_tokens=6 must be >= 1 and fit twice"),
    ("compression", dict(seq_len=10, vocab_size=1), r"vocab_size=1 must be >= 2"),
    ("memorization", dict(seq_len=31, vocab_size=256), r"seq_len must be even, got 31"),
    ("memorization", dict(seq_len=32, vocab_size=2), r"vocab_size=2 must be >= 3"),
    ("memorization", dict(seq_len=32, vocab_size=256, map_seed=-1), r"map_seed must be >= 0"),
]


@pytest.mark.parametrize("task,kw,match", BAD, ids=[f"{t}-{m[:24]}" for t, _, m in BAD])
def test_generator_argument_errors(task, kw, match):
    with pytest.raises(ValueError, match=match):
        T.example(task, 0, split="train", seed=0, **kw)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown task 'mqarr'; known: \["):
        T.example("mqarr", 0, split="train", seed=0, seq_len=64, vocab_size=64)
    with pytest.raises(ValueError, match=r"task 'mqar' got unknown task_kwargs \['num_kv'\]; valid: \['num_kv_pairs'"):
        T.example("mqar", 0, split="train", seed=0, seq_len=64, vocab_size=64, num_kv=4)
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train'\], got 'valid'"):
        T.example("mqar", 0, split="valid", seed=0, seq_len=64, vocab_size=64)
    with pytest.raises(ValueError, match=r"index must be >= 0, got -1"):
        T.example("mqar", -1, split="train", seed=0, seq_len=64, vocab_size=64)
    with pytest.raises(ValueError, match=r"seed must be >= 0, got -3"):
        T.example("mqar", 0, split="train", seed=-3, seq_len=64, vocab_size=64)
    with pytest.raises(ValueError, match=r"mqar: split must be one of"):
        T.mqar(np.random.default_rng(0), seq_len=64, vocab_size=64, split="dev")
    with pytest.raises(ValueError, match=r"memorization: vocab_size=2 must be >= 3"):
        T.memorization_map(2, 0)
    assert T.task_knobs("selective_copying") == ("num_tokens_to_copy",)
