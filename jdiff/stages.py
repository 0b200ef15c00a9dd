"""The two training stages of latent diffusion, as `train_lib.Stage`s: the VAE on images, then the
U-Net (and a text encoder trained from scratch, or a frozen pretrained one) on the frozen VAE's
latents. Models are built from the run config; everything here is a pure function of its inputs.
"""

import dataclasses

import numpy as np
import jax
import jax.numpy as jnp

from jdiff import losses
from jdiff.errors import ConfigError
from jdiff.models.text import CLIPTextConfig, CLIPTextModel
from jdiff.models.unet import UNet2DConditionModel, UNetConfig
from jdiff.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, scale_latents, standardize_latents
from jdiff.schedules import SchedulerConfig, train_alphas_cumprod
from jdiff.train_lib import Stage


def compute_dtype(config):
    return jnp.dtype(config.dtype)


# --- the VAE ------------------------------------------------------------------------------------


def vae_config(config) -> VAEConfig:
    n = len(config.vae.block_out_channels)
    return VAEConfig(
        block_out_channels=tuple(config.vae.block_out_channels), down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=config.vae.layers_per_block,
        latent_channels=config.vae.latent_channels, norm_num_groups=config.vae.norm_num_groups,
        sample_size=config.data.resolution, mid_block_add_attention=config.vae.mid_block_add_attention)


def vae_module(config) -> AutoencoderKL:
    return AutoencoderKL(vae_config(config), dtype=compute_dtype(config), gradient_checkpointing=config.remat)


def vae_stage(config, test_images: np.ndarray, module: AutoencoderKL | None = None) -> Stage:
    """test_images: float32 [N, R, R, 3] in [-1, 1] for the PSNR evaluation."""
    module = module or vae_module(config)
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
        chunks = [np.asarray(reconstruct(params, test_images[i:i + 100])) for i in range(0, len(test_images), 100)]
        reconstructions = np.concatenate(chunks)
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
    return np.concatenate([np.asarray(encode(images[i:i + 100])[0]) for i in range(0, len(images), 100)])


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


def scheduler_config(config) -> SchedulerConfig:
    d = config.diffusion
    return SchedulerConfig(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                           beta_schedule=d.beta_schedule, prediction_type=d.prediction_type, clip_sample=False,
                           set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def text_config(config, tokenizer) -> CLIPTextConfig:
    t = config.text
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                          num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                          max_position_embeddings=t.max_length, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          projection_dim=t.hidden_size)


def unet_config(config, vae: VAEConfig, cross_attention_dim: int) -> UNetConfig:
    u = config.unet
    return UNetConfig(
        sample_size=config.data.resolution // vae.downscale, in_channels=vae.latent_channels,
        out_channels=vae.latent_channels, block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block, attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups, down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types), cross_attention_dim=cross_attention_dim,
        only_cross_attention=u.get("only_cross_attention", False))


def token_ids(tokenizer, captions) -> np.ndarray:
    return tokenizer([str(c) for c in captions], padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="np").input_ids.astype(np.int32)


def latent_encoder(vae: AutoencoderKL, vae_params):
    """images [B, H, W, 3] in [-1, 1] -> (posterior mean, log-variance), jitted: what `encode_source` needs
    to encode a training set once for a diffusion stage with `cached_latents`."""
    @jax.jit
    def encode(images):
        posterior = vae.apply({"params": vae_params}, images, method="encode")
        return posterior.mean, posterior.logvar

    return encode


def diffusion_stage(config, *, unet: UNet2DConditionModel, text: CLIPTextModel, vae: AutoencoderKL, vae_params,
                    tokenizer, text_params=None, unet_params=None, evaluate=None, cached_latents: bool = False) -> Stage:
    """The U-Net (and, if config.diffusion.train_text_encoder, the text encoder) learn to predict
    the noise (or v) of noised VAE latents of captioned images.

    text_params / unet_params: pretrained starting points (fine-tuning); None = initialise.
    cached_latents: batches carry the VAE posterior ("latent_mean", "latent_logvar", from a
    `LatentSource`) instead of images; the latents drawn from it are the same as on the fly.
    """
    d = config.diffusion
    losses.check_timestep_sampling(d.timestep_sampling, d.logit_std)
    train_text = d.train_text_encoder
    alphas_cumprod = jnp.asarray(train_alphas_cumprod(scheduler_config(config)))
    empty_ids = jnp.asarray(token_ids(tokenizer, [""])[0])
    latent_size = config.data.resolution // vae.config.downscale
    max_length = tokenizer.model_max_length

    def init_params(rng):
        unet_rng, text_rng = jax.random.split(rng)
        params = {"unet": unet_params if unet_params is not None else unet.init(
            unet_rng, jnp.zeros((1, latent_size, latent_size, vae.config.latent_channels)), jnp.zeros((1,)),
            jnp.zeros((1, max_length, text.config.hidden_size)))["params"]}
        if train_text:
            params["text_encoder"] = text_params if text_params is not None else text.init(
                text_rng, jnp.zeros((1, max_length), jnp.int32))["params"]
        return params

    def loss_fn(params, frozen, batch, rng):
        latent_rng, drop_rng, t_rng, noise_rng = jax.random.split(rng, 4)
        if cached_latents:
            posterior = DiagonalGaussian(batch["latent_mean"], batch["latent_logvar"])
        else:
            posterior = vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")
        x0 = jax.lax.stop_gradient(scale_latents(vae.config, posterior.sample(latent_rng)))
        batch_size = x0.shape[0]
        # Caption dropout: the model also learns the unconditional prediction guidance needs.
        dropped = jax.random.uniform(drop_rng, (batch_size,)) < config.data.caption_dropout
        ids = jnp.where(dropped[:, None], empty_ids[None, :], batch["ids"])
        text_params_ = params["text_encoder"] if train_text else frozen["text_encoder"]
        context = text.apply({"params": text_params_}, ids).last_hidden_state
        timesteps = losses.sample_timesteps(t_rng, batch_size, d.num_train_timesteps, d.timestep_sampling,
                                            d.logit_mean, d.logit_std)
        noise = losses.sample_noise(noise_rng, x0.shape, d.noise_offset)
        noisy = losses.add_noise(x0, noise, timesteps, alphas_cumprod)
        output = unet.apply({"params": params["unet"]}, noisy, timesteps, context)
        loss, _ = losses.diffusion_loss(output, x0, noise, timesteps, alphas_cumprod,
                                        prediction_type=d.prediction_type, min_snr_gamma=d.min_snr_gamma)
        return loss, {}

    def prepare_batch(batch):
        inputs = ("latent_mean", "latent_logvar") if cached_latents else ("image",)
        return {**{k: batch[k] for k in inputs}, "ids": token_ids(tokenizer, batch["caption"])}

    frozen = {} if cached_latents else {"vae": vae_params}
    if not train_text:
        frozen["text_encoder"] = text_params
    meta = {"unet": unet.config.to_dict(), "text_encoder": text.config.to_dict(), "vae": vae.config.to_dict(),
            "diffusion": dict(d), "train_text_encoder": train_text}
    return Stage("diffusion", init_params, loss_fn, prepare_batch, frozen=frozen, evaluate=evaluate,
                 model_meta=meta)
