"""Greedy generation parity with transformers: tiny random `MambaForCausalLM` and `LlamaForCausalLM` (float32, CPU)
saved with `save_pretrained`, loaded with `seqmix_jax.from_pretrained`; `seqmix_jax.generate` (temperature 0) must
equal transformers' `model.generate(do_sample=False, max_new_tokens=N)` token for token, batch 1 and 2 (no padding).

Greedy parity is only meaningful when the argmax is not a near-tie: the weights are scaled so that the logits are
spread out, and the test measures (with the transformers model, on the generated sequences) the smallest gap between
the top-2 logits over all generated positions, prints it, and requires it to be far above float32 rounding (our
logits match transformers' to ~1e-6 relative, tests/parity/test_lm_parity.py). It also requires the tiny models to
produce varied tokens (not one token repeated), so the comparison exercises the decoding state.
"""

from __future__ import annotations

import numpy as np
import pytest

from seqmix_jax.models import from_pretrained, generate
from tests.parity import torch_refs

N = 20
PROMPT = 9
MIN_MARGIN = 1e-3  # top-1 minus top-2 logit; the logit mismatch is ~1e-6 * max|logit| (max|logit| ~ 10-30 here)


def _hf(kind):
    torch = torch_refs.torch()
    tf = torch_refs.require("transformers")
    torch.manual_seed(0)
    if kind == "mamba":
        cfg = tf.MambaConfig(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                             conv_kernel=4, time_step_rank=4, use_bias=False, use_conv_bias=True,
                             tie_word_embeddings=False)
        model = tf.MambaForCausalLM(cfg)
    else:
        cfg = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
                             tie_word_embeddings=False, max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # spread the logits out: unit-variance embeddings and a strong head
        for name, p in model.named_parameters():
            if name.endswith(("embeddings.weight", "embed_tokens.weight")):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5 * 4.0)
    model = model.float().eval()
    # no early stop, no pad warnings: every row generates exactly N tokens
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = None
    return model


def _min_top2_margin(model, seqs, prompt_len):
    """Smallest top-1 minus top-2 logit over the positions that chose a generated token (transformers forward)."""
    torch = torch_refs.torch()
    with torch.no_grad():
        logits = model(torch.tensor(seqs)).logits[:, prompt_len - 1:-1].numpy()
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return float((top2[..., 1] - top2[..., 0]).min()), float(np.abs(logits).max())


@pytest.mark.parametrize("kind", ["mamba", "llama"])
def test_greedy_generate_equals_transformers(tmp_path, rng, kind):
    torch = torch_refs.torch()
    ref = _hf(kind)
    ref.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    for b in (1, 2):
        prompt = rng.integers(0, ref.config.vocab_size, (b, PROMPT))
        with torch.no_grad():
            expect = ref.generate(torch.tensor(prompt), attention_mask=torch.ones(b, PROMPT, dtype=torch.long),
                                  do_sample=False, max_new_tokens=N).numpy()
        assert expect.shape == (b, PROMPT + N), expect.shape
        got = np.asarray(generate(ours, prompt, max_new_tokens=N, temperature=0.0))
        margin, scale = _min_top2_margin(ref, expect, PROMPT)
        new = expect[:, PROMPT:]
        print(f"{kind} b={b}: min top-2 logit margin {margin:.3e} (max|logit| {scale:.1f}); "
              f"generated {new.tolist()}")
        assert margin > MIN_MARGIN, f"{kind}: near-tie in the reference argmax ({margin:.2e}): test setup too weak"
        assert all(len(set(row)) >= 4 for row in new.tolist()), f"{kind}: degenerate (repetitive) generation"
        mismatch = np.argwhere(got != expect)
        assert mismatch.size == 0, f"{kind} b={b}: first mismatch at (row, pos) {mismatch[0].tolist()}: " \
                                   f"ours {got.tolist()} vs transformers {expect.tolist()}"
