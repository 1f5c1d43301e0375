"""Decode cost vs context length: per-token `step` time after a prompt of c tokens, and the decode-state size.

Mixers at d_model 256 (b=1, float32): Attention (4 heads x 64, 2 kv heads, RoPE; KV cache sized to the context),
StripedHyenaMixer (modal state, state_size 2 as StripedHyena-7B), HyenaOperator (order 2, cached direct
convolution, l_max = the largest context), and MambaMixer / Mamba2Mixer for comparison. The step is jitted
once per (mixer, context) with `nnx.split` -> `jax.jit` -> `nnx.merge`, as a `lax.scan` of STEPS tokens (a
generation loop: the state is a loop carry, updated in place); the median of n calls divided by STEPS is the
per-token time.

Then the same for whole language models (`--models`): each preset at d_model 256, 4 layers, vocab 1024 (Mamba,
Mamba-2, Llama with GQA, StripedHyena striping, and the hybrid pattern "MSAM"), per-token `LM.step` after a prompt
of c tokens.

    python benchmarks/bench_decode.py [--quick] [-n 20] [--out benchmarks/results/decode.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from seqmix_jax.layers import Attention, HyenaOperator, Mamba2Mixer, MambaMixer, StripedHyenaMixer  # noqa: E402
from seqmix_jax.models import (LM, llama_preset, mamba2_preset, mamba_preset, pattern_config,  # noqa: E402
                               striped_hyena_preset)

D_MODEL = 256
STEPS = 16


def mixers(max_context: int):
    """name -> (module, init_state(c) -> fresh state for a context of c tokens)."""
    r = lambda: nnx.Rngs(0)
    attn = Attention(D_MODEL, 4, num_kv_heads=2, rngs=r())
    sh = StripedHyenaMixer(D_MODEL, 4, state_size=2, rngs=r())
    hy = HyenaOperator(D_MODEL, max_context + STEPS, rngs=r())
    m1 = MambaMixer(D_MODEL, rngs=r())
    m2 = Mamba2Mixer(D_MODEL, rngs=r())
    return {
        "Attention (KV cache)": (attn, lambda c: attn.init_state(1, c + STEPS)),
        "StripedHyena (modal)": (sh, lambda c: sh.init_state(1)),
        "Hyena (cached conv)": (hy, lambda c: hy.init_state(1)),
        "Mamba": (m1, lambda c: m1.init_state(1)),
        "Mamba2": (m2, lambda c: m2.init_state(1)),
    }


def models():
    """name -> LM (d_model 256, 4 layers, vocab 1024, float32)."""
    v, d, n = 1024, 256, 4
    configs = {
        "Mamba LM": mamba_preset(d_model=d, n_layer=n, vocab_size=v),
        "Mamba-2 LM": mamba2_preset(d_model=d, n_layer=n, vocab_size=v, ssm_cfg={"headdim": 64}),
        "Llama LM": llama_preset(vocab_size=v, hidden_size=d, intermediate_size=688, num_hidden_layers=n,
                                 num_attention_heads=4, num_key_value_heads=2),
        "StripedHyena LM": striped_hyena_preset(vocab_size=v, hidden_size=d, num_layers=n, num_attention_heads=4,
                                                proj_groups=2, inner_mlp_size=688),
        "hybrid MSAM": pattern_config("MSAM", vocab_size=v, d_model=d, mlp=True, mlp_hidden=688,
                                      mixer_kwargs={"attention": {"num_heads": 4, "num_kv_heads": 2},
                                                    "striped_hyena": {"num_heads": 4}}),
    }
    return {name: LM(c, rngs=nnx.Rngs(0)) for name, c in configs.items()}


def decode(module, xs, state):
    """STEPS tokens xs (STEPS, b, d) through `module.step`, the state carried by `lax.scan`."""
    def body(st, x):
        y, st = module.step(x, st)
        return st, y

    state, ys = jax.lax.scan(body, state, xs)
    return ys, state


def state_bytes(state) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(state))


def main():
    p = H.parser(__doc__.splitlines()[0], "decode.json")
    p.add_argument("--no-models", action="store_true", help="mixers only, no whole-model presets")
    args = p.parse_args()
    meta = H.meta(args)
    contexts = [64, 256] if args.quick else [256, 1024, 4096, 16384]
    n = 3 if args.quick else args.n
    rows = []
    for name, (module, fresh) in mixers(max(contexts)).items():
        rows += measure(name, module, fresh, contexts, n, lambda c: jax.random.normal(
            jax.random.key(c), (1, c, D_MODEL), jnp.float32), lambda c: jax.random.normal(
            jax.random.key(c + 1), (STEPS, 1, D_MODEL), jnp.float32), kind="mixer")
    if not args.no_models:
        for name, model in models().items():
            rows += measure(name, model, lambda c, m=model: m.init_state(1, c + STEPS), contexts, n,
                            lambda c: jax.random.randint(jax.random.key(c), (1, c), 0, 1000),
                            lambda c: jax.random.randint(jax.random.key(c + 1), (STEPS, 1), 0, 1000), kind="model")
    by_mixer = {}
    for row in rows:
        by_mixer.setdefault(row["mixer"], []).append(row)
    for group in by_mixer.values():
        base = group[0]["median_s"]
        for row in group:
            row["vs_shortest"] = row["median_s"] / base
    print(report(rows))
    H.write_json(args.out, rows, meta)


def measure(name, module, fresh, contexts, n, prompt, tokens, kind):
    """Per-token decode time after a prompt of each context length: rows for `report`."""
    graphdef, params = nnx.split(module)
    prefill = jax.jit(lambda p, x, st: nnx.merge(graphdef, p).prefill(x, st))
    step = jax.jit(lambda p, xs, st: decode(nnx.merge(graphdef, p), xs, st))
    rows = []
    for c in contexts:
        _, state = prefill(params, prompt(c), fresh(c))
        row = H.bench(f"{name} step", step, params, tokens(c), state, n=n, warmup=2, mem=False, mixer=name,
                      kind=kind, context=c, state_bytes=state_bytes(state))
        for k in ("median_s", "min_s", "max_s"):
            row[k] /= STEPS
        rows.append(row)
        print(f"  {name:<22} c={c:>6}  step {H.fmt_s(row['median_s']):>9}  state {H.fmt_bytes(row['state_bytes'])}",
              flush=True)
    return rows


def report(rows, meta=None):
    cols = [("mixer", "mixer", None), ("context", "context", None), ("per token (median)", "median_s", H.fmt_s),
            ("min", "min_s", H.fmt_s), ("vs shortest context", "vs_shortest", H.fmt_x),
            ("decode state", "state_bytes", H.fmt_bytes)]
    return H.Table(cols).render(rows)


if __name__ == "__main__":
    main()
