"""ControlNet in generation: attaching ControlNets to a pipeline, generate()'s control inputs, and
the residuals each U-Net call adds.

ControlNets live in the pipeline beside its components, as diffusers' ControlNet pipelines hold
them: modules and params named `controlnet`, `controlnet_1`, ... The control inputs travel inside
the prompts' conditioning (`cond["control"]`: the images and a scale per image and ControlNet), so
classifier-free guidance doubles them with the prompts, and guess mode is a zero scale on the
unconditional half. Scales, guidance windows and guess mode are traced values: changing them never
recompiles.
"""

import dataclasses
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import convert
from jdiff.errors import ConfigError
from jdiff.families.base import Pipeline
from jdiff.models.controlnet import residual_scales

PREFIX = "controlnet"


def names(modules) -> list[str]:
    """The attached ControlNets' component names, in the order they were given."""
    found = [name for name in modules if name == PREFIX or name.startswith(PREFIX + "_")]
    return sorted(found, key=lambda name: 0 if name == PREFIX else int(name.rsplit("_", 1)[1]))


def load_controlnet(pipe: Pipeline, folders, *, variant: str | None = None) -> Pipeline:
    """`pipe` with the ControlNet of `folders` (a diffusers ControlNetModel folder, or a list of
    them for several, applied together as diffusers' MultiControlNetModel) attached after any
    already attached. The base parameters are shared, not copied."""
    folders = [folders] if isinstance(folders, (str, bytes)) or hasattr(folders, "__fspath__") else list(folders)
    if not folders:
        raise ConfigError("load_controlnet: no ControlNet folder given.")
    if pipe.family.denoiser_name != "unet":
        raise ConfigError(f"ControlNets steer a U-Net (SD 1.x/2.x, SDXL); {pipe.family.name} models have none.")
    param_dtype = jax.tree.leaves(pipe.params["unet"])[0].dtype
    modules, params = dict(pipe.modules), dict(pipe.params)
    for folder in folders:
        module, weights = convert.load_controlnet(folder, dtype=pipe.unet.dtype, param_dtype=param_dtype,
                                                  variant=variant)
        _check_fits(pipe, module, folder)
        count = len(names(modules))
        name = PREFIX if count == 0 else f"{PREFIX}_{count}"
        modules[name], params[name] = module, weights
    return pipe.replace(modules=modules, params=params)


def _check_fits(pipe: Pipeline, module, folder) -> None:
    """A clear error for a ControlNet of another model (diffusers fails inside the first call)."""
    unet, control = pipe.unet.config, module.config
    mismatched = [field for field in ("block_out_channels", "cross_attention_dim", "addition_embed_type",
                                      "layers_per_block", "down_block_types")
                  if _plain(getattr(unet, field)) != _plain(getattr(control, field))]
    if mismatched:
        details = "; ".join(f"{f}: U-Net {_plain(getattr(unet, f))!r}, ControlNet {_plain(getattr(control, f))!r}"
                            for f in mismatched)
        raise ConfigError(f"the ControlNet in {str(folder)!r} was made for another model ({details}).")


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


@dataclasses.dataclass(frozen=True)
class ControlInputs:
    """generate()'s control arguments made into arrays: per ControlNet k, images[k] [B, H, W, 3];
    scales [B, K] (per image: one prompt may be steered harder than another); starts, ends [K]."""

    images: tuple
    scales: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    guess_mode: bool


def _per_controlnet(value, count: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ConfigError(f"{name} has {len(values)} entries for {count} ControlNets.")
    return values


def control_inputs(pipe: Pipeline, control_image, batch: int, height: int, width: int, *,
                   conditioning_scale: Union[float, Sequence[float]] = 1.0,
                   guidance_start: Union[float, Sequence[float]] = 0.0,
                   guidance_end: Union[float, Sequence[float]] = 1.0, guess_mode: bool = False,
                   as_images) -> ControlInputs | None:
    """Checks generate()'s control arguments against the attached ControlNets. `as_images(value,
    name, batch, channels)` is generate()'s image reader ([B, H, W, C] in [0, 1])."""
    attached = names(pipe.modules)
    if control_image is None:
        if attached:
            raise ConfigError(f"this pipeline has {len(attached)} ControlNet(s) attached: pass control_image "
                              "(one image, or a list with one per ControlNet).")
        return None
    if not attached:
        raise ConfigError("control_image needs a ControlNet: attach one with jdiff.load_controlnet(pipe, folder).")
    count = len(attached)
    if count == 1 and isinstance(control_image, (list, tuple)) and len(control_image) == batch > 1:
        # one ControlNet, one picture per prompt (as diffusers takes a list for a batch)
        control_image = np.concatenate([as_images(image, f"control_image[{b}]", 1, 3)
                                        for b, image in enumerate(control_image)])
    images = [control_image] if count == 1 and not isinstance(control_image, (list, tuple)) else control_image
    if not isinstance(images, (list, tuple)) or len(images) != count:
        raise ConfigError(f"control_image must be a list of {count} images, one per ControlNet.")
    images = tuple(as_images(image, f"control_image[{k}]" if count > 1 else "control_image", batch, 3)
                   for k, image in enumerate(images))
    for k, image in enumerate(images):
        if image.shape[1:3] != (height, width):
            raise ConfigError(f"control image {k} is {image.shape[2]}x{image.shape[1]} but {width}x{height} is "
                              "generated: give it at the output size.")
    scales = np.asarray(_per_controlnet(conditioning_scale, count, "controlnet_conditioning_scale"), np.float32)
    starts = np.asarray(_per_controlnet(guidance_start, count, "control_guidance_start"), np.float32)
    ends = np.asarray(_per_controlnet(guidance_end, count, "control_guidance_end"), np.float32)
    if not np.all((0 <= starts) & (starts < ends) & (ends <= 1)):
        raise ConfigError(f"control_guidance_start {starts.tolist()} and control_guidance_end {ends.tolist()} "
                          "must satisfy 0 <= start < end <= 1 for each ControlNet.")
    # diffusers turns guess mode on for global-pool ControlNets (shuffle), judged by the first one.
    guess_mode = bool(guess_mode) or pipe.modules[attached[0]].config.global_pool_conditions
    return ControlInputs(images, np.broadcast_to(scales, (batch, count)).copy(), starts, ends, guess_mode)


def conditioning(inputs: ControlInputs, unconditional: bool) -> dict:
    """What goes into one half's conditioning. Guess mode steers the conditional half only: the
    unconditional half's residuals are zero, as diffusers makes them."""
    scales = np.zeros_like(inputs.scales) if unconditional and inputs.guess_mode else inputs.scales
    guess = np.full(len(scales), inputs.guess_mode, np.bool_)  # per image, so guidance can double it
    return {"images": inputs.images, "scales": scales, "guess_mode": guess}


def keep(step, plan, starts, ends):
    """[K] 1 where each ControlNet steers this step, else 0: diffusers' `controlnet_keep`, step i of the
    n run being inside [start, end) as fractions (i / n >= start and (i + 1) / n <= end)."""
    n = jnp.asarray(plan.num_steps - plan.start, jnp.float32)
    i = jnp.asarray(step - plan.start, jnp.float32)
    return 1.0 - ((i / n < starts) | ((i + 1) / n > ends)).astype(jnp.float32)


def with_keep(cond: dict, factors) -> dict:
    """cond with its control scales multiplied by this step's keep factors [K]."""
    control = cond["control"]
    return {**cond, "control": {**control, "scales": control["scales"] * factors[None, :]}}


def unet_residuals(modules, params, x, t, context, added_cond, control) -> dict:
    """The U-Net's extra keyword arguments for one call: the attached ControlNets' residuals, summed
    (MultiControlNet), each image's scaled by its own factors; {} without control."""
    if control is None:
        return {}
    total = None
    for k, name in enumerate(names(modules)):
        module = modules[name]
        down, mid = module.apply({"params": params[name]}, x, t, context, control["images"][k],
                                 conditioning_scale=1.0, added_cond=added_cond)
        residuals = [*down, mid]
        # [B, residual]: the image's scale, times guess mode's ramp (diffusers' per-residual factors).
        ramp = residual_scales(len(residuals), 1.0, True, module.config.global_pool_conditions)
        factors = control["scales"][:, k, None] * jnp.where(control["guess_mode"][:, None], ramp[None], 1.0)
        residuals = [r * factors[:, j].reshape(-1, 1, 1, 1).astype(r.dtype) for j, r in enumerate(residuals)]
        total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
    return {"down_block_additional_residuals": total[:-1], "mid_block_additional_residual": total[-1]}
