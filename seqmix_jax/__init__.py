"""seqmix_jax: JAX/Flax sequence mixers for hybrid LLM architectures, matched to the PyTorch references."""

__version__ = "0.1.0"

from seqmix_jax import ops  # noqa: E402,F401
