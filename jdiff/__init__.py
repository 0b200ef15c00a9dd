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
from jdiff.errors import CheckpointError, ConfigError

__version__ = "0.1.0"
