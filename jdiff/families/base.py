"""What a model family is, and the `Pipeline` of components every family's builder makes.

A family says how prompts become conditioning (its tokenizers and text encoders), what its
denoiser is and how it is called, and which checkpoint folders it reads. Everything else —
samplers, guidance, `generate()`, training, sharding, checkpoints — works on a `Pipeline` through
these functions and never asks which family it holds.
"""

import dataclasses
from typing import Any, Callable, Mapping

from jdiff.errors import CheckpointError
from jdiff.schedules import Scheduler


def require_components(folder, names, kind: str) -> None:
    """A CheckpointError naming the component folders of `names` that `folder` lacks."""
    missing = [name for name in names if not (folder / name).is_dir()]
    if missing:
        raise CheckpointError(f"{str(folder)!r} is not {kind}: it lacks {', '.join(m + '/' for m in missing)}.")


@dataclasses.dataclass(frozen=True, eq=False)  # one object per family: hashed by identity (a jit key)
class Family:
    """One model family. Traced functions take `modules` (the Flax modules by component name) and
    `params` (their parameters by the same names); host functions take the whole `Pipeline`.

    pipeline_classes: model_index.json `_class_name`s it reads, each with diffusers' default
      step count for that pipeline.
    load(folder, index, dtype, param_dtype, variant) -> Pipeline; save(pipe, folder) -> model_index.json
      dict; from_config(config, ...) -> Pipeline (modules built from a run config, parameters only
      where given).
    tokenize(pipe, prompts, warn=True) -> dict of int32 [B, L] numpy arrays (the traced inputs of
      encode_prompts); warn: say which words a too-long prompt loses (generation, not training).
      Families with `long_prompts` (a T5 encoder) also take `max_sequence_length`. A family with
      `prompt_count` N > 1 also takes prompts_2 .. prompts_N: lists of one prompt per image for
      its second and third text encoders (diffusers' prompt_2, prompt_3); None: `prompts`.
    encode_prompts(modules, params, tokens, clip_skip) -> conditioning pytree, batch-major.
    denoiser(modules, params, guidance) -> model_fn(x, t, conditioning, extra_channels=None): one
      call of the denoiser in the scheduler's prediction type; `guidance` reaches it only where
      the model embeds the scale (see embeds_guidance).
    embeds_guidance(modules): True when the model takes the guidance scale as an input (LCM,
      guidance-distilled models) and so runs no unconditional half.
    inpainting_channels(modules): True when the denoiser takes mask and masked-image channels.
    init_params(modules, names, rng, latent_shape) -> {name: params} for training from scratch.
    extra_conditioning(pipe, batch, height, width, options, negatives_given[B]) -> (dict, dict) of
      numpy arrays [B, ...] added to the positive and negative prompts' tokens: conditioning that
      is not text (SDXL's size and crop ids). `options`: generate()'s family-specific keywords
      (only the ones the caller set); a family refuses the ones it does not know.
    training_conditioning(pipe, examples, height, width) -> (conditional, unconditional): dicts of
      numpy arrays [B, ...] merged into the captions' tokens, and into the empty prompt's tokens
      where training drops a caption, made from each training example's own fields (SDXL: time ids
      from "original_size" and "crop_top_left"). None: the conditioning is the text alone.
    trainable_text_encoders: the text encoders training may update (train_text_encoder=True);
      None: all of them, (): none (they stay frozen).
    lora_text_encoders: the text encoders LoRA adapts (config.lora.text_encoder_targets), as
      diffusers' LoRA loaders do; None: all of them (SD3 and Flux: the CLIPs, never T5).
    kohya_prefixes: {component: prefix} of kohya-format LoRA keys (`lora_unet`, `lora_te`, ...).
    kohya_sgm_unet: kohya's files name this family's U-Net layers as the original LDM/SGM U-Net
      does (`input_blocks_4_1_...`, SDXL) rather than as diffusers does (SD 1.x/2.x).
    levels_options(pipe, num_steps, height, width) -> dict: what the family's diffusers pipeline
      passes to its scheduler's set_timesteps besides the step count (flow models: the dynamic
      shift `mu` for the image's token count, Flux's own sigma list). None: nothing.
    default_latent_size: the latent side when the denoiser's config has no sample_size (Flux).
    """

    name: str
    denoiser_name: str  # the component that is trained to denoise ("unet", "transformer")
    text_encoder_names: tuple[str, ...]
    pipeline_classes: Mapping[str, int]
    load: Callable
    save: Callable
    from_config: Callable
    tokenize: Callable
    encode_prompts: Callable
    denoiser: Callable
    embeds_guidance: Callable
    inpainting_channels: Callable
    init_params: Callable
    extra_conditioning: Callable = None
    training_conditioning: Callable = None
    trainable_text_encoders: tuple[str, ...] | None = None
    lora_text_encoders: tuple[str, ...] | None = None
    default_guidance: float = 7.5  # diffusers' guidance_scale default for the family's pipelines
    kohya_prefixes: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"unet": "lora_unet", "text_encoder": "lora_te"})
    kohya_sgm_unet: bool = False
    levels_options: Callable = None
    default_latent_size: int = 64  # diffusers' pipelines' fallback
    long_prompts: bool = False  # a T5 encoder whose token count generate(max_sequence_length=) sets
    prompt_count: int = 1  # the prompts its pipelines take, one per text encoder (prompt, prompt_2, ...)


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """A family's components: Flax modules and tokenizers by their diffusers component names
    (`pipe.unet`, `pipe.text_encoder`, `pipe.tokenizer` read them), the checkpoint's scheduler,
    and the parameters by component name. `adapters` are the LoRA adapters loaded beside the
    parameters (applied unmerged by generate(); see jdiff.lora)."""

    family: Family
    modules: Mapping[str, Any]
    tokenizers: Mapping[str, Any]
    scheduler: Scheduler
    params: dict
    source: str = ""
    pipeline_class: str = ""  # model_index.json's `_class_name`
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # model_index.json's own options
    adapters: Mapping[str, dict] = dataclasses.field(default_factory=dict)  # LoRA: {name: tree}, see jdiff.lora
    _placed: dict = dataclasses.field(default_factory=dict, repr=False)  # params per mesh (generate)

    def __getattr__(self, name):
        for table in ("modules", "tokenizers"):
            found = self.__dict__.get(table) or {}
            if name in found:
                return found[name]
        raise AttributeError(f"{type(self).__name__} has no component or attribute {name!r}")

    def replace(self, **changes) -> "Pipeline":
        return dataclasses.replace(self, **changes, _placed={})

    @property
    def denoiser_module(self):
        return self.modules[self.family.denoiser_name]

    @property
    def vae_scale_factor(self) -> int:
        return self.modules["vae"].config.downscale

    @property
    def latent_channels(self) -> int:
        return self.modules["vae"].config.latent_channels

    @property
    def default_size(self) -> int:
        size = getattr(self.denoiser_module.config, "sample_size", None) or self.family.default_latent_size
        return size * self.vae_scale_factor

    @property
    def default_steps(self) -> int:
        return self.family.pipeline_classes.get(self.pipeline_class, 50)
