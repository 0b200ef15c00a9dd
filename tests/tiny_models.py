"""Tiny random reference models written in the exact on-disk formats of real checkpoints."""

import sys
from pathlib import Path

import torch

from parity import randomize_torch
from tiny_tokenizers import write_tiny_t5_tokenizer, write_tiny_tokenizer  # noqa: F401 (re-exported)


SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                    clip_sample=False, set_alpha_to_one=False)


def make_tiny_sd_pipeline(folder, *, in_channels=4, time_cond_proj_dim=None, seed=0):
    """A StableDiffusionPipeline (or inpainting one, in_channels=9) with random weights: VAE with
    factor 8 on 4 latent channels, a two-level U-Net with cross-attention, a 2-layer CLIP."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_tiny_tokenizer(folder / "_tokenizer_src")
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, time_cond_proj_dim=time_cond_proj_dim)
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    # Scales chosen so that the prompt, guidance and negative prompt each move pixels by several
    # times the 2/255 parity tolerance (weaker weights give images that ignore the text).
    for i, (module, scale) in enumerate(((unet, 1.5), (vae, 0.7), (text, 0.3))):
        randomize_torch(module, scale=scale, seed=seed + i)
    cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    # Reload, so the reference reads the same files as jdiff (an in-memory scheduler config also
    # remembers which fields were defaults, which changes what `from_config` picks).
    return cls.from_pretrained(folder)


def write_captioned_pictures(folder, height: int, width: int, count: int = 8):
    """`count` random pictures with same-name .txt captions: an image folder to fine-tune on."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red circle" if i % 2 else "circle")
    return folder


SDXL_SCHEDULER = dict(SD_SCHEDULER, interpolation_type="linear", timestep_spacing="leading", use_karras_sigmas=False)
SDXL_TIME_EMBED = 8  # addition_time_embed_dim of the tiny U-Nets
SDXL_POOLED = 32  # projection_dim of the second text encoder


def make_tiny_sdxl_pipeline(folder, *, refiner: bool = False, seed: int = 10, text_2_width: int = 32):
    """A StableDiffusionXLPipeline (or, refiner=True, an Img2Img refiner with only the second text
    encoder and aesthetic-score time ids) with random weights, shaped like SDXL in miniature: a
    level without attention, two transformer layers at the next, linear projections, two CLIP
    encoders (the second with a projection and gelu, as OpenCLIP bigG, `text_2_width` wide)
    concatenated to 32 + `text_2_width` features."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = write_tiny_tokenizer(folder / "_tokenizer_src")
    src = folder / "_tokenizer_src"
    tokenizer_2 = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=77, pad_token="!")
    text_kw = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                   max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text = None if refiner else CLIPTextModel(CLIPTextConfig(num_hidden_layers=2, **text_kw))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(num_hidden_layers=3, hidden_act="gelu",
                                                        projection_dim=SDXL_POOLED,
                                                        **{**text_kw, "hidden_size": text_2_width}))
    time_ids = 5 if refiner else 6
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=text_2_width if refiner else 32 + text_2_width, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=SDXL_TIME_EMBED * time_ids + SDXL_POOLED)
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, scaling_factor=0.13025, force_upcast=True)
    for i, (module, scale) in enumerate(((unet, 1.5), (vae, 0.7), (text, 0.3), (text_2, 0.3))):
        if module is not None:
            randomize_torch(module, scale=scale, seed=seed + i)
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)  # as SDXL ships it, with DDIM-era fields
    if refiner:
        cls = StableDiffusionXLImg2ImgPipeline
        pipe = cls(vae=vae, text_encoder=None, text_encoder_2=text_2, tokenizer=None, tokenizer_2=tokenizer_2,
                   unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    else:
        cls = StableDiffusionXLPipeline
        pipe = cls(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                   unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return cls.from_pretrained(folder)


def make_tiny_sd3_pipeline(folder, *, with_t5: bool = True, seed: int = 30):
    """A StableDiffusion3Pipeline with random weights, shaped like SD3.5 in miniature: an MMDiT with
    query/key RMS norms and one dual-attention block, CLIP-L-like and CLIP-G-like encoders with
    projections (16 + 24 features, zero-padded to the joint width 48), a T5 of width 48 (or none,
    with_t5=False), a 16-channel VAE with shift_factor, and flow matching with shift 3."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel)

    torch.manual_seed(seed)
    tokenizer = write_tiny_tokenizer(folder / "_tokenizer_src")
    src = folder / "_tokenizer_src"
    tokenizer_2 = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=77, pad_token="!")
    text_kw = dict(vocab_size=len(tokenizer), intermediate_size=37, num_attention_heads=4, max_position_embeddings=77,
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, projection_dim=16)
    text = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, num_hidden_layers=2, **text_kw))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, num_hidden_layers=3, hidden_act="gelu",
                                                        **text_kw))
    t5_tokenizer = write_tiny_t5_tokenizer(folder / "_t5_tokenizer_src") if with_t5 else None
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=48, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=6, feed_forward_proj="gated-gelu")) if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=12, qk_norm="rms_norm", dual_attention_layers=(0,))
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=16,
                        norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False)
    for i, (module, scale) in enumerate(((transformer, 1.0), (vae, 0.7), (text, 0.3), (text_2, 0.3), (t5, 0.5))):
        if module is not None:
            randomize_torch(module, scale=scale, seed=seed + i)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text,
                                    tokenizer=tokenizer, text_encoder_2=text_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(folder)  # without T5, diffusers leaves it out of model_index.json
    return StableDiffusion3Pipeline.from_pretrained(folder, **({} if with_t5 else dict(text_encoder_3=None,
                                                                                       tokenizer_3=None)))


def make_tiny_flux_pipeline(folder, *, dev: bool = True, seed: int = 40):
    """A FluxPipeline with random weights, shaped like Flux.1 in miniature: dev (guidance embedding,
    dynamic shifting, with base and max token counts that make the tiny images' mu vary) or schnell
    (neither); CLIP-L-like pooled encoder (16), T5 of width 24, a 4-channel VAE with shift_factor
    (2x2 patches: 16 features per token)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = write_tiny_tokenizer(folder / "_tokenizer_src")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    t5_tokenizer = write_tiny_t5_tokenizer(folder / "_t5_tokenizer_src")
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=24, d_kv=8, d_ff=40, num_layers=2,
                                 num_heads=3, feed_forward_proj="gated-gelu"))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=dev, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False)
    for i, (module, scale) in enumerate(((transformer, 1.0), (vae, 0.7), (text, 0.3), (t5, 0.5))):
        randomize_torch(module, scale=scale, seed=seed + i)
    if dev:  # Flux-dev's scheduler, with token counts scaled to tiny images
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=4, max_image_seq_len=64)
    else:  # schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(folder)
    return FluxPipeline.from_pretrained(folder)


def write_random_lora(pipeline_folder, lora_folder, *, seed: int, unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
                      text_targets=("q_proj", "v_proj"), rank: int = 4, alpha: float = 8, scale: float = 0.3,
                      rank_pattern=None, alpha_pattern=None):
    """A LoRA with random, non-zero weights (PEFT initialises up matrices to zero) for the diffusers
    pipeline in `pipeline_folder`, written by diffusers' own `save_lora_weights` with PEFT's metadata.
    `unet_targets` go into the denoiser (U-Net or transformer), text targets into every CLIP text
    encoder the pipeline has."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(pipeline_folder)
    generator = torch.Generator().manual_seed(seed)
    layers, metadata = {}, {}
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        denoiser = name in ("unet", "transformer")
        targets = unet_targets if denoiser else text_targets
        if model is None or not targets or type(model).__name__ == "T5EncoderModel":  # diffusers adapts CLIPs only
            continue
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian",
                            rank_pattern=dict(rank_pattern or {}) if denoiser else {},
                            alpha_pattern=dict(alpha_pattern or {}) if denoiser else {})
        model.add_adapter(config)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_A" in key or "lora_B" in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        metadata[f"{name}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(lora_folder, **layers, **metadata)
    return lora_folder


ROOT = Path(__file__).resolve().parents[1]


def tiny_vae_train_command(workdir, *overrides, steps: int = 100_000) -> list[str]:
    """`train.py` on the tiny config, VAE stage only: with the default step count, only a signal ends
    it. `overrides` are further `--config...` flags."""
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "jdiff" / "configs" / "tiny.py"),
            "--workdir", str(workdir), "--config.stages=vae", f"--config.vae_train.steps={steps}", *overrides]
