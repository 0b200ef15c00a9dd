"""Stable Diffusion 1.x / 2.x: one CLIP text encoder whose last (or clip-skipped) hidden states are
the U-Net's cross-attention context, a U-Net predicting epsilon, v or x0, and an AutoencoderKL.
Also LCM-distilled and 9-channel inpainting U-Nets of the same shape."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import control, convert, guidance as guidance_lib, ip_adapter
from jdiff.errors import CheckpointError
from jdiff.families.base import Family, Pipeline
from jdiff.models.text import CLIPTextConfig, CLIPTextModel, clip_skip_hidden_state
from jdiff.models.unet import UNet2DConditionModel, UNetConfig
from jdiff.models.vae import AutoencoderKL, VAEConfig
from jdiff.paths import Path
from jdiff.schedules import Scheduler, SchedulerConfig, read_scheduler_config, write_scheduler_config

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# diffusers' pipelines of this family and the step count each runs when given none.
PIPELINE_CLASSES = {"StableDiffusionPipeline": 50, "StableDiffusionImg2ImgPipeline": 50,
                    "StableDiffusionInpaintPipeline": 50, "LatentConsistencyModelPipeline": 4,
                    "StableDiffusionDepth2ImgPipeline": 50}


def load(folder: Path, index: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None,
         weights: dict | None = None) -> Pipeline:
    """`weights`: diffusers-keyed state dicts by component ("unet", "vae", "text_encoder") to use in
    place of the folder's files (a single-file checkpoint, with the folder giving configs and tokenizer)."""
    weights = weights or {}
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise CheckpointError(
            f"{str(folder)!r} is not a diffusion checkpoint: it lacks "
            f"{', '.join(m + '/' for m in missing)} (expected {', '.join(COMPONENTS)}).")
    kw = dict(dtype=dtype, param_dtype=param_dtype, variant=variant)
    unet, unet_params = convert.load_unet(folder / "unet", **kw, state=weights.get("unet"))
    vae, vae_params = convert.load_vae(folder / "vae", **kw, state=weights.get("vae"))
    text_encoder, text_params = convert.load_text_encoder(folder / "text_encoder", **kw,
                                                          state=weights.get("text_encoder"))
    tokenizer = convert.load_tokenizer(folder / "tokenizer", text_encoder.config.max_position_embeddings)
    return Pipeline(FAMILY, {"unet": unet, "vae": vae, "text_encoder": text_encoder}, {"tokenizer": tokenizer},
                    read_scheduler_config(folder / "scheduler"),
                    {"unet": unet_params, "vae": vae_params, "text_encoder": text_params}, str(folder),
                    index.get("_class_name", "StableDiffusionPipeline"))


def save(pipe: Pipeline, folder: Path) -> dict:
    """Writes the components as diffusers lays them out; returns the folder's model_index.json."""
    convert.save_unet(pipe.unet, pipe.params["unet"], folder / "unet")
    convert.save_vae(pipe.vae, pipe.params["vae"], folder / "vae")
    convert.save_text_encoder(pipe.text_encoder, pipe.params["text_encoder"], folder / "text_encoder")
    convert.save_tokenizer(pipe.tokenizer, folder / "tokenizer")
    write_scheduler_config(pipe.scheduler, folder / "scheduler")
    # An inpainting U-Net keeps its pipeline class; otherwise the plain text-to-image one.
    name = pipe.pipeline_class if pipe.pipeline_class in PIPELINE_CLASSES else "StableDiffusionPipeline"
    index = {"_class_name": name, "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", pipe.scheduler.class_name],
             "feature_extractor": [None, None]}
    if name == "StableDiffusionDepth2ImgPipeline":  # its depth estimator is not jdiff's to write
        return {**index, "depth_estimator": [None, None]}
    return {**index, "safety_checker": [None, None], "requires_safety_checker": False}


# --- from a run config (training from scratch) ----------------------------------------------------


def vae_config(config) -> VAEConfig:
    n = len(config.vae.block_out_channels)
    return VAEConfig(
        block_out_channels=tuple(config.vae.block_out_channels), down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=config.vae.layers_per_block,
        latent_channels=config.vae.latent_channels, norm_num_groups=config.vae.norm_num_groups,
        sample_size=config.data.resolution, mid_block_add_attention=config.vae.mid_block_add_attention)


def text_config(config, tokenizer) -> CLIPTextConfig:
    return clip_config(config.text, tokenizer)


def clip_config(t, tokenizer, max_length: int | None = None) -> CLIPTextConfig:
    """A CLIP text encoder of a run config's text section on the caption tokenizer's vocabulary,
    max_length tokens long (default: the section's max_length)."""
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                          num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                          max_position_embeddings=max_length or t.max_length, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          projection_dim=t.hidden_size)


def unet_config(config, vae: VAEConfig, cross_attention_dim: int) -> UNetConfig:
    u = config.unet
    return UNetConfig(
        sample_size=config.data.resolution // vae.downscale, in_channels=vae.latent_channels,
        out_channels=vae.latent_channels, block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block, attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups, down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types), cross_attention_dim=cross_attention_dim,
        only_cross_attention=u.get("only_cross_attention", False))


def scheduler_from_config(config) -> Scheduler:
    """The scheduler a model built from this config is trained with and ships (DDIM, SD's spacing)."""
    s = config.scheduler
    fields = dict(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                  beta_schedule=s.beta_schedule, prediction_type=s.prediction_type, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    return Scheduler(SchedulerConfig(**fields), "DDIMScheduler", frozenset(fields))


def from_config(config, *, tokenizer=None, vae=None, dtype=jnp.float32) -> Pipeline:
    """Modules built from a run config: `config.vae`, `.text`, `.unet`, `.scheduler`, `.remat`.

    tokenizer: the caption tokenizer (the text encoder's vocabulary); None builds no text encoder or
      U-Net (the VAE stage). vae: a trained (module, params) to build the U-Net around; None builds
      one from config.vae (untrained). Parameters are only those given (the VAE's).
    """
    remat = config.remat
    vae_module, vae_params = vae if vae is not None else (
        AutoencoderKL(vae_config(config), dtype=dtype, gradient_checkpointing=remat), None)
    modules, params = {"vae": vae_module}, {} if vae_params is None else {"vae": vae_params}
    tokenizers = {}
    if tokenizer is not None:
        text = CLIPTextModel(text_config(config, tokenizer), dtype=dtype)
        modules["text_encoder"] = text
        modules["unet"] = UNet2DConditionModel(unet_config(config, vae_module.config, text.config.hidden_size),
                                               dtype=dtype, gradient_checkpointing=remat)
        tokenizers["tokenizer"] = tokenizer
    return Pipeline(FAMILY, modules, tokenizers, scheduler_from_config(config), params, "",
                    "StableDiffusionPipeline")


def init_params(modules, names, rng, latent_shape) -> dict:
    """Fresh parameters of the named components (latent_shape: one example's [h, w, C])."""
    text, unet = modules["text_encoder"], modules["unet"]
    length = text.config.max_position_embeddings
    inits = {
        "unet": lambda key: unet.init(key, jnp.zeros((1, *latent_shape)), jnp.zeros((1,)),
                                      jnp.zeros((1, length, unet.config.per_block("cross_attention_dim")[0]))),
        "text_encoder": lambda key: text.init(key, jnp.zeros((1, length), jnp.int32)),
    }
    keys = dict(zip(inits, jax.random.split(rng, len(inits))))
    return {name: inits[name](keys[name])["params"] for name in names}


# --- conditioning and the denoiser (traced) --------------------------------------------------------


def tokenize(pipe: Pipeline, prompts, warn: bool = True, max_length: int = None) -> dict:
    """{"ids": int32 [B, max_length]}, truncated with a warning naming the cut words, as diffusers does.
    max_length: the tokenizer's own length by default."""
    tokenizer = pipe.tokenizer
    prompts = [str(p) for p in prompts]
    max_length = max_length or tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np").input_ids
    if warn:
        full = tokenizer(prompts, padding=False, truncation=False).input_ids  # unpadded: true lengths
        for prompt, tokens in zip(prompts, full):
            if len(tokens) > max_length:
                removed = tokenizer.decode(tokens[max_length - 1:-1])
                warnings.warn(f"prompt {prompt[:40]!r}... is longer than the text encoder's {max_length} tokens; "
                              f"this part was cut off: {removed!r}", stacklevel=3)
    return {"ids": ids.astype(np.int32)}


def encode_prompts(modules, params, tokens, clip_skip: int = 0) -> dict:
    text = modules["text_encoder"]
    output = text.apply({"params": params["text_encoder"]}, tokens["ids"], output_hidden_states=clip_skip > 0)
    return {"context": clip_skip_hidden_state(params["text_encoder"], output, clip_skip, text.config)}


def denoiser(modules, params, guidance=None):
    unet = modules["unet"]
    timestep_cond = None
    if unet.config.time_cond_proj_dim and guidance is not None:  # LCM: the guidance scale is an input
        timestep_cond = guidance_lib.guidance_scale_embedding(guidance - 1, unet.config.time_cond_proj_dim)

    def model_fn(x, t, cond, extra_channels=None):
        # ControlNets read the latents alone, also beside an inpainting U-Net (diffusers' layout)
        residuals = control.unet_residuals(modules, params, x, t, cond["context"], None, cond.get("control"))
        if extra_channels is not None:
            x = jnp.concatenate([x, extra_channels], axis=-1)
        emb = None if timestep_cond is None else jnp.broadcast_to(timestep_cond, (x.shape[0],) + timestep_cond.shape[1:])
        return unet.apply({"params": params["unet"]}, x, t, cond["context"], emb, **residuals,
                          **ip_adapter.unet_kwargs(cond))

    return model_fn


def embeds_guidance(modules) -> bool:
    return bool(modules["unet"].config.time_cond_proj_dim)


def inpainting_channels(modules) -> bool:
    unet, vae = modules["unet"], modules["vae"]
    return unet.config.in_channels == 2 * vae.config.latent_channels + 1


FAMILY = Family(
    name="stable-diffusion", denoiser_name="unet", text_encoder_names=("text_encoder",),
    pipeline_classes=PIPELINE_CLASSES, load=load, save=save, from_config=from_config, tokenize=tokenize,
    encode_prompts=encode_prompts, denoiser=denoiser, embeds_guidance=embeds_guidance,
    inpainting_channels=inpainting_channels, init_params=init_params)
