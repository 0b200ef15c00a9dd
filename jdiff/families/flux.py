"""Flux.1 (dev and schnell): a rectified-flow transformer over 2x2 patches of a 16-channel latent,
conditioned as diffusers' FluxPipeline does:

- T5 v1.1 XXL's last hidden states (max_sequence_length tokens, 512 by default) are the context;
- CLIP-L's pooled output (no projection) is the pooled vector;
- Flux-dev embeds the guidance scale (guidance distillation: one model call per step, no
  unconditional half); schnell has no guidance input and ignores `guidance`.

Sampling is FlowMatchEuler on the pipeline's own levels (linspace(1, 1/n, n)) shifted by `mu`, which
grows with the image's token count where the scheduler says `use_dynamic_shifting` (dev).
"""


import jax.numpy as jnp
import numpy as np

from jdiff import convert, schedules
from jdiff.errors import CheckpointError, ConfigError
from jdiff.families import stable_diffusion
from jdiff.families.base import Family, Pipeline, require_components
from jdiff.models import flux_transformer
from jdiff.paths import Path
from jdiff.schedules import read_scheduler_config, write_scheduler_config

REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
PIPELINE_CLASSES = {"FluxPipeline": 28, "FluxImg2ImgPipeline": 28}
MAX_SEQUENCE_LENGTH = 512  # diffusers' FluxPipeline default `max_sequence_length`
CLIP_LENGTH = 77


def load(folder: Path, index: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None) -> Pipeline:
    require_components(folder, REQUIRED, "a Flux checkpoint")
    kw = dict(dtype=dtype, param_dtype=param_dtype, variant=variant)
    modules, params = {}, {}
    modules["transformer"], params["transformer"] = convert.load_flux_transformer(folder / "transformer", **kw)
    modules["vae"], params["vae"] = convert.load_vae_upcast(folder / "vae", **kw)
    modules["text_encoder"], params["text_encoder"] = convert.load_text_encoder(folder / "text_encoder", **kw)
    modules["text_encoder_2"], params["text_encoder_2"] = convert.load_t5_encoder(folder / "text_encoder_2", **kw)
    tokenizers = {"tokenizer": convert.load_tokenizer(folder / "tokenizer", CLIP_LENGTH),
                  "tokenizer_2": convert.load_t5_tokenizer(folder / "tokenizer_2", MAX_SEQUENCE_LENGTH)}
    pipe = Pipeline(FAMILY, modules, tokenizers, read_scheduler_config(folder / "scheduler"), params, str(folder),
                    index.get("_class_name", "FluxPipeline"))
    _check_widths(pipe, str(folder))
    return pipe


def _check_widths(pipe: Pipeline, source: str) -> None:
    config, problems = pipe.transformer.config, []
    if pipe.text_encoder.config.hidden_size != config.pooled_projection_dim:
        problems.append(f"CLIP's pooled output has {pipe.text_encoder.config.hidden_size} features, "
                        f"pooled_projection_dim is {config.pooled_projection_dim}")
    if pipe.text_encoder_2.config.d_model != config.joint_attention_dim:
        problems.append(f"T5's d_model {pipe.text_encoder_2.config.d_model} is not joint_attention_dim "
                        f"{config.joint_attention_dim}")
    if config.in_channels != 4 * pipe.latent_channels:
        problems.append(f"the transformer takes {config.in_channels} features per token, 2x2 patches of the VAE's "
                        f"{pipe.latent_channels} latent channels are {4 * pipe.latent_channels}")
    if problems:
        raise CheckpointError(f"{source}: the components do not fit together: {'; '.join(problems)}.")


def save(pipe: Pipeline, folder: Path) -> dict:
    convert.save_flux_transformer(pipe.transformer, pipe.params["transformer"], folder / "transformer")
    convert.save_vae(pipe.vae, pipe.params["vae"], folder / "vae")
    convert.save_text_encoder(pipe.text_encoder, pipe.params["text_encoder"], folder / "text_encoder")
    convert.save_t5_encoder(pipe.text_encoder_2, pipe.params["text_encoder_2"], folder / "text_encoder_2")
    convert.save_tokenizer(pipe.tokenizers["tokenizer"], folder / "tokenizer")
    convert.save_tokenizer(pipe.tokenizers["tokenizer_2"], folder / "tokenizer_2")
    write_scheduler_config(pipe.scheduler, folder / "scheduler")
    name = pipe.pipeline_class if pipe.pipeline_class in PIPELINE_CLASSES else "FluxPipeline"
    return {"_class_name": name, "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"], "scheduler": ["diffusers", pipe.scheduler.class_name],
            "image_encoder": [None, None], "feature_extractor": [None, None]}


def from_config(config, **_):
    raise ConfigError("Flux is not trained from scratch by train.py yet; load a Flux checkpoint with load_pipeline.")


def init_params(modules, names, rng, latent_shape):
    raise ConfigError("Flux components are not initialised from scratch; start from a checkpoint.")


# --- conditioning and the denoiser (traced) --------------------------------------------------------


def tokenize(pipe: Pipeline, prompts, warn: bool = True, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
             prompts_2=None) -> dict:
    """{"ids": CLIP's 77 tokens of `prompts`, "ids_2": T5's max_sequence_length tokens of
    `prompts_2` (default `prompts`, as diffusers' prompt_2)}."""
    tokens = {}
    texts = (prompts, prompts if prompts_2 is None else prompts_2)
    encoders = (("tokenizer", "ids", None), ("tokenizer_2", "ids_2", max_sequence_length))
    for (tokenizer_name, key, length), text in zip(encoders, texts):
        single = pipe.replace(tokenizers={"tokenizer": pipe.tokenizers[tokenizer_name]})
        tokens[key] = stable_diffusion.tokenize(single, text, warn, length)["ids"]
    return tokens


def encode_prompts(modules, params, tokens, clip_skip: int = 0) -> dict:
    """{"context": T5's states [B, L, joint_dim], "pooled": CLIP's pooled output [B, 768]}."""
    if clip_skip:
        raise ConfigError("Flux uses CLIP's pooled output only: clip_skip does not apply.")
    pooled = modules["text_encoder"].apply({"params": params["text_encoder"]}, tokens["ids"]).pooler_output
    context = modules["text_encoder_2"].apply({"params": params["text_encoder_2"]}, tokens["ids_2"])
    return {"context": context.astype(pooled.dtype), "pooled": pooled}


def denoiser(modules, params, guidance=None):
    transformer = modules["transformer"]
    embeds = transformer.config.guidance_embeds

    def model_fn(x, t, cond, extra_channels=None):
        if extra_channels is not None:
            raise ConfigError("Flux transformers take no extra input channels.")
        b, h, w, _ = x.shape
        if h % 2 or w % 2:
            raise ConfigError(f"Flux packs 2x2 latent patches: the image must be a multiple of 16 pixels on each "
                              f"side (latents {h}x{w}).")
        # diffusers passes sigma (t / 1000) and the model multiplies by 1000 again: same float32 ops.
        sigma = jnp.broadcast_to(jnp.asarray(t, jnp.float32) / 1000, (b,))
        scale = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,)) if embeds else None
        context = cond["context"]
        out = transformer.apply({"params": params["transformer"]}, flux_transformer.pack(x), sigma, context,
                                cond["pooled"], flux_transformer.image_ids(h, w),
                                np.zeros((context.shape[1], 3), np.float32), scale)
        return flux_transformer.unpack(out, h, w)

    return model_fn


def levels_options(pipe: Pipeline, num_steps: int, height: int, width: int) -> dict:
    """FluxPipeline's schedule: levels linspace(1, 1/n, n) and mu for its packed token count."""
    tokens = (height // pipe.vae_scale_factor // 2) * (width // pipe.vae_scale_factor // 2)
    return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps),
            "mu": schedules.flow_shift_mu(pipe.scheduler.config, tokens)}


FAMILY = Family(
    name="flux", denoiser_name="transformer", text_encoder_names=("text_encoder", "text_encoder_2"),
    pipeline_classes=PIPELINE_CLASSES, load=load, save=save, from_config=from_config, tokenize=tokenize,
    encode_prompts=encode_prompts, denoiser=denoiser,
    # No unconditional half: dev embeds the scale, schnell was distilled to need none.
    embeds_guidance=lambda modules: True, inpainting_channels=lambda modules: False, init_params=init_params,
    default_guidance=3.5, trainable_text_encoders=(), lora_text_encoders=("text_encoder",), kohya_prefixes={}, levels_options=levels_options,
    default_latent_size=128, long_prompts=True, prompt_count=2)
