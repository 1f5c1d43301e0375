"""Synthetic sequence tasks as causal-LM examples: zoology's MQAR and the six MAD tasks.

Pure numpy; no JAX. Every generator has the signature

    fn(rng: np.random.Generator, *, seq_len, vocab_size, split="train", **knobs)
        -> {"inputs": int32 (seq_len,), "targets": int32 (seq_len,), "weights": float32 (seq_len,)}

and draws randomness from `rng` only (never numpy's global RNG). `targets[t]` is what the model should
emit after reading `inputs[:t+1]`; `weights[t]` is 1 where the loss/accuracy counts and 0 elsewhere (the
ignore-index -100 of the reference code). Targets at weight-0 positions are filler: the next input token for
the recall tasks (whose training loss is plain next-token prediction), 0 for the others.

`example(task, index, split=..., seed=...)` seeds a fresh generator with `[seed, split_id, index]`, so
example i of a split is reproducible on its own and the train and test streams never share a generator.

Tasks (REFERENCE_NOTES §6-7; the semantics are restated here, not copied):

- `mqar` (zoology `multiquery_ar`): keys drawn without replacement from [1, V/2), values from [V/2, V);
  context `k1 v1 k2 v2 ...` (repeated `num_passes` times), then each key queried once in the remaining
  region, at even offsets 2*gap with gaps drawn without replacement with P(gap = i-1) proportional to
  a * i**(a-1) (a = power_a = 0.01 strongly favours short gaps). Other query-region tokens are 0 (or
  uniform over [0, V) with random_non_queries=True). The target at a query key's position is its value
  (zoology builds labels one step ahead and shifts them by one), weight 1 there only; train = test.
- `in_context_recall` (MAD, multi-query): keys from the lower half, values from the upper half of the
  V - noise_vocab_size content tokens; a fresh random key->value map per sequence; seq_len/2 - 1 (k, v) pairs
  (keys drawn with replacement, so keys repeat) followed by a probe pair with an already-seen key.
  Train: weight 1 on every position but the last (MAD supervises the whole shifted input). Test: weight 1
  only at key positions whose key appeared earlier (target = its value), which includes the probe.
- `noisy_in_context_recall`: the same with noise_vocab_size=16 noise tokens [V-16, V) and frac_noise=0.2:
  each context pair slot is, with probability frac_noise, two uniform noise tokens instead of a pair (one
  random slot is always a real pair). Noise targets are weighted in training, never in test.
- `fuzzy_in_context_recall`: keys are motifs of 1..k_motif_size distinct key tokens, values motifs of
  1..v_motif_size distinct value tokens (pad token V-1; keys [0, (V-1)//2), values [(V-1)//2, V-1)). A probe
  pair is placed at a random pair boundary of the context and repeated at the end; the sequence is left-padded
  with the pad token to seq_len + 1 tokens and shifted. At test every key has the full k_motif_size. Train
  weights: all positions; test: the tokens of every value whose key motif appeared earlier.
- `selective_copying`: content tokens [0, V-2), blank V-2, copy token V-1. num_tokens_to_copy content tokens
  at uniformly random positions (order kept) among seq_len - 2n - 1 blanks, then the copy token, then n
  blanks; the targets at those last n positions are the content tokens in order (weight 1 there only;
  train = test). MAD inserts its blanks with numpy's global RNG; here every draw comes from `rng`.
- `compression` (adapted): MAD trains an autoencoder (encoder, last position as the code, MLP decoder with
  positions). A causal LM has no bottleneck to train, so here the sequence is `num_tokens` random content
  tokens from [0, V-1) followed by the compression token V-1 repeated to seq_len; the targets at the
  compression positions m, m+1, ..., 2m-1 reconstruct the content tokens t_1..t_m in order (weight 1
  there only; train = test). Default num_tokens = seq_len // 2. Because a causal LM can attend to the
  content directly, this measures exact recall of a random sequence at a fixed lag, not compression
  through a single vector; MAD's "seq 32" (31 tokens to compress) corresponds to seq_len=64, num_tokens=31.
- `memorization`: a key->value map fixed by `map_seed` (`example` passes the task seed, so train and test
  share it): keys [0, (V-1)//2), each mapped to a distinct value in [(V-1)//2, V-1); insert token V-1.
  Input `k1 INS k2 INS ...` (keys drawn with replacement); the target at each INS position is the value of
  the key before it (weight 1 there only; train = test).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np

SPLITS = {"train": 0, "test": 1}


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _common_checks(task: str, seq_len: int, vocab_size: int, split: str) -> None:
    _require(isinstance(seq_len, (int, np.integer)) and seq_len >= 1,
             f"{task}: seq_len must be a positive int, got {seq_len!r}")
    _require(isinstance(vocab_size, (int, np.integer)) and vocab_size >= 1,
             f"{task}: vocab_size must be a positive int, got {vocab_size!r}")
    _require(split in SPLITS, f"{task}: split must be one of {sorted(SPLITS)}, got {split!r}")


def _pack(inputs, targets, weights) -> dict[str, np.ndarray]:
    return {"inputs": np.asarray(inputs, np.int32), "targets": np.asarray(targets, np.int32),
            "weights": np.asarray(weights, np.float32)}


# ----------------------------------------------------------------------------------------------- MQAR


def mqar(rng: np.random.Generator, *, seq_len: int, vocab_size: int, split: str = "train", num_kv_pairs: int = 8,
         power_a: float = 0.01, num_passes: int = 1, random_non_queries: bool = False) -> dict[str, np.ndarray]:
    """Multi-query associative recall (zoology). See the module docstring for the layout."""
    _common_checks("mqar", seq_len, vocab_size, split)
    kv = num_kv_pairs
    _require(kv >= 1 and num_passes >= 1, f"mqar: num_kv_pairs={kv} and num_passes={num_passes} must be >= 1")
    _require(power_a > 0, f"mqar: power_a must be > 0, got {power_a}")
    _require(seq_len % 2 == 0, f"mqar: seq_len must be even, got {seq_len}")
    context = 2 * kv * num_passes
    _require(context + 2 * kv <= seq_len,
             f"mqar: seq_len={seq_len} too short for num_kv_pairs={kv} (num_passes={num_passes}): need "
             f"2*kv*passes + 2*kv = {context + 2 * kv}")
    half = vocab_size // 2
    _require(half - 1 >= kv and vocab_size - half >= kv,
             f"mqar: vocab_size={vocab_size} too small for num_kv_pairs={kv}: keys come from [1, {half}) and "
             f"values from [{half}, {vocab_size}); need vocab_size >= {2 * kv + 2}")

    keys = 1 + rng.choice(half - 1, size=kv, replace=False)
    values = half + rng.choice(vocab_size - half, size=kv, replace=False)
    pairs = np.empty(2 * kv, np.int64)
    pairs[0::2], pairs[1::2] = keys, values

    # Gaps without replacement, P(gap = i-1) proportional to a * i**(a-1): the top-kv of log p + Gumbel noise is
    # distributed exactly like kv successive weighted draws without replacement (and ~10x faster than
    # Generator.choice with p).
    space = (seq_len - context) // 2
    log_p = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
    gaps = np.argsort(-(log_p + rng.gumbel(size=space)), kind="stable")[:kv]

    inputs = np.zeros(seq_len, np.int64)
    inputs[:context] = np.tile(pairs, num_passes)
    query_pos = context + 2 * gaps
    inputs[query_pos] = keys
    if random_non_queries:
        filler = np.ones(seq_len, bool)
        filler[:context] = False
        filler[query_pos] = False
        inputs[filler] = rng.integers(0, vocab_size, size=int(filler.sum()))
    targets = np.zeros(seq_len, np.int64)
    weights = np.zeros(seq_len, np.float32)
    targets[query_pos] = values
    weights[query_pos] = 1.0
    return _pack(inputs, targets, weights)


# ---------------------------------------------------------------------------------------- MAD recall


def in_context_recall(rng: np.random.Generator, *, seq_len: int, vocab_size: int, split: str = "train",
                      noise_vocab_size: int = 0, frac_noise: float = 0.0) -> dict[str, np.ndarray]:
    """MAD in-context recall (multi-query). See the module docstring."""
    return _recall("in_context_recall", rng, seq_len, vocab_size, split, noise_vocab_size, frac_noise)


def noisy_in_context_recall(rng: np.random.Generator, *, seq_len: int, vocab_size: int, split: str = "train",
                            noise_vocab_size: int = 16, frac_noise: float = 0.2) -> dict[str, np.ndarray]:
    """MAD noisy in-context recall: in_context_recall with noise pairs. See the module docstring."""
    return _recall("noisy_in_context_recall", rng, seq_len, vocab_size, split, noise_vocab_size, frac_noise)


def _recall(task, rng, seq_len, vocab_size, split, noise_vocab_size, frac_noise):
    _common_checks(task, seq_len, vocab_size, split)
    _require(seq_len % 2 == 0 and seq_len >= 4, f"{task}: seq_len must be even and >= 4, got {seq_len}")
    _require(0.0 <= frac_noise < 1.0, f"{task}: frac_noise must be in [0, 1), got {frac_noise}")
    _require(noise_vocab_size >= 0, f"{task}: noise_vocab_size must be >= 0, got {noise_vocab_size}")
    _require(frac_noise == 0 or noise_vocab_size > 0,
             f"{task}: frac_noise={frac_noise} > 0 needs noise_vocab_size > 0, got {noise_vocab_size}")
    content = vocab_size - noise_vocab_size
    _require(content >= 2, f"{task}: vocab_size={vocab_size} minus noise_vocab_size={noise_vocab_size} leaves "
                           f"{content} content tokens; need >= 2 (one key, one value)")
    n_keys = content // 2
    n_values = content - n_keys

    # All draws up front (vectorized): pair i is noise with prob frac_noise (slot `always_real` never is);
    # a key's value is the candidate drawn at its first real occurrence; later occurrences are queries.
    n_ctx = seq_len // 2 - 1
    always_real = rng.integers(n_ctx)
    keys = rng.integers(n_keys, size=n_ctx)
    candidates = n_keys + rng.integers(n_values, size=n_ctx)
    noise = np.zeros(n_ctx, bool)
    if frac_noise > 0:
        noise = rng.random(n_ctx) < frac_noise
        noise[always_real] = False
        noise_tokens = rng.integers(content, vocab_size, size=(n_ctx, 2))
    real = np.flatnonzero(~noise)
    seen_keys, first = np.unique(keys[real], return_index=True)
    value_of = np.zeros(n_keys, np.int64)
    value_of[seen_keys] = candidates[real[first]]
    repeat = np.ones(n_ctx, bool)
    repeat[noise] = False
    repeat[real[first]] = False
    probe = seen_keys[rng.integers(len(seen_keys))]

    seq = np.empty(seq_len, np.int64)
    seq[0:-2:2], seq[1:-2:2] = keys, value_of[keys]
    if frac_noise > 0:
        seq[0:-2:2][noise], seq[1:-2:2][noise] = noise_tokens[noise, 0], noise_tokens[noise, 1]
    seq[-2], seq[-1] = probe, value_of[probe]
    test_w = np.zeros(seq_len, np.float32)
    test_w[0:-2:2] = repeat
    test_w[-2] = 1.0

    targets = np.append(seq[1:], 0)
    if split == "train":
        weights = np.ones(seq_len, np.float32)
        weights[-1] = 0.0
    else:
        weights = test_w
    return _pack(seq, targets, weights)


def fuzzy_in_context_recall(rng: np.random.Generator, *, seq_len: int, vocab_size: int, split: str = "train",
                            k_motif_size: int = 3, v_motif_size: int = 3) -> dict[str, np.ndarray]:
    """MAD fuzzy in-context recall (multi-query): keys and values are multi-token motifs. See the module docstring."""
    task = "fuzzy_in_context_recall"
    _common_checks(task, seq_len, vocab_size, split)
    km, vm = k_motif_size, v_motif_size
    _require(km >= 1 and vm >= 1, f"{task}: k_motif_size={km} and v_motif_size={vm} must be >= 1")
    pad = vocab_size - 1
    n_keys = (vocab_size - 1) // 2
    n_values = (vocab_size - 1) - n_keys
    _require(n_keys >= km and n_values >= vm,
             f"{task}: vocab_size={vocab_size} gives {n_keys} key and {n_values} value tokens; motifs of "
             f"distinct tokens need >= k_motif_size={km} and >= v_motif_size={vm}")
    _require(seq_len + 1 >= 2 * (km + vm),
             f"{task}: seq_len={seq_len} too short for k_motif_size={km}, v_motif_size={vm}: need seq_len >= "
             f"{2 * (km + vm) - 1}")
    test = split == "test"

    # Draw every motif up front: row j holds pair j's key and value (row 0 is the probe). A motif is `size`
    # distinct tokens in uniformly random order: the first `size` entries of a random permutation.
    rows = (seq_len + 1) // 2 + 1  # every pair takes >= 2 tokens, so no sequence needs more rows
    k_size = np.full(rows, km) if test else rng.integers(1, km + 1, size=rows)
    v_size = rng.integers(1, vm + 1, size=rows)
    k_tok = np.argsort(rng.random((rows, n_keys)), axis=1)[:, :km].tolist()
    v_tok = (n_keys + np.argsort(rng.random((rows, n_values)), axis=1)[:, :vm]).tolist()
    k_size, v_size = k_size.tolist(), v_size.tolist()

    k_probe, v_probe = tuple(k_tok[0][:k_size[0]]), tuple(v_tok[0][:v_size[0]])
    kv = {k_probe: v_probe}
    budget = seq_len + 1 - 2 * (len(k_probe) + len(v_probe))
    pairs, used, j = [], 0, 1
    while used + km + vm <= budget:
        k = tuple(k_tok[j][:k_size[j]])
        if k not in kv:
            kv[k] = tuple(v_tok[j][:v_size[j]])
        pairs.append((k, kv[k]))
        used += len(k) + len(kv[k])
        j += 1
    pairs.insert(int(rng.integers(len(pairs) + 1)), (k_probe, v_probe))
    pairs.append((k_probe, v_probe))

    tokens, supervised, seen = [], [], set()
    for k, v in pairs:
        tokens += [*k, *v]
        supervised += [0.0] * len(k) + [1.0 if k in seen else 0.0] * len(v)
        seen.add(k)
    n_pad = seq_len + 1 - len(tokens)
    seq = np.array([pad] * n_pad + tokens, np.int64)
    sup = np.array([0.0] * n_pad + supervised, np.float32)
    weights = np.ones(seq_len, np.float32) if split == "train" else sup[1:]
    return _pack(seq[:-1], seq[1:], weights)


# ------------------------------------------------------------------------------ copying, compression


def selective_copying(rng: np.random.Generator, *, seq_len: int, vocab_size: int, split: str = "train",
                      num_tokens_to_copy: int = 16) -> dict[str, np.ndarray]:
    """MAD selective copying. See the module docstring."""
    task = "selective_copying"
    _common_checks(task, seq_len, vocab_size, split)
    n = num_tokens_to_copy
    _require(n >= 1, f"{task}: num_tokens_to_copy must be >= 1, got {n}")
    _require(vocab_size >= 3, f"{task}: vocab_size={vocab_size} must be >= 3 (content, blank, copy tokens)")
    _require(seq_len >= 2 * n + 1,
             f"{task}: seq_len={seq_len} too short for num_tokens_to_copy={n}: need seq_len >= 2n+1 = {2 * n + 1}")
    blank, copy = vocab_size - 2, vocab_size - 1
    content = rng.integers(0, vocab_size - 2, size=n)
    body_len = seq_len - n - 1
    body = np.full(body_len, blank, np.int64)
    body[np.sort(rng.choice(body_len, size=n, replace=False))] = content
    inputs = np.concatenate([body, [copy], np.full(n, blank)])
    targets = np.zeros(seq_len, np.int64)
    weights = np.zeros(seq_len, np.float32)
    targets[-n:] = content
    weights[-n:] = 1.0
    return _pack(inputs, targets, weights)


def compression(rng: np.random.Generator, *, seq_len: int, vocab_size: int, split: str = "train",
                num_tokens: int | None = None) -> dict[str, np.ndarray]:
    """MAD compression adapted to a causal LM (content, then compression tokens that reconstruct it)."""
    task = "compression"
    _common_checks(task, seq_len, vocab_size, split)
    m = seq_len // 2 if num_tokens is None else num_tokens
    _require(m >= 1 and 2 * m <= seq_len,
             f"{task}: num_tokens={m} must be >= 1 and fit twice in seq_len={seq_len}")
    _require(vocab_size >= 2, f"{task}: vocab_size={vocab_size} must be >= 2 (content + compression token)")
    content = rng.integers(0, vocab_size - 1, size=m)
    inputs = np.full(seq_len, vocab_size - 1, np.int64)
    inputs[:m] = content
    targets = np.zeros(seq_len, np.int64)
    weights = np.zeros(seq_len, np.float32)
    targets[m:2 * m] = content
    weights[m:2 * m] = 1.0
    return _pack(inputs, targets, weights)


# ------------------------------------------------------------------------------------- memorization


@functools.lru_cache(maxsize=16)
def _memorization_table(vocab_size: int, map_seed: int) -> np.ndarray:
    n_keys = (vocab_size - 1) // 2
    n_values = (vocab_size - 1) - n_keys
    table = n_keys + np.random.default_rng(map_seed).permutation(n_values)[:n_keys]
    table.setflags(write=False)
    return table


def memorization_map(vocab_size: int, map_seed: int) -> dict[int, int]:
    """The fixed key->value map of the memorization task (keys [0, (V-1)//2), distinct values above them)."""
    _require(vocab_size >= 3, f"memorization: vocab_size={vocab_size} must be >= 3")
    return {k: int(v) for k, v in enumerate(_memorization_table(int(vocab_size), int(map_seed)))}


def memorization(rng: np.random.Generator, *, seq_len: int, vocab_size: int, split: str = "train",
                 map_seed: int = 0) -> dict[str, np.ndarray]:
    """MAD memorization: recall a key->value map fixed by `map_seed`. See the module docstring."""
    task = "memorization"
    _common_checks(task, seq_len, vocab_size, split)
    _require(vocab_size >= 3, f"{task}: vocab_size={vocab_size} must be >= 3 (a key, a value, the insert token)")
    _require(seq_len % 2 == 0, f"{task}: seq_len must be even, got {seq_len}")
    _require(map_seed >= 0, f"{task}: map_seed must be >= 0, got {map_seed}")
    table = _memorization_table(int(vocab_size), int(map_seed))
    keys = rng.integers(0, len(table), size=seq_len // 2)
    inputs = np.full(seq_len, vocab_size - 1, np.int64)
    inputs[0::2] = keys
    targets = np.zeros(seq_len, np.int64)
    weights = np.zeros(seq_len, np.float32)
    targets[1::2] = table[keys]
    weights[1::2] = 1.0
    return _pack(inputs, targets, weights)


# --------------------------------------------------------------------------------------- registry

TASKS = {
    "mqar": mqar,
    "in_context_recall": in_context_recall,
    "fuzzy_in_context_recall": fuzzy_in_context_recall,
    "noisy_in_context_recall": noisy_in_context_recall,
    "selective_copying": selective_copying,
    "compression": compression,
    "memorization": memorization,
}

#: MAD baseline settings per task (REFERENCE_NOTES §6.2, configs/tasks/*.yml) and the zoology Figure-2 MQAR
#: middle setting; the knobs not listed keep the generator defaults above.
BASELINES = {
    "mqar": dict(seq_len=128, vocab_size=8192, num_kv_pairs=8),
    "in_context_recall": dict(seq_len=128, vocab_size=16),
    "fuzzy_in_context_recall": dict(seq_len=128, vocab_size=16),
    "noisy_in_context_recall": dict(seq_len=128, vocab_size=32),
    "selective_copying": dict(seq_len=256, vocab_size=16),
    "compression": dict(seq_len=64, vocab_size=16, num_tokens=31),
    "memorization": dict(seq_len=32, vocab_size=256),
}


def task_knobs(task: str) -> tuple[str, ...]:
    """The keyword knobs a task accepts beyond seq_len, vocab_size and split."""
    fn = _task_fn(task)
    skip = {"rng", "seq_len", "vocab_size", "split"}
    return tuple(p for p in inspect.signature(fn).parameters if p not in skip)


def check_task_kwargs(task: str, kwargs) -> None:
    """ValueError naming the task and the unknown keys if `kwargs` has a key the task does not take."""
    valid = task_knobs(task)
    unknown = sorted(set(kwargs) - set(valid))
    _require(not unknown, f"task {task!r} got unknown task_kwargs {unknown}; valid: {list(valid)}")


def _task_fn(task: str):
    _require(task in TASKS, f"unknown task {task!r}; known: {sorted(TASKS)}")
    return TASKS[task]


def example(task: str, index: int, *, split: str, seed: int, seq_len: int, vocab_size: int,
            **task_kwargs) -> dict[str, np.ndarray]:
    """Example `index` of `task`'s `split` stream: generated with rng = default_rng([seed, split_id, index]).

    Memorization's key->value map defaults to map_seed=seed, so both splits share it.
    """
    fn = _task_fn(task)
    _require(split in SPLITS, f"split must be one of {sorted(SPLITS)}, got {split!r}")
    _require(int(index) >= 0, f"index must be >= 0, got {index}")
    _require(int(seed) >= 0, f"seed must be >= 0, got {seed}")
    check_task_kwargs(task, task_kwargs)
    if task == "memorization":
        task_kwargs.setdefault("map_seed", int(seed))
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    return fn(rng, seq_len=seq_len, vocab_size=vocab_size, split=split, **task_kwargs)
