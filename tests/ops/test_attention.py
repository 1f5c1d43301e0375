"""attention: the reference is the definition (numpy float64 loop), the blockwise xla path equals the reference in
outputs and every gradient, its memory is O(l) not O(l s), and every validation error.

Sizes are distinct per axis (b 2, l 37, h 6, g 2, k 8) so a transposed axis cannot pass. The xla tests shrink the
block sizes (BLOCK_Q 16, BLOCK_K 8 unless a case says otherwise) so that every case crosses several query and key
blocks, a block edge falls inside the causal diagonal and the window, and l is not a multiple of either block.

Segment ids are compared raw: a query attends the keys whose id equals its own, wherever they are. A reused,
non-adjacent id therefore joins the earlier tokens with that id (the transformers / flash-attn packed convention),
unlike ssd and the convolutions, where a change of id starts a new segment. Packers give every document its own id.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix_jax.ops import attention, attention_reference, dispatch
from tests.helpers import assert_close, rel_err

attn_mod = importlib.import_module("seqmix_jax.ops.attention")  # `seqmix_jax.ops.attention` is the function


def make_qkv(rng, b=2, l=37, s=None, h=6, g=2, k=8, dtype=jnp.float32):
    s = l if s is None else s
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    return f(b, l, h, k), f(b, s, g, k), f(b, s, g, k)


def loop_attention(q, k, v, *, causal=True, window=None, q_seg=None, kv_seg=None, softcap=None, scale=None,
                   q_offset=None):
    """The module docstring's definition, one (batch, query, head) at a time in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, l, h, dk = q.shape
    s, g = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(dk) if scale is None else scale
    offsets = np.broadcast_to(np.asarray(s - l if q_offset is None else q_offset), (b,))
    out = np.zeros_like(q)
    keys = np.arange(s)
    for bi in range(b):
        for i in range(l):
            pos = offsets[bi] + i
            allowed = np.ones(s, bool)
            if causal:
                allowed &= keys <= pos
            if window is not None:
                allowed &= keys > pos - window
            if q_seg is not None:
                allowed &= np.asarray(kv_seg)[bi] == np.asarray(q_seg)[bi, i]
            if not allowed.any():
                continue  # no allowed key: the row stays 0
            for hi in range(h):
                kv_head = hi // (h // g)
                scores = scale * k[bi, allowed, kv_head] @ q[bi, i, hi]
                if softcap is not None:
                    scores = softcap * np.tanh(scores / softcap)
                w = np.exp(scores - scores.max())
                out[bi, i, hi] = (w / w.sum()) @ v[bi, allowed, kv_head]
    return out


# Packed rows of length 37: documents crossing block edges, a length-1 document, and in row 1 the id 0 reused
# after id 1 (those tokens attend the first id-0 tokens too: raw ids are compared).
SEGMENTS = np.asarray([[0] * 5 + [1] * 14 + [2] + [3] * 17,
                       [0] * 9 + [1] * 9 + [0] * 10 + [2] * 9], np.int32)


# --- the reference is the definition -------------------------------------------------------------------------

REFERENCE_CASES = {
    "causal": dict(),
    "non_causal": dict(causal=False),
    "window": dict(window=5),
    "segments_reused_id": dict(segment_ids=jnp.asarray(SEGMENTS)),
    "softcap": dict(softcap=1.5),
    "scale": dict(scale=0.7),
    "prefill_l_lt_s": dict(s=50),  # q_offset defaults to s - l: the queries are the last l positions
    "q_offset_int": dict(s=50, q_offset=4),
    "q_offset_per_row": dict(l=3, s=50, q_offset=np.asarray([0, 41])),
    "mqa": dict(g=1),
    "mha": dict(h=2, g=2),
    "everything": dict(window=9, softcap=2.0, segment_ids=jnp.asarray(SEGMENTS), g=3),
}


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_matches_loop(rng, case):
    kw = dict(REFERENCE_CASES[case])
    shape = {n: kw.pop(n) for n in ("l", "s", "h", "g") if n in kw}
    q, k, v = make_qkv(rng, **shape)
    if "q_offset" in kw and not isinstance(kw["q_offset"], int):
        kw["q_offset"] = jnp.asarray(kw["q_offset"], jnp.int32)
    seg = kw.get("segment_ids")
    loop_kw = {n: kw[n] for n in ("causal", "window", "softcap", "scale", "q_offset") if n in kw}
    want = loop_attention(q, k, v, q_seg=seg, kv_seg=seg, **loop_kw)
    assert_close(f"reference {case} vs loop", attention_reference(q, k, v, **kw), want, 1e-5)


def test_reused_segment_id_attends_the_earlier_tokens(rng):
    """Row 1 of SEGMENTS: the second id-0 run (tokens 18..27) reads the values of the first (tokens 0..8)."""
    q, k, v = make_qkv(rng)
    seg = jnp.asarray(SEGMENTS)
    dv = jax.jit(jax.grad(lambda v_: attention(q, k, v_, segment_ids=seg, impl="xla")[1, 20].sum()))(v)
    assert np.all(np.abs(np.asarray(dv[1, :9])).sum(-1) > 0)
    assert np.all(np.asarray(dv[1, 9:18]) == 0)  # id 1 in between: masked
    assert np.all(np.asarray(dv[1, 28:]) == 0)  # id 2 and the future


# --- xla == reference, outputs and gradients -------------------------------------------------------------

def run(impl, q, k, v, proj, **kw):
    """Output and d(sum(out * proj))/d(q, k, v), jitted (a fresh function: the block sizes are read when traced)."""

    def loss(q, k, v):
        out = attention(q, k, v, impl=impl, **kw)
        return jnp.sum(out.astype(jnp.float32) * proj), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def check_xla_vs_reference(rng, q, k, v, tag="", **kw):
    proj = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    out_ref, g_ref = run("reference", q, k, v, proj, **kw)
    out, grads = run("xla", q, k, v, proj, **kw)
    assert_close(f"xla {tag} out", out, out_ref, 1e-5)
    for name, ours, ref in zip("qkv", grads, g_ref):
        assert_close(f"xla {tag} d{name}", ours, ref, 1e-4)
    return out, grads


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(attn_mod, "BLOCK_Q", 16)
    monkeypatch.setattr(attn_mod, "BLOCK_K", 8)
    monkeypatch.setattr(attn_mod, "CPU_FORWARD_BLOCK_ELEMENTS", 0)  # forward-only calls keep these blocks too


slow = pytest.mark.slow
XLA_CASES = [  # the default run covers every feature at least once; the slow cases take them one at a time
    pytest.param(dict(), id="gqa_causal_l_not_block_multiple"),
    pytest.param(dict(window=7, softcap=3.0, segment_ids=jnp.asarray(SEGMENTS)), id="gqa_window_softcap_segments"),
    pytest.param(dict(causal=False, segment_ids=jnp.asarray(SEGMENTS)), id="non_causal_segments"),
    # the diagonal and one key back (window 1 gives dq = 0 up to rounding: nothing to compare)
    pytest.param(dict(g=1, window=2), id="mqa_window_2"),
    pytest.param(dict(h=3, g=3, softcap=1.5, scale=0.9), id="mha_softcap_scale"),
    pytest.param(dict(l=1, s=45, q_offset=np.asarray([3, 44])), id="decode_l1_per_row_offsets"),  # against a cache
    pytest.param(dict(l=21, s=53, q_offset=np.asarray([0, 32]), window=13), id="chunk_per_row_offsets_window"),
    pytest.param(dict(l=19, s=37, segment_pair=True), id="segment_pairs_l_ne_s"),  # default q_offset = s - l
    pytest.param(dict(causal=False), id="non_causal", marks=slow),
    pytest.param(dict(window=11), id="window", marks=slow),
    pytest.param(dict(segment_ids=jnp.asarray(SEGMENTS)), id="segments", marks=slow),
    pytest.param(dict(softcap=1.5), id="softcap", marks=slow),
    pytest.param(dict(l=1, s=45, q_offset=30), id="decode_l1_cache", marks=slow),
    pytest.param(dict(l=21, s=53), id="prefill_chunk_l_lt_s", marks=slow),
    pytest.param(dict(l=21, s=53, causal=False), id="non_causal_l_ne_s", marks=slow),
    pytest.param(dict(l=19, s=37, causal=False, segment_pair=True), id="non_causal_segment_pairs", marks=slow),
]


@pytest.mark.parametrize("case", XLA_CASES)
def test_xla_matches_reference(rng, small_blocks, case, request):
    kw = dict(case)
    shape = {n: kw.pop(n) for n in ("l", "s", "h", "g") if n in kw}
    q, k, v = make_qkv(rng, **shape)
    if kw.pop("segment_pair", False):  # queries = the last l tokens of the packed rows
        kw["segment_ids"] = (jnp.asarray(SEGMENTS[:, -q.shape[1]:]), jnp.asarray(SEGMENTS))
    if "q_offset" in kw and not isinstance(kw["q_offset"], int):
        kw["q_offset"] = jnp.asarray(kw["q_offset"], jnp.int32)
    check_xla_vs_reference(rng, q, k, v, request.node.callspec.id, **kw)


def test_xla_default_blocks_with_skipped_blocks(rng):
    """The module's own block sizes (128 x 256): l = 600 crosses 5 query and 3 key blocks, the window skips some."""
    q, k, v = make_qkv(rng, b=1, l=600, h=4, g=2, k=16)
    check_xla_vs_reference(rng, q, k, v, "default blocks window", window=150)


@pytest.mark.parametrize("dk", [72, pytest.param(64, marks=pytest.mark.slow), pytest.param(80, marks=pytest.mark.slow),
                                pytest.param(96, marks=pytest.mark.slow), pytest.param(128, marks=pytest.mark.slow)])
def test_xla_head_dims(rng, small_blocks, dk):
    q, k, v = make_qkv(rng, l=29, k=dk)
    check_xla_vs_reference(rng, q, k, v, f"k={dk}", window=17)


def test_rows_without_keys_output_zero_with_zero_gradient(rng, small_blocks):
    """Query ids 5 and 6 appear in no key row: those rows output exactly 0, get exactly 0 gradient, no NaN."""
    q, k, v = make_qkv(rng, l=23, s=37)
    q_seg = SEGMENTS[:, -23:].copy()
    q_seg[0, 3:9] = 5
    q_seg[1, -4:] = 6
    kw = dict(segment_ids=(jnp.asarray(q_seg), jnp.asarray(SEGMENTS)))
    out, (dq, dk, dv) = check_xla_vs_reference(rng, q, k, v, "masked rows", **kw)
    empty = np.isin(q_seg, (5, 6))
    for name, a in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert np.all(np.isfinite(np.asarray(a))), name
    assert np.all(np.asarray(out)[empty] == 0) and np.all(np.asarray(dq)[empty] == 0)
    assert np.all(np.abs(np.asarray(out)[~empty]).sum(-1) > 0)


def test_xla_keys_after_the_query_get_exactly_zero_gradient(rng, small_blocks):
    """Causality by gradient: with q_offset 10 and l = 3 the queries sit at 10..12; keys 13.. must not matter."""
    q, k, v = make_qkv(rng, l=3, s=45)
    _, (_, dk, dv) = run("xla", q, k, v, jnp.ones(q.shape), q_offset=10)
    assert np.all(np.asarray(dk)[:, 13:] == 0) and np.all(np.asarray(dv)[:, 13:] == 0)
    assert np.all(np.abs(np.asarray(dv)[:, :13]).sum((-1, -2)) > 0)


def test_empty_sequences(rng):
    """No queries: an empty output. No keys: every row has no allowed key, so 0 (and zero gradients)."""
    q, k, v = make_qkv(rng, l=0, s=7)
    assert attention(q, k, v, impl="xla").shape == attention_reference(q, k, v).shape == (2, 0, 6, 8)
    q, k, v = make_qkv(rng, l=3, s=0)
    out, grads = run("xla", q, k, v, jnp.ones(q.shape), causal=False)
    assert out.shape == q.shape and not np.any(np.asarray(out)) and not np.any(np.asarray(grads[0]))


def test_block_sizes_do_not_change_the_result(rng, monkeypatch):
    q, k, v = make_qkv(rng, l=45)
    kw = dict(window=20, segment_ids=jnp.asarray(np.concatenate([SEGMENTS, SEGMENTS[:, :8]], 1)))
    outs = []
    monkeypatch.setattr(attn_mod, "CPU_FORWARD_BLOCK_ELEMENTS", 0)
    for bq, bk in ((45, 45), (8, 32), (32, 8), (1, 1)):
        monkeypatch.setattr(attn_mod, "BLOCK_Q", bq)
        monkeypatch.setattr(attn_mod, "BLOCK_K", bk)
        outs.append(jax.jit(lambda q, k, v: attention(q, k, v, impl="xla", **kw))(q, k, v))
    for out, bs in zip(outs[1:], ("8x32", "32x8", "1x1")):
        assert_close(f"blocks {bs} vs one block", out, outs[0], 1e-5)


def test_cpu_forward_grows_its_blocks_and_agrees(rng, monkeypatch):
    """A forward that is not differentiated grows its blocks on the CPU (from square blocks to
    CPU_FORWARD_BLOCK_ELEMENTS per score tile, never beyond l or s); the result equals the constant blocks' and the
    reference, and a differentiated forward keeps the constants."""
    assert attn_mod._grown(128, 256, 4, 1 << 20, 512, 512) == (512, 512)  # b=1, h=4, l=512: one block
    assert attn_mod._grown(128, 256, 8, 1 << 20, 1024, 1024) == (512, 256)
    assert attn_mod._grown(128, 256, 32, 1 << 20, 512, 512) == (128, 256)  # b=8: the tile is big enough
    assert attn_mod._grown(1, 256, 32, 1 << 20, 1, 512) == (1, 512)  # one query (a last-position prefill)
    assert attn_mod._grown(97, 256, 4, 1 << 20, 97, 300) == (97, 300)  # short sequences: one block, no more
    q, k, v = make_qkv(rng, l=45)
    kw = dict(window=20, segment_ids=jnp.asarray(np.concatenate([SEGMENTS, SEGMENTS[:, :8]], 1)))
    monkeypatch.setattr(attn_mod, "BLOCK_Q", 4)
    monkeypatch.setattr(attn_mod, "BLOCK_K", 8)
    fwd = lambda q, k, v: attention(q, k, v, impl="xla", **kw)
    bh = q.shape[0] * q.shape[2]
    seen = []
    real_forward = attn_mod._forward
    monkeypatch.setattr(attn_mod, "_forward", lambda cfg, *a: seen.append((cfg.bq, cfg.bk)) or real_forward(cfg, *a))
    for tile in (0, bh * 16 * 8):  # constants 4 x 8; grown from square 4 x 4 blocks to 16 x 8 (3 x 6 blocks)
        monkeypatch.setattr(attn_mod, "CPU_FORWARD_BLOCK_ELEMENTS", tile)
        out = jax.jit(lambda q, k, v: fwd(q, k, v))(q, k, v)  # a new function: traced again
        assert_close(f"forward with a tile of {tile} elements vs reference", out,
                     attention_reference(q, k, v, **kw), 1e-5)
    jax.jit(jax.grad(lambda q: jnp.sum(fwd(q, k, v))))(q)  # differentiated: the constants
    assert seen == [(4, 8), (16, 8), (4, 8)], seen


def test_block_sizes_grow_on_accelerators_only():
    """CPU keeps the constants; a GPU / TPU doubles bq (up to 2 bk) and bk until b * h * bq * bk reaches the budget."""
    assert attn_mod._block_sizes(4, "cpu") == (attn_mod.BLOCK_Q, attn_mod.BLOCK_K) == (128, 256)
    assert attn_mod._block_sizes(4, "gpu") == (2048, 1024)  # b=1, h=4: the size measured best on an H200
    assert attn_mod._block_sizes(4, "tpu") == (2048, 1024)
    assert attn_mod._block_sizes(256, "gpu") == (128, 256)  # large b * h: the tile is big enough already
    assert attn_mod._block_sizes(32, "gpu") == (512, 512)


def test_xla_bf16_error_at_most_twice_the_reference_bf16_error(rng, small_blocks):
    """FlashAttention's test: against float32 attention on the same (bf16-valued) inputs, the xla path in bf16
    may err at most 2x as much as the reference run in bf16 (output and every gradient)."""
    q, k, v = make_qkv(rng, l=45, dtype=jnp.bfloat16)
    proj = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16).astype(jnp.float32)
    kw = dict(window=30, softcap=5.0)
    exact = run("reference", *(a.astype(jnp.float32) for a in (q, k, v)), proj, **kw)
    ref16 = run("reference", q, k, v, proj, **kw)
    xla16 = run("xla", q, k, v, proj, **kw)
    assert xla16[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in xla16[1])
    for name, want, ref, ours in zip(("out", "dq", "dk", "dv"), (exact[0], *exact[1]), (ref16[0], *ref16[1]),
                                     (xla16[0], *xla16[1])):
        e_ref, e_ours = rel_err(ref, want)[0], rel_err(ours, want)[0]
        print(f"bf16 {name}: xla max rel err {e_ours:.2e}, reference bf16 {e_ref:.2e}")
        assert e_ours <= 2 * e_ref, name


# --- memory ----------------------------------------------------------------------------------------------

def _temp_bytes(fn, *shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _fwd_bwd(impl):
    return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl)), argnums=(0, 1, 2))


def test_xla_training_memory_is_linear_in_length():
    """Compiled only. One (l, s) float32 score matrix per head is 64 MiB at l = s = 2048, h = 4: xla's forward+
    backward temporaries, and a forward's alone, stay far below it and double (not quadruple) with l; the
    reference's exceed it."""
    h, g, dk = 4, 2, 64
    shapes = lambda l: ((1, l, h, dk), (1, l, g, dk), (1, l, g, dk))
    scores = 2048 * 2048 * 4 * h
    t2k, t4k = _temp_bytes(_fwd_bwd("xla"), *shapes(2048)), _temp_bytes(_fwd_bwd("xla"), *shapes(4096))
    t_ref = _temp_bytes(_fwd_bwd("reference"), *shapes(2048))
    print(f"fwd+bwd temp: xla {t2k / 2**20:.1f} MiB at l=2048, {t4k / 2**20:.1f} MiB at 4096; "
          f"reference {t_ref / 2**20:.1f} MiB at 2048; scores {scores / 2**20:.0f} MiB")
    assert t_ref > scores  # the measurement does see materialized scores
    assert t2k < scores / 4
    assert t4k < 2.2 * t2k
    # A forward alone (grown blocks on the CPU: score tiles of CPU_FORWARD_BLOCK_ELEMENTS) stays linear as well.
    fwd = lambda q, k, v: attention(q, k, v, impl="xla")
    f2k, f4k = _temp_bytes(fwd, *shapes(2048)), _temp_bytes(fwd, *shapes(4096))
    print(f"forward temp: xla {f2k / 2**20:.1f} MiB at l=2048, {f4k / 2**20:.1f} MiB at 4096")
    assert f2k < scores / 4 and f4k < 2.2 * f2k


# --- errors ----------------------------------------------------------------------------------------------

def _qkv(b=2, l=5, h=4, g=2, dk=3, s=None):
    s = l if s is None else s
    return jnp.zeros((b, l, h, dk)), jnp.zeros((b, s, g, dk)), jnp.zeros((b, s, g, dk))


ERRORS = {
    "q_rank": (lambda q, k, v: (q[0], k, v, {}), r"^q must have rank 4 \(b, l, h, k\), got shape \(5, 4, 3\)"),
    "k_rank": (lambda q, k, v: (q, k[0], v, {}), r"^k must have rank 4 \(b, s, g, k\), got shape \(5, 2, 3\)"),
    "q_int": (lambda q, k, v: (q.astype(jnp.int32), k, v, {}), r"^q must be float32, .* got dtype int32"),
    "v_int": (lambda q, k, v: (q, k, v.astype(jnp.int32), {}), r"^v must be float32, .* got dtype int32"),
    "k_batch": (lambda q, k, v: (q, k[:1], v[:1], {}),
                r"^k must have shape \(b, s, g, k\) with b=2 and head dim k=3 as in q \(2, 5, 4, 3\), "
                r"got \(1, 5, 2, 3\)"),
    "head_dim": (lambda q, k, v: (q, k[..., :2], v[..., :2], {}),
                 r"^k must have shape .* head dim k=3 .* got \(2, 5, 2, 2\)"),
    "v_shape": (lambda q, k, v: (q, k, v[:, :4], {}),
                r"^v must have shape \(b, s, g, k\) like k = \(2, 5, 2, 3\), got \(2, 4, 2, 3\)"),
    "heads_not_divisible": (lambda q, k, v: (q[:, :, :3], k, v, {}),
                            r"^the number of query heads h=3 must be divisible by the number of kv heads g=2"),
    "window_zero": (lambda q, k, v: (q, k, v, dict(window=0)), r"^window must be a positive int, got 0"),
    "window_float": (lambda q, k, v: (q, k, v, dict(window=2.5)), r"^window must be a positive int, got 2.5"),
    "window_not_causal": (lambda q, k, v: (q, k, v, dict(window=3, causal=False)),
                          r"^window=3 needs causal=True"),
    "softcap_zero": (lambda q, k, v: (q, k, v, dict(softcap=0.0)), r"^softcap must be a positive number, got 0.0"),
    "softcap_str": (lambda q, k, v: (q, k, v, dict(softcap="1")), r"^softcap must be a positive number, got '1'"),
    "q_offset_negative": (lambda q, k, v: (q, k, v, dict(q_offset=-1)), r"^q_offset must be >= 0, got -1"),
    "q_offset_float": (lambda q, k, v: (q, k, v, dict(q_offset=jnp.zeros(2))),
                       r"^q_offset must be an integer array, got dtype float32"),
    "q_offset_shape": (lambda q, k, v: (q, k, v, dict(q_offset=jnp.zeros(3, jnp.int32))),
                       r"^q_offset must be an int or have shape \(b,\) = \(2,\), got \(3,\)"),
    "segments_l_ne_s": (lambda q, k, v: (q[:, :3], k, v, dict(segment_ids=jnp.zeros((2, 3), jnp.int32))),
                        r"^segment_ids as one \(b, l\) array needs l == s, got l=3, s=5"),
    "segments_three": (lambda q, k, v: (q, k, v, dict(segment_ids=(jnp.zeros((2, 5), jnp.int32),) * 3)),
                       r"^segment_ids as a pair must be \(q_segment_ids, kv_segment_ids\), got 3 arrays"),
    "segments_float": (lambda q, k, v: (q, k, v, dict(segment_ids=jnp.zeros((2, 5)))),
                       r"^segment_ids must be an integer array, got dtype float32"),
    "q_segments_shape": (lambda q, k, v: (q, k, v, dict(segment_ids=(jnp.zeros((2, 4), jnp.int32),
                                                                     jnp.zeros((2, 5), jnp.int32)))),
                         r"^q_segment_ids must have shape \(b, l\) = \(2, 5\), got \(2, 4\)"),
    "kv_segments_shape": (lambda q, k, v: (q, k, v, dict(segment_ids=(jnp.zeros((2, 5), jnp.int32),
                                                                      jnp.zeros((1, 5), jnp.int32)))),
                          r"^kv_segment_ids must have shape \(b, s\) = \(2, 5\), got \(1, 5\)"),
}


@pytest.mark.parametrize("case", ERRORS)
@pytest.mark.parametrize("fn", [attention_reference, lambda *a, **kw: attention(*a, impl="xla", **kw)],
                         ids=["reference", "xla"])
def test_invalid_arguments_raise(case, fn):
    make, match = ERRORS[case]
    q, k, v, kw = make(*_qkv())
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, **kw)


def test_impl_errors(monkeypatch):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^impl='nope' is not one of"):
        attention(q, k, v, impl="nope")
    with pytest.raises(ValueError, match=r"^impl='associative' is not available for attention; choose from "
                                         r"\('auto', 'reference', 'xla', 'pallas'\)"):
        attention(q, k, v, impl="associative")
    monkeypatch.delitem(dispatch._PALLAS_SUPPORT, "attention", raising=False)
    with pytest.raises(ValueError, match=r"^impl='pallas' cannot run attention: no Pallas kernel is registered"):
        attention(q, k, v, impl="pallas")


def test_auto_is_xla_on_cpu(rng):
    q, k, v = make_qkv(rng)
    assert np.array_equal(attention(q, k, v, window=9), attention(q, k, v, window=9, impl="xla"))


# --- attention_decode: one query per row against a head-major (b, g, s, k) cache ------------------------------

@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("kw", [{}, {"window": 5}, {"softcap": 1.5, "scale": 0.3}], ids=["plain", "window", "softcap"])
def test_attention_decode_matches_the_loop_definition(rng, impl, kw):
    from seqmix_jax.ops import attention_decode
    b, s, h, g, dk = 3, 29, 6, 2, 8
    q, k, v = make_qkv(rng, b=b, l=1, s=s, h=h, g=g, k=dk)
    position = jnp.asarray([0, 11, s - 1], jnp.int32)  # first slot, middle (later slots are unwritten), last
    got = attention_decode(q[:, 0], jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), position, impl=impl, **kw)
    want = np.stack([loop_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], q_offset=int(position[i]), **kw)[0, 0]
                     for i in range(b)])
    assert got.shape == (b, h, dk)
    assert_close(f"attention_decode[{impl}] vs loop", got, want, 1e-5)


def test_attention_decode_ignores_slots_after_the_position(rng):
    from seqmix_jax.ops import attention_decode
    q, k, v = make_qkv(rng, b=2, l=1, s=16, h=4, g=4, k=8)
    kc, vc = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    pos = jnp.asarray([6, 9])
    a = attention_decode(q[:, 0], kc, vc, pos)
    b = attention_decode(q[:, 0], kc.at[:, :, 10:].set(1e4), vc.at[:, :, 10:].set(-3e3), pos)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("args, match", [
    (((2, 4, 8), (2, 2, 16, 8), (2, 2, 16, 4)), "k_cache, v_cache"),
    (((2, 4, 8), (2, 16, 8), (2, 16, 8)), "k_cache, v_cache"),
    (((2, 4, 8), (3, 2, 16, 8), (3, 2, 16, 8)), "does not fit"),
    (((2, 3, 8), (2, 2, 16, 8), (2, 2, 16, 8)), "does not fit"),
])
def test_attention_decode_bad_shapes(args, match):
    from seqmix_jax.ops import attention_decode
    q, k, v = (jnp.zeros(s) for s in args)
    with pytest.raises(ValueError, match=match):
        attention_decode(q, k, v, jnp.zeros((2,), jnp.int32))


def test_attention_decode_bad_window():
    from seqmix_jax.ops import attention_decode
    z = jnp.zeros((2, 2, 16, 8))
    with pytest.raises(ValueError, match="window"):
        attention_decode(jnp.zeros((2, 4, 8)), z, z, jnp.zeros((2,), jnp.int32), window=0)
