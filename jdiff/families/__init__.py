"""Model families and the one builder of their components.

    pipe = build("path/to/diffusers/folder")                 # by model_index.json's `_class_name`
    pipe = build(run_config, tokenizer=tok, vae=(vae, params))  # by run_config.family, from its sections

Adding a family: write its module (a `Family`: loading, saving, building from a run config,
tokenizing, encoding prompts, calling the denoiser) and list it in FAMILIES. `generate()`,
`sample.py`, `train.py`, sharding and checkpoints then work for it unchanged.
"""

import dataclasses
import json
import os

import jax.numpy as jnp

from jdiff import hub, paths, single_file
from jdiff.errors import CheckpointError, ConfigError
from jdiff.families import flux, stable_diffusion, stable_diffusion_3, stable_diffusion_xl
from jdiff.families.base import Family, Pipeline
from jdiff.paths import Path

FAMILIES = {f.name: f for f in (stable_diffusion.FAMILY, stable_diffusion_xl.FAMILY, stable_diffusion_3.FAMILY,
                                 flux.FAMILY)}


def family_for_pipeline_class(class_name: str) -> Family:
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    known = sorted(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise CheckpointError(f"model_index.json names {class_name!r}, which jdiff does not build; "
                          f"it reads {', '.join(known)}.")


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; use one of {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def load_pipeline(folder, *, dtype=jnp.float32, param_dtype=jnp.float32, variant: str | None = None,
                  revision: str | None = None, cache_dir=None, config=None) -> Pipeline:
    """A diffusers pipeline folder (its family chosen by model_index.json's `_class_name`), a
    train.py workdir (its `pipeline/` export), or a Hugging Face repo id ("org/name") already in the
    local Hugging Face cache (`revision`, `cache_dir`: `jdiff.hub.resolve`). `dtype` is the compute
    dtype (bfloat16 on accelerators); parameters are stored in `param_dtype`. `variant` ("fp16")
    loads diffusers' variant weight files (`*.fp16.safetensors`), as diffusers' `variant=` does.

    A single .safetensors file in the original SD 1.x/2.x layout (A1111's, most model sites') loads
    too, its configs and tokenizer taken from `config` (a diffusers folder or cached repo id of the same
    model; default: the model type's usual repo, from the cache): `jdiff.single_file`."""
    if Path(folder).is_file() or Path(folder).suffix in (".safetensors", *single_file.PICKLES):
        if not Path(folder).is_file():
            raise CheckpointError(f"checkpoint file {str(folder)!r} does not exist.")
        return single_file.load(folder, config=config, dtype=dtype, param_dtype=param_dtype, revision=revision,
                                cache_dir=cache_dir)
    source, folder = folder, hub.resolve(folder, revision=revision, cache_dir=cache_dir)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {str(folder)!r} does not exist or is not a folder.")
    if (folder / "pipeline" / "model_index.json").is_file():  # a train.py workdir: its exported model
        folder = folder / "pipeline"
    index_file = folder / "model_index.json"
    if index_file.is_file():
        index = paths.read_json(index_file)
    else:  # a folder laid out like Stable Diffusion without its index
        index = {"_class_name": "StableDiffusionPipeline"}
    if variant and not any(folder.glob(f"*/*.{variant}.safetensors")) and not any(
            folder.glob(f"*/*.safetensors.index.{variant}.json")):
        raise CheckpointError(f"{str(folder)!r} has no {variant!r} variant: no component folder holds "
                              f"*.{variant}.safetensors weights.")
    family = family_for_pipeline_class(index.get("_class_name", ""))
    pipe = family.load(folder, index, dtype=dtype, param_dtype=param_dtype, variant=variant)
    if not Path(source).exists():  # a repo id: it names the model better than its cache snapshot's path
        pipe = dataclasses.replace(pipe, source=str(source) + (f"@{revision}" if revision else ""))
    return pipe


def save_pipeline(pipe: Pipeline, folder) -> None:
    """Writes `pipe` as a diffusers pipeline folder (which `load_pipeline`, sample.py and diffusers'
    `from_pretrained` read), local or in an object store (`gs://`). An interruption never leaves a
    half-written model that looks whole: it is written beside the target and swapped in when
    complete, or on an object store written in place with model_index.json last
    (`paths.replace_folder`)."""
    if pipe.adapters:  # a diffusers pipeline folder has no place for them: never drop them silently
        raise ConfigError(f"this pipeline has unmerged LoRA adapters ({', '.join(pipe.adapters)}): merge them "
                          f"first (jdiff.fuse_lora) or save them on their own (jdiff.save_lora_weights).")
    def write(staging: Path) -> None:
        index = pipe.family.save(pipe, staging)
        (staging / "model_index.json").write_text(json.dumps(index, indent=2))  # last: the folder is whole

    if "ip_adapter" in pipe.params:
        raise ConfigError("this pipeline has an IP-Adapter attached: save the pipeline loaded without it (the "
                          "adapter stays in its own file, as diffusers keeps it).")
    if any(name.startswith("controlnet") for name in pipe.modules):  # not a component of its pipeline class
        raise ConfigError("this pipeline has ControlNets attached: save the pipeline loaded without them, and each "
                          "ControlNet on its own (jdiff.convert.save_controlnet), as diffusers keeps them.")
    paths.replace_folder(folder, write)


def build(source, **options) -> Pipeline:
    """A family's components from a diffusers folder (a path) or from a run config (an
    ml_collections config with a `family` field and that family's model sections)."""
    if isinstance(source, (str, os.PathLike)):
        return load_pipeline(source, **options)
    return get(source.get("family", "stable-diffusion")).from_config(source, **options)
