"""seqmix_jax trainer: `python train.py [--config FILE] [--init-from DIR] [section.key=value ...]`.

With no arguments it runs the default job, configs/tiny.yaml: a small striped hybrid learning multi-query
associative recall on a CPU, leaving a checkpoint, metrics.jsonl and metrics.png in runs/<name>/. The same script
trains any config on one GPU or across hosts (see seqmix_jax/train/loop.py for what a run does).

    python train.py                                          # the default job
    python train.py --config configs/llama.yaml data.path='corpus/*.txt' run.steps=2000
    python train.py model.d_model=128 optimizer.lr=3e-3      # dotted overrides, type-checked
    python train.py --init-from path/to/hf_checkpoint ...    # start from `from_pretrained` weights

Exit codes: 0 done (or stopped by SIGTERM after saving), 1 non-finite loss under run.nonfinite=stop, 2 bad input
(one line on stderr; nothing on disk is overwritten).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the usage too; bad input gets one line (and exit code 2)
        print(f"train.py: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="train.py", description="Train a seqmix_jax language model.")
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--init-from", default=None, help="a from_pretrained directory to start from")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=128")
    args = parser.parse_args(argv)

    from seqmix_jax.train.config import load_config
    from seqmix_jax.train.loop import NonFiniteLoss, train

    overrides = list(args.overrides)
    if args.init_from is not None:
        overrides.append(f"checkpoint.init_from={args.init_from}")
    try:
        cfg = load_config(args.config or str(DEFAULT_CONFIG), overrides)
        result = train(cfg)
    except NonFiniteLoss as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return 1
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        msg = " ".join(str(e).split())
        print(f"train.py: error: {msg}", file=sys.stderr)
        return 2
    ev = result.eval
    tail = f"eval loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.4f}" if ev else "no evaluation"
    print(f"{result.status} at step {result.step} in {result.seconds:.1f} s: train loss "
          f"{result.train_loss if result.train_loss is None else round(result.train_loss, 4)}, {tail}; "
          f"run directory {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
