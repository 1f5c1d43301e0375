"""apply_rotary / rotary_inv_freq against a float64 numpy loop of both pairings (rotate-half, interleaved), partial
rotary, per-row positions, interpolated positions, bf16, and the documented errors. Parity with transformers'
`apply_rotary_pos_emb` lives in tests/parity/test_attention_parity.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix_jax.ops.rotary import apply_rotary, rotary_inv_freq
from tests.helpers import assert_close


def rope_numpy(x, positions, r, base=10000.0, interleaved=False, scale=1.0):
    """Rotate each channel pair of each head by angle (p / scale) * base^(-2i/r), one pair at a time (float64)."""
    x = np.asarray(x, np.float64)
    b, l, h, k = x.shape
    pos = np.broadcast_to(np.asarray(positions, np.float64), (b, l)) / scale
    out = x.copy()
    for i in range(r // 2):
        theta = base ** (-2.0 * i / r)
        ia, ib = (2 * i, 2 * i + 1) if interleaved else (i, i + r // 2)
        c = np.cos(pos * theta)[:, :, None]
        s = np.sin(pos * theta)[:, :, None]
        a, bb = x[..., ia], x[..., ib]
        out[..., ia] = a * c - bb * s
        out[..., ib] = bb * c + a * s
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("r", [22, 8, 0])  # full, partial, none (k = 22)
def test_matches_numpy(interleaved, r, rng):
    x = rng.standard_normal((2, 11, 3, 22))
    pos = np.arange(11) + 5  # an offset, as in decoding
    ours = apply_rotary(jnp.asarray(x, jnp.float32), jnp.asarray(pos), rotary_dim=r, interleaved=interleaved)
    ref = rope_numpy(x, pos, r, interleaved=interleaved)
    assert_close(f"rope r={r} interleaved={interleaved}", ours, ref, 1e-6)
    if r < 22:  # the pass-through channels are copied exactly
        np.testing.assert_array_equal(np.asarray(ours)[..., r:], np.asarray(x, np.float32)[..., r:])


def test_per_row_positions_base_scale_and_inv_freq(rng):
    x = rng.standard_normal((3, 7, 2, 10))
    pos = rng.integers(0, 5000, (3, 7))
    ours = apply_rotary(jnp.asarray(x, jnp.float32), jnp.asarray(pos), base=500000.0, position_scale=16.0)
    assert_close("rope per-row, base 5e5, scale 16", ours, rope_numpy(x, pos, 10, base=500000.0, scale=16.0), 1e-5)
    # A checkpoint's inv_freq buffer overrides the base.
    inv = 1.0 / (500000.0 ** (np.arange(0, 10, 2) / 10))
    with_buffer = apply_rotary(jnp.asarray(x, jnp.float32), jnp.asarray(pos), inv_freq=jnp.asarray(inv, jnp.float32),
                               position_scale=16.0)
    assert_close("rope from inv_freq", with_buffer, ours, 1e-5)  # float32 angles ~300 rad: ulp 3e-5


def test_inv_freq_and_relative_property(rng):
    np.testing.assert_allclose(np.asarray(rotary_inv_freq(8, 100.0)), 100.0 ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)
    assert rotary_inv_freq(8).dtype == jnp.float32
    # <rope(q, m), rope(k, n)> depends only on m - n: the reason RoPE gives relative positions.
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32) for _ in range(2))
    dots = [float(jnp.sum(apply_rotary(q, jnp.array([m + 3])) * apply_rotary(k, jnp.array([m])))) for m in (0, 40, 900)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


def test_bf16_keeps_dtype_and_is_close(rng):
    x = jnp.asarray(rng.standard_normal((2, 9, 2, 16)), jnp.bfloat16)
    pos = jnp.arange(9) * 97
    y = apply_rotary(x, pos, rotary_dim=12)
    assert y.dtype == jnp.bfloat16
    assert_close("rope bf16", y, rope_numpy(np.asarray(x.astype(jnp.float32)), np.asarray(pos), 12), 1e-2)
    y_jit = jax.jit(lambda x, p: apply_rotary(x, p, rotary_dim=12))(x, pos)
    np.testing.assert_array_equal(np.asarray(y_jit, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("interleaved", [False, True])
def test_concrete_positions_give_constant_tables(interleaved, rng):
    """Positions given as numpy under jit: the cos / sin tables are constants of the program (no
    cosine / sine op left for XLA to evaluate per element), with the same result as traced positions (per-row,
    inv_freq buffer and interpolation included) and as the float64 loop."""
    x = jnp.asarray(rng.standard_normal((2, 13, 3, 16)), jnp.float32)
    inv = (1.0 / (500.0 ** (np.arange(0, 12, 2) / 12))).astype(np.float32)
    for pos, kw in [(np.arange(13) + 4, {}), (rng.integers(0, 900, (2, 13)), dict(inv_freq=inv, position_scale=4.0))]:
        kw = dict(rotary_dim=12, interleaved=interleaved, **kw)
        const = jax.jit(lambda x: apply_rotary(x, pos, **kw))
        traced = jax.jit(lambda x, p: apply_rotary(x, p, **kw))
        ops = const.lower(x).as_text()
        assert "cosine" not in ops and "sine" not in ops, ops
        assert "cosine" in traced.lower(x, jnp.asarray(pos)).as_text()
        ours = const(x)
        assert_close(f"rope constant tables vs traced positions {pos.shape}", ours, traced(x, jnp.asarray(pos)), 1e-6)
        ref = rope_numpy(np.asarray(x), pos, 12, base=500.0 if "inv_freq" in kw else 10000.0,
                         interleaved=interleaved, scale=kw.get("position_scale", 1.0))
        assert_close(f"rope constant tables vs numpy {pos.shape}", ours, ref, 1e-5)


def test_errors():
    x = jnp.zeros((2, 5, 3, 8))
    pos = jnp.arange(5)
    with pytest.raises(ValueError, match="rotary_dim must be a non-negative even int, got 3"):
        apply_rotary(x, pos, rotary_dim=3)
    with pytest.raises(ValueError, match="rotary_dim=10 must be <= the head dim k=8"):
        apply_rotary(x, pos, rotary_dim=10)
    with pytest.raises(ValueError,
                       match=r"positions must have shape \(l,\) = \(5,\) or \(b, l\) = \(2, 5\), got \(4,\)"):
        apply_rotary(x, jnp.arange(4))
    with pytest.raises(ValueError, match=r"got \(3, 5\)"):
        apply_rotary(x, jnp.zeros((3, 5), jnp.int32))
    with pytest.raises(ValueError, match="positions must be an integer array"):
        apply_rotary(x, jnp.arange(5.0))
    with pytest.raises(ValueError, match="x must have rank 4"):
        apply_rotary(jnp.zeros((5, 8)), pos)
    with pytest.raises(ValueError, match="position_scale must be a positive number"):
        apply_rotary(x, pos, position_scale=0.0)
    with pytest.raises(ValueError, match=r"inv_freq must have shape \(rotary_dim // 2,\) = \(4,\)"):
        apply_rotary(x, pos, inv_freq=jnp.ones(3))
    with pytest.raises(ValueError, match="base must be a positive number"):
        rotary_inv_freq(8, -1.0)
    with pytest.raises(ValueError, match="rotary_dim must be a non-negative even int"):
        rotary_inv_freq(-2)
