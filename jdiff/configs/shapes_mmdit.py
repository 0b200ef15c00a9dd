"""The default run with an SD3-style transformer (MMDiT) trained by rectified flow in place of the
U-Net: the same data, VAE stage and evaluation, so the two denoisers compare at the same wall time.

    python train.py --config=configs/shapes_mmdit.py --workdir=workdir/mmdit

The export is a StableDiffusion3Pipeline folder (two CLIP encoders trained from scratch on the
caption tokenizer, no T5). diffusers loads it with `text_encoder_3=None, tokenizer_3=None` and draws
from it with `max_sequence_length=1`, the T5 token count it was trained with; jdiff reads that from
the folder.
"""

import ml_collections

from jdiff.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.family = "stable-diffusion-3"
    config.unet = ml_collections.ConfigDict()  # unused: the denoiser is config.mmdit
    # SD3's second CLIP encoder (its pooled output and hidden states join the first one's); smaller.
    config.text_2 = ml_collections.ConfigDict(dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2))  # config.text's length
    # 16x16x4 latents in 2x2 patches: 64 image tokens beside the 32 caption tokens.
    config.mmdit = ml_collections.ConfigDict(dict(
        patch_size=2, num_layers=4, num_attention_heads=4, attention_head_dim=32, qk_norm="rms_norm",
        dual_attention_layers=(),
        # One T5 token's place, as zeros (the model has no T5): diffusers' default would add 256.
        max_sequence_length=1))
    # Rectified flow; no shift at 64 tokens (SD3 shifts by 3 at 1024x1024's 4096).
    config.scheduler = ml_collections.ConfigDict(dict(num_train_timesteps=1000, shift=1.0))
    # The U-Net's 4,000 steps. On an idle 2-core machine a step here costs about 0.7x a U-Net step
    # (58 against 40 images/s, measured one after the other): equal wall time would be ~5,800 steps.
    config.diffusion_train.update(steps=4000, learning_rate=5e-4, eval_every=1000)
    config.sample.sampler = "flow_euler"
    return config
