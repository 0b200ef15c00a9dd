"""Text-to-image, image-to-image and inpainting for every model family: `generate()`.

Text encoding, the whole sampling loop and the VAE decode run as one jitted function. Prompts,
negative prompts, seeds, guidance scale, strength, step count and the init image are traced
values: changing them reuses the compiled program. A new batch or image size, sampler, dtype, or
switching guidance on or off (guidance <= 1 skips the unconditional half, as diffusers does)
compiles once more. The batch is sharded over the `data` axis of a device mesh (all devices by
default); each image's noise comes from its own seed, so results do not depend on the device count.
"""

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jdiff import (control, depth as depth_lib, executable_cache, guidance as guidance_lib, ip_adapter, lora, samplers,
                   sharding)
from jdiff.errors import ConfigError
from jdiff.families import Pipeline, load_pipeline, save_pipeline  # noqa: F401 (the public API)
from jdiff.models import vae_tiling as tiling
from jdiff.models.vae import scale_latents, unscale_latents

# --- host-side input preparation ----------------------------------------------------------------


def _as_list(value, n: int, name: str) -> list:
    """One entry per prompt (None where none was given)."""
    if value is None or isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ConfigError(f"{name} has {len(value)} entries for {n} prompts.")
    return value


def _encoder_prompts(family, first: list, more: dict, name: str) -> dict:
    """{"prompts_N": one prompt per image} for the N-th text encoder's prompts that were given
    (more = {N: value}): diffusers' `prompt_2 or prompt`, so an empty argument, like a None entry,
    falls back to `first`'s."""
    given = {}
    for n, value in more.items():
        if not value:
            continue
        if n > family.prompt_count:
            takes = {2: "SDXL, SD3 and Flux", 3: "SD3"}[n]
            raise ConfigError(f"{name}_{n} is the prompt of a text encoder {n} ({takes} models); "
                              f"{family.name} models take {family.prompt_count} prompt(s).")
        entries = _as_list(value, len(first), f"{name}_{n}")
        given[f"prompts_{n}"] = [fallback if entry is None else entry for entry, fallback in zip(entries, first)]
    return given


def _images(value, name: str, batch: int, channels: int) -> np.ndarray:
    """[B, H, W, C] float32 from an array (or PIL image) with values in [0, 1]."""
    if hasattr(value, "convert"):  # a PIL image
        value = np.asarray(value.convert("RGB" if channels == 3 else "L"), np.float32) / 255.0
    array = np.asarray(value, np.float32)
    if channels == 1 and array.ndim >= 3 and array.shape[-1] in (3, 4):  # an RGB(A) mask: its grey level
        array = array[..., :3].mean(axis=-1)
    if array.ndim == 2 and channels == 1:
        array = array[..., None]
    if array.ndim == 3 and array.shape[-1] != channels and channels == 1:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != channels:
        raise ConfigError(f"{name} must be [B, H, W, {channels}] (or one [H, W, {channels}] image), "
                          f"got shape {np.shape(value)}.")
    if array.shape[0] == 1 and batch > 1:
        array = np.repeat(array, batch, axis=0)
    if array.shape[0] != batch:
        raise ConfigError(f"{name} has {array.shape[0]} images for {batch} prompts.")
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        raise ConfigError(f"{name} values must be finite and in [0, 1].")
    return array


def _image_size(value) -> tuple[int, int]:
    """(height, width) of an image given as a PIL image or an array [..., H, W, C]."""
    if hasattr(value, "convert"):
        return value.size[1], value.size[0]
    shape = np.shape(value)
    if len(shape) < 3:
        raise ConfigError(f"an image must be [H, W, C] or [B, H, W, C], got shape {shape}.")
    return shape[-3], shape[-2]


def _vae_tile(pipe: Pipeline, vae_tiling) -> int:
    """generate()'s vae_tiling as a tile size in pixels (0: no tiling)."""
    if vae_tiling is False or vae_tiling is None:
        return 0
    tile = tiling.default_tile(pipe.vae) if vae_tiling is True else vae_tiling
    f = pipe.vae_scale_factor
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile % f or tile < 4 * f:
        raise ConfigError(f"vae_tiling must be True, False or a tile size in pixels that is a multiple of {f} "
                          f"and at least {4 * f}, got {vae_tiling!r}.")
    return int(tile)


def _seeds(seed, batch: int) -> np.ndarray:
    """Per-image seeds: an int seed s gives images s, s+1, ...; a list gives one seed per image."""
    if isinstance(seed, (int, np.integer)):
        seeds = np.arange(batch, dtype=np.int64) + int(seed)
    else:
        seeds = np.asarray(list(seed), np.int64)
        if seeds.shape != (batch,):
            raise ConfigError(f"seed must be an int or one seed per prompt ({batch}), got {len(seeds)}.")
    return (seeds % 2**32).astype(np.uint32)


# --- the compiled program ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that shapes the compiled program (hashable: a jit cache key). The sampler and its
    settings are part of the plan's tree structure."""

    family: Any
    modules: tuple  # ((component name, Flax module), ...)
    latent_shape: tuple  # [B, h, w, C]
    mode: str  # "text" | "image" | "inpaint"
    use_cfg: bool
    clip_skip: int
    given_noise: bool
    from_latents: bool  # the start is given as latents (a base model's hand-off), not as an image
    add_noise: bool  # noise the start to the first step's level (not when continuing a hand-off)
    output_latents: bool  # return the final latents instead of decoding them
    vae_tile: int = 0  # > 0: the VAE encodes and decodes in tiles of this many pixels

    def describe(self) -> dict:
        """The same, as text that is stable across processes (the on-disk executables' key)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("family", "modules")}
        return dict(family=self.family.name, modules=[(name, repr(module)) for name, module in self.modules], **fields)


def _encode_image(vae, params, images, tile: int):
    """Latents of images in [-1, 1]: the posterior mean, scaled (deterministic; see generate)."""
    posterior = tiling.encode(vae, params, images, tile)
    return scale_latents(vae.config, posterior.mode())


@functools.partial(jax.jit, static_argnames="static")
def _generate(params, adapters, lora_scales, tokens, negative_tokens, seeds, noise, plan, scale, cfg_scale, rescale,
              image, mask, controls, depth, image_prompt, *, static: _Static):
    """scale: the guidance scale a model embeds (LCM, Flux-dev); cfg_scale: the classifier-free
    guidance weight (the same number, except for true CFG on a guidance-embedding model).
    controls: None, or the ControlNets' inputs for each half and their guidance windows (control.py).
    depth: None, or a depth-to-image U-Net's depth channel [B, h, w, 1] (depth.py).
    image_prompt: None, or the IP-Adapters' image encoder input [B, adapters, S, S, 3], scales
      [B, adapters] and optional masks, per image (ip_adapter.py)."""
    family, modules = static.family, dict(static.modules)
    vae = modules["vae"]
    modules = lora.with_adapters(modules, adapters, lora_scales)  # unchanged without adapters
    modules = ip_adapter.with_image_prompt(modules, params)  # unchanged without an IP-Adapter
    cond = family.encode_prompts(modules, params, tokens, static.clip_skip)
    keys = jax.vmap(jax.random.key)(seeds)
    noise_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 0)
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 1)
    if not static.given_noise:
        noise = jax.vmap(lambda k: jax.random.normal(k, static.latent_shape[1:], jnp.float32))(noise_keys)
    model_fn = family.denoiser(modules, params, scale)

    known, extra = None, None
    x = samplers.initial_latents(noise, plan)
    if static.mode != "text":
        if static.from_latents:
            image_latents = image
        else:
            image = image * 2 - 1
            image_latents = _encode_image(vae, params["vae"], image, static.vae_tile)
        noised = samplers.noised_latents(image_latents, noise, plan) if static.add_noise else image_latents
        x = noised if static.mode == "image" else jnp.where(plan.start == 0, x, noised)
    if static.mode == "inpaint":
        f = vae.config.downscale
        keep = (mask >= 0.5).astype(jnp.float32)  # 1 = repaint, binarised as diffusers does
        latent_mask = keep[:, ::f, ::f]
        if family.inpainting_channels(modules):  # the model sees the mask and the masked image
            masked = _encode_image(vae, params["vae"], image * (1 - keep), static.vae_tile)  # masked: 0 (grey)
            extra = jnp.concatenate([latent_mask, masked], axis=-1)
        else:  # an ordinary model: keep the known region on the noisy trajectory every step
            known = (image_latents, latent_mask, noise)
    if depth is not None:  # read beside the latents at every step, as the inpainting channels are
        extra = depth

    negative = family.encode_prompts(modules, params, negative_tokens, static.clip_skip) if static.use_cfg else None
    if image_prompt is not None:  # the images' tokens, and the unconditional half's (from zero embeddings)
        pictured, unpictured = ip_adapter.image_tokens(modules, params, image_prompt["pixels"], modules["unet"].dtype)
        shared = {k: v for k, v in image_prompt.items() if k != "pixels"}  # scales and masks, for both halves
        cond = {**cond, "image_prompt": {"tokens": pictured, **shared}}
        if negative is not None:
            negative = {**negative, "image_prompt": {"tokens": unpictured, **shared}}
    if controls is not None:  # the control images and scales travel with each half's conditioning
        cond = {**cond, "control": controls["cond"]}
        negative = None if negative is None else {**negative, "control": controls["negative"]}

    def guided(cond, negative):
        if static.use_cfg:
            return guidance_lib.classifier_free_guidance(model_fn, cond, negative, cfg_scale, rescale, extra)
        return guidance_lib.unguided(model_fn, cond, extra)

    if controls is None:
        denoise = guided(cond, negative)
    else:  # each ControlNet steers only the steps inside its guidance window
        def denoise(x, t, step):
            factors = control.keep(step, plan, controls["starts"], controls["ends"])
            return guided(control.with_keep(cond, factors),
                          None if negative is None else control.with_keep(negative, factors))(x, t)

        denoise = samplers.step_aware(denoise)

    latents = samplers.sample(denoise, x, plan, step_keys, known=known)
    if static.output_latents:
        return latents
    images = tiling.decode(vae, params["vae"], unscale_latents(vae.config, latents), static.vae_tile)
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def _placed_params(pipe: Pipeline, mesh: Mesh):
    """(weights, LoRA adapters) laid out on `mesh`: the weights replicated, except over a mesh's
    fsdp/tensor axes, and kept (a pipeline with other adapters shares them); the adapters (small)
    replicated at each call."""
    key = (tuple(d.id for d in mesh.devices.flat), mesh.axis_names, mesh.devices.shape)
    if key not in pipe._placed:
        pipe._placed.clear()
        pipe._placed[key] = sharding.put(pipe.params, sharding.tree_shardings(pipe.params, mesh))
    adapters = dict(pipe.adapters)
    return pipe._placed[key], sharding.put(adapters, jax.tree.map(lambda _: NamedSharding(mesh, P()), adapters))


def _to_host(images) -> np.ndarray:
    if jax.process_count() > 1:  # every process gets every image
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(images, tiled=True))
    return np.asarray(images)


def checkpoint_sampling(pipe: Pipeline) -> tuple[str, int]:
    """(sampler, steps) that diffusers' `pipe(prompt)` runs for this checkpoint: the sampler of its
    scheduler's class and its pipeline's default step count."""
    return samplers.for_scheduler(pipe.scheduler.class_name, pipe.scheduler.config), pipe.default_steps


def generate(
    pipe: Pipeline,
    prompts: Union[str, Sequence[str]],
    *,
    negative_prompts: Union[None, str, Sequence[str]] = None,
    prompts_2: Union[None, str, Sequence[str]] = None,
    negative_prompts_2: Union[None, str, Sequence[str]] = None,
    prompts_3: Union[None, str, Sequence[str]] = None,
    negative_prompts_3: Union[None, str, Sequence[str]] = None,
    sampler: Optional[str] = None,
    steps: Optional[int] = None,
    guidance: Optional[float] = None,
    seed: Union[int, Sequence[int]] = 0,
    height: Optional[int] = None,
    width: Optional[int] = None,
    latents=None,
    init_image=None,
    strength: float = 0.8,
    mask=None,
    eta: float = 0.0,
    guidance_rescale: float = 0.0,
    clip_skip: int = 0,
    mesh: Optional[Mesh] = None,
    init_latents=None,
    denoising_start: Optional[float] = None,
    denoising_end: Optional[float] = None,
    output_type: str = "np",
    original_size=None,
    crops_coords_top_left=None,
    target_size=None,
    negative_original_size=None,
    negative_crops_coords_top_left=None,
    negative_target_size=None,
    aesthetic_score=None,
    negative_aesthetic_score=None,
    lora_scales=None,
    vae_tiling: Union[bool, int] = False,
    max_sequence_length: Optional[int] = None,
    true_cfg_scale: float = 1.0,
    control_image=None,
    controlnet_conditioning_scale: Union[float, Sequence[float]] = 1.0,
    control_guidance_start: Union[float, Sequence[float]] = 0.0,
    control_guidance_end: Union[float, Sequence[float]] = 1.0,
    guess_mode: bool = False,
    depth_map=None,
    ip_adapter_image=None,
    ip_adapter_scale: Union[float, Sequence[float]] = 1.0,
    ip_adapter_mask=None,
) -> np.ndarray:
    """Images [B, H, W, 3] in [0, 1] for `prompts` (or latents, with output_type="latent").

    negative_prompts: one for all prompts or one per prompt; None (or a None entry) means none was
      given: the empty prompt, or zeros where an SDXL checkpoint asks for them.
    prompts_2, negative_prompts_2, prompts_3, negative_prompts_3: the prompts of the second and
      third text encoders, as diffusers' prompt_2 and prompt_3 (SDXL: OpenCLIP bigG; SD3: CLIP-G
      and T5; Flux: T5); by default, or where an entry is None, the same as `prompts` and
      `negative_prompts`. Whether zeros stand for a missing negative (SDXL) depends on
      `negative_prompts` alone, as in diffusers.
    guidance: classifier-free guidance scale (<= 1: none); by default diffusers' default for the
      family (7.5 for SD 1.x/2.x, 5.0 for SDXL).

    latents: NHWC starting noise [B, H/8, W/8, C] before the sampler's initial scaling (diffusers'
      `latents=` after a transpose); by default drawn from each image's seed.
    init_image: [B, H, W, 3] (or one [H, W, 3] image, or PIL) in [0, 1] for image-to-image: the
      last int(steps * strength) steps run from the image noised to that level. It is encoded with
      the VAE posterior's mean (deterministic), not a sample of it.
    mask: [B, H, W] (or [H, W]) with init_image: inpaint where mask >= 0.5. Inpainting U-Nets (9
      input channels) see the mask and masked image; ordinary ones keep the unmasked region's
      latents on the noisy trajectory every step.
    sampler, steps: by default the checkpoint's own scheduler (scheduler_config.json's
      `_class_name`) and the step count diffusers' pipeline of this checkpoint runs.
    seed: an int s gives image b the seed s + b; or one seed per image.
    init_latents: [B, h, w, C] latents to start from instead of an init_image, as a model's own
      latents (diffusers' `image=latents`): noised per `strength`, or taken as they are with
      `denoising_start` (a refiner continuing a base model's `denoising_end`).
    denoising_start, denoising_end: fractions in (0, 1) of the noise levels where this run starts
      or stops (diffusers' SDXL base/refiner hand-off); with denoising_end pass
      output_type="latent" and give the result to the refiner's init_latents.
    output_type: "np" (images) or "latent" (the final latents [B, h, w, C], not decoded).
    original_size, crops_coords_top_left, target_size and their negative_ counterparts,
      aesthetic_score, negative_aesthetic_score: SDXL's micro-conditioning, with diffusers'
      defaults ((height, width), (0, 0), (height, width), 6.0, 2.5); a (height, width) pair or one
      pair per prompt.
    lora_scales: the loaded LoRA adapters' scales (jdiff.load_lora_weights): {name: scale} for the
      batch, or a list of one such dict per prompt (adapters mixed per image in one batch); a name
      left out is off. Default: every loaded adapter at 1.0. Traced: changing them never recompiles.
    vae_tiling: True decodes (and encodes init images) in overlapping, blended tiles of the VAE's
      sample_size pixels, as diffusers' `enable_vae_tiling()`, for images larger than that; an int
      gives the tile size in pixels (a multiple of the VAE's downscale factor, at least 4 latents).
    max_sequence_length: the T5 prompt's token count of SD3 (default 256) and Flux (default 512), as
      diffusers' argument; static (a new length compiles a new program).
    true_cfg_scale: classifier-free guidance on top of a model that embeds its guidance scale (Flux's
      `true_cfg_scale`): > 1 runs the negative prompts (required) as the unconditional half with
      this weight, while `guidance` still goes into the model. Traced.
    control_image: with ControlNets attached (jdiff.load_controlnet), the control image [H, W, 3] or
      [B, H, W, 3] (or PIL) in [0, 1] at the output size (which it sets by default); a list with one
      per ControlNet. controlnet_conditioning_scale, control_guidance_start, control_guidance_end:
      the residuals' weight, and the fractions of the steps between which each ControlNet steers
      (one value, or one per ControlNet), as diffusers'; guess_mode: ControlNets steer the
      conditional half only, their shallow residuals weakened (for prompts that say little). All
      traced: changing them never recompiles.
    depth_map: a depth-to-image model's (SD 2 depth) depth estimate of init_image, [H, W] or
      [B, H, W] in any units (larger = nearer, as DPT/MiDaS give it); brought to the latent size and
      to [-1, 1] as diffusers' StableDiffusionDepth2ImgPipeline does. jdiff has no depth estimator.
    ip_adapter_image: with an IP-Adapter attached (jdiff.load_ip_adapter), the image prompt: one
      picture for all prompts or one per prompt (PIL, uint8 or [0, 1] floats, any size);
      ip_adapter_scale: its weight, one for all or one per prompt (diffusers' set_ip_adapter_scale);
      ip_adapter_mask: where it acts, a [h, w] mask (or PIL image; resized to the output and
      binarised as diffusers' IPAdapterMaskProcessor does), one for all or a list with one per
      prompt; None: everywhere. With several IP-Adapters attached, each of the three is a list with
      one entry per adapter (each as above; a mask entry may be None). Pictures, scales and masks
      are traced: changing them never recompiles (giving masks at all compiles once more).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ConfigError("no prompts given.")
    default_sampler, default_steps = checkpoint_sampling(pipe)
    guidance = pipe.family.default_guidance if guidance is None else guidance
    sampler = sampler or default_sampler
    samplers.check_sampler(sampler, pipe.scheduler.class_name)
    steps = default_steps if steps is None else steps
    batch = len(prompts)
    negatives = _as_list(negative_prompts, batch, "negative_prompts")
    f = pipe.vae_scale_factor
    if output_type not in ("np", "latent"):
        raise ConfigError(f"output_type must be 'np' or 'latent', got {output_type!r}.")
    vae_tile = _vae_tile(pipe, vae_tiling)
    if max_sequence_length is not None:
        if not pipe.family.long_prompts:
            raise ConfigError(f"max_sequence_length sets the T5 prompt length of SD3 and Flux; {pipe.family.name} "
                              "models have no T5 encoder.")
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= 512:
            raise ConfigError(f"max_sequence_length must be an integer in 1..512 (as diffusers), got "
                              f"{max_sequence_length!r}.")
    options = {name: value for name, value in dict(
        original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
        negative_original_size=negative_original_size, negative_crops_coords_top_left=negative_crops_coords_top_left,
        negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
        negative_aesthetic_score=negative_aesthetic_score).items() if value is not None}
    if options and pipe.family.extra_conditioning is None:
        raise ConfigError(f"{', '.join(options)}: micro-conditioning that {pipe.family.name} models do not take "
                          "(SDXL's).")

    image = mask_array = None
    mode = "text"
    if init_image is not None and init_latents is not None:
        raise ConfigError("give init_image or init_latents, not both.")
    if init_latents is not None:
        image = np.asarray(init_latents, np.float32)
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[0] not in (1, batch) or image.shape[-1] != pipe.latent_channels:
            raise ConfigError(f"init_latents must be [B, h, w, {pipe.latent_channels}] latents for {batch} prompts "
                              f"(NHWC), got shape {np.shape(init_latents)}.")
        if not np.all(np.isfinite(image)):
            raise ConfigError("init_latents contain NaN or infinite values.")
        image = np.repeat(image, batch, axis=0) if image.shape[0] == 1 else image
        mode = "image"
        height, width = height or image.shape[1] * f, width or image.shape[2] * f
        if image.shape[1:3] != (height // f, width // f):
            raise ConfigError(f"init_latents are {image.shape[2]}x{image.shape[1]}, the latents of a "
                              f"{image.shape[2] * f}x{image.shape[1] * f} image, but {width}x{height} was asked for.")
    if denoising_start is not None and mode == "text":
        raise ConfigError("denoising_start continues from an image or latents: pass init_latents (or init_image).")
    if init_image is not None:
        image = _images(init_image, "init_image", batch, 3)
        mode = "image"
        height = height or image.shape[1]
        width = width or image.shape[2]
        if image.shape[1:3] != (height, width):
            raise ConfigError(f"init_image is {image.shape[2]}x{image.shape[1]} but {width}x{height} was asked for.")
    if mask is not None:
        if init_image is None:
            raise ConfigError("mask needs an init_image to inpaint.")
        mask_array = _images(mask, "mask", batch, 1)
        if mask_array.shape[1:3] != image.shape[1:3]:
            raise ConfigError(f"mask is {mask_array.shape[2]}x{mask_array.shape[1]} but the image is "
                              f"{image.shape[2]}x{image.shape[1]}: they must be the same size.")
        mode = "inpaint"
    if control_image is not None and (height is None or width is None):  # the control image's size
        first = control_image[0] if isinstance(control_image, (list, tuple)) else control_image
        control_height, control_width = _image_size(first)
        height, width = height or control_height, width or control_width
    height, width = height or pipe.default_size, width or pipe.default_size
    if height % f or width % f or height <= 0 or width <= 0:
        raise ConfigError(f"height and width must be positive multiples of {f}, got {height}x{width}.")
    channels = pipe.latent_channels
    latent_shape = (batch, height // f, width // f, channels)
    if latents is not None:
        latents = np.asarray(latents, np.float32)
        if latents.shape != latent_shape:
            raise ConfigError(f"latents must have shape {latent_shape} (NHWC), got {latents.shape}.")

    depth = None
    if depth_map is not None or depth_lib.takes_depth(pipe):
        if not depth_lib.takes_depth(pipe):
            raise ConfigError("depth_map is for depth-to-image models (SD 2 depth: a U-Net with one input channel more "
                              "than the latents); this model takes none.")
        if depth_map is None:
            raise ConfigError("this is a depth-to-image model (SD 2 depth): pass depth_map, a depth estimate of "
                              "init_image (jdiff has no depth estimator; diffusers runs DPT when given none).")
        if mode != "image" or init_image is None:
            raise ConfigError("depth-to-image starts from a picture: pass init_image (and no mask).")
        depth = depth_lib.depth_condition(depth_map, batch, height // f, width // f)
    image_prompt = None
    if ip_adapter_image is not None or ip_adapter.attached(pipe):
        if not ip_adapter.attached(pipe):
            raise ConfigError("ip_adapter_image needs an IP-Adapter: attach one with jdiff.load_ip_adapter(pipe, ...).")
        if ip_adapter_image is None:
            raise ConfigError("this pipeline has an IP-Adapter attached: pass ip_adapter_image (diffusers fails "
                              "without one too).")
        image_prompt = {"pixels": ip_adapter.image_pixels(pipe, ip_adapter_image, batch),
                        "scale": ip_adapter.image_scales(pipe, ip_adapter_scale, batch)}
        if ip_adapter_mask is not None:  # a program of its own: without masks, no mask arithmetic at all
            image_prompt["masks"] = ip_adapter.image_masks(pipe, ip_adapter_mask, batch, height, width)
    elif ip_adapter_mask is not None:
        raise ConfigError("ip_adapter_mask needs an IP-Adapter: attach one with jdiff.load_ip_adapter(pipe, ...).")
    controls = control.control_inputs(pipe, control_image, batch, height, width,
                                      conditioning_scale=controlnet_conditioning_scale,
                                      guidance_start=control_guidance_start, guidance_end=control_guidance_end,
                                      guess_mode=guess_mode, as_images=_images)
    family = pipe.family
    levels_options = family.levels_options(pipe, steps, height, width) if family.levels_options else None
    plan = samplers.make_plan(sampler, pipe.scheduler.config, steps, strength=strength if mode != "text" else 1.0,
                              eta=eta, explicit=pipe.scheduler.explicit, denoising_start=denoising_start,
                              denoising_end=denoising_end, levels_options=levels_options)
    embeds = family.embeds_guidance(pipe.modules)
    if true_cfg_scale != 1.0:
        if not embeds:
            raise ConfigError(f"true_cfg_scale is classifier-free guidance for models that embed their guidance scale "
                              f"(Flux); {family.name} models are guided by `guidance`.")
        if negative_prompts is None:
            raise ConfigError("true_cfg_scale needs negative_prompts (diffusers ignores it without them).")
    use_cfg = true_cfg_scale > 1 if embeds else guidance > 1
    cfg_scale = true_cfg_scale if embeds else guidance

    # Pad the batch to a multiple of the batch axes (data x fsdp), shard it, drop the padding after.
    mesh = mesh or sharding.make_mesh({"data": -1})  # every device samples its own prompts
    size = sharding.batch_shards(mesh)
    padded = -(-batch // size) * size
    pad = lambda a: np.concatenate([a, np.repeat(a[-1:], padded - batch, axis=0)])
    extra, negative_extra = {}, {}
    if family.extra_conditioning is not None:
        given = np.array([n is not None for n in negatives])
        extra, negative_extra = family.extra_conditioning(pipe, batch, height, width, options, given)
    negatives = ["" if n is None else n for n in negatives]
    sequence = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    tokenize = functools.partial(family.tokenize, pipe, **sequence)
    texts = _encoder_prompts(family, prompts, {2: prompts_2, 3: prompts_3}, "prompts")
    negative_texts = _encoder_prompts(family, negatives, {2: negative_prompts_2, 3: negative_prompts_3},
                                      "negative_prompts")
    batch_inputs = ({**tokenize(prompts, **texts), **extra}, {**tokenize(negatives, **negative_texts), **negative_extra},
                    _seeds(seed, batch), latents, image, mask_array, lora.scales_for(pipe, lora_scales, batch), depth,
                    image_prompt)
    sharded = sharding.batch_sharding(mesh)
    tokens, negative_tokens, seeds, noise, image, mask_array, lora_scales, depth, image_prompt = jax.tree.map(
        lambda a: sharding.put(pad(a), sharded), batch_inputs)
    replicated = NamedSharding(mesh, P())
    if controls is not None:
        halves = jax.tree.map(lambda a: sharding.put(pad(a), sharded),
                              (control.conditioning(controls, False), control.conditioning(controls, True)))
        windows = jax.tree.map(lambda a: sharding.put(a, replicated), (controls.starts, controls.ends))
        controls = {"cond": halves[0], "negative": halves[1], "starts": windows[0], "ends": windows[1]}
    plan, scale, cfg_scale, rescale = jax.tree.map(
        lambda a: sharding.put(a, replicated),
        (plan, np.float32(guidance), np.float32(cfg_scale), np.float32(guidance_rescale)))
    static = _Static(family, tuple(sorted(pipe.modules.items())), (padded,) + latent_shape[1:], mode, use_cfg,
                     clip_skip, latents is not None, init_latents is not None, denoising_start is None,
                     output_type == "latent", vae_tile)
    params, adapters = _placed_params(pipe, mesh)
    args = (params, adapters, lora_scales, tokens, negative_tokens, seeds, noise, plan, scale, cfg_scale, rescale,
            image, mask_array, controls, depth, image_prompt)
    images = executable_cache.call(_generate, args, {"static": static}, static.describe)
    return _to_host(images)[:batch]
