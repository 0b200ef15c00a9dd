"""The two training stages of latent diffusion, as `train_lib.Stage`s: the VAE on images, then a
family's denoiser (and its text encoders, trained from scratch or kept frozen) on the frozen VAE's
latents. Stages take components (a `Pipeline` from `jdiff.families.build`) and an objective; they
build no models. Everything here is a pure function of its inputs.
"""

import dataclasses

import numpy as np
import jax
import jax.numpy as jnp

from jdiff import families, losses, schedules
from jdiff.batching import map_batches
from jdiff.errors import ConfigError
from jdiff.data.prior_preservation import merge_pairs
from jdiff.families import Pipeline
from jdiff.lora import training as lora_training
from jdiff.lora.apply import with_adapters
from jdiff.models.vae import AutoencoderKL, DiagonalGaussian, scale_latents, standardize_latents
from jdiff.train_lib import Stage


def compute_dtype(config):
    return jnp.dtype(config.dtype)


def trained_pipeline(config, workdir, pipe: Pipeline | None, stage: str, test_source) -> Pipeline:
    """What a stage after 'diffusion' works on: `pipe` when the same run trained it, else the export
    in <workdir>/pipeline. Those stages judge held-out scenes of the shapes set: they refuse other data."""
    if config.data.dataset != "shapes" or test_source is None:
        raise ConfigError(f"the {stage} stage is judged on the shapes set's held-out scenes: data.dataset='shapes'.")
    if pipe is not None:
        return pipe
    exported = exported_pipeline(config, workdir)
    if exported is None:
        raise ConfigError(f"the {stage} stage works on a trained model: {workdir / 'pipeline'} does not exist. Run "
                          f"the 'diffusion' stage first (config.stages).")
    return exported


def exported_pipeline(config, workdir) -> Pipeline | None:
    """The diffusion stage's export, <workdir>/pipeline, in the run's compute dtype (and remat);
    None before it exists."""
    exported = workdir / "pipeline"
    if not (exported / "model_index.json").is_file():
        return None
    return with_remat(families.load_pipeline(exported, dtype=compute_dtype(config)), config.remat)


def with_remat(pipe: Pipeline, remat: bool) -> Pipeline:
    """`pipe` whose models recompute their blocks in the backward pass where `remat` (config.remat)
    asks: a checkpoint loads without it, and a stage that trains on it (or differentiates through
    it) would otherwise keep every activation."""
    if not remat:
        return pipe
    return pipe.replace(modules={name: module.clone(gradient_checkpointing=True)
                                 if hasattr(module, "gradient_checkpointing") else module
                                 for name, module in pipe.modules.items()})


# --- the VAE ------------------------------------------------------------------------------------


def vae_stage(config, test_images: np.ndarray, module: AutoencoderKL | None = None) -> Stage:
    """test_images: float32 [N, R, R, 3] in [-1, 1] for the PSNR evaluation. module: the VAE to
    train (default: the family's, built from the config)."""
    module = module or families.build(config, dtype=compute_dtype(config)).vae
    resolution = config.data.resolution

    def init_params(rng):
        return module.init(rng, jnp.zeros((1, resolution, resolution, 3)))["params"]

    crop = config.vae.train_crop
    if crop and not (0 < crop <= resolution and crop % module.config.downscale == 0):
        raise ConfigError(f"vae.train_crop={crop} must be 0 (whole images) or a multiple of the VAE's downscale "
                          f"factor {module.config.downscale} no larger than data.resolution={resolution}.")

    def loss_fn(params, frozen, batch, rng):
        images = batch["image"]
        if 0 < crop < resolution:
            rng, window = jax.random.split(rng)
            images = random_window(images, crop, window)
        posterior = module.apply({"params": params}, images, method="encode")
        reconstruction = module.apply({"params": params}, posterior.sample(rng), method="decode")
        loss, parts = losses.vae_loss(reconstruction, images, posterior, kl_weight=config.vae_loss.kl_weight,
                                      kind=config.vae_loss.reconstruction)
        return loss, {**parts, "psnr": losses.psnr(reconstruction, images)}

    reconstruct = jax.jit(lambda params, images: module.apply({"params": params}, images))

    def evaluate(params, step):
        reconstructions = map_batches(lambda images: reconstruct(params, images), test_images, 100)
        psnr = float(losses.psnr(jnp.asarray(reconstructions), jnp.asarray(test_images)))
        pairs = np.concatenate([test_images[:8], np.clip(reconstructions[:8], -1, 1)], axis=2)  # original | rebuilt
        return {"psnr": psnr, "reconstructions": np.concatenate(list(pairs), axis=0) * 0.5 + 0.5}

    return Stage("vae", init_params, loss_fn, lambda batch: {"image": batch["image"]}, evaluate=evaluate,
                 model_meta={"vae": module.config.to_dict()})


def random_window(images: jax.Array, size: int, rng) -> jax.Array:
    """One random size x size window of a [B, H, W, C] batch (the same place in every image). The VAE is
    convolutional, so it can train on windows of larger images at the cost of the window."""
    top = jax.random.randint(rng, (), 0, images.shape[1] - size + 1)
    left = jax.random.randint(jax.random.fold_in(rng, 1), (), 0, images.shape[2] - size + 1)
    return jax.lax.dynamic_slice(images, (0, top, left, 0), (images.shape[0], size, size, images.shape[3]))


def posterior_means(module: AutoencoderKL, params, images: np.ndarray) -> np.ndarray:
    """The VAE posterior means of `images` ([N, H, W, 3] in [-1, 1]), in batches of 100."""
    encode = latent_encoder(module, params)
    return map_batches(lambda batch: encode(batch)[0], images, 100)


def diffusion_ready_vae(module: AutoencoderKL, params, images: np.ndarray, latent_std: float = 0.0):
    """(module, params) of a trained VAE, with the latent scaling the diffusion stage trains on.

    latent_std > 0: fold a per-channel standardisation into the weights (`standardize_latents`) and
    set scaling_factor = latent_std, so every channel of the diffusion latents has mean 0 and std
    latent_std. Below 1 this lowers the signal-to-noise ratio at every timestep by latent_std**2:
    the "input scaling" of Chen (2023), the SNR shift SD3 applies at high resolution.
    latent_std = 0: only scaling_factor = 1 / std of all elements (Stable Diffusion's 0.18215 rule).
    """
    means = posterior_means(module, params, images)
    if latent_std > 0:
        config, params = standardize_latents(module.config, params, means.mean(axis=(0, 1, 2)),
                                             means.std(axis=(0, 1, 2)))
        config = dataclasses.replace(config, scaling_factor=float(latent_std))
    else:
        config = dataclasses.replace(module.config, scaling_factor=float(1.0 / means.std()))
    return module.clone(config=config), params


# --- the diffusion model ------------------------------------------------------------------------


def make_objective(config, scheduler: schedules.Scheduler) -> losses.Objective:
    """The training objective of config.diffusion on the model's scheduler (rectified flow or a
    noise schedule, by its class)."""
    d = config.diffusion
    flow, weighting = schedules.is_flow(scheduler.class_name), d.get("flow_weighting", "none")
    # Unset: SD3's logit-normal for flow, unless a loss weighting is asked for (diffusers' one
    # --weighting_scheme then draws uniformly); uniform for noise schedules.
    sampling = d.get("timestep_sampling") or ("logit_normal" if flow and weighting == "none" else "uniform")
    return losses.Objective(scheduler.config, min_snr_gamma=d.min_snr_gamma, timestep_sampling=sampling,
                            logit_mean=d.logit_mean, logit_std=d.logit_std, mode_scale=d.get("mode_scale", 1.29),
                            noise_offset=d.noise_offset, flow=flow, flow_weighting=weighting,
                            precondition_outputs=d.get("precondition_outputs", False),
                            guidance=d.get("guidance_scale", 3.5) if flow else None)


def latent_encoder(vae: AutoencoderKL, vae_params):
    """images [B, H, W, 3] in [-1, 1] -> (posterior mean, log-variance), jitted: what `encode_source` needs
    to encode a training set once for a diffusion stage with `cached_latents`."""
    @jax.jit
    def encode(images):
        posterior = vae.apply({"params": vae_params}, images, method="encode")
        return posterior.mean, posterior.logvar

    return encode


def conditioning_inputs(pipe: Pipeline, examples: dict, size: int, empty_tokens: dict) -> dict:
    """The text encoders' inputs for a batch of examples ("caption" and the family's per-example
    fields): {"tokens": the captions' tokens with the family's training conditioning,
    "dropped_tokens": what replaces them where a caption is dropped (the empty prompt's tokens
    with the family's unconditional fields)}. Numpy, on the host."""
    family, batch = pipe.family, len(examples["caption"])
    extra, unconditional = {}, {}
    if family.training_conditioning is not None:
        extra, unconditional = family.training_conditioning(pipe, examples, size, size)
    empty = {k: np.broadcast_to(v, (batch,) + v.shape[1:]) for k, v in empty_tokens.items()}
    return {"tokens": {**family.tokenize(pipe, examples["caption"], warn=False), **extra},
            "dropped_tokens": {**empty, **unconditional}}


def drop_captions(dropped: jax.Array, replacement, conditional):
    """Per example, `replacement` where `dropped` else `conditional` (pytrees of [B, ...] arrays)."""
    return jax.tree.map(lambda r, c: jnp.where(dropped.reshape((-1,) + (1,) * (c.ndim - 1)), r, c),
                        replacement, conditional)


def conditioning_encoder(pipe: Pipeline, size: int, with_dropped: bool = True):
    """examples -> {"conditioning", and with_dropped "dropped_conditioning"}: the frozen text
    encoders' conditioning of a batch (and of its dropped captions), jitted: what
    `encode_conditioning` needs to encode a training set's captions once for a diffusion stage with
    `cached_conditioning`."""
    family = pipe.family
    params = {n: pipe.params[n] for n in family.text_encoder_names if n in pipe.params}
    empty_tokens = family.tokenize(pipe, [""], warn=False)
    encode = jax.jit(lambda params, tokens: family.encode_prompts(pipe.modules, params, tokens))

    def encode_examples(examples):
        inputs = conditioning_inputs(pipe, examples, size, empty_tokens)
        encoded = {"conditioning": encode(params, inputs["tokens"])}
        if with_dropped:
            encoded["dropped_conditioning"] = encode(params, inputs["dropped_tokens"])
        return encoded

    return encode_examples


def diffusion_stage(pipe: Pipeline, objective: losses.Objective, *, latent_size: int, caption_dropout: float,
                    train_text_encoder: bool = True, evaluate=None, cached_latents: bool = False,
                    cached_conditioning: bool = False, model_meta: dict | None = None,
                    lora: lora_training.LoraSpec | None = None, prior_loss_weight: float | None = None,
                    controlnet: bool = False) -> Stage:
    """The family's denoiser (and, with train_text_encoder, its text encoders) learn `objective` on
    noised VAE latents of captioned images.

    pipe: the components; parameters it holds are starting points (fine-tuning), the trained
    components it lacks are initialised. cached_latents: batches carry the VAE posterior
    ("latent_mean", "latent_logvar", from a `LatentSource`) instead of images; the latents drawn from
    it are the same as on the fly. cached_conditioning: batches carry the frozen text encoders'
    output ("conditioning", and "dropped_conditioning" when captions are dropped, from
    `encode_conditioning` with `conditioning_encoder`) instead of captions; the text encoders then
    never reach the devices. Conditioning that is not text (SDXL's time ids) comes from each
    example's fields through the family's `training_conditioning`.

    lora: train LoRA adapters (trainable params {"lora": {component: {path: {"down", "up"}}}}) on
    the targeted layers, every pretrained weight frozen (and sharded like any frozen parameter).

    prior_loss_weight: DreamBooth's prior preservation. Batches hold (instance, class) pairs (a
    `PriorPreservationSource`); the loss is the instance half's mean plus prior_loss_weight times
    the class half's mean, as diffusers' DreamBooth scripts compute it.

    controlnet: train the ControlNet attached to `pipe` (jdiff.control; start it with
    models.controlnet.from_unet) on batches that also carry "control_image" [B, H, W, 3] in [0, 1];
    the U-Net, VAE and text encoders stay frozen, as diffusers' train_controlnet.py does.
    """
    family, modules, vae = pipe.family, pipe.modules, pipe.vae
    text_encoders = tuple(n for n in family.text_encoder_names if n in modules)  # SD3 may have no T5
    trainable = family.text_encoder_names if family.trainable_text_encoders is None else family.trainable_text_encoders
    trainable_text = tuple(n for n in trainable if n in modules)
    if train_text_encoder and not trainable_text:
        raise ConfigError(f"the {family.name} family's text encoders ({', '.join(text_encoders)}) "
                          f"stay frozen in training: set --config.diffusion.train_text_encoder=False.")
    if train_text_encoder and cached_conditioning:
        raise ConfigError("data.cache_text_embeddings needs frozen text encoders: set "
                          "--config.diffusion.train_text_encoder=False or --config.data.cache_text_embeddings=False.")
    if prior_loss_weight is not None and (cached_latents or cached_conditioning):
        raise ConfigError("prior preservation (DreamBooth class images) does not work with data.cache_latents or "
                          "data.cache_text_embeddings yet: set both to False.")
    if lora is not None:
        if train_text_encoder:
            raise ConfigError("LoRA training keeps every pretrained weight frozen: set "
                              "--config.diffusion.train_text_encoder=False (adapt text encoders with lora.text_encoder_targets).")
        if cached_conditioning and any(lora.targets.get(n) for n in text_encoders):
            raise ConfigError("data.cache_text_embeddings cannot be used with LoRA on a text encoder: its "
                              "conditioning changes as it trains.")
        missing = [n for n in (family.denoiser_name,) + text_encoders if n not in pipe.params]
        if missing:
            raise ConfigError(f"LoRA training adapts a pretrained model; {', '.join(missing)} have no weights: "
                              f"set config.pretrained.")
    if controlnet:
        if "controlnet" not in pipe.params or family.denoiser_name != "unet":
            raise ConfigError("ControlNet training needs a U-Net pipeline with a ControlNet attached "
                              "(jdiff.control.load_controlnet, or models.controlnet.from_unet for a new one).")
        if lora is not None or train_text_encoder or prior_loss_weight is not None:
            raise ConfigError("ControlNet training keeps the base model frozen: no LoRA, no text encoder "
                              "training, no prior preservation.")
    trained = ("controlnet",) if controlnet else () if lora is not None else (
        (family.denoiser_name,) + (trainable_text if train_text_encoder else ()))
    frozen_text = [n for n in text_encoders if n not in trained and n not in pipe.params]
    if frozen_text:
        raise ConfigError(f"train_text_encoder=False needs pretrained text encoders ({', '.join(frozen_text)}): "
                          f"set config.pretrained.")
    empty_tokens = family.tokenize(pipe, [""], warn=False)
    latent_shape = (latent_size, latent_size, vae.config.latent_channels)
    size = latent_size * vae.config.downscale  # the training images' resolution (SDXL's target size)

    def init_params(rng):
        if lora is not None:
            return {"lora": lora_training.init_adapter(pipe.params, lora.targets, lora.rank, rng)}
        missing = [n for n in trained if n not in pipe.params]  # none when fine-tuning
        fresh = family.init_params(modules, missing, rng, latent_shape) if missing else {}
        return {n: pipe.params[n] if n in pipe.params else fresh[n] for n in trained}

    def loss_fn(params, frozen, batch, rng):
        latent_rng, drop_rng, t_rng, noise_rng = jax.random.split(rng, 4)
        if cached_latents:
            posterior = DiagonalGaussian(batch["latent_mean"], batch["latent_logvar"])
        else:
            posterior = vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")
        x0 = jax.lax.stop_gradient(scale_latents(vae.config, posterior.sample(latent_rng)))
        # Caption dropout: the model also learns the unconditional prediction guidance needs.
        dropped = jax.random.uniform(drop_rng, (x0.shape[0],)) < caption_dropout
        all_params = {**frozen, **params}
        models = modules
        if lora is not None:  # every adapted layer adds its update (scale 1, the file's alpha)
            adapters = {"lora": lora_training.with_alpha(params["lora"], lora.alpha)}
            models = with_adapters(modules, adapters, jnp.ones((1, 1), jnp.float32))
        if cached_conditioning:  # encoding is per example, so dropping after it equals dropping before
            cond = batch["conditioning"]
            if caption_dropout > 0:
                cond = drop_captions(dropped, batch["dropped_conditioning"], cond)
        else:
            tokens = drop_captions(dropped, batch["dropped_tokens"], batch["tokens"])
            cond = family.encode_prompts(models, all_params, tokens)
        if controlnet:  # one ControlNet at full scale; the control image stays when the caption drops
            batch_size = batch["control_image"].shape[0]
            cond = {**cond, "control": {"images": (batch["control_image"],), "scales": jnp.ones((batch_size, 1)),
                                        "guess_mode": jnp.zeros((batch_size,), bool)}}
        model_fn = family.denoiser(models, all_params, objective.guidance)
        loss, per_example = losses.denoising_loss(objective, lambda x, t: model_fn(x, t, cond), x0, t_rng, noise_rng)
        if prior_loss_weight is None:
            return loss, {}
        prior = batch["prior"]  # 1 for class pictures: tells the halves apart on any number of hosts
        instance_loss = jnp.sum(per_example * (1 - prior)) / jnp.sum(1 - prior)
        prior_loss = jnp.sum(per_example * prior) / jnp.sum(prior)
        return instance_loss + prior_loss_weight * prior_loss, {"instance_loss": instance_loss, "prior_loss": prior_loss}

    def prepare_batch(batch):
        if prior_loss_weight is not None:
            batch = merge_pairs(batch)
            return {"image": batch["image"], "prior": batch["prior"],
                    **conditioning_inputs(pipe, batch, size, empty_tokens)}
        inputs = ("latent_mean", "latent_logvar") if cached_latents else ("image",)
        if controlnet:
            if "control_image" not in batch:
                raise ConfigError("ControlNet training: the batches lack control_image (see app/shapes_control.py).")
            inputs += ("control_image",)
        if cached_conditioning:
            missing = [k for k in ("conditioning",) + (("dropped_conditioning",) if caption_dropout > 0 else ())
                       if k not in batch]
            if missing:
                raise ConfigError(f"cached_conditioning: the batches lack {missing}; encode the source with "
                                  f"encode_conditioning(conditioning_encoder(pipe, size, with_dropped=True), ...).")
            inputs += ("conditioning",) + (("dropped_conditioning",) if caption_dropout > 0 else ())
            return {k: batch[k] for k in inputs}
        return {**{k: batch[k] for k in inputs}, **conditioning_inputs(pipe, batch, size, empty_tokens)}

    frozen = {} if cached_conditioning else {n: pipe.params[n] for n in text_encoders if n not in trained}
    if lora is not None or controlnet:
        frozen[family.denoiser_name] = pipe.params[family.denoiser_name]
    if not cached_latents:
        frozen["vae"] = pipe.params["vae"]
    meta = {n: m.config.to_dict() for n, m in modules.items()}
    meta.update(objective=losses.objective_record(objective), trained=list(trained), **(model_meta or {}))
    if prior_loss_weight is not None:
        meta["prior_loss_weight"] = prior_loss_weight
    if lora is not None:
        meta["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "targets": {k: list(v) for k, v in lora.targets.items()}}
    return Stage("diffusion", init_params, loss_fn, prepare_batch, frozen=frozen, evaluate=evaluate,
                 model_meta=meta)
