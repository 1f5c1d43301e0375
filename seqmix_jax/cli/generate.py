"""Text generation from a checkpoint directory on the command line.

    python -m seqmix_jax.generate --checkpoint DIR --prompt "Once upon a time" [--max-new-tokens 64]
        [--temperature 0] [--top-k K] [--top-p P] [--seed S] [--eos-id ID] [--tokenizer auto|bytes|hf]

The checkpoint is anything `seqmix_jax.from_pretrained` loads (Hugging Face mamba / mamba2 / llama directories,
mamba_ssm and StripedHyena checkpoints). Tokenizer (`--tokenizer auto`, the default): the Hugging Face
`tokenizer.json` in DIR when there is one (read with the `tokenizers` package, imported only then), otherwise
byte level: ids are the prompt's UTF-8 bytes (the model needs vocab_size >= 256) and generated ids are decoded
back as UTF-8 with invalid sequences (and ids >= 256, which are no byte) shown as U+FFFD.

With a tokenizer.json and no `--eos-id`, config.json's `eos_token_id` ends generation (as transformers does);
the byte-level tokenizer has no end-of-sequence id unless `--eos-id` names one. Prints the completion (the text
after the prompt, up to but not including the first eos) on stdout.

Bad input (missing directory, a checkpoint that does not load, a prompt longer than the model's maximum, an
empty prompt, vocab_size < 256 for bytes, invalid sampling settings) prints one line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "python -m seqmix_jax.generate"
TOKENIZER_JSON = "tokenizer.json"
REPLACEMENT = "\ufffd"


class UsageError(Exception):
    """Bad user input: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we report one line
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Generate text with a seqmix_jax language model loaded from a checkpoint "
                                       "directory (greedy by default).")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + weights)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--eos-id", type=int, default=None,
                   help="end-of-sequence id (default: config.json's eos_token_id with a tokenizer.json, "
                        "none for bytes)")
    p.add_argument("--tokenizer", choices=("auto", "bytes", "hf"), default="auto",
                   help=f"auto (default): {TOKENIZER_JSON} in the checkpoint when present, else bytes")
    return p


# ---------------------------------------------------------------- tokenizers

class ByteTokenizer:
    """ids = UTF-8 bytes of the text; decoding shows invalid UTF-8 and ids >= 256 as U+FFFD."""

    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        parts, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            parts.append(REPLACEMENT)
            run = bytearray()
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` package (special tokens added as it specifies)."""

    name = "hf"

    def __init__(self, path: Path):
        try:
            import tokenizers
        except ImportError:
            raise UsageError(f"{path} needs the `tokenizers` package (pip install tokenizers), or pass "
                             f"--tokenizer bytes") from None
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - any parse failure is bad input here
            raise UsageError(f"cannot read {path}: {_one_line(err)}") from None

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def pick_tokenizer(directory: Path, choice: str):
    path = directory / TOKENIZER_JSON
    if choice == "hf" or (choice == "auto" and path.is_file()):
        if not path.is_file():
            raise UsageError(f"--tokenizer hf: no {TOKENIZER_JSON} in {directory}")
        return HFTokenizer(path)
    return ByteTokenizer()


# ---------------------------------------------------------------- main

def _one_line(err) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _config_eos(directory: Path, vocab_size: int):
    """config.json's eos_token_id (an int, or the first of a list) when it is a valid id, else None."""
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if isinstance(eos, int) and not isinstance(eos, bool) and 0 <= eos < vocab_size else None


def run(args) -> str:
    """The completion text for parsed `args` (raises UsageError for bad input)."""
    directory = Path(args.checkpoint)
    if not directory.is_dir():
        raise UsageError(f"checkpoint directory not found: {directory}")
    tokenizer = pick_tokenizer(directory, args.tokenizer)  # before the (slow) model load: fail fast

    import numpy as np

    from seqmix_jax.models.checkpoints import from_pretrained
    from seqmix_jax.models.generate import generate

    try:
        model = from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 - any failure to load is reported as bad input in one line
        raise UsageError(f"cannot load checkpoint {directory}: {type(err).__name__}: {_one_line(err)}") from None
    cfg = model.config
    if tokenizer.name == "bytes" and cfg.vocab_size < 256:
        raise UsageError(f"the byte-level tokenizer needs vocab_size >= 256, the model has vocab_size={cfg.vocab_size} "
                         f"(put a {TOKENIZER_JSON} in the checkpoint directory)")
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UsageError("the prompt is empty (it encodes to no tokens)")
    if cfg.max_seq_len is not None and len(ids) > cfg.max_seq_len:
        raise UsageError(f"the prompt is {len(ids)} tokens, longer than the model's maximum max_seq_len="
                         f"{cfg.max_seq_len}")
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise UsageError(f"the tokenizer produced ids outside the model's vocabulary [0, {cfg.vocab_size}), "
                         f"e.g. {bad[0]}")
    eos = args.eos_id
    if eos is None and tokenizer.name == "hf":
        eos = _config_eos(directory, cfg.vocab_size)
    try:
        out = generate(model, np.asarray([ids], np.int32), max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=eos)
    except ValueError as err:  # generate validates every setting (and prompt + new tokens vs max_seq_len)
        raise UsageError(_one_line(err)) from None
    new = [int(i) for i in np.asarray(out)[0, len(ids):]]
    if eos is not None and eos in new:
        new = new[:new.index(eos)]
    return tokenizer.decode(new)


def main(argv=None) -> int:
    """CLI entry point: 0 on success, 2 on bad input (one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
        text = run(args)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
