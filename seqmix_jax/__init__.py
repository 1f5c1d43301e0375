"""seqmix_jax: JAX/Flax sequence mixers for hybrid LLM architectures, matched to the PyTorch references."""

__version__ = "0.1.0"

from seqmix_jax import ops  # noqa: E402,F401
from seqmix_jax.models import (LM, BlockSpec, ModelConfig, from_pretrained, generate, jamba_preset,  # noqa: E402
                               llama_preset, mamba2_preset, mamba_preset, mixtral_preset, pattern_config,
                               save_pretrained, striped_hyena_preset)

__all__ = ["LM", "BlockSpec", "ModelConfig", "from_pretrained", "generate", "jamba_preset", "llama_preset",
           "mamba2_preset", "mamba_preset", "mixtral_preset", "ops", "pattern_config", "save_pretrained",
           "striped_hyena_preset"]
