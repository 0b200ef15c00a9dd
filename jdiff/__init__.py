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
from jdiff.control import load_controlnet
from jdiff.errors import CheckpointError, ConfigError, TrainingError
from jdiff.families import FAMILIES, build, load_pipeline, save_pipeline
from jdiff.families.base import Family, Pipeline
from jdiff.ip_adapter import load_ip_adapter
from jdiff.lora import fuse_lora, load_lora_weights, save_lora_weights, unload_lora_weights
from jdiff.pipeline import checkpoint_sampling, generate
from jdiff.samplers import SAMPLERS

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "FAMILIES", "Family", "Pipeline", "SAMPLERS", "TrainingError", "build",
    "checkpoint_sampling", "fuse_lora", "generate", "load_controlnet", "load_ip_adapter", "load_lora_weights", "load_pipeline", "save_lora_weights",
    "save_pipeline", "unload_lora_weights",
    "load_text_encoder", "load_tokenizer", "load_unet", "load_vae", "save_text_encoder", "save_unet", "save_vae",
]
