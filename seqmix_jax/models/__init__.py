"""Language models assembled from a layer pattern, presets of the reference architectures, and generation."""

from seqmix_jax.models.config import (BlockSpec, ModelConfig, jamba_preset, llama_preset, mamba2_preset,
                                      mamba_preset, mixtral_preset, pattern_config, striped_hyena_preset)
from seqmix_jax.models.checkpoints import from_pretrained, save_pretrained
from seqmix_jax.models.generate import generate
from seqmix_jax.models.lm import LM, Block

__all__ = ["LM", "Block", "BlockSpec", "ModelConfig", "from_pretrained", "generate", "jamba_preset", "llama_preset",
           "mamba2_preset", "mamba_preset", "mixtral_preset", "pattern_config", "save_pretrained",
           "striped_hyena_preset"]
