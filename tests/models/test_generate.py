"""generate(): greedy == an independent argmax loop over the full forward for every preset, eos padding, top-k / top-p
filtering (against a numpy restatement), seeded sampling, padded vocabulary rows never emitted, and the errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix_jax.models import LM, generate
from seqmix_jax.models.generate import _Sampling, sample
from tests.models.test_lm import CONFIGS, V, build, ids_of, jit_apply

PROMPT, NEW = 7, 8


def greedy_by_full_forward(model, prompt, n):
    """The definition: append argmax over the real vocabulary of the full forward's last logits, n times. The
    sequence lives in a fixed buffer (one compile); causality makes the not-yet-written tail irrelevant."""
    fwd = jit_apply(model, lambda m, ids: m(ids))
    b, l = prompt.shape
    buf = np.zeros((b, l + n), np.int32)
    buf[:, :l] = np.asarray(prompt)
    for i in range(n):
        logits = np.asarray(fwd(jnp.asarray(buf)))[:, l + i - 1, :V]
        buf[:, l + i] = logits.argmax(-1)
    return buf


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_argmax_of_full_forward(name):
    cfg = CONFIGS[name]
    # larger untied embeddings give less repetitive tiny-model output (tied ones then just copy the last token)
    m = build(cfg if cfg.tie_embeddings else cfg.replace(embed_init_std=1.0))
    prompt = ids_of(11, 2, PROMPT)
    out = generate(m, prompt, max_new_tokens=NEW)
    assert out.shape == (2, PROMPT + NEW) and out.dtype == jnp.int32
    ref = greedy_by_full_forward(m, prompt, NEW)
    print(name, np.asarray(out)[:, PROMPT:].tolist())
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_decode_loop_options_per_model():
    """On the CPU, models without attention layers decode with YNNPACK kept to the matmuls (when this jaxlib takes
    the option: it does on the CI's), attention models with the default options; both loops give the same tokens
    (test_greedy_equals_argmax_of_full_forward checks the chosen one against the full forward for every preset)."""
    import importlib

    gen = importlib.import_module("seqmix_jax.models.generate")
    assert jax.default_backend() == "cpu"
    assert gen._cpu_option_supported()  # jax 0.10 / 0.11 XLA:CPU know the option; a refusal would fall back
    mamba, llama = build(CONFIGS["mamba"]), build(CONFIGS["llama"])
    assert gen._decode_for(mamba) is gen._decode_cpu_dot_only
    assert gen._decode_for(llama) is gen._decode and gen._decode_for(build(CONFIGS["pattern"])) is gen._decode
    gd, params = nnx.split(mamba)
    samp = _Sampling(temperature=0.0, top_k=None, top_p=None, vocab_size=V)
    key = jax.random.key(0)
    first, state = gen._prefill(gd, params, ids_of(3, 2, PROMPT), key, PROMPT + NEW, samp)
    a, b = (np.asarray(f(gd, params, first, state, key, NEW, samp, None))
            for f in (gen._decode, gen._decode_cpu_dot_only))
    np.testing.assert_array_equal(a, b)


def test_eos_padding_topk1_topp_tiny_and_seeds():
    m = build(CONFIGS["llama"])
    prompt = ids_of(12, 3, PROMPT)
    greedy = np.asarray(generate(m, prompt, max_new_tokens=NEW))
    eos = int(greedy[0, PROMPT + 2])
    out = np.asarray(generate(m, prompt, max_new_tokens=NEW, eos_id=eos))
    for row, g in zip(out, greedy):  # greedy up to and including the first eos, eos afterwards
        new = list(g[PROMPT:])
        cut = new.index(eos) + 1 if eos in new else len(new)
        expect = new[:cut] + [eos] * (len(new) - cut)
        np.testing.assert_array_equal(row[PROMPT:], expect)
        np.testing.assert_array_equal(row[:PROMPT], g[:PROMPT])
    assert (out[0, PROMPT + 3:] == eos).all()
    # k = 1 and a vanishing nucleus both leave only the argmax: sampling == greedy at any temperature and seed
    np.testing.assert_array_equal(generate(m, prompt, max_new_tokens=NEW, temperature=0.7, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(generate(m, prompt, max_new_tokens=NEW, temperature=1.3, top_k=4, top_p=1e-6,
                                           seed=4), greedy)
    a = generate(m, prompt, max_new_tokens=NEW, temperature=1.0, seed=5)
    b = generate(m, prompt, max_new_tokens=NEW, temperature=1.0, seed=5)
    c = generate(m, prompt, max_new_tokens=NEW, temperature=1.0, seed=6)
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()
    np.testing.assert_array_equal(generate(m, prompt, max_new_tokens=0), prompt)


def test_padded_vocab_rows_never_generated():
    cfg = CONFIGS["pattern"]  # untied head, 37 -> 40 rows
    m = build(cfg)
    kernel = m.lm_head.kernel
    # final LayerNorm bias 10 and padded head columns 10: the padded logits are ~10 * 24 * 10, far above the rest
    m.norm_f.bias[...] = jnp.full_like(m.norm_f.bias[...], 10.0)
    kernel[...] = kernel[...].at[:, V:].set(10.0)
    prompt = ids_of(13, 2, PROMPT)
    assert int(jit_apply(m, lambda m, ids: m(ids))(prompt)[:, -1].argmax(-1).min()) >= V
    out = np.asarray(generate(m, prompt, max_new_tokens=4, temperature=1.0, seed=1))  # greedy slices the same way
    assert out.max() < V, out


def test_sampling_filters_match_numpy():
    """top-k / top-p keep exactly the restated sets, and the draws follow the renormalized probabilities."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 40)).astype(np.float32) * 2
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.jit(jax.vmap(lambda k, s: sample(jnp.asarray(logits), k, s)[0], in_axes=(0, None)),
                   static_argnums=1)
    real = logits[0, :V].astype(np.float64) / 0.8
    order = np.argsort(-real)
    for top_k, top_p in ((5, None), (None, 0.6), (8, 0.5)):
        s = _Sampling(temperature=0.8, top_k=top_k, top_p=top_p, vocab_size=V)
        allowed = order[:top_k] if top_k else order
        if top_p is not None:
            p = np.exp(real[allowed] - real[allowed].max())
            p /= p.sum()
            n_keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)  # smallest prefix with mass >= top_p
            allowed = allowed[:n_keep]
        probs = np.exp(real[allowed] - real[allowed].max())
        probs /= probs.sum()
        got = np.asarray(draw(keys, s))
        freq = np.array([(got == a).mean() for a in allowed])
        print(f"top_k={top_k} top_p={top_p}: kept {sorted(allowed.tolist())}, max |freq - p| "
              f"{np.abs(freq - probs).max():.3f}")
        assert set(np.unique(got)) <= set(allowed.tolist())
        assert np.abs(freq - probs).max() < 0.04


def test_bf16_residual_fp32_generation_runs():
    m = build(CONFIGS["mamba2attn"].replace(dtype="bfloat16", residual_in_fp32=True))
    out = generate(m, ids_of(14, 2, PROMPT), max_new_tokens=4, temperature=0.9, top_p=0.9)
    assert out.shape == (2, PROMPT + 4) and int(out.max()) < V


def test_generate_errors():
    m = build(CONFIGS["llama"])  # max_seq_len 64
    p = ids_of(15, 1, 4)
    cases = [
        (dict(input_ids=jnp.asarray([[1, V]])), rf"token ids must lie in \[0, vocab_size={V}\)"),
        (dict(input_ids=jnp.asarray([1, 2])), r"input_ids must be a non-empty integer array of shape \(b, l\)"),
        (dict(input_ids=jnp.zeros((1, 3))), "integer array"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0, got -1"),
        (dict(max_new_tokens=2.0), "max_new_tokens must be an int"),
        (dict(temperature=-0.1), "temperature must be a number >= 0"),
        (dict(top_k=0), "top_k must be None or an int >= 1, got 0"),
        (dict(top_p=0.0), r"top_p must be None or a number in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), "top_p must be"),
        (dict(eos_id=V), rf"eos_id must be None or an int in \[0, vocab_size={V}\), got {V}"),
        (dict(seed="a"), "seed must be an int"),
        (dict(max_len=5), r"max_len must be an int >= prompt length 4 \+ max_new_tokens 2 = 6, got 5"),
        (dict(input_ids=jnp.zeros((1, 65), jnp.int32)), r"prompt length 65 \+ max_new_tokens 2 = 67 exceeds"),
        (dict(max_new_tokens=61), r"prompt length 4 \+ max_new_tokens 61 = 65 exceeds the model's max_seq_len=64"),
    ]
    for kw, match in cases:
        args = dict(input_ids=p, max_new_tokens=2) | kw
        with pytest.raises(ValueError, match=match):
            generate(m, args.pop("input_ids"), **args)
    with pytest.raises(ValueError, match="model must be a seqmix_jax LM"):
        generate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), p, max_new_tokens=1)
    assert isinstance(m, LM)
