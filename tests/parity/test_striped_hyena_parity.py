"""StripedHyenaMixer (and a block assembled from our RMSNorm + mixer + GatedMLP) against stripedhyena 0.2.2 on CPU,
float32, same (perturbed, random) weights.

Checked: `ParallelHyenaFilter.forward` (short FIR, column split, modal filter, FFT convolution, D skip, gate) vs our
`hyena_filter`; a whole `ParallelGatedConvBlock` (both RMSNorm variants) vs ours, outputs and gradients w.r.t. the
input and every parameter; the state after an FFT prefill (`HyenaInferenceEngine.prefill_via_modal_fft`, FIR
cache and complex64 modal state) and every recurrent decode step (`sequential_forward` -> `step_fir`, `step_iir`)
vs our `prefill` / `step`; and `AttentionBlock` (flash-attn `MHA` with its torch softmax path, RoPE on the whole
head, GQA through `proj_groups`) vs our RMSNorm + Attention (q/k/v from `Wqkv` by `split_fused_qkv`) + GatedMLP,
outputs and gradients.

Tolerances (never loosened): outputs max|ours - ref| / max|ref| <= 1e-5, gradients <= 1e-4, states and decoded
tokens <= 1e-5.

Observations about the reference (read from stripedhyena 0.2.2; they shape the config below):
  * `hyena_filter_groups` defaults to hidden_size, which gives num_systems = hidden_size // groups = 1: one filter
    shared by every channel. SH-7B sets 1 (one filter per channel), as we do. Its grouped path (groups > 1)
    repeats (d / groups) filters (d / groups) times, consistent only when groups^2 = d, and `step_iir` raises for
    groups > 1; we support one filter per channel only.
  * `RMSNorm.__init__` reassigns `self.scale = self.scale.to(config.params_dtype)`; any params_dtype other than
    the parameter's float32 raises in torch (a plain tensor cannot replace a registered Parameter).
  * `ParallelGatedConvBlock.projections` is not cast to `hyena_block_dtype` (the out projection is); the MLP
    defaults to bfloat16 (`mlp_dtype`), set to float32 here.
  * The short-filter bias is added after the conv ("source of small error"); D is added after the FFT result is
    cast to the data dtype; in bf16 with float32 D, torch's type promotion makes that sum float32.
  * The open-code init of the poles is a placeholder (|p| ~ 0.01, the filter dies after one or two taps), so the
    poles are replaced here by |p| in [0.5, 0.98], and D, the norm scales and the residues are randomized.
  * `prefill_style="recurrence"` (`prefill_via_direct_recurrence`) is wrong for complex poles: it updates the
    state's real part in place and then uses the *new* real part in the imaginary update, and its outputs keep
    only sum_n Re(R) Re(S) (the -Im(R) Im(S) term is dropped). Its placeholder poles (|Im p| ~ 1e-3) hide this;
    with the poles used here its state is off by ~100 % (see the last test). We match the default "fft" style.
  * `use_flash_rmsnorm=True` needs flash-attn's CUDA layer norm; `torch_refs.stripedhyena` substitutes a torch
    restatement of that kernel (eps inside the sqrt), so that variant checks our eps placement, not the kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix_jax.layers.attention import Attention, split_fused_qkv
from seqmix_jax.layers.mlp import GatedMLP
from seqmix_jax.layers.norms import RMSNorm
from seqmix_jax.layers.striped_hyena import StripedHyenaMixer, StripedHyenaState
from seqmix_jax.ops.rotary import rotary_inv_freq
from tests.helpers import assert_close
from tests.parity import torch_refs

OUT_TOL, GRAD_TOL, DECODE_TOL = 1e-5, 1e-4, 1e-5
B, L, D_MODEL, HEADS, N, W, INNER = 2, 37, 24, 4, 3, 3, 40
PROMPT, NEW = 19, 6
# Large enough that the two RMSNorm epsilon placements differ by ~5e-3 on unit-scale inputs (1e-5, SH-7B's value,
# would move the output by ~5e-6, under the output tolerance: the test could not tell the variants apart).
EPS = 1e-2


# ------------------------------------------------------------------ torch side

def _config(**over):
    torch = torch_refs.torch()
    utils = torch_refs.require("stripedhyena.utils")
    cfg = dict(hidden_size=D_MODEL, num_filters=D_MODEL, num_attention_heads=HEADS, state_size=N,
               short_filter_length=W, short_filter_bias=True, eps=EPS, use_flash_rmsnorm=False,
               params_dtype=torch.float32, hyena_block_dtype=torch.float32, mlp_dtype=torch.float32,
               attn_block_dtype=torch.float32, inner_mlp_size=INNER, model_parallel_size=1, mlp_activation="silu",
               hyena_filter_groups=1, column_split_hyena=True, prefill_style="fft", use_flashfft=False,
               use_flash_depthwise=False, use_flash_attn=False, attn_layer_idxs=[], hyena_layer_idxs=[0],
               num_layers=1, vocab_size=32)
    cfg.update(over)
    return utils.dotdict(cfg)


def _perturb_filter(filt, gen):
    """Stable poles with long memory (|p| in [0.5, 0.98], any angle), random residues, D and FIR bias."""
    torch = torch_refs.torch()
    with torch.no_grad():
        d, n = filt.poles.shape[:2]
        mag = 0.5 + 0.48 * torch.rand(d, n, 1, generator=gen)
        ang = (2 * torch.rand(d, n, 1, generator=gen) - 1) * np.pi
        filt.poles.copy_(torch.stack([mag * torch.cos(ang), mag * torch.sin(ang)], -1))
        filt.residues.copy_(torch.randn(filt.residues.shape, generator=gen) * 0.3)
        filt.D.copy_(torch.randn(filt.D.shape, generator=gen))
        filt.short_filter_weight.mul_(0.5)


def torch_filter(seed=0):
    model = torch_refs.stripedhyena()
    torch = torch_refs.torch()
    torch.manual_seed(seed)
    filt = model.ParallelHyenaFilter(_config(), layer_idx=0)
    _perturb_filter(filt, torch.Generator().manual_seed(seed + 1))
    return filt


def torch_block(seed=0, **over):
    model = torch_refs.stripedhyena()
    torch = torch_refs.torch()
    torch.manual_seed(seed)
    block = model.ParallelGatedConvBlock(_config(**over), layer_idx=0)
    gen = torch.Generator().manual_seed(seed + 1)
    _perturb_filter(block.filter, gen)
    with torch.no_grad():
        for norm in (block.pre_norm, block.post_norm):
            norm.scale.copy_(1.0 + 0.3 * torch.randn(norm.scale.shape, generator=gen))
    return block


# ------------------------------------------------------------------ ours

class GatedConvBlock(nnx.Module):
    """stripedhyena's ParallelGatedConvBlock from our parts: u' = u + mixer(pre_norm(u)),
    y = u' + mlp(post_norm(u'))."""

    def __init__(self, *, eps_inside_sqrt: bool, activation: str = "silu", rngs: nnx.Rngs):
        norm = lambda: RMSNorm(D_MODEL, eps=EPS, eps_inside_sqrt=eps_inside_sqrt, rngs=rngs)
        self.pre_norm, self.post_norm = norm(), norm()
        self.mixer = StripedHyenaMixer(D_MODEL, HEADS, state_size=N, short_filter_length=W, chunk_size=8, rngs=rngs)
        self.mlp = GatedMLP(D_MODEL, INNER, activation=activation, rngs=rngs)

    def __call__(self, u):
        u = u + self.mixer(self.pre_norm(u))
        return u + self.mlp(self.post_norm(u))

    def prefill(self, u, state=None):
        y, state = self.mixer.prefill(self.pre_norm(u), state)
        u = u + y
        return u + self.mlp(self.post_norm(u)), state

    def step(self, u, state):
        y, state = self.mixer.step(self.pre_norm(u), state)
        u = u + y
        return u + self.mlp(self.post_norm(u)), state


# torch key -> (our path, torch -> ours, ours -> torch). `kernel`s are transposed; the FIR weight is (3d, 1, w) in
# torch and (w, 3d) here; poles / residues (d, n, 1, 2) vs (d, n, 2).
_T = (lambda a: a.T, lambda a: a.T)
_ID = (lambda a: a, lambda a: a)
_FIR = (lambda a: a[:, 0, :].T, lambda a: a.T[:, None, :])
_MODE = (lambda a: a[:, :, 0], lambda a: a[:, :, None])
FILTER_KEYS = {"short_filter_weight": (("short_filter_weight",), *_FIR),
               "short_filter_bias": (("short_filter_bias",), *_ID),
               "poles": (("poles",), *_MODE), "residues": (("residues",), *_MODE), "D": (("D",), *_ID)}
BLOCK_KEYS = {"pre_norm.scale": (("pre_norm", "scale"), *_ID), "post_norm.scale": (("post_norm", "scale"), *_ID),
              "projections.weight": (("mixer", "projections", "kernel"), *_T),
              "projections.bias": (("mixer", "projections", "bias"), *_ID),
              **{f"filter.{k}": (("mixer",) + path, a, b) for k, (path, a, b) in FILTER_KEYS.items()},
              "out_filter_dense.weight": (("mixer", "out_proj", "kernel"), *_T),
              "out_filter_dense.bias": (("mixer", "out_proj", "bias"), *_ID),
              "mlp.l1.weight": (("mlp", "gate", "kernel"), *_T), "mlp.l2.weight": (("mlp", "up", "kernel"), *_T),
              "mlp.l3.weight": (("mlp", "down", "kernel"), *_T)}


def load(ours, torch_module, keys, strict=True):
    """Copy every torch parameter into ours; with `strict`, both sides must hold exactly the same set."""
    sd = {k: v.detach().numpy() for k, v in torch_module.named_parameters()}
    assert set(sd) == set(keys), (sorted(set(sd) - set(keys)), sorted(set(keys) - set(sd)))
    flat = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
    paths = {path for path, _, _ in keys.values()}
    assert paths <= set(flat) and (not strict or paths == set(flat)), sorted(flat)
    for k, (path, to_ours, _) in keys.items():
        value = to_ours(sd[k])
        assert value.shape == flat[path][...].shape, (k, value.shape, flat[path][...].shape)
        flat[path][...] = jnp.asarray(value, jnp.float32)


def grads_in_torch_layout(grads, keys):
    flat = {tuple(map(str, path)): np.asarray(g[...] if isinstance(g, nnx.Variable) else g)
            for path, g in nnx.to_flat_state(grads)}
    return {k: to_torch(flat[path]) for k, (path, _, to_torch) in keys.items()}


def run_both(torch_module, ours_fn, ours_params, x, keys, rng):
    """Outputs and VJPs (w.r.t. x and every parameter) of the torch module and ours for one random cotangent."""
    torch = torch_refs.torch()
    xt = torch.tensor(x, requires_grad=True)
    out = torch_module(xt)[0]
    ct = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(torch.tensor(ct))
    ref = dict(y=out.detach().numpy(), dx=xt.grad.numpy(),
               **{k: p.grad.numpy() for k, p in torch_module.named_parameters()})

    @jax.jit
    def vjp(params, x, ct):
        y, pullback = jax.vjp(ours_fn, params, x)
        return y, pullback(ct)

    y, (g_params, g_x) = vjp(ours_params, jnp.asarray(x), jnp.asarray(ct))
    return ref, dict(y=np.asarray(y), dx=np.asarray(g_x), **grads_in_torch_layout(g_params, keys))


def compare(name, ours, ref):
    assert_close(f"{name} y", ours["y"], ref["y"], OUT_TOL)
    for k in ref:
        if k != "y":
            assert np.abs(ref[k]).max() > 0, f"reference gradient d{k} is identically zero"
            assert_close(f"{name} d{k}", ours[k], ref[k], GRAD_TOL)


# ------------------------------------------------------------------ tests

def test_parallel_hyena_filter_forward_and_grads(rng):
    """ParallelHyenaFilter: (b, l, 3d) projections -> (b, l, d); ours is `StripedHyenaMixer.hyena_filter`."""
    filt = torch_filter(seed=11)
    mixer = StripedHyenaMixer(D_MODEL, HEADS, state_size=N, short_filter_length=W, rngs=nnx.Rngs(0))
    load(mixer, filt, FILTER_KEYS, strict=False)  # the mixer's projections are not part of the filter
    is_filter_param = lambda path, value: isinstance(value, nnx.Param) and path[0] in FILTER_KEYS
    graphdef, params, rest = nnx.split(mixer, is_filter_param, ...)
    z = rng.standard_normal((B, L, 3 * D_MODEL)).astype(np.float32)
    ref, got = run_both(filt, lambda p, z: nnx.merge(graphdef, p, rest).hyena_filter(z), params, z, FILTER_KEYS, rng)
    compare("ParallelHyenaFilter", got, ref)


@pytest.mark.parametrize("use_flash_rmsnorm,activation", [(False, "gelu"), (True, "silu")],
                         ids=["evo1_eps_outside_sqrt_gelu", "sh7b_eps_inside_sqrt_silu"])
def test_gated_conv_block_forward_and_grads(rng, use_flash_rmsnorm, activation):
    """Evo 1 (non-flash RMSNorm: eps outside the sqrt, GELU MLP) and SH-7B (flash RMSNorm, SwiGLU) settings."""
    block = torch_block(seed=5, use_flash_rmsnorm=use_flash_rmsnorm, mlp_activation=activation)
    ours = GatedConvBlock(eps_inside_sqrt=use_flash_rmsnorm, activation=activation, rngs=nnx.Rngs(0))
    load(ours, block, BLOCK_KEYS)
    graphdef, params = nnx.split(ours, nnx.Param)
    x = rng.standard_normal((B, L, D_MODEL)).astype(np.float32)
    ref, got = run_both(block, lambda p, u: nnx.merge(graphdef, p)(u), params, x, BLOCK_KEYS, rng)
    compare(f"ParallelGatedConvBlock (use_flash_rmsnorm={use_flash_rmsnorm}, {activation})", got, ref)


def test_prefill_state_and_decode_steps_match_inference_engine(rng, prefill_style="fft"):
    """The block with RecurrentInferenceParams: a prompt (FFT prefill -> FIR cache (b, 3d, w - 1) and complex64
    modal state (b, d, n)), then one token at a time through `sequential_forward` (step_fir, step_iir)."""
    torch = torch_refs.torch()
    cache = torch_refs.require("stripedhyena.cache")
    block = torch_block(seed=7, prefill_style=prefill_style)
    ours = GatedConvBlock(eps_inside_sqrt=False, rngs=nnx.Rngs(0))
    load(ours, block, BLOCK_KEYS)
    x = rng.standard_normal((B, PROMPT + NEW, D_MODEL)).astype(np.float32)

    params = cache.RecurrentInferenceParams(fir_filter_length=W, state_dim=N, seqlen_offset=0)
    with torch.no_grad():
        ref_prompt = block(torch.tensor(x[:, :PROMPT]), inference_params=params)[0].numpy()
        ref_fir = params.fir_state_dict[0].numpy()  # (b, 3d, w - 1)
        ref_modal = params.state_dict[0]
        assert ref_modal.dtype == torch.complex64
        ref_modal = torch.view_as_real(ref_modal).numpy()  # (b, d, n, 2)
        ref_tokens = [block(torch.tensor(x[:, t:t + 1]), inference_params=params)[0].numpy()[:, 0]
                      for t in range(PROMPT, PROMPT + NEW)]

    graphdef, state = nnx.split(ours)
    prefill = jax.jit(lambda s, u: nnx.merge(graphdef, s).prefill(u))
    step = jax.jit(lambda s, u, c: nnx.merge(graphdef, s).step(u, c))
    y_prompt, c = prefill(state, jnp.asarray(x[:, :PROMPT]))
    assert isinstance(c, StripedHyenaState)
    assert_close(f"{prefill_style} prompt output", y_prompt, ref_prompt, OUT_TOL)
    assert_close(f"{prefill_style} FIR cache", np.swapaxes(np.asarray(c.fir), 1, 2), ref_fir, DECODE_TOL)
    assert_close(f"{prefill_style} modal state", np.stack([np.real(c.modal), np.imag(c.modal)], -1), ref_modal,
                 DECODE_TOL)
    for i, t in enumerate(range(PROMPT, PROMPT + NEW)):
        y_t, c = step(state, jnp.asarray(x[:, t]), c)
        assert_close(f"{prefill_style} decode token {t}", y_t, ref_tokens[i], DECODE_TOL)


def test_reference_direct_recurrence_prefill_is_wrong_for_complex_poles(rng):
    """Pins the reference defect documented above: stripedhyena's "recurrence" prefill state equals a restatement
    of its in-place loop (diagnosis), and that state is far from its own FFT prefill (which we match)."""
    torch = torch_refs.torch()
    cache = torch_refs.require("stripedhyena.cache")
    z = torch.tensor(rng.standard_normal((B, PROMPT, 3 * D_MODEL)).astype(np.float32))
    states = {}
    for style in ("fft", "recurrence"):
        filt = torch_filter(seed=11)
        filt.config["prefill_style"] = style
        params = cache.RecurrentInferenceParams(fir_filter_length=W, state_dim=N)
        with torch.no_grad():
            filt(z, inference_params=params)
        states[style] = params.state_dict[0].numpy().astype(np.complex128)
    with torch.no_grad():  # x1v of the filter, restated: FIR (+ bias after), column split, x1 * v
        zc = torch.nn.functional.conv1d(z.transpose(1, 2), filt.short_filter_weight, padding=W - 1,
                                        groups=3 * D_MODEL)[..., :PROMPT] + filt.short_filter_bias[:, None]
        zh = zc.reshape(B, HEADS, 3, D_MODEL // HEADS, PROMPT)
        x1v = (zh[:, :, 1] * zh[:, :, 2]).reshape(B, D_MODEL, PROMPT).numpy().astype(np.float64)
    p = filt.poles.detach().numpy()[:, :, 0].astype(np.float64)
    re, im = np.zeros((B, D_MODEL, N)), np.zeros((B, D_MODEL, N))
    for t in range(PROMPT):
        re = p[..., 0] * re - p[..., 1] * im + x1v[:, :, t, None]
        im = p[..., 0] * im + p[..., 1] * re  # uses the updated real part, as the reference does
    assert_close("reference recurrence vs its in-place loop", states["recurrence"].view(np.float64),
                 (re + 1j * im).view(np.float64), 1e-5)
    wrong = np.abs(states["recurrence"] - states["fft"]).max() / np.abs(states["fft"]).max()
    print(f"reference recurrence prefill state vs its FFT prefill: max rel err {wrong:.3e}")
    assert wrong > 0.1


# ------------------------------------------------------------------ attention block

D_ATTN, HEADS_ATTN = 48, 4  # head_dim 12


class AttentionBlock(nnx.Module):
    """stripedhyena's AttentionBlock from our parts: u' = u + attn(pre_norm(u)); y = u' + mlp(post_norm(u'))."""

    def __init__(self, *, kv_heads: int, qkv_bias: bool, out_bias: bool, rope_base: float, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(D_ATTN, eps=EPS, eps_inside_sqrt=False, rngs=rngs)
        self.pre_norm, self.post_norm = norm(), norm()
        self.attn = Attention(D_ATTN, HEADS_ATTN, num_kv_heads=kv_heads, qkv_bias=qkv_bias, out_bias=out_bias,
                              rope_base=rope_base, rngs=rngs)
        self.mlp = GatedMLP(D_ATTN, INNER, rngs=rngs)

    def __call__(self, u):
        u = u + self.attn(self.pre_norm(u))
        return u + self.mlp(self.post_norm(u))


def _attention_keys(kv_heads, qkv_bias, out_bias):
    """torch key -> (our path, torch -> ours, ours -> torch) for everything but the fused Wqkv."""
    keys = {"pre_norm.scale": (("pre_norm", "scale"), *_ID), "post_norm.scale": (("post_norm", "scale"), *_ID),
            "inner_mha_cls.out_proj.weight": (("attn", "o_proj", "kernel"), *_T),
            "mlp.l1.weight": (("mlp", "gate", "kernel"), *_T), "mlp.l2.weight": (("mlp", "up", "kernel"), *_T),
            "mlp.l3.weight": (("mlp", "down", "kernel"), *_T)}
    if out_bias:
        keys["inner_mha_cls.out_proj.bias"] = (("attn", "o_proj", "bias"), *_ID)
    fused = {"inner_mha_cls.Wqkv.weight": "kernel"} | ({"inner_mha_cls.Wqkv.bias": "bias"} if qkv_bias else {})
    return keys, fused


@pytest.mark.parametrize("proj_groups,biases", [(2, False), (1, True)], ids=["gqa_sh7b", "mha_biases_evo1"])
def test_attention_block_forward_and_grads(rng, proj_groups, biases):
    """SH-7B style (GQA with proj_groups, no qkv/out biases, RoPE base 500000) and Evo-1 style (plain MHA with
    biases, base 10000): flash-attn's MHA takes its GQA path (q and kv rotated separately) or its fused-qkv path."""
    torch = torch_refs.torch()
    model = torch_refs.stripedhyena()
    base = 500000.0 if proj_groups > 1 else 10000.0
    kv_heads = HEADS_ATTN // proj_groups
    cfg = _config(hidden_size=D_ATTN, num_filters=D_ATTN, num_attention_heads=HEADS_ATTN, attn_layer_idxs=[0],
                  hyena_layer_idxs=[], proj_groups=proj_groups, qkv_proj_bias=biases, mha_out_proj_bias=biases,
                  rotary_emb_base=base)
    torch.manual_seed(3)
    block = model.AttentionBlock(cfg, layer_idx=0)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for norm in (block.pre_norm, block.post_norm):
            norm.scale.copy_(1.0 + 0.3 * torch.randn(norm.scale.shape, generator=gen))
        for name, p in block.inner_mha_cls.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    hd = D_ATTN // HEADS_ATTN
    assert_close("rotary inv_freq buffer", rotary_inv_freq(hd, base),
                 block.inner_mha_cls.rotary_emb.inv_freq.numpy(), 1e-7)

    ours = AttentionBlock(kv_heads=kv_heads, qkv_bias=biases, out_bias=biases, rope_base=base, rngs=nnx.Rngs(0))
    keys, fused = _attention_keys(kv_heads, biases, biases)
    sd = {k: v.detach().numpy() for k, v in block.named_parameters()}
    assert set(sd) == set(keys) | set(fused), sorted(sd)
    flat = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
    for k, (path, to_ours, _) in keys.items():
        flat[path][...] = jnp.asarray(to_ours(sd[k]))
    for k, leaf in fused.items():
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_fused_qkv(sd[k], HEADS_ATTN, kv_heads, hd)):
            flat[("attn", proj, leaf)][...] = jnp.asarray(part.T if leaf == "kernel" else part)
    assert len(flat) == len(keys) + 3 * len(fused), sorted(flat)

    x = rng.standard_normal((B, L, D_ATTN)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    out = block(xt)[0]
    ct = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(torch.tensor(ct))
    ref = dict(y=out.detach().numpy(), dx=xt.grad.numpy(), **{k: p.grad.numpy() for k, p in block.named_parameters()})

    graphdef, params = nnx.split(ours, nnx.Param)

    @jax.jit
    def vjp(params, x, ct):
        y, pullback = jax.vjp(lambda p, u: nnx.merge(graphdef, p)(u), params, x)
        return y, pullback(ct)

    y, (g_params, g_x) = vjp(params, jnp.asarray(x), jnp.asarray(ct))
    g = {tuple(map(str, path)): np.asarray(v[...] if isinstance(v, nnx.Variable) else v)
         for path, v in nnx.to_flat_state(g_params)}
    got = dict(y=np.asarray(y), dx=np.asarray(g_x), **{k: to_torch(g[path]) for k, (path, _, to_torch) in keys.items()})
    for k, leaf in fused.items():  # our q/k/v gradients stacked back into the fused [q | k | v] rows
        parts = [g[("attn", proj, leaf)] for proj in ("q_proj", "k_proj", "v_proj")]
        got[k] = np.concatenate([p.T if leaf == "kernel" else p for p in parts], axis=0)
    compare(f"AttentionBlock (proj_groups={proj_groups}, biases={biases})", got, ref)
