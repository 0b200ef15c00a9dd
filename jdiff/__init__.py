"""jdiff: latent diffusion (the Stable Diffusion family) in JAX/Flax."""

from jdiff.convert import (
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
    save_text_encoder,
    save_unet,
    save_vae,
)
from jdiff.errors import CheckpointError, ConfigError, TrainingError
from jdiff.pipeline import Pipeline, generate, load_pipeline
from jdiff.samplers import SAMPLERS

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "Pipeline", "SAMPLERS", "TrainingError", "generate", "load_pipeline",
    "load_text_encoder", "load_tokenizer", "load_unet", "load_vae", "save_text_encoder", "save_unet", "save_vae",
]
