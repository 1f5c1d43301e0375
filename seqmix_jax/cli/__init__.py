"""Command-line entry points (wiring only: parse arguments, build, run). See seqmix_jax/cli/generate.py."""
