"""Stable Diffusion 3 / 3.5: an MMDiT transformer trained by rectified flow (the scheduler is
FlowMatchEulerDiscreteScheduler), conditioned on three text encoders as diffusers'
StableDiffusion3Pipeline does:

- CLIP-L and CLIP-G (both with projections): their penultimate hidden states are concatenated
  (768 + 1280 features in SD3), zero-padded to the T5 width and put in front of the T5 tokens;
  their projected pooled outputs are concatenated into the pooled vector (2048).
- T5 v1.1 XXL: its last hidden states are the rest of the context. A checkpoint may ship without
  it (model_index.json lists text_encoder_3 as null or leaves it out); then those tokens are
  max_sequence_length zero vectors, as diffusers makes them.

The VAE has 16 latent channels and a shift_factor.

`from_config` builds a small SD3 to train from scratch (configs/shapes_mmdit.py): two CLIP encoders
on the caption tokenizer and no T5. Its T5 token count (zero vectors) is part of what it learns, so
the export records it in model_index.json under a private key that diffusers ignores; generate()
uses it by default, diffusers users pass it as `max_sequence_length`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import convert, schedules
from jdiff.errors import CheckpointError, ConfigError
from jdiff.families import stable_diffusion
from jdiff.families.base import Family, Pipeline, require_components
from jdiff.models.sd3_transformer import SD3Transformer2DModel, SD3TransformerConfig
from jdiff.models.text import CLIPTextModel
from jdiff.models.vae import AutoencoderKL
from jdiff.paths import Path
from jdiff.schedules import Scheduler, SchedulerConfig, read_scheduler_config, write_scheduler_config

CLIP_ENCODERS = (("tokenizer", "text_encoder", "ids"), ("tokenizer_2", "text_encoder_2", "ids_2"))
T5_ENCODER = ("tokenizer_3", "text_encoder_3", "ids_3")
REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
PIPELINE_CLASSES = {"StableDiffusion3Pipeline": 28, "StableDiffusion3Img2ImgPipeline": 28,
                    "StableDiffusion3InpaintPipeline": 28}
# diffusers' `max_sequence_length` default for SD3: the T5 prompt is padded or cut to this many tokens.
MAX_SEQUENCE_LENGTH = 256
# model_index.json key of the T5 token count a model without T5 was trained with ("_": diffusers drops it)
TRAINED_LENGTH_KEY = "_jdiff_max_sequence_length"


def load(folder: Path, index: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None) -> Pipeline:
    require_components(folder, REQUIRED, "an SD3 checkpoint")
    kw = dict(dtype=dtype, param_dtype=param_dtype, variant=variant)
    modules, params, tokenizers = {}, {}, {}
    modules["transformer"], params["transformer"] = convert.load_sd3_transformer(folder / "transformer", **kw)
    modules["vae"], params["vae"] = convert.load_vae_upcast(folder / "vae", **kw)
    for tokenizer_name, encoder_name, _ in CLIP_ENCODERS:
        modules[encoder_name], params[encoder_name] = convert.load_text_encoder(folder / encoder_name, **kw)
        if not modules[encoder_name].config.with_projection:
            raise CheckpointError(f"{str(folder / encoder_name)!r}: SD3's CLIP encoders must be "
                                  "CLIPTextModelWithProjection (their projected pooled outputs condition the model).")
        # diffusers pads both CLIP prompts to the first tokenizer's length: 77, or a small model's own
        length = modules["text_encoder"].config.max_position_embeddings
        tokenizers[tokenizer_name] = convert.load_tokenizer(folder / tokenizer_name, length)
    tokenizer_name, encoder_name, _ = T5_ENCODER
    listed = index.get(encoder_name)
    if (folder / encoder_name).is_dir() and not (listed is not None and listed[0] is None):
        modules[encoder_name], params[encoder_name] = convert.load_t5_encoder(folder / encoder_name, **kw)
        tokenizers[tokenizer_name] = convert.load_t5_tokenizer(folder / tokenizer_name, MAX_SEQUENCE_LENGTH)
    settings = {"max_sequence_length": int(index[TRAINED_LENGTH_KEY])} if TRAINED_LENGTH_KEY in index else {}
    pipe = Pipeline(FAMILY, modules, tokenizers, read_scheduler_config(folder / "scheduler"), params, str(folder),
                    index.get("_class_name", "StableDiffusion3Pipeline"), settings)
    _check_widths(pipe, str(folder))
    return pipe


def _check_widths(pipe: Pipeline, source: str) -> None:
    """The text features must fit the transformer: CLIP widths within the joint width, T5's equal
    to it, the pooled outputs' sum equal to the pooled width."""
    config = pipe.transformer.config
    clip_width = sum(pipe.modules[name].config.hidden_size for _, name, _ in CLIP_ENCODERS)
    pooled = sum(pipe.modules[name].config.projection_dim for _, name, _ in CLIP_ENCODERS)
    problems = []
    if clip_width > config.joint_attention_dim:
        problems.append(f"the CLIP encoders' {clip_width} features exceed joint_attention_dim "
                        f"{config.joint_attention_dim}")
    if pooled != config.pooled_projection_dim:
        problems.append(f"the pooled outputs give {pooled} features, pooled_projection_dim is "
                        f"{config.pooled_projection_dim}")
    if "text_encoder_3" in pipe.modules and pipe.text_encoder_3.config.d_model != config.joint_attention_dim:
        problems.append(f"T5's d_model {pipe.text_encoder_3.config.d_model} is not joint_attention_dim "
                        f"{config.joint_attention_dim}")
    if problems:
        raise CheckpointError(f"{source}: the text encoders do not fit the transformer: {'; '.join(problems)}.")


def save(pipe: Pipeline, folder: Path) -> dict:
    index = {"_class_name": pipe.pipeline_class if pipe.pipeline_class in PIPELINE_CLASSES
             else "StableDiffusion3Pipeline"}
    convert.save_sd3_transformer(pipe.transformer, pipe.params["transformer"], folder / "transformer")
    convert.save_vae(pipe.vae, pipe.params["vae"], folder / "vae")
    for tokenizer_name, encoder_name, _ in CLIP_ENCODERS:
        convert.save_text_encoder(pipe.modules[encoder_name], pipe.params[encoder_name], folder / encoder_name)
        convert.save_tokenizer(pipe.tokenizers[tokenizer_name], folder / tokenizer_name)
        index[encoder_name] = ["transformers", "CLIPTextModelWithProjection"]
        index[tokenizer_name] = ["transformers", "CLIPTokenizer"]
    tokenizer_name, encoder_name, _ = T5_ENCODER
    if encoder_name in pipe.modules:
        convert.save_t5_encoder(pipe.modules[encoder_name], pipe.params[encoder_name], folder / encoder_name)
        convert.save_tokenizer(pipe.tokenizers[tokenizer_name], folder / tokenizer_name)
        index.update({encoder_name: ["transformers", "T5EncoderModel"],
                      tokenizer_name: ["transformers", "T5TokenizerFast"]})
    else:
        index.update({encoder_name: [None, None], tokenizer_name: [None, None]})
    write_scheduler_config(pipe.scheduler, folder / "scheduler")
    index.update(transformer=["diffusers", "SD3Transformer2DModel"], vae=["diffusers", "AutoencoderKL"],
                 scheduler=["diffusers", pipe.scheduler.class_name], image_encoder=[None, None],
                 feature_extractor=[None, None])
    if "max_sequence_length" in pipe.settings:
        index[TRAINED_LENGTH_KEY] = pipe.settings["max_sequence_length"]
    return index


# --- from a run config (training from scratch) ----------------------------------------------------


def transformer_config(config, latent_size: int, latent_channels: int, encoders) -> SD3TransformerConfig:
    """config.mmdit as an SD3Transformer2DModel config whose joint and pooled widths fit `encoders`
    (the CLIP encoders), with a position table just the size of the trained latents."""
    m = config.mmdit
    if latent_size % m.patch_size:
        raise ConfigError(f"config.mmdit.patch_size={m.patch_size} does not divide the {latent_size}x{latent_size} "
                          f"latents of data.resolution={config.data.resolution}.")
    transformer = SD3TransformerConfig(
        sample_size=latent_size, patch_size=m.patch_size, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=m.num_layers, attention_head_dim=m.attention_head_dim, num_attention_heads=m.num_attention_heads,
        joint_attention_dim=sum(e.config.hidden_size for e in encoders),
        caption_projection_dim=m.num_attention_heads * m.attention_head_dim,
        pooled_projection_dim=sum(e.config.projection_dim for e in encoders),
        pos_embed_max_size=latent_size // m.patch_size, qk_norm=m.qk_norm or None,
        dual_attention_layers=tuple(m.dual_attention_layers))
    transformer.validate("config.mmdit")
    return transformer


def scheduler_from_config(config) -> Scheduler:
    """Rectified flow with config.scheduler's shift, as FlowMatchEulerDiscreteScheduler ships it."""
    fields = dict(num_train_timesteps=config.scheduler.num_train_timesteps, shift=config.scheduler.shift)
    return Scheduler(SchedulerConfig(**fields), "FlowMatchEulerDiscreteScheduler", frozenset(fields))


def from_config(config, *, tokenizer=None, vae=None, dtype=jnp.float32) -> Pipeline:
    """A small SD3 from a run config: `config.vae`, `.text` and `.text_2` (the two CLIP encoders,
    with projections, on the caption tokenizer, both config.text.max_length tokens long), `.mmdit` (the transformer, and
    max_sequence_length: the T5 zero tokens it is trained and sampled with), `.scheduler` (shift),
    `.remat`. tokenizer None builds only the VAE (the VAE stage); vae: a trained (module, params).
    The VAE gets shift_factor 0, which diffusers' SD3 pipeline needs to decode."""
    remat = config.remat
    vae_module, vae_params = vae if vae is not None else (
        AutoencoderKL(stable_diffusion.vae_config(config), dtype=dtype, gradient_checkpointing=remat), None)
    if vae_module.config.shift_factor is None:
        vae_module = vae_module.clone(config=dataclasses.replace(vae_module.config, shift_factor=0.0))
    modules, params, tokenizers = {"vae": vae_module}, {} if vae_params is None else {"vae": vae_params}, {}
    settings = {}
    if tokenizer is not None:
        for (tokenizer_name, encoder_name, _), section in zip(CLIP_ENCODERS, (config.text, config.text_2)):
            # both read the same config.text.max_length tokens (diffusers pads both to the first's length)
            clip = dataclasses.replace(stable_diffusion.clip_config(section, tokenizer, config.text.max_length),
                                       with_projection=True)
            modules[encoder_name] = CLIPTextModel(clip, dtype=dtype)
            tokenizers[tokenizer_name] = tokenizer
        latent_size = config.data.resolution // vae_module.config.downscale
        encoders = [modules[name] for _, name, _ in CLIP_ENCODERS]
        modules["transformer"] = SD3Transformer2DModel(
            transformer_config(config, latent_size, vae_module.config.latent_channels, encoders), dtype=dtype,
            gradient_checkpointing=remat)
        settings["max_sequence_length"] = int(config.mmdit.max_sequence_length)
    return Pipeline(FAMILY, modules, tokenizers, scheduler_from_config(config), params, "", "StableDiffusion3Pipeline",
                    settings)


def init_params(modules, names, rng, latent_shape) -> dict:
    """Fresh parameters of the named components (latent_shape: one example's [h, w, C])."""
    transformer, text = modules["transformer"], modules["text_encoder"]
    length, cfg = text.config.max_position_embeddings, transformer.config
    ids = jnp.zeros((1, length), jnp.int32)
    inits = {
        "transformer": lambda key: transformer.init(key, jnp.zeros((1, *latent_shape)), jnp.zeros((1,)),
                                                    jnp.zeros((1, length, cfg.joint_attention_dim)),
                                                    jnp.zeros((1, cfg.pooled_projection_dim))),
        "text_encoder": lambda key: text.init(key, ids),
        "text_encoder_2": lambda key: modules["text_encoder_2"].init(key, ids),
    }
    keys = dict(zip(inits, jax.random.split(rng, len(inits))))
    unknown = [n for n in names if n not in inits]
    if unknown:
        raise ConfigError(f"SD3 components {unknown} are not initialised from scratch; start from a checkpoint.")
    return {name: inits[name](keys[name])["params"] for name in names}


# --- conditioning and the denoiser (traced) --------------------------------------------------------


def tokenize(pipe: Pipeline, prompts, warn: bool = True, max_sequence_length: int | None = None,
             prompts_2=None, prompts_3=None) -> dict:
    """{"ids", "ids_2"}: the CLIP tokenizers' length (77) per prompt; "ids_3": T5's max_sequence_length tokens, or
    without a T5 "t5_zeros", whose shape says how many zero vectors stand for them. The default
    length is diffusers' 256, or the one a model trained here without T5 records. CLIP-L reads
    `prompts`, CLIP-G `prompts_2` and T5 `prompts_3`, each `prompts` by default (diffusers')."""
    max_sequence_length = max_sequence_length or pipe.settings.get("max_sequence_length", MAX_SEQUENCE_LENGTH)
    texts = {"ids": prompts, "ids_2": prompts if prompts_2 is None else prompts_2,
             "ids_3": prompts if prompts_3 is None else prompts_3}
    tokens = {}
    for tokenizer_name, _, key in CLIP_ENCODERS + (T5_ENCODER,):
        if tokenizer_name in pipe.tokenizers:
            single = pipe.replace(tokenizers={"tokenizer": pipe.tokenizers[tokenizer_name]})
            length = max_sequence_length if key == "ids_3" else None
            tokens[key] = stable_diffusion.tokenize(single, texts[key], warn, length)["ids"]
    if "ids_3" not in tokens:
        tokens["t5_zeros"] = np.zeros((len(prompts), max_sequence_length), np.int8)
    return tokens


def encode_prompts(modules, params, tokens, clip_skip: int = 0) -> dict:
    """{"context": [B, 77 + max_sequence_length, joint_dim], "pooled": [B, pooled_dim]}.

    Each CLIP encoder's hidden state `clip_skip` layers before its penultimate one (no final layer
    norm, as SDXL); diffusers applies clip_skip to the prompt only, jdiff to both prompts."""
    width = modules["transformer"].config.joint_attention_dim
    states, pooled = [], []
    for _, name, key in CLIP_ENCODERS:
        output = modules[name].apply({"params": params[name]}, tokens[key], output_hidden_states=True)
        states.append(output.hidden_states[-(clip_skip + 2)])
        pooled.append(output.text_embeds)
    clip = jnp.concatenate(states, axis=-1)
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
    _, name, key = T5_ENCODER
    if key in tokens:
        t5 = modules[name].apply({"params": params[name]}, tokens[key]).astype(clip.dtype)
    else:
        t5 = jnp.zeros((clip.shape[0], tokens["t5_zeros"].shape[1], width), clip.dtype)
    return {"context": jnp.concatenate([clip, t5], axis=1), "pooled": jnp.concatenate(pooled, axis=-1)}


def denoiser(modules, params, guidance=None):
    transformer = modules["transformer"]

    def model_fn(x, t, cond, extra_channels=None):
        if extra_channels is not None:
            raise ConfigError("SD3 transformers take no extra input channels.")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        return transformer.apply({"params": params["transformer"]}, x, t, cond["context"], cond["pooled"])

    return model_fn


def levels_options(pipe: Pipeline, num_steps: int, height: int, width: int) -> dict:
    """The dynamic shift for the image's token count, where the scheduler asks for one."""
    config = pipe.scheduler.config
    if not config.use_dynamic_shifting:
        return {}
    patch = pipe.transformer.config.patch_size
    tokens = (height // pipe.vae_scale_factor // patch) * (width // pipe.vae_scale_factor // patch)
    return {"mu": schedules.flow_shift_mu(config, tokens)}


FAMILY = Family(
    name="stable-diffusion-3", denoiser_name="transformer",
    text_encoder_names=("text_encoder", "text_encoder_2", "text_encoder_3"), pipeline_classes=PIPELINE_CLASSES,
    load=load, save=save, from_config=from_config, tokenize=tokenize, encode_prompts=encode_prompts,
    denoiser=denoiser, embeds_guidance=lambda modules: False, inpainting_channels=lambda modules: False,
    init_params=init_params, default_guidance=7.0, kohya_prefixes={},
    # the CLIPs, never T5 (diffusers' SD3 LoRA script trains these; its full script T5 too)
    trainable_text_encoders=("text_encoder", "text_encoder_2"), lora_text_encoders=("text_encoder", "text_encoder_2"),
    levels_options=levels_options, long_prompts=True, prompt_count=3)
