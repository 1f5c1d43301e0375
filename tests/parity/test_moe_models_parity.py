"""Whole-model parity for the mixture-of-experts models: tiny random transformers `MixtralForCausalLM` (RoPE GQA
attention with a sliding window, top-2 of 5 experts, renormalized) and `JambaForCausalLM` (Mamba mixers with the
dt/B/C RMSNorms, attention without RoPE, MoE and SwiGLU-MLP layers, top-2 of 5 experts, not renormalized), float32 on
CPU, through checkpoint files — the same checks as tests/parity/test_lm_parity.py:

  * `save_pretrained` (transformers) -> `from_pretrained` (ours): logits max|ours - ref| / max|ref| <= 1e-5;
    gradients of the mean next-token cross-entropy w.r.t. every tensor of the PyTorch model (the fused in-memory
    expert layout, `experts.gate_up_proj` / `experts.down_proj`) <= 1e-4;
  * `seqmix_jax.compare` on the saved directory: every block's residual stream and the logits within 1e-5;
  * export: `save_pretrained(ours)` writes the same tensor names as transformers' own `save_pretrained` (the
    per-expert layout) and reloads in transformers with bit-identical logits;
  * the fused layout on disk (a PyTorch `state_dict()` saved as is) loads to the same parameters;
  * greedy generation equals transformers' `generate` token for token (exercises the KV caches, the sliding window
    past its width and the Mamba decode state with the dt/B/C norms); the prompt is the first of a fixed list of
    seeds whose reference continuation is varied (a tiny random model easily falls into repeating one token, which
    would leave the decoding state unexercised).

Every parameter is moved away from its init first: norm weights (including Jamba's dt/B/C norms), A_log, D, biases,
and the router and experts (transformers' std 0.02 would leave the routing at near-ties and the experts' output
negligible); MoE dispatch is "dropless" (what from_pretrained configures), the exact transformers computation.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from seqmix_jax.compare import load_torch_model, torch_forward
from seqmix_jax.models import generate
from seqmix_jax.models.checkpoints import from_pretrained, read_config, save_pretrained
from tests.parity import torch_refs
from tests.parity.test_generate_parity import _min_top2_margin
from tests.parity.test_lm_parity import (B, L, _compare, _compare_layers, _ours_logits_and_grads, _perturb,
                                         _torch_logits_and_grads)

KINDS = ["mixtral", "jamba"]
GEN_PROMPT, GEN_NEW, MIN_MARGIN = 9, 16, 1e-3


def _hf(kind, *, generation=False):
    torch = torch_refs.torch()
    tf = torch_refs.require("transformers")
    torch.manual_seed(0)
    if kind == "mixtral":
        cfg = tf.MixtralConfig(vocab_size=61, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5,
                               rope_parameters={"rope_type": "default", "rope_theta": 500.0}, sliding_window=5,
                               num_local_experts=5, num_experts_per_tok=2, tie_word_embeddings=False,
                               max_position_embeddings=64)
        model = tf.MixtralForCausalLM(cfg)
    else:  # attention at layer 1 (period 3, offset 1), experts at layers 1 and 3: every block/ffn pairing occurs
        cfg = tf.JambaConfig(vocab_size=61, hidden_size=32, intermediate_size=24, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, num_experts=5, num_experts_per_tok=2,
                             attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                             mamba_d_state=5, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=3, rms_norm_eps=1e-6,
                             tie_word_embeddings=False)
        model = tf.JambaForCausalLM(cfg)
    model.set_experts_implementation("eager")  # the modeling file's per-expert loop, not the grouped_mm kernel
    model = _perturb(model.float().eval(), seed=1)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".gate.weight", ".router.weight")):  # spread routing: clear top-k choices
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("experts.gate_up_proj"):  # (e, 2f, d): unit-scale expert outputs
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[2] ** 0.5)
            elif name.endswith("experts.down_proj"):  # (e, d, f)
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[2] ** 0.5)
            elif generation and name == "lm_head.weight":  # spread the logits: no near-tie argmax
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5 * 4.0)
    if generation:
        with torch.no_grad():  # unit-variance embeddings: less repetitive tiny-model output
            model.get_input_embeddings().weight.copy_(torch.randn(61, 32, generator=torch.Generator().manual_seed(1)))
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        model.generation_config.bos_token_id = None
    return model


def _disk_keys(path):
    from seqmix_jax.models import _tensors

    return set(_tensors.load_state_dict(path))


@pytest.mark.parametrize("kind", KINDS)
def test_moe_models_load_match_and_export(tmp_path, rng, kind):
    torch = torch_refs.torch()
    ref = _hf(kind)
    ref.save_pretrained(tmp_path / "hf")
    on_disk = _disk_keys(tmp_path / "hf")
    # transformers writes the per-expert layout (its conversion mapping reverts the fused in-memory tensors)
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in on_disk), sorted(on_disk)
    assert any(".experts.4." in k for k in on_disk)
    ids = rng.integers(0, ref.config.vocab_size, (B, L))
    ref_logits, ref_grads = _torch_logits_and_grads(ref, ids)
    assert any(k.endswith("experts.gate_up_proj") for k in ref_grads)

    ours = from_pretrained(tmp_path / "hf")
    assert {b.moe["dispatch"] for b in ours.config.blocks if b.moe} == {"dropless"}
    fmt, _ = read_config(tmp_path / "hf")
    logits, grads = _ours_logits_and_grads(ours, ids, fmt)
    _compare(kind, logits, grads, ref_logits, ref_grads)
    _compare_layers(tmp_path / "hf", ids)

    save_pretrained(ours, tmp_path / "export")
    assert _disk_keys(tmp_path / "export") == on_disk  # the layout and names transformers itself writes
    back = load_torch_model(tmp_path / "export")
    assert type(back).__name__ == type(ref).__name__
    back_logits, _ = torch_forward(back, ids)
    print(f"{kind} export -> transformers: max|diff| {np.abs(back_logits - ref_logits).max():.3e}")
    np.testing.assert_array_equal(back_logits, ref_logits)  # same float32 weights, same PyTorch code

    # the fused in-memory layout on disk (a state_dict saved as is) loads to the same parameters
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(ref.state_dict(), fused / "pytorch_model.bin")
    assert any(k.endswith("experts.gate_up_proj") for k in _disk_keys(fused))
    flat = lambda m: {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    a, b = flat(ours), flat(from_pretrained(fused))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


@pytest.mark.slow  # ~15 s each; generate() on MoE models runs in the fast suite in tests/models/test_moe_models.py
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_equals_transformers(tmp_path, kind):
    torch = torch_refs.torch()
    ref = _hf(kind, generation=True)
    ref.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    for seed in range(20):  # the first prompt whose reference continuation is varied in every row
        prompt = np.random.default_rng(seed).integers(0, ref.config.vocab_size, (2, GEN_PROMPT))
        with torch.no_grad():
            expect = ref.generate(torch.tensor(prompt), attention_mask=torch.ones(2, GEN_PROMPT, dtype=torch.long),
                                  do_sample=False, max_new_tokens=GEN_NEW).numpy()
        if all(len(set(row)) >= 4 for row in expect[:, GEN_PROMPT:].tolist()):
            break
    got = np.asarray(generate(ours, prompt, max_new_tokens=GEN_NEW, temperature=0.0))
    margin, scale = _min_top2_margin(ref, expect, GEN_PROMPT)
    new = expect[:, GEN_PROMPT:]
    print(f"{kind}: min top-2 logit margin {margin:.3e} (max|logit| {scale:.1f}); generated {new.tolist()}")
    assert margin > MIN_MARGIN, f"{kind}: near-tie in the reference argmax ({margin:.2e}): test setup too weak"
    assert all(len(set(row)) >= 4 for row in new.tolist()), f"{kind}: degenerate (repetitive) generation"
    mismatch = np.argwhere(got != expect)
    assert mismatch.size == 0, (f"{kind}: first mismatch at (row, pos) {mismatch[0].tolist()}: ours {got.tolist()} "
                                f"vs transformers {expect.tolist()}")

