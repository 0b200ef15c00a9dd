"""DreamBooth in the training recipe (config.dreambooth): every instance picture under one instance
prompt and, with a class prompt, prior preservation on class pictures the base model draws first.

The class pictures are written to `class_folder` (default <workdir>/class_images) as PNGs with
caption files, so a rerun, or another run on the same base model, reuses them; only the missing
ones are drawn (seeds 0, 1, ... of the class prompt, diffusers' DreamBooth scripts draw them with
the pipeline's default sampler: here config.sample's). data.cache_latents is ignored: the few
pictures of a DreamBooth run are encoded at every step.
"""


from jdiff import distributed, image_io
from jdiff.data.image_folder import IMAGE_EXTENSIONS, ImageFolder
from jdiff.data.prior_preservation import InstancePromptSource, PriorPreservationSource
from jdiff.errors import ConfigError
from jdiff.families import Pipeline
from jdiff.paths import Path


def enabled(config) -> bool:
    section = config.get("dreambooth")
    return bool(section is not None and section.instance_prompt)


def prior_loss_weight(config) -> float | None:
    """The stage's prior_loss_weight: None without prior preservation."""
    if not enabled(config) or not config.dreambooth.class_prompt:
        return None
    return float(config.dreambooth.prior_loss_weight)


def write_class_images(config, workdir: Path, pipe: Pipeline) -> Path:
    """Draws the class pictures that `class_folder` still lacks; returns the folder (settings
    already passed `check`)."""
    section = config.dreambooth
    folder = Path(section.class_folder or workdir / "class_images")
    count = int(section.num_class_images)
    have = len([p for p in folder.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]) if folder.is_dir() else 0
    missing = list(range(have, count))
    if not missing:
        return folder
    from jdiff.pipeline import generate

    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
    s, size, batch = config.sample, config.data.resolution, 8
    for start in range(0, len(missing), batch):
        seeds = missing[start:start + batch]
        prompts = [section.class_prompt] * len(seeds)
        # every process draws (generate() is collective on several hosts); process 0 writes
        images = generate(pipe, prompts, sampler=s.sampler, steps=s.steps, guidance=s.guidance, seed=seeds,
                          height=size, width=size)
        if distributed.is_main():
            for seed, image in zip(seeds, images):
                image_io.save_png(folder / f"{seed:05d}.png", image, {"prompt": section.class_prompt, "seed": seed})
                (folder / f"{seed:05d}.txt").write_text(section.class_prompt + "\n")
    distributed.barrier("dreambooth class images")
    return folder


def training_source(config, workdir: Path, pipe: Pipeline, instances):
    """The instance pictures under the instance prompt, paired with class pictures when
    prior preservation is on."""
    section = config.dreambooth
    if not section.class_prompt:
        return InstancePromptSource(instances, section.instance_prompt)
    classes = ImageFolder(write_class_images(config, workdir, pipe), config.data.resolution,
                          allow_missing_captions=True)
    return PriorPreservationSource(instances, classes, section.instance_prompt, section.class_prompt)


def check(config) -> None:
    """Refuses DreamBooth settings that cannot work, before anything is trained or drawn."""
    if not enabled(config):
        return
    if config.dreambooth.prior_loss_weight < 0:
        raise ConfigError(f"dreambooth.prior_loss_weight must not be negative, got {config.dreambooth.prior_loss_weight}.")
    if config.dreambooth.class_prompt and config.dreambooth.num_class_images < 1:
        raise ConfigError(f"dreambooth.num_class_images must be at least 1, got {config.dreambooth.num_class_images}.")
    if not config.pretrained:
        raise ConfigError("DreamBooth (dreambooth.instance_prompt) fine-tunes a pretrained model: set config.pretrained.")
    if config.data.dataset != "folder":
        raise ConfigError("DreamBooth trains on your own pictures: set --config.data.dataset=folder and data.folder.")
    if config.data.get("cache_text_embeddings", False):
        raise ConfigError("DreamBooth does not work with data.cache_text_embeddings yet: set it to False.")
