"""The default run: both stages on the embedded captioned-shapes set, sized for a 2-core CPU.

    python train.py                                   # this config, workdir ./workdir/shapes
    python train.py --config.diffusion_train.steps=500 --config.data.resolution=64
    python train.py --config.pretrained=path/to/sd15 --config.stages=diffusion   # fine-tune its own objective
"""

import ml_collections
from ml_collections.config_dict import placeholder


def train_section(**overrides) -> ml_collections.ConfigDict:
    """Optimiser, schedule, checkpoint and logging settings of one stage."""
    section = ml_collections.ConfigDict(dict(
        steps=2000,
        run_steps=0,  # stop this invocation after this many steps (0 = run to `steps`); a rerun resumes
        batch_size=32,  # global, over all devices and hosts
        learning_rate=2e-4,
        warmup_steps=100,
        final_lr_fraction=0.1,  # cosine decay ends at this fraction of the peak
        weight_decay=0.0,
        adam_b1=0.9,
        adam_b2=0.999,
        adam_eps=1e-8,
        grad_clip=1.0,
        grad_accum_steps=1,
        ema_decay=0.999,
        log_every=50,
        checkpoint_every=500,
        keep_checkpoints=3,
        async_checkpoints=True,
        eval_every=1000,
        seed=0,
        num_devices=0,  # 0 = every device of every process
        # Device mesh: the batch is split over data x fsdp; fsdp also shards parameters, optimizer
        # state and EMA; tensor splits attention heads and MLP units. One size may be -1 (the rest).
        mesh=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
    ))
    section.update(overrides)
    return section


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stages = "vae,diffusion"  # run in this order; a finished stage is skipped on a rerun
    config.dtype = "float32"  # compute dtype: bfloat16 on accelerators
    # Recompute activations in the backward pass (less memory, more time). On CPU, train.py then also
    # switches XLA to its memory-optimised scheduler, without which remat saves nothing there.
    config.remat = False

    config.data = ml_collections.ConfigDict(dict(
        dataset="shapes",  # "shapes" (embedded, generated) or "folder" (images + captions)
        folder="",  # for dataset="folder"
        control_column="conditioning_image",  # folder data, controlnet stage: metadata.jsonl's control image key
        data_dir="",  # where the shapes set is built; default <workdir>/data
        resolution=32,
        num_train=10_000,
        num_test=1_000,
        caption_dropout=0.1,  # drop captions this often, so the model learns classifier-free guidance
        # The diffusion stage encodes every training image once with the frozen VAE and keeps the
        # posteriors in memory (8 bytes per latent element per image; every process holds them all).
        # False: encode each batch as it comes (sets too large for memory).
        cache_latents=True,
        # With frozen text encoders (diffusion.train_text_encoder=False): encode every caption once
        # before the diffusion stage and keep the conditioning in memory (for SDXL 77 x 2048 + 1280
        # floats per image, twice that when captions are dropped, since the dropped conditioning is
        # stored too); the text encoders then never reach the devices.
        cache_text_embeddings=False,
        # Folder data, diffusion stage: crop each picture (its shorter side scaled to the resolution)
        # at a random place instead of the centre, and flip half of them, as diffusers' training
        # scripts without --center_crop and with --random_flip. With cache_latents each picture's crop
        # and flip are drawn once (from the seed); without, every epoch draws afresh.
        random_crop=False,
        random_flip=False,
    ))

    # Stage 1: the autoencoder (factor 2: 32x32x3 images <-> 16x16x4 latents; at factor 4 a small
    # object is one latent pixel and a CPU-sized VAE blurs shapes into blobs).
    # Sized by measured step times on a 2-core CPU: about 0.1 s per VAE step, 0.3 s per U-Net step.
    config.vae = ml_collections.ConfigDict(dict(
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        mid_block_add_attention=False,
        # > 0: fold a per-channel standardisation into the VAE after training and scale the diffusion
        # latents to this std (stages.diffusion_ready_vae); 0: one global 1/std scale (SD's rule).
        latent_std=0.0,
        # > 0: train on one random train_crop x train_crop window per batch (the VAE is convolutional;
        # larger images at the cost of the window). 64 px images, a factor-4 VAE (16, 32, 64) and
        # 32 px windows: the detector reads 99% of its reconstructions' shapes, but the U-Net then drew
        # circles and squares alike (held-out shape 0.61, colour 0.84), so the default stays 32 px.
        train_crop=0))
    # Batch 16 for 1400 steps rather than 32 for 700 (same images, same time): test PSNR 32.5 vs
    # 30.7 dB, and the detector reads the shape of 82% of reconstructed test objects vs 68%. A blurry
    # VAE caps the shape accuracy of everything decoded through it.
    config.vae_train = train_section(steps=1400, batch_size=16, learning_rate=1e-3, eval_every=700)
    # L2 rather than L1: objects cover a few percent of the pixels, and L1's median-seeking
    # reconstructions settle on the background first.
    config.vae_loss = ml_collections.ConfigDict(dict(reconstruction="l2", kl_weight=1e-6))

    # Stage 2: text encoder (from scratch, on a tokenizer of the captions' words) and U-Net.
    config.text = ml_collections.ConfigDict(dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, max_length=32))
    # Cross-attention only (no self-attention over the 256 latent pixels) and two heads: on a CPU the
    # transformer blocks otherwise cost three times the convolutions.
    config.unet = ml_collections.ConfigDict(dict(
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2, norm_num_groups=8,
        only_cross_attention=True,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    # 6000 steps: whole-scene adherence (guidance 4, mean / worst of seeds 0-2) 0.865 / 0.84 at 4000
    # steps, 0.907 / 0.885 at 6000; two-object scenes 0.792 / 0.748 -> 0.860 / 0.845
    # (bench/results/shapes_{default,6000_steps}_runs.json). About 25 of the run's ~29 CPU minutes
    # (~0.25 s per step under huge pages, jdiff/app/huge_pages.py); steps=4000 is the ~20-minute run.
    config.diffusion_train = train_section(steps=6000, batch_size=32, learning_rate=1e-3, eval_every=1000)
    # v-prediction with plain MSE weighs the x0 error by SNR + 1 >= 1, so the high-noise steps, where
    # colour, shape and place are decided and only the prompt can tell them, carry full weight; with
    # epsilon or min-SNR weighting their x0 weight is the SNR (~0.03 at t=850). Measured at 1200 steps
    # from scratch: held-out colour 0.83 and position 0.93 with v/MSE against chance (0.23 / 0.27)
    # with epsilon + min-SNR 5, at the same cost. config.scheduler is the scheduler of a model built
    # from this config (like config.unet, unused with config.pretrained, whose checkpoint brings its
    # own): what it is trained with and what its export ships.
    config.scheduler = ml_collections.ConfigDict(dict(
        prediction_type="v_prediction",  # or "epsilon"
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000))
    config.diffusion = ml_collections.ConfigDict(dict(
        min_snr_gamma=0.0,  # 0 = plain MSE
        # Which timesteps training visits (jdiff.losses.sample_unit): "uniform", "logit_normal"
        # (sigmoid(N(logit_mean, logit_std)): fewer at the two ends) or "mode" (SD3's, mode_scale).
        # Unset: "uniform" for noise schedules; for rectified flow "logit_normal" (the SD3 paper's and
        # diffusers' SD3 scripts' default; its Flux scripts draw uniformly), or "uniform" when
        # flow_weighting is set (as diffusers' single --weighting_scheme option does).
        timestep_sampling=placeholder(str), logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
        noise_offset=0.0,
        # Rectified flow only: loss weights "none", "sigma_sqrt" or "cosmap", and the SD3 script's
        # precondition_outputs (compare noisy - sigma * output with the clean latents).
        flow_weighting="none", precondition_outputs=False,
        guidance_scale=3.5,  # given to a denoiser that embeds the guidance scale (Flux-dev)
        train_text_encoder=True,  # False: keep a pretrained text encoder frozen
        # The schedule is the model's own (config.scheduler, or a pretrained checkpoint's scheduler);
        # a field set here overrides it and the export records it. Unset = the model's own.
        schedule=ml_collections.ConfigDict({
            "prediction_type": placeholder(str), "beta_schedule": placeholder(str),
            "beta_start": placeholder(float), "beta_end": placeholder(float),
            "num_train_timesteps": placeholder(int), "timestep_spacing": placeholder(str),
            "rescale_betas_zero_snr": placeholder(bool), "shift": placeholder(float)}),
        change_prediction_type=False,  # True: allow schedule.prediction_type to differ from the model's
    ))
    config.family = "stable-diffusion"  # the model family built from config.vae/.text/.unet (jdiff.families)
    config.pretrained = ""  # a diffusers folder to fine-tune (its VAE, tokenizer, text encoder, U-Net)
    # LoRA instead of full fine-tuning (with config.pretrained): rank > 0 trains adapters on the
    # targeted layers (PEFT's target_modules rule), every pretrained weight frozen; the export is
    # <workdir>/lora/pytorch_lora_weights.safetensors (sample.py --model PRETRAINED --lora WORKDIR/lora).
    config.lora = ml_collections.ConfigDict(dict(
        rank=0, alpha=0.0,  # alpha 0 = the rank (scale 1), as diffusers' LoRA scripts
        unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
        text_encoder_targets=(),  # e.g. ("q_proj", "k_proj", "v_proj", "out_proj"): every text encoder
    ))
    # DreamBooth (with config.pretrained and data.dataset="folder"): every picture of data.folder
    # under instance_prompt; with class_prompt, prior preservation on num_class_images pictures the
    # base model draws first into class_folder (default <workdir>/class_images), their loss
    # weighted by prior_loss_weight. Works with full fine-tuning and with config.lora.
    config.dreambooth = ml_collections.ConfigDict(dict(
        instance_prompt="", class_prompt="", class_folder="", num_class_images=100, prior_loss_weight=1.0))

    # The "controlnet" stage (after "diffusion", or alone on <workdir>/pipeline or config.pretrained): a
    # ControlNet trained on a frozen model, exported to <workdir>/controlnet/export.
    # - shapes data: each example's object outlines are its control image (where, how big, what
    #   shape; the caption still says the colour); then controlnet_evaluation.json: box IoU,
    #   controlled cell, colour and shape of generated objects on held-out scenes, with and without it.
    # - folder data: each picture's control image is named in metadata.jsonl under data.control_column;
    #   then <workdir>/controlnet/samples.png draws num_samples of them.
    # conditioning_embedding_out_channels: one width per halving of the control image to the latent
    # size, plus one; empty: diffusers' (16, 32, 96, 256) cut to the VAE's factor. init: a diffusers
    # ControlNet folder to continue training instead of a new one copied from the U-Net.
    config.controlnet = ml_collections.ConfigDict(dict(
        conditioning_embedding_out_channels=(), init="", num_prompts=200, num_samples=8, guidance=4.0))
    config.controlnet_train = train_section(steps=2000, batch_size=32, learning_rate=5e-4, eval_every=100_000)

    # The "reward" stage (shapes data; after "diffusion", or alone on <workdir>/pipeline): DRaFT-K reward
    # fine-tuning (jdiff/app/reward_finetuning.py) of the trained U-Net (lora_rank > 0: LoRA adapters on
    # config.lora.unet_targets instead) against jdiff/app/shapes_reward.py's soft colour-per-cell reward:
    # pictures sampled from training captions (steps of sampler, guidance), gradients through the last
    # grad_steps steps. Exports <workdir>/reward/export (or reward/lora) and writes reward_evaluation.json:
    # whole-scene adherence of num_prompts held-out captions before and after, judged by the detector.
    config.reward = ml_collections.ConfigDict(dict(
        sampler="dpm++2m", steps=10, grad_steps=1, guidance=4.0, lora_rank=0,
        num_prompts=200, eval_guidance=4.0, eval_seed=100_000))
    config.reward_train = train_section(steps=150, batch_size=8, learning_rate=1e-5, warmup_steps=20,
                                        ema_decay=0.99, checkpoint_every=100, eval_every=100_000)

    # The "consistency" stage (shapes data; after "diffusion", or alone on <workdir>/pipeline): latent
    # consistency distillation (jdiff/app/consistency_distillation.py) of the trained U-Net into a student
    # that takes the guidance scale through time_cond_proj_dim (LCM checkpoints' layout) and draws in 1-4
    # LCM steps. Exports <workdir>/consistency/export (an LCMScheduler pipeline) and writes
    # consistency_evaluation.json: whole-scene adherence at eval_steps student steps and the teacher's.
    config.consistency = ml_collections.ConfigDict(dict(
        time_cond_proj_dim=256, guidance_range=(2.0, 6.0), huber_c=0.001,
        num_prompts=200, eval_guidance=4.0, eval_steps=(1, 2, 4), eval_seed=100_000))
    # ema_decay: the target network's (LCM's 0.95); the export is the online student
    config.consistency_train = train_section(steps=300, batch_size=32, learning_rate=5e-5, warmup_steps=50,
                                             ema_decay=0.95, eval_every=100_000)

    # The "noise" stage (shapes data; after "diffusion", or alone on <workdir>/pipeline): optimises the
    # starting noise of num_prompts held-out captions for shapes_reward's reward, the model fixed
    # (jdiff/app/noise_stage.py): batches of batch_size, `iterations` Adam steps each through every one
    # of `steps` sampler steps; prompt i starts from seed + i. Writes <workdir>/noise/ (the optimised
    # noise per batch, resumable; the pictures) and noise_evaluation.json (the detector, before and after).
    # Each batch is split over num_devices devices (0 = all; the batch must divide by their number).
    config.noise = ml_collections.ConfigDict(dict(
        num_prompts=200, batch_size=20, iterations=10, learning_rate=0.05, prior_weight=1.0,
        sampler="dpm++2m", steps=10, guidance=4.0, seed=100_000, num_devices=0))

    # After training: a sample grid of held-out prompts and the prompt-adherence evaluation.
    config.sample = ml_collections.ConfigDict(dict(sampler="dpm++2m", steps=25, guidance=4.0, num_prompts=16))
    config.evaluate = ml_collections.ConfigDict(dict(num_prompts=200, batch_size=50, guidances=(1.0, 4.0)))
    return config
