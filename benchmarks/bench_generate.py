"""Generation throughput on CPU: seqmix_jax `generate` vs transformers `generate` for the same tiny weights.

Models (float32, random weights built by transformers with a fixed seed, written with `save_pretrained` and read
into seqmix_jax with `from_pretrained`): MambaForCausalLM (d_model 256, 4 layers, state 16, expand 2, vocab 1024,
tied head) and LlamaForCausalLM (hidden 256, 4 layers, 4 heads x 64, SwiGLU 688, vocab 1024, untied head).
Prompt 512 random tokens, 128 new tokens, greedy, batch 1 and 8, no padding, eos disabled (every row generates
all 128 tokens).

  generate   end to end: prefill + 128 new tokens. tokens/s = batch * 128 / median wall time.
  prefill    `generate(..., max_new_tokens=1)`, i.e. time to the first token. tokens/s = batch * 512 / time.
  decode     tokens/s = batch * 127 / (generate - prefill), the incremental steps alone.
Ours: jitted prefill + jitted `lax.while_loop` decode; compilation is excluded (one untimed warm-up call per shape
first; the compiled functions are cached). transformers: torch CPU eager, `model.generate(do_sample=False)` under
`torch.no_grad()`; its Mamba uses the pure-torch path (no CUDA kernels on CPU). Ours and theirs are timed
round-robin (harness.bench_group), so the ratios are measured under the same load. `match` is the fraction of
generated tokens equal between the two (random weights: near-ties may legitimately differ late in a sequence).
The issue's target: ours >= 5x transformers' generate tokens/s on CPU.

Ceiling (Llama rows): an estimate of the fastest any float32 implementation could generate on this machine, from two
rates measured in the same run -- the best float32 matmul rate (jnp.matmul and torch.matmul on the prefill's shapes
and a 2048^3 one) and the memory bandwidth (a jnp / numpy sum over 256 MiB) -- and counts that no float32
implementation avoids: the prefill's matmul FLOPs (weight matmuls on every prompt token + the causal half of the two
attention matmuls, in every layer but the last, where only the keys and values of every prompt token are needed: the
rest of that layer runs for the last token alone, as ours does) and the bytes each decode step reads (every cached
key and value, and the weights). At b = 8 a
step's working set (a 34-42 MiB KV cache + 14 MiB of weights) is larger than the 32 MiB L3 cache and is read in the
same order every step, so it streams from memory. At b = 1 the working set (19 MiB) fits in the L3 cache, where no
such bound holds, and no ceiling is given. Elementwise work, softmax, sampling and dispatch are left out, so the true
limit is lower still.
`ceiling ratio` = transformers' generate time / that time.

    python benchmarks/bench_generate.py [--quick] [-n 5] [--out benchmarks/results/generate.json]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from seqmix_jax.models import from_pretrained, generate  # noqa: E402

TARGET = 5.0
VOCAB, D_MODEL, LAYERS = 1024, 256, 4


def build_torch(kind):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if kind == "mamba":
        cfg = tf.MambaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, state_size=16, num_hidden_layers=LAYERS, expand=2,
                             conv_kernel=4, use_bias=False, use_conv_bias=True, tie_word_embeddings=True)
        model = tf.MambaForCausalLM(cfg)
    else:
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=688, num_hidden_layers=LAYERS,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                             tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(cfg)
    model = model.float().eval()
    gc = model.generation_config
    gc.eos_token_id, gc.bos_token_id, gc.pad_token_id = None, None, 0
    return model


def memory_bandwidth(n):
    """GB/s of a sum over 256 MiB of float32 (jit'd jnp.sum and numpy), timed round-robin; the better of the two."""
    import jax
    import jax.numpy as jnp

    a = np.ones(64 * 1024 * 1024, np.float32)
    ja = jnp.asarray(a)
    total = jax.jit(jnp.sum)
    runs = H.bench_group([H.spec("jax", lambda: total(ja), jit=False), H.spec("numpy", a.sum, jit=False)],
                         n=max(n, 5), warmup=2)
    rates = {r["name"]: a.nbytes / r["median_s"] / 1e9 for r in runs}
    print("  memory bandwidth GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()), flush=True)
    return {"bytes": a.nbytes, **{f"{k}_gbs": v for k, v in rates.items()}, "best_gbs": max(rates.values())}


def l3_cache_bytes():
    """The L3 cache size from sysfs (Linux), or None."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return None
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def llama_ceiling_s(b, prompt_len, new_tokens, best_gflops, best_gbs, l3_bytes):
    """Estimated lower bound on the generate time of the benchmark's Llama (see the module docstring); None when a
    decode step's working set fits in the L3 cache (or its size is unknown)."""
    f = 688
    per_token = LAYERS * (4 * D_MODEL * D_MODEL + 3 * D_MODEL * f)
    weight_bytes = (per_token + D_MODEL * VOCAB) * 4
    cache_bytes = lambda t: b * LAYERS * 2 * t * D_MODEL * 4  # every cached key and value, t tokens
    steps = range(prompt_len + 1, prompt_len + new_tokens)  # the cached tokens each decode step attends to
    if l3_bytes is None or cache_bytes(steps[0]) + weight_bytes <= l3_bytes:
        return None
    kv_only = 2 * D_MODEL * D_MODEL  # the last layer's k and v projections, per prompt token
    prefill_flops = (2 * (per_token // LAYERS * (LAYERS - 1) + kv_only) * b * prompt_len
                     + (LAYERS - 1) * 2 * 2 * b * (prompt_len ** 2 / 2) * D_MODEL)
    step_bytes = sum(cache_bytes(t) + weight_bytes for t in steps)
    return prefill_flops / (best_gflops * 1e9) + step_bytes / (best_gbs * 1e9)


def measure(kind, batches, prompt_len, new_tokens, n, tmp):
    import torch

    ref = build_torch(kind)
    ref.save_pretrained(Path(tmp) / kind)
    ours = from_pretrained(Path(tmp) / kind)
    rows = []
    for b in batches:
        prompt = np.random.default_rng(b).integers(0, VOCAB, (b, prompt_len)).astype(np.int32)
        tp = torch.tensor(prompt, dtype=torch.long)
        mask = torch.ones_like(tp)
        ours_gen = lambda k: generate(ours, prompt, max_new_tokens=k)
        theirs_gen = lambda k: ref.generate(tp, attention_mask=mask, do_sample=False, max_new_tokens=k)
        t0 = time.perf_counter()
        ours_gen(new_tokens), ours_gen(1)  # compile (excluded from the timings below)
        compile_s = time.perf_counter() - t0
        specs = [H.spec("ours generate", ours_gen, new_tokens, jit=False),
                 H.spec("transformers generate", theirs_gen, new_tokens, jit=False, torch_no_grad=True),
                 H.spec("ours prefill", ours_gen, 1, jit=False),
                 H.spec("transformers prefill", theirs_gen, 1, jit=False, torch_no_grad=True)]
        runs = H.bench_group(specs, n=n, warmup=1)
        t = {r["name"]: r["median_s"] for r in runs}
        with torch.no_grad():
            theirs_ids = theirs_gen(new_tokens).numpy()
        ours_ids = np.asarray(ours_gen(new_tokens))
        assert ours_ids.shape == theirs_ids.shape == (b, prompt_len + new_tokens), (ours_ids.shape, theirs_ids.shape)
        match = float((ours_ids[:, prompt_len:] == theirs_ids[:, prompt_len:]).mean())
        row = {"name": f"{kind} b={b}", "model": kind, "batch": b, "prompt": prompt_len, "new_tokens": new_tokens,
               "ours_compile_s": compile_s, "match": match, "runs": runs}
        for who, pre in (("ours", "ours"), ("torch", "transformers")):
            g, p = t[f"{pre} generate"], t[f"{pre} prefill"]
            row[f"{who}_generate_s"], row[f"{who}_prefill_s"] = g, p
            row[f"{who}_tok_s"] = b * new_tokens / g
            row[f"{who}_prefill_tok_s"] = b * prompt_len / p
            row[f"{who}_decode_tok_s"] = b * (new_tokens - 1) / (g - p) if g > p else None
        row["ratio"] = row["ours_tok_s"] / row["torch_tok_s"]
        row["prefill_ratio"] = row["ours_prefill_tok_s"] / row["torch_prefill_tok_s"]
        row["decode_ratio"] = (row["ours_decode_tok_s"] / row["torch_decode_tok_s"]
                               if row["ours_decode_tok_s"] and row["torch_decode_tok_s"] else None)
        row["meets_target"] = row["ratio"] >= TARGET
        rows.append(row)
        print(f"  {kind:<5} b={b}: ours {row['ours_tok_s']:9.1f} tok/s, transformers {row['torch_tok_s']:9.1f} tok/s "
              f"({row['ratio']:.2f}x); prefill {row['ours_prefill_tok_s']:.0f} vs {row['torch_prefill_tok_s']:.0f} "
              f"tok/s ({row['prefill_ratio']:.2f}x); match {match:.2f}", flush=True)
    return rows


def main():
    p = H.parser(__doc__.splitlines()[0], "generate.json")
    args = p.parse_args()
    import torch

    meta = H.meta(args, torch_threads=torch.get_num_threads(), target_ratio=TARGET,
                  source_models=H.source_state(("seqmix_jax/models", "seqmix_jax/layers", "seqmix_jax/ops")))
    batches, prompt_len, new_tokens = ((1, 2), 64, 16) if args.quick else ((1, 8), 512, 128)
    n = 1 if args.quick else args.n
    meta["runs"] = n
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("mamba", "llama"):
            rows += measure(kind, batches, prompt_len, new_tokens, n, tmp)
    from benchmarks.bench_train import measure_matmul_rate

    print("machine limits (for the Llama ceiling)", flush=True)
    meta["matmul_rate"] = measure_matmul_rate(max(batches), prompt_len, n)
    meta["memory_bandwidth"] = memory_bandwidth(n)
    meta["l3_cache_bytes"] = l3_cache_bytes()
    for row in rows:
        if row["model"] == "llama":
            row["ceiling_s"] = llama_ceiling_s(row["batch"], prompt_len, new_tokens, meta["matmul_rate"]["best_gflops"],
                                               meta["memory_bandwidth"]["best_gbs"], meta["l3_cache_bytes"])
            row["ceiling_ratio"] = None if row["ceiling_s"] is None else row["torch_generate_s"] / row["ceiling_s"]
    print(report(rows, meta))
    H.write_json(args.out, rows, meta)


def _tok(v):
    return "-" if v is None else f"{v:,.0f}"


def report(rows, meta=None):
    cols = [("model", "model", None), ("batch", "batch", None),
            ("prompt+new", lambda r: f"{r['prompt']}+{r['new_tokens']}", None),
            ("ours tok/s", "ours_tok_s", _tok), ("transformers tok/s", "torch_tok_s", _tok),
            ("ratio", "ratio", H.fmt_x), ("ours prefill tok/s", "ours_prefill_tok_s", _tok),
            ("transformers prefill tok/s", "torch_prefill_tok_s", _tok),
            ("prefill ratio", "prefill_ratio", H.fmt_x),
            ("ours decode tok/s", "ours_decode_tok_s", _tok), ("transformers decode tok/s", "torch_decode_tok_s", _tok),
            ("ours generate", "ours_generate_s", H.fmt_s), ("transformers generate", "torch_generate_s", H.fmt_s),
            ("match", "match", lambda v: f"{v:.2f}"),
            ("ceiling ratio (this machine)", lambda r: r.get("ceiling_ratio"), H.fmt_x)]
    text = H.Table(cols).render(rows)
    if meta is not None:
        text += (f"\n\nGeneration tokens/s = batch x new tokens / end-to-end generate time (median of "
                 f"{meta.get('runs', '?')} timed runs); target >= {meta.get('target_ratio', TARGET):g}x transformers "
                 f"(torch threads {meta.get('torch_threads', '?')}).")
        mm, bw = meta.get("matmul_rate"), meta.get("memory_bandwidth")
        if mm and bw:
            text += (" Ceiling ratio: transformers' generate time / an estimated lower bound on any float32 "
                     "implementation's, "
                     f"from the best matmul rate ({mm['best_gflops']:.0f} GFLOP/s) and memory bandwidth "
                     f"({bw['best_gbs']:.1f} GB/s) measured in the same run (see the script's docstring).")
    return text


if __name__ == "__main__":
    main()
