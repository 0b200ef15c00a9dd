"""The whole training recipe that train.py runs: data, the VAE stage, the diffusion stage, export
to a diffusers-format folder, a sample grid and the prompt-adherence evaluation.

Workdir layout (every stage resumes from its own checkpoints; a finished stage is skipped):

    <workdir>/data/                 the built shapes set (default data_dir)
    <workdir>/vae/checkpoints/      VAE train states          <workdir>/vae/export/  its diffusers folder
    <workdir>/diffusion/checkpoints/ U-Net (+ text) states    <workdir>/tokenizer/   caption tokenizer
    <workdir>/pipeline/             the trained model as a diffusers pipeline folder (sample.py --model)
    <workdir>/lora/                 instead, with config.lora.rank > 0: the trained LoRA (sample.py --lora)
    <workdir>/samples/grid.png, <workdir>/evaluation.json
    <workdir>/controlnet/, <workdir>/reward/, <workdir>/consistency/, <workdir>/noise/   the optional
                                    'controlnet', 'reward', 'consistency' and 'noise' stages
                                    (config.stages), each with its *_evaluation.json
"""

import json

import jax
import numpy as np

from jdiff import control, convert, distributed, families, samplers, schedules, sharding, train_lib
from jdiff.app import dreambooth, shapes, stages
from jdiff.app.caption_tokenizer import write_caption_tokenizer
from jdiff.app.shapes_tfds import default_data_dir, load_shapes
from jdiff.data import decode_example, encode_conditioning, encode_source, make_loader, to_model_range
from jdiff.data.augment import CropAndFlip, FixedCrops, Uncropped
from jdiff.data.image_folder import ImageFolder, WithControl
from jdiff.errors import ConfigError
from jdiff.families import Pipeline, save_pipeline
from jdiff.lora import save_lora_weights, training as lora_training
from jdiff.paths import Path

STAGES = ("vae", "diffusion", "controlnet", "reward", "consistency", "noise")


def _stages(config) -> list[str]:
    return [s.strip() for s in config.stages.split(",") if s.strip()]


def data_sources(config, workdir: Path):
    """(train source, test source or None) of the configured dataset."""
    data = config.data
    if data.dataset == "shapes":
        data_dir = data.data_dir or default_data_dir(workdir)
        kw = dict(resolution=data.resolution, num_train=data.num_train, num_test=data.num_test, seed=config.seed)
        # Built once, by process 0, into a data_dir that every process can read.
        return distributed.main_first("shapes dataset", lambda: (load_shapes(data_dir, "train", **kw),
                                                                 load_shapes(data_dir, "test", **kw)))
    if data.dataset == "folder":
        if not data.folder:
            raise ConfigError("data.dataset is 'folder' but data.folder is empty: set --config.data.folder=DIR.")
        # DreamBooth's pictures need no captions: they all get the instance prompt. A ControlNet's
        # pictures need their control images (checked and read by the same folder).
        controls = data.control_column if "controlnet" in _stages(config) else None
        return ImageFolder(data.folder, data.resolution, allow_missing_captions=dreambooth.enabled(config),
                           control_column=controls), None
    raise ConfigError(f"unknown data.dataset {data.dataset!r}; use 'shapes' or 'folder'.")


def _examples(source, count: int) -> tuple[np.ndarray, list[str]]:
    items = [decode_example(source[i]) for i in range(min(count, len(source)))]
    return to_model_range(np.stack([it["image"] for it in items])), [str(it.get("caption", "")) for it in items]


def _all_captions(config, source) -> list[str]:
    """Every training caption, without decoding any image: shapes captions are a function of the
    scene, an image folder keeps its captions in memory."""
    if isinstance(source, ImageFolder):
        return [text for _, text in source.entries]
    return [shapes.caption([placed.object for placed in shapes.scene(i, "train", config.seed)])
            for i in range(len(source))]


def _loader(source, section, seed, augment=None):
    per_process = section.batch_size // jax.process_count()
    if per_process * jax.process_count() != section.batch_size:
        raise ConfigError(f"batch_size {section.batch_size} does not split over {jax.process_count()} processes.")
    return make_loader(source, batch_size=per_process, seed=seed, augment=augment)


def augmentation(config) -> CropAndFlip | None:
    """The diffusion stage's random crops and flips of folder pictures (data.random_crop,
    data.random_flip), or None."""
    data = config.data
    if not (data.get("random_crop") or data.get("random_flip")):
        return None
    if data.dataset != "folder":
        raise ConfigError("data.random_crop and data.random_flip are for folder data: the shapes set's pictures are "
                          "exactly the resolution, and its captions say left and right.")
    if "controlnet" in _stages(config):
        raise ConfigError("data.random_crop and data.random_flip do not apply to the controlnet stage (its control "
                          "images are centre-cropped with their pictures): leave them off for it.")
    return CropAndFlip(data.resolution, bool(data.get("random_crop")), bool(data.get("random_flip")))


def train_vae(config, workdir: Path, train_source, test_source):
    """Stage 1; returns (module, EMA params) ready for the diffusion stage and exports vae/export."""
    test_images, _ = _examples(test_source or train_source, 200)
    module = families.build(config, dtype=stages.compute_dtype(config)).vae
    stage = stages.vae_stage(config, test_images, module)
    state, _ = train_lib.train(stage, config.vae_train, workdir / "vae", _loader(train_source, config.vae_train, config.seed),
                            total_batch=config.vae_train.batch_size)
    if int(state.step) < config.vae_train.steps:
        return None, None  # stopped early (run_steps): the next invocation resumes
    params = sharding.gather(state.ema_params)
    sample_images, _ = _examples(train_source, 1000)
    module, params = stages.diffusion_ready_vae(module, params, sample_images, config.vae.latent_std)
    if distributed.is_main():
        convert.save_vae(module, params, workdir / "vae" / "export")
    return module, params


def _exported_vae(config, workdir: Path):
    folder = workdir / "vae" / "export"
    if not folder.is_dir():
        raise ConfigError(f"the diffusion stage needs a trained VAE: {folder} does not exist. Run the 'vae' "
                          f"stage first (config.stages) or set config.pretrained.")
    return convert.load_vae(folder, dtype=stages.compute_dtype(config))


def diffusion_components(config, workdir: Path, train_source, vae, vae_params) -> Pipeline:
    """What the diffusion stage trains: a pretrained checkpoint's components, or the family's
    modules built from the config around the trained VAE, with a tokenizer of the captions."""
    dtype = stages.compute_dtype(config)
    if config.pretrained:
        return stages.with_remat(families.build(config.pretrained, dtype=dtype), config.remat)
    tokenizer = distributed.main_first("tokenizer", lambda: write_caption_tokenizer(
        workdir / "tokenizer", _all_captions(config, train_source), config.text.max_length))
    return stages.with_remat(families.build(config, tokenizer=tokenizer, vae=(vae, vae_params), dtype=dtype),
                             config.remat)


def train_diffusion(config, workdir: Path, train_source, vae, vae_params, test_captions) -> Pipeline:
    """Stage 2; returns the trained pipeline (EMA weights) and exports it to <workdir>/pipeline.

    The schedule is the model's own (a pretrained checkpoint's scheduler, or config.scheduler for a
    model built from the config) with the fields config.diffusion.schedule sets; the export's
    scheduler says what was trained."""
    base = diffusion_components(config, workdir, train_source, vae, vae_params)
    scheduler = schedules.training_scheduler(base.scheduler, dict(config.diffusion.schedule),
                                             config.diffusion.change_prediction_type)
    base = base.replace(scheduler=scheduler)
    # the evaluation samples with config.sample.sampler: refuse a misfit now, not after training
    samplers.check_sampler(config.sample.sampler, scheduler.class_name)
    lora = lora_spec(config, base)
    cache, cache_text = config.data.cache_latents, config.data.get("cache_text_embeddings", False)
    cache = cache and not dreambooth.enabled(config)  # pairs of pictures: encoded at every step (a few pictures)
    augment = augmentation(config)
    if augment is not None:  # latents encoded once hold one crop per picture; the loader crops afresh
        train_source = FixedCrops(train_source, augment, config.seed) if cache else Uncropped(train_source)
    if dreambooth.enabled(config):  # the instance prompt, and the class pictures the base model draws first
        train_source = dreambooth.training_source(config, workdir, base, train_source)

    def pipeline_from(params) -> Pipeline:
        if lora is not None:  # the base model with the trained adapter
            return base.replace(adapters={"lora": lora_training.with_alpha(params["lora"], lora.alpha)})
        return base.replace(params={**base.params, **params}, source=str(workdir / "pipeline"))

    size = config.data.resolution  # samples at the trained size

    def evaluate(params, step):
        from jdiff.pipeline import generate
        from jdiff import image_io

        s = config.sample
        images = generate(pipeline_from(params), test_captions[:s.num_prompts], sampler=s.sampler, steps=s.steps,
                          guidance=s.guidance, seed=0, height=size, width=size)
        return {"samples": image_io.image_grid(images, columns=4)}

    vae, vae_params = base.vae, base.params["vae"]
    stage = stages.diffusion_stage(base, stages.make_objective(config, scheduler),
                                   latent_size=config.data.resolution // vae.config.downscale,
                                   caption_dropout=config.data.caption_dropout,
                                   # LoRA freezes every pretrained weight; text encoders get adapters instead
                                   train_text_encoder=config.diffusion.train_text_encoder and lora is None,
                                   evaluate=evaluate,
                                   cached_latents=cache, cached_conditioning=cache_text, lora=lora,
                                   prior_loss_weight=dreambooth.prior_loss_weight(config))
    if cache:  # the VAE is frozen: encode once rather than at every step
        train_source = encode_source(stages.latent_encoder(vae, vae_params), train_source,
                                     show_progress=distributed.is_main())
    if cache_text:  # so are the text encoders (the stage refuses otherwise): encode each caption once
        encoder = stages.conditioning_encoder(base, config.data.resolution, config.data.caption_dropout > 0)
        train_source = encode_conditioning(encoder, train_source, show_progress=distributed.is_main())
    loader = _loader(train_source, config.diffusion_train, config.seed, None if cache else augment)
    state, _ = train_lib.train(stage, config.diffusion_train, workdir / "diffusion", loader,
                               total_batch=config.diffusion_train.batch_size)
    if int(state.step) < config.diffusion_train.steps:
        return None  # stopped early (run_steps): the next invocation resumes
    pipe = pipeline_from(sharding.gather(state.ema_params))
    if distributed.is_main():
        if lora is not None:
            save_lora_weights(pipe, workdir / "lora", adapter_name="lora")
        else:
            save_pipeline(pipe, workdir / "pipeline")
    return pipe


def lora_spec(config, pipe: Pipeline) -> lora_training.LoraSpec | None:
    """config.lora as a LoraSpec (None: full training); LoRA adapts a pretrained model."""
    section = config.get("lora")
    if section is None or section.rank == 0:
        return None
    if not config.pretrained:
        raise ConfigError("config.lora.rank > 0 trains LoRA adapters on a pretrained model: set config.pretrained.")
    if section.rank < 0 or section.alpha < 0:
        raise ConfigError(f"config.lora.rank and alpha must not be negative, got {section.rank} and {section.alpha}.")
    targets = {pipe.family.denoiser_name: tuple(section.unet_targets)}
    family = pipe.family
    adapted = family.text_encoder_names if family.lora_text_encoders is None else family.lora_text_encoders
    targets.update({name: tuple(section.text_encoder_targets) for name in adapted if name in pipe.params})
    return lora_training.LoraSpec(int(section.rank), float(section.alpha or section.rank), targets)


def run(config, workdir) -> dict:
    """Runs config.stages, then samples held-out prompts and evaluates them (shapes data)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    requested = _stages(config)
    unknown = [s for s in requested if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown} in config.stages; use a comma-separated subset of {STAGES}.")
    dreambooth.check(config)
    augmentation(config)  # refused settings fail now, not after the VAE stage
    if distributed.is_main():
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    train_source, test_source = data_sources(config, workdir)
    test_captions = _examples(test_source, 1000)[1] if test_source is not None else _examples(train_source, 64)[1]
    stopped = {"stopped_early": "run_steps reached; run the same command again to continue"}
    if "vae" in requested:
        vae, vae_params = train_vae(config, workdir, train_source, test_source)
        if vae is None:
            return stopped
    elif "diffusion" in requested:
        vae, vae_params = (None, None) if config.pretrained else _exported_vae(config, workdir)
    results, pipe = {}, None
    if "diffusion" in requested:
        pipe = train_diffusion(config, workdir, train_source, vae, vae_params, test_captions)
        if pipe is None:
            return stopped
        results = sample_and_evaluate(config, pipe, workdir, test_source)
    if "controlnet" in requested:
        control_results = train_controlnet(config, workdir, train_source, test_source, pipe)
        if control_results is None:
            return stopped
        results["controlnet"] = control_results
    if "reward" in requested:
        from jdiff.app.reward_finetuning import train_reward

        reward_results = train_reward(config, workdir, train_source, test_source, pipe,
                                      lambda section: _loader(train_source, section, config.seed))
        if reward_results is None:
            return stopped
        results["reward"] = reward_results
    if "consistency" in requested:
        from jdiff.app.consistency_distillation import train_consistency

        distilled = train_consistency(config, workdir, train_source, test_source, pipe,
                                      lambda source, section: _loader(source, section, config.seed))
        if distilled is None:
            return stopped
        results["consistency"] = distilled
    if "noise" in requested:
        from jdiff.app.noise_stage import train_noise

        results["noise"] = train_noise(config, workdir, train_source, test_source, pipe)
    return results


def train_controlnet(config, workdir: Path, train_source, test_source, pipe: Pipeline | None) -> dict | None:
    """Stage 3: a ControlNet on a trained model, the model frozen; exports <workdir>/controlnet/export.
    - shapes data: on `pipe` (or <workdir>/pipeline), each example's outlines its control image; then
      controlnet_evaluation.json (held-out scenes with and without it).
    - folder data: on `pipe`, config.pretrained or <workdir>/pipeline, each picture's control image
      named in metadata.jsonl (config.data.control_column); then controlnet/samples.png (the first
      pictures' control images, and what the model draws from them and their captions)."""
    from jdiff.app.shapes_control import OutlineControl
    from jdiff.models import controlnet

    folder_data = config.data.dataset == "folder"
    if folder_data:  # train_source: the ImageFolder, opened with its control images (data_sources)
        pipe = _folder_controlnet_base(config, workdir, pipe)
    else:
        pipe = stages.trained_pipeline(config, workdir, pipe, "controlnet", test_source)
    section, resolution = config.controlnet, config.data.resolution
    vae, vae_params = pipe.vae, pipe.params["vae"]
    if section.init:  # continue training a ControlNet written earlier (diffusers' --controlnet_model_name_or_path)
        attached = control.load_controlnet(pipe, section.init)  # refuses one made for another model
        module, params = attached.modules[control.PREFIX], attached.params[control.PREFIX]
    else:
        module, params = controlnet.from_unet(
            pipe.unet, pipe.params["unet"], jax.random.key(config.seed), dtype=stages.compute_dtype(config),
            conditioning_embedding_out_channels=control_widths(section, vae.config.downscale))
    base = stages.with_remat(pipe.replace(modules={**pipe.modules, "controlnet": module},
                                          params={**pipe.params, "controlnet": params}), config.remat)
    cache = config.data.cache_latents
    source = encode_source(stages.latent_encoder(vae, vae_params), train_source,
                           show_progress=distributed.is_main()) if cache else train_source
    # control images are read as batches are drawn, not kept in memory with the latents
    source = WithControl(source, train_source) if folder_data else OutlineControl(source, "train", resolution,
                                                                                 config.seed)
    stage = stages.diffusion_stage(base, stages.make_objective(config, base.scheduler),
                                   latent_size=resolution // vae.config.downscale,
                                   caption_dropout=config.data.caption_dropout, train_text_encoder=False,
                                   cached_latents=cache, controlnet=True)
    loader = _loader(source, config.controlnet_train, config.seed)
    state, _ = train_lib.train(stage, config.controlnet_train, workdir / "controlnet", loader,
                               total_batch=config.controlnet_train.batch_size)
    if int(state.step) < config.controlnet_train.steps:
        return None  # stopped early (run_steps): the next invocation resumes
    trained = sharding.gather(state.ema_params)["controlnet"]
    controlled = base.replace(params={**base.params, "controlnet": trained})
    if distributed.is_main():
        convert.save_controlnet(module, trained, workdir / "controlnet" / "export")
    if folder_data:
        return _controlnet_samples(config, controlled, train_source, workdir / "controlnet" / "samples.png")
    from jdiff.app import shapes_control_eval

    s = config.sample
    kw = dict(num_prompts=section.num_prompts, guidance=section.guidance, sampler=s.sampler, steps=s.steps,
              resolution=resolution, data_seed=config.seed, batch_size=config.evaluate.batch_size)
    results = {"with_controlnet": shapes_control_eval.evaluate(controlled, test_source, "test", **kw),
               "without_controlnet": shapes_control_eval.evaluate(pipe, test_source, "test", **kw)}
    if distributed.is_main():
        (workdir / "controlnet_evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


CONTROL_WIDTHS = (16, 32, 96, 256)  # diffusers' ControlNetModel default, for a VAE of factor 8


def control_widths(section, vae_factor: int) -> tuple[int, ...]:
    """The control embedding's widths: config.controlnet's, or else diffusers' default cut to one
    width per halving from the control image to the latents, plus one (factor 2: (16, 32))."""
    if section.conditioning_embedding_out_channels:
        return tuple(section.conditioning_embedding_out_channels)
    halvings = int(vae_factor).bit_length() - 1
    if vae_factor != 1 << halvings or halvings >= len(CONTROL_WIDTHS):
        raise ConfigError(f"the VAE's factor {vae_factor} needs config.controlnet.conditioning_embedding_out_channels "
                          f"set: one width per halving from the image to the latents, plus one.")
    return CONTROL_WIDTHS[:halvings + 1]


def _folder_controlnet_base(config, workdir: Path, pipe: Pipeline | None) -> Pipeline:
    """The model a ControlNet is trained for on folder data: the one this run fine-tuned, else
    config.pretrained, else the diffusion stage's export."""
    if pipe is not None:
        return pipe
    if config.pretrained:
        return families.load_pipeline(config.pretrained, dtype=stages.compute_dtype(config))
    exported = stages.exported_pipeline(config, workdir)
    if exported is None:
        raise ConfigError(f"the controlnet stage needs a model to steer: set config.pretrained to a diffusers folder, "
                          f"or run the 'diffusion' stage first ({workdir / 'pipeline'} does not exist).")
    return exported


def _controlnet_samples(config, pipe: Pipeline, source: ImageFolder, path: Path) -> dict:
    """Pairs of (control image, drawn image) for the first pictures of `source` and their captions."""
    from jdiff import image_io
    from jdiff.pipeline import generate

    count, s, section = min(config.controlnet.num_samples, len(source)), config.sample, config.controlnet
    captions = [text for _, text in source.entries[:count]]
    controls = np.stack([source.control_image(i) for i in range(count)])
    images = generate(pipe, captions, control_image=controls, sampler=s.sampler, steps=s.steps,
                      guidance=section.guidance, seed=0, height=config.data.resolution, width=config.data.resolution)
    pairs = [image for pair in zip(controls, images) for image in pair]
    if distributed.is_main():
        image_io.save_png(path, image_io.image_grid(pairs, columns=2),
                          {"prompts": captions, "sampler": s.sampler, "steps": s.steps, "guidance": section.guidance,
                           "layout": "rows of (control image, generated image)"})
    return {"samples": str(path), "num_samples": count}


def sample_and_evaluate(config, pipe: Pipeline, workdir: Path, test_source) -> dict:
    """Writes <workdir>/samples/ (a grid of held-out prompts) and, for the shapes set,
    <workdir>/evaluation.json with colour/shape/position accuracy with and without guidance."""
    from jdiff import image_io
    from jdiff.pipeline import generate

    s = config.sample
    captions = _examples(test_source, s.num_prompts)[1] if test_source is not None else ["a picture"] * s.num_prompts
    size = config.data.resolution  # the trained size (a checkpoint's default may be far larger: Flux's 1024)
    images = generate(pipe, captions, sampler=s.sampler, steps=s.steps, guidance=s.guidance, seed=0,
                      height=size, width=size)
    if distributed.is_main():
        (workdir / "samples").mkdir(exist_ok=True)
        image_io.save_png(workdir / "samples" / "grid.png", image_io.image_grid(images, columns=4),
                          {"prompts": captions, "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance})
    if config.data.dataset != "shapes":
        return {}
    from jdiff.app import shapes_eval as evaluate

    results = evaluate.evaluate_pipeline(pipe, test_source, num_prompts=config.evaluate.num_prompts,
                                         guidances=tuple(config.evaluate.guidances), sampler=s.sampler,
                                         steps=s.steps, batch_size=config.evaluate.batch_size)
    if distributed.is_main():
        (workdir / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
