"""Stable Diffusion XL, base and refiner: two CLIP text encoders whose penultimate hidden states are
concatenated into the U-Net's context, the second one's projected pooled output and six "time ids"
(original size, crop corner, target size) added to the time embedding, an AutoencoderKL that
decodes in float32 unless its config says it is safe in half precision.

The refiner has only the second text encoder, and its time ids carry an aesthetic score instead of
the target size (model_index.json's `requires_aesthetics_score`).
"""


import jax.numpy as jnp
import numpy as np

from jdiff import control, convert, ip_adapter
from jdiff.errors import CheckpointError, ConfigError
from jdiff.families import stable_diffusion
from jdiff.families.base import Family, Pipeline, require_components
from jdiff.paths import Path
from jdiff.schedules import read_scheduler_config, write_scheduler_config

# The pairs of (tokenizer, text encoder) in the order their hidden states are concatenated.
ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
PIPELINE_CLASSES = {"StableDiffusionXLPipeline": 50, "StableDiffusionXLImg2ImgPipeline": 50,
                    "StableDiffusionXLInpaintPipeline": 50}
# model_index.json options and the value diffusers' pipeline classes register when a folder omits them.
SETTINGS = {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}
# generate()'s SDXL keywords with diffusers' defaults (None: the generated image's height and width).
MICRO_CONDITIONING = {"original_size": None, "crops_coords_top_left": (0, 0), "target_size": None,
                      "negative_original_size": None, "negative_crops_coords_top_left": (0, 0),
                      "negative_target_size": None, "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}


def load(folder: Path, index: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None,
         weights: dict | None = None) -> Pipeline:
    """`weights`: diffusers-keyed state dicts by component name in place of the folder's files (a
    single-file checkpoint, with the folder giving configs and tokenizers)."""
    weights = weights or {}
    require_components(folder, ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"), "an SDXL checkpoint")
    kw = dict(dtype=dtype, param_dtype=param_dtype, variant=variant)
    modules, params, tokenizers = {}, {}, {}
    modules["unet"], params["unet"] = convert.load_unet(folder / "unet", **kw, state=weights.get("unet"))
    modules["vae"], params["vae"] = convert.load_vae_upcast(folder / "vae", **kw, state=weights.get("vae"))
    for tokenizer_name, encoder_name in ENCODERS:
        listed = index.get(encoder_name)
        if encoder_name == "text_encoder" and (listed is not None and listed[0] is None
                                               or not (folder / encoder_name).is_dir()):
            continue  # the refiner has only the second encoder
        modules[encoder_name], params[encoder_name] = convert.load_text_encoder(folder / encoder_name, **kw,
                                                                                state=weights.get(encoder_name))
        length = modules[encoder_name].config.max_position_embeddings
        tokenizers[tokenizer_name] = convert.load_tokenizer(folder / tokenizer_name, length)
    if not modules["text_encoder_2"].config.with_projection:
        raise CheckpointError(f"{str(folder / 'text_encoder_2')!r}: SDXL's second text encoder must be a "
                              "CLIPTextModelWithProjection (its projected pooled output conditions the U-Net).")
    settings = {k: index.get(k, default) for k, default in SETTINGS.items()}
    pipe = Pipeline(FAMILY, modules, tokenizers, read_scheduler_config(folder / "scheduler"), params, str(folder),
                    index.get("_class_name", "StableDiffusionXLPipeline"), settings)
    _check_time_ids(pipe, str(folder))
    return pipe


def save(pipe: Pipeline, folder: Path) -> dict:
    index = {"_class_name": pipe.pipeline_class if pipe.pipeline_class in PIPELINE_CLASSES
             else "StableDiffusionXLPipeline"}
    convert.save_unet(pipe.unet, pipe.params["unet"], folder / "unet")
    convert.save_vae(pipe.vae, pipe.params["vae"], folder / "vae")
    for tokenizer_name, encoder_name in ENCODERS:
        if encoder_name not in pipe.modules:
            index[encoder_name] = index[tokenizer_name] = [None, None]
            continue
        module = pipe.modules[encoder_name]
        convert.save_text_encoder(module, pipe.params[encoder_name], folder / encoder_name)
        convert.save_tokenizer(pipe.tokenizers[tokenizer_name], folder / tokenizer_name)
        index[encoder_name] = ["transformers", "CLIPTextModelWithProjection" if module.config.with_projection
                               else "CLIPTextModel"]
        index[tokenizer_name] = ["transformers", "CLIPTokenizer"]
    write_scheduler_config(pipe.scheduler, folder / "scheduler")
    index.update(unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"],
                 scheduler=["diffusers", pipe.scheduler.class_name], image_encoder=[None, None],
                 feature_extractor=[None, None], **{**SETTINGS, **pipe.settings})
    if index["_class_name"] == "StableDiffusionXLPipeline":  # the text-to-image class has no aesthetic ids
        if index.pop("requires_aesthetics_score"):
            index["_class_name"] = "StableDiffusionXLImg2ImgPipeline"
    return index


def from_config(config, **_):
    raise ConfigError("SDXL is not trained from scratch by train.py: fine-tune an SDXL checkpoint with "
                      "--config.pretrained=FOLDER, or use family 'stable-diffusion' for a model from scratch.")


def init_params(modules, names, rng, latent_shape):
    raise ConfigError("SDXL components are not initialised from scratch; start from a checkpoint.")


def _time_id_count(pipe: Pipeline) -> int:
    return 5 if pipe.settings.get("requires_aesthetics_score") else 6


def _check_time_ids(pipe: Pipeline, source: str) -> None:
    """The U-Net's added-embedding width must equal the pooled text width plus its time ids' width."""
    unet = pipe.unet.config
    expected = unet.projection_class_embeddings_input_dim
    if unet.addition_embed_type != "text_time" or expected is None:
        raise CheckpointError(f"{source}: an SDXL U-Net has addition_embed_type 'text_time', this one has "
                              f"{unet.addition_embed_type!r}.")
    count = _time_id_count(pipe)
    given = unet.addition_time_embed_dim * count + pipe.text_encoder_2.config.projection_dim
    if given != expected:
        hint = ("; a refiner needs requires_aesthetics_score: true in model_index.json"
                if given - expected == unet.addition_time_embed_dim else
                "; a base model needs requires_aesthetics_score: false"
                if expected - given == unet.addition_time_embed_dim else "")
        raise CheckpointError(f"{source}: the U-Net's added embedding takes {expected} features, but "
                              f"{count} time ids x {unet.addition_time_embed_dim} + the pooled text "
                              f"{pipe.text_encoder_2.config.projection_dim} give {given}{hint}.")


# --- conditioning and the denoiser (traced) --------------------------------------------------------


def tokenize(pipe: Pipeline, prompts, warn: bool = True, prompts_2=None) -> dict:
    """{"ids": ..., "ids_2": ...}: the prompts through each tokenizer present (CLIP's 77 tokens);
    `prompts_2` (default `prompts`) for the second. As in diffusers, prompts go to the encoders
    present in order: a refiner's one encoder reads `prompts`, and `prompts_2` goes unused."""
    tokens = {}
    present = [(t, e) for t, e in ENCODERS if e in pipe.modules]
    for (tokenizer_name, encoder_name), texts in zip(present, (prompts, prompts if prompts_2 is None else prompts_2)):
        single = pipe.replace(tokenizers={"tokenizer": pipe.tokenizers[tokenizer_name]})
        key = "ids" if encoder_name == "text_encoder" else "ids_2"
        tokens[key] = stable_diffusion.tokenize(single, texts, warn)["ids"]
    return tokens


def encode_prompts(modules, params, tokens, clip_skip: int = 0) -> dict:
    """{"context": [B, 77, D1 + D2], "text_embeds": [B, P], "time_ids": [B, K]}.

    Each encoder's hidden state `clip_skip` layers before its penultimate one, without the final
    layer norm (SDXL was trained on those), concatenated; the pooled output projected by the second
    encoder. diffusers applies clip_skip to the prompt only and always uses the penultimate state
    for the negative prompt; jdiff applies it to both. A negative prompt that was not given comes
    with `zero` = 1 where the checkpoint asks for zeros instead of the empty prompt's encoding.
    """
    states = []
    for key, name in (("ids", "text_encoder"), ("ids_2", "text_encoder_2")):
        if key not in tokens:
            continue
        output = modules[name].apply({"params": params[name]}, tokens[key], output_hidden_states=True)
        states.append(output.hidden_states[-(clip_skip + 2)])
    context = jnp.concatenate(states, axis=-1)
    pooled = output.text_embeds  # the second encoder's, the last one run
    if "zero" in tokens:
        keep = (1 - tokens["zero"]).astype(context.dtype)
        context, pooled = context * keep[:, None, None], pooled * keep[:, None].astype(pooled.dtype)
    return {"context": context, "text_embeds": pooled, "time_ids": tokens["time_ids"]}


def denoiser(modules, params, guidance=None):
    unet = modules["unet"]

    def model_fn(x, t, cond, extra_channels=None):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        residuals = control.unet_residuals(modules, params, x, t, cond["context"], added, cond.get("control"))
        if extra_channels is not None:
            x = jnp.concatenate([x, extra_channels], axis=-1)
        return unet.apply({"params": params["unet"]}, x, t, cond["context"], added_cond=added, **residuals,
                          **ip_adapter.unet_kwargs(cond))

    return model_fn


def _pairs(value, batch: int, name: str) -> np.ndarray:
    """A (height, width) pair, or one pair per image, as float32 [B, 2]."""
    array = np.asarray(value, np.float32)
    if array.shape == (2,):
        array = np.broadcast_to(array, (batch, 2))
    if array.shape != (batch, 2):
        raise ConfigError(f"{name} must be a (height, width) pair or one pair per prompt ({batch}), got "
                          f"shape {np.shape(value)}.")
    return array


def _scores(value, batch: int, name: str) -> np.ndarray:
    array = np.asarray(value, np.float32)
    array = np.broadcast_to(array, (batch,)) if array.ndim == 0 else array
    if array.shape != (batch,):
        raise ConfigError(f"{name} must be a number or one per prompt ({batch}), got shape {np.shape(value)}.")
    return array[:, None]


def extra_conditioning(pipe: Pipeline, batch: int, height: int, width: int, options: dict,
                       negatives_given: np.ndarray) -> tuple[dict, dict]:
    """The time ids of the prompts and of the negative prompts, as diffusers' SDXL pipelines make
    them: (original size, crop corner, target size), or (original size, crop corner, aesthetic
    score) for a refiner. Negative ids equal the prompt's unless negative sizes are given. Where
    an image's negative prompt was not given (negatives_given[b] False), its unconditional half uses
    zeros if the checkpoint says force_zeros_for_empty_prompt."""
    unknown = sorted(set(options) - set(MICRO_CONDITIONING))
    if unknown:
        raise ConfigError(f"SDXL takes no option {', '.join(unknown)}.")
    o = {**MICRO_CONDITIONING, **options}
    size = (height, width)
    original = _pairs(o["original_size"] or size, batch, "original_size")
    crop = _pairs(o["crops_coords_top_left"], batch, "crops_coords_top_left")
    negative_crop = _pairs(o["negative_crops_coords_top_left"], batch, "negative_crops_coords_top_left")
    negative_original = _pairs(o["negative_original_size"] or o["original_size"] or size, batch,
                               "negative_original_size")
    if pipe.settings.get("requires_aesthetics_score"):
        ids = np.concatenate([original, crop, _scores(o["aesthetic_score"], batch, "aesthetic_score")], -1)
        negative_ids = np.concatenate([negative_original, negative_crop,
                                       _scores(o["negative_aesthetic_score"], batch, "negative_aesthetic_score")], -1)
    else:
        target = _pairs(o["target_size"] or size, batch, "target_size")
        ids = np.concatenate([original, crop, target], -1)
        negative_ids = ids
        if o["negative_original_size"] is not None and o["negative_target_size"] is not None:
            negative_target = _pairs(o["negative_target_size"], batch, "negative_target_size")
            negative_ids = np.concatenate([negative_original, negative_crop, negative_target], -1)
    zero = ~np.asarray(negatives_given, bool) & bool(pipe.settings.get("force_zeros_for_empty_prompt", True))
    negative = {"time_ids": negative_ids, "zero": zero.astype(np.float32)}
    return {"time_ids": ids}, negative


def training_conditioning(pipe: Pipeline, examples: dict, height: int, width: int) -> tuple[dict, dict]:
    """The time ids of training examples, as diffusers' SDXL training script makes them: each
    image's own original (height, width) before resizing, the (y, x) of the crop taken after
    resizing, and the training resolution as the target size. Examples without these fields (a
    set already at the training resolution, such as the shapes set) get generate()'s defaults:
    original size = target size, crop (0, 0).

    Where a caption is dropped the text conditioning becomes what guidance's unconditional half
    uses at generation for this checkpoint: zeros (context and pooled) when model_index.json's
    force_zeros_for_empty_prompt is set (SDXL base; Stability's own trainer drops a caption by
    zeroing its embeddings, which is why the flag exists), otherwise the empty prompt's encoding
    (diffusers' training script always encodes the empty prompt). The time ids stay the example's.

    A refiner's ids end in an aesthetic score instead of the target size: each example's own
    ("aesthetic_score", from an image folder's metadata.jsonl), else 6.0, the score diffusers'
    refiner pipeline asks for by default, so that generating at the default draws the pictures'
    kind. (diffusers has no refiner training script; Stability trained on LAION aesthetic scores.)
    """
    batch, size = len(examples["caption"]), (height, width)
    original = _pairs(examples.get("original_size", size), batch, "original_size")
    crop = _pairs(examples.get("crop_top_left", (0, 0)), batch, "crop_top_left")
    if pipe.settings.get("requires_aesthetics_score"):
        last = _scores(examples.get("aesthetic_score", MICRO_CONDITIONING["aesthetic_score"]), batch, "aesthetic_score")
    else:
        last = _pairs(size, batch, "target_size")
    ids = np.concatenate([original, crop, last], -1)
    zero = float(pipe.settings.get("force_zeros_for_empty_prompt", True))
    return ({"time_ids": ids, "zero": np.zeros((batch,), np.float32)},
            {"time_ids": ids, "zero": np.full((batch,), zero, np.float32)})


def embeds_guidance(modules) -> bool:
    return bool(modules["unet"].config.time_cond_proj_dim)


FAMILY = Family(
    name="stable-diffusion-xl", denoiser_name="unet", text_encoder_names=("text_encoder", "text_encoder_2"),
    pipeline_classes=PIPELINE_CLASSES, load=load, save=save, from_config=from_config, tokenize=tokenize,
    encode_prompts=encode_prompts, denoiser=denoiser, embeds_guidance=embeds_guidance,
    inpainting_channels=stable_diffusion.inpainting_channels, init_params=init_params,
    extra_conditioning=extra_conditioning, default_guidance=5.0,
    # Both encoders stay frozen in training (as in diffusers' SDXL script): training them is untested here.
    training_conditioning=training_conditioning, trainable_text_encoders=(),
    kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}, kohya_sgm_unet=True,
    prompt_count=2)
