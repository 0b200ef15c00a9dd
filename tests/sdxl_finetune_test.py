"""Fine-tuning an SDXL checkpoint with train.py's recipe: the U-Net learns the checkpoint's own
objective with both text encoders frozen and SDXL's micro-conditioning (time ids) made from each
training picture's true size and crop (and, for a refiner, its aesthetic score), and the export is
a StableDiffusionXLPipeline (or Img2Img, refiner) folder that diffusers loads and that draws what
jdiff draws."""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

import jdiff
from jdiff.configs import tiny
from jdiff import losses, schedules
from jdiff.app import recipe, stages
from jdiff.data import ImageFolder, encode_conditioning, encode_source, make_loader
from jdiff.data.image_folder import resized_size
from jdiff.errors import ConfigError
from parity import nchw_to_nhwc, nhwc_to_nchw
from pipeline_test import TOL
from tiny_models import make_tiny_sdxl_pipeline

RESOLUTION = 32  # the tiny SDXL U-Net's 4x4 latents through the factor-8 VAE
# (height, width) of the training pictures: portrait, landscape, odd margins (61 x 50 resizes to
# 39 x 32, whose centre crop starts at row 4: rounded half to even, not floored), one already square.
SIZES = [(40, 48), (64, 32), (45, 77), (32, 32), (96, 50), (33, 60), (50, 50), (61, 50)]


def write_pictures(folder):
    """Captioned random pictures of SIZES, plus a JPEG stored sideways (EXIF orientation 6) and
    large enough that PIL's draft decodes it at a fraction of its size."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red circle" if i % 2 else "circle")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view: the upright picture is 300 high, 120 wide
    Image.fromarray(rng.integers(0, 255, (120, 300, 3), np.uint8)).save(folder / "sideways.jpg", exif=exif)
    (folder / "sideways.txt").write_text("red")
    return folder


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_finetune")
    make_tiny_sdxl_pipeline(root / "base")
    return root / "base", write_pictures(root / "pictures")


def finetune_config(base, pictures, **train):
    config = tiny.get_config()
    config.pretrained = str(base)
    config.stages = "diffusion"
    config.data.update(dataset="folder", folder=str(pictures), resolution=RESOLUTION, caption_dropout=0.0)
    config.diffusion.update(train_text_encoder=False)
    config.diffusion_train.update(steps=2, batch_size=8, learning_rate=0.0, eval_every=100, checkpoint_every=100)
    config.diffusion_train.update(**train)
    config.sample.update(num_prompts=2, steps=2)
    return config


def expected_time_ids(path):
    """diffusers' train_text_to_image_sdxl recipe, by hand: original (height, width) of the upright
    picture, the centre crop's (top, left) after the shorter side is resized, target = resolution."""
    with Image.open(path) as image:
        upright = np.asarray(image.convert("RGB").transpose(Image.Transpose.ROTATE_270)
                             if path.suffix == ".jpg" else image.convert("RGB"))
    height, width = upright.shape[:2]
    # torchvision's Resize(R): the shorter side to R, the longer truncated; CenterCrop rounds half to even
    new_width, new_height = ((RESOLUTION, int(RESOLUTION * height / width)) if width <= height
                             else (int(RESOLUTION * width / height), RESOLUTION))
    assert (new_width, new_height) == resized_size(width, height, RESOLUTION)
    top, left = int(round((new_height - RESOLUTION) / 2)), int(round((new_width - RESOLUTION) / 2))
    return np.array([height, width, top, left, RESOLUTION, RESOLUTION], np.float32), upright, (top, left)


def test_time_ids_come_from_each_pictures_true_size_and_crop(sdxl):
    base, pictures = sdxl
    source = ImageFolder(pictures, RESOLUTION)
    paths = [path for path, _ in source.entries]
    expected = {}
    for i, path in enumerate(paths):
        ids, upright, (top, left) = expected_time_ids(path)
        expected[source.entries[i][0].name] = ids
        example = source[i]
        assert tuple(example["original_size"]) == upright.shape[:2]
        assert tuple(example["crop_top_left"]) == (top, left)
        if path.suffix == ".jpg":  # decoded at half size (draft): its pixels differ from a full decode's
            continue
        # the recorded corner is where the pixels came from: the resized picture cropped there
        resized = Image.fromarray(upright).resize(resized_size(upright.shape[1], upright.shape[0], RESOLUTION),
                                                  Image.Resampling.BICUBIC, reducing_gap=3.0)
        window = np.asarray(resized)[top:top + RESOLUTION, left:left + RESOLUTION]
        np.testing.assert_array_equal(window, example["image"])
    assert expected["sideways.jpg"][:2].tolist() == [300, 120]  # upright, full size (not the JPEG draft)
    assert any(ids[2] > 0 for ids in expected.values()) and any(ids[3] > 0 for ids in expected.values())
    assert expected["7.png"][2] == 4

    # Through the loader (and the latent cache, which keeps the fields) into the stage's batch.
    config = finetune_config(base, pictures)
    pipe = recipe.diffusion_components(config, None, None, None, None)
    objective = stages.make_objective(config, pipe.scheduler)
    latents = encode_source(stages.latent_encoder(pipe.vae, pipe.params["vae"]), source, batch_size=9,
                            show_progress=False)
    for cached, data in ((False, source), (True, latents)):
        stage = stages.diffusion_stage(pipe, objective, latent_size=4, caption_dropout=0.0, train_text_encoder=False,
                                       cached_latents=cached)
        batch = next(iter(make_loader(data, batch_size=len(source), seed=0, shuffle=False)))
        inputs = stage.prepare_batch(batch)
        np.testing.assert_array_equal(inputs["tokens"]["time_ids"], np.stack([expected[p.name] for p in paths]))
        # a dropped caption keeps its picture's time ids; its text becomes zeros (force_zeros_for_empty_prompt)
        np.testing.assert_array_equal(inputs["dropped_tokens"]["time_ids"], inputs["tokens"]["time_ids"])
        assert (inputs["dropped_tokens"]["zero"] == 1).all() and (inputs["tokens"]["zero"] == 0).all()
    # random crops and flips (data.random_crop, data.random_flip): the ids carry each draw's corner
    from jdiff.data.augment import CropAndFlip, Uncropped

    loader = make_loader(Uncropped(source), batch_size=len(source), seed=1, shuffle=False,
                         augment=CropAndFlip(RESOLUTION, random_crop=True, random_flip=True))
    batch = next(iter(loader))
    stage = stages.diffusion_stage(pipe, objective, latent_size=4, caption_dropout=0.0, train_text_encoder=False)
    ids = stage.prepare_batch(batch)["tokens"]["time_ids"]
    np.testing.assert_array_equal(ids[:, 2:4], batch["crop_top_left"])
    np.testing.assert_array_equal(ids[:, :2], np.stack([expected[p.name][:2] for p in paths]))
    assert (ids[:, 2:4] != np.stack([expected[p.name][2:4] for p in paths])).any()


def reference_loss(folder, captions, latents, noise, timesteps, time_ids):
    """diffusers' train_text_to_image_sdxl recipe in PyTorch: both encoders' penultimate hidden
    states concatenated, the second one's projected pooled output, time ids, add_noise, the
    scheduler's target, MSE."""
    noise_scheduler = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    states, pooled = [], None
    with torch.no_grad():
        for suffix, cls in (("", transformers.CLIPTextModel), ("_2", transformers.CLIPTextModelWithProjection)):
            tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer" + suffix)
            encoder = cls.from_pretrained(folder, subfolder="text_encoder" + suffix).eval()
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            output = encoder(ids, output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output[0]  # text_embeds of the projection model, the last one run
        x0, eps = torch.from_numpy(nhwc_to_nchw(latents).copy()), torch.from_numpy(nhwc_to_nchw(noise).copy())
        t = torch.from_numpy(timesteps.copy()).long()
        noisy = noise_scheduler.add_noise(x0, eps, t)
        target = eps if noise_scheduler.config.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, eps, t)
        added = {"time_ids": torch.from_numpy(time_ids), "text_embeds": pooled}
        prediction = unet(noisy, t, torch.cat(states, dim=-1), added_cond_kwargs=added).sample
        return F.mse_loss(prediction.float(), target.float(), reduction="mean").item(), prediction, target


def test_first_step_loss_equals_diffusers_sdxl_training_recipe(sdxl):
    base, pictures = sdxl
    config = finetune_config(base, pictures)
    pipe = recipe.diffusion_components(config, None, None, None, None)
    scheduler = schedules.training_scheduler(pipe.scheduler, dict(config.diffusion.schedule))
    objective = stages.make_objective(config, scheduler)
    source = ImageFolder(pictures, RESOLUTION)
    picked = [1, 2, 4, 8]  # landscape, odd margins, tall, the sideways JPEG
    examples = [source[i] for i in picked]
    captions = [e["caption"] for e in examples]
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((4, 4, 4, 4)).astype(np.float32)  # clean scaled latents, NHWC
    batch = {"latent_mean": latents / pipe.vae.config.scaling_factor,  # (nearly) zero variance: x0 = latents
             "latent_logvar": np.full_like(latents, -30.0), "caption": np.array(captions),
             "original_size": np.stack([e["original_size"] for e in examples]),
             "crop_top_left": np.stack([e["crop_top_left"] for e in examples])}
    key = jax.random.key(7)

    def loss_of(stage, batch):
        params = stage.init_params(jax.random.key(0))
        inputs = jax.tree.map(jnp.asarray, stage.prepare_batch(batch))
        return float(jax.jit(stage.loss_fn)(params, stage.frozen, inputs, key)[0])

    stage = stages.diffusion_stage(pipe, objective, latent_size=4, caption_dropout=0.0, train_text_encoder=False,
                                   cached_latents=True)
    loss = loss_of(stage, batch)

    _, _, t_key, noise_key = jax.random.split(key, 4)  # the stage's (latent, dropout, timestep, noise) keys
    timesteps = np.asarray(losses.sample_timesteps(t_key, 4, scheduler.config.num_train_timesteps))
    noise = np.asarray(losses.sample_noise(noise_key, latents.shape))
    time_ids = np.stack([expected_time_ids(source.entries[i][0])[0] for i in picked])
    reference, prediction, target = reference_loss(base, captions, latents, noise, timesteps, time_ids)
    assert scheduler.config.prediction_type == "epsilon"
    assert loss == pytest.approx(reference, rel=1e-4)
    # the time ids matter: the generate()-style defaults (original = target, no crop) give another loss
    default_ids = np.tile(np.array([RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION], np.float32), (4, 1))
    other, _, _ = reference_loss(base, captions, latents, noise, timesteps, default_ids)
    assert abs(other - reference) > 1e-3 * reference

    # Conditioning encoded once before training gives the same loss, dropped captions included (their
    # conditioning is cached beside it); the text encoders stay off the devices.
    for dropout in (0.5,):
        live = stages.diffusion_stage(pipe, objective, latent_size=4, caption_dropout=dropout,
                                      train_text_encoder=False, cached_latents=True)
        cached = stages.diffusion_stage(pipe, objective, latent_size=4, caption_dropout=dropout,
                                        train_text_encoder=False, cached_latents=True, cached_conditioning=True)
        assert cached.frozen == {}
        encoder = stages.conditioning_encoder(pipe, RESOLUTION, with_dropped=dropout > 0)
        with_text = encode_conditioning(encoder, [{k: v[i] for k, v in batch.items()} for i in range(4)],
                                        batch_size=3, show_progress=False)
        cached_batch = {**batch, **{k: np.stack([with_text[i][k] for i in range(4)])
                                    for k in ("latent_mean", "latent_logvar")},
                        **jax.tree.map(lambda *rows: np.stack(rows),
                                       *[{k: with_text[i][k] for k in with_text.computed} for i in range(4)])}
        assert loss_of(cached, cached_batch) == pytest.approx(loss_of(live, batch), rel=1e-5)
    assert (with_text.computed["dropped_conditioning"]["context"] == 0).all()  # force_zeros_for_empty_prompt
    dropped = jax.random.uniform(jax.random.split(key, 4)[1], (4,)) < 0.5
    assert 0 < int(dropped.sum()) < 4  # the dropout case really mixed dropped and kept captions


def test_fine_tuned_sdxl_export_loads_in_diffusers_and_draws_the_same(sdxl, tmp_path, one_device):
    base, pictures = sdxl
    config = finetune_config(base, pictures, steps=3, learning_rate=1e-3, warmup_steps=1)
    # latents encoded once, each picture cropped and flipped once at random
    config.data.update(caption_dropout=0.2, cache_text_embeddings=True, random_crop=True, random_flip=True)
    config.diffusion_train.mesh.update(data=4, fsdp=2)  # the train state sharded as for SD1.x
    recipe.run(config, tmp_path / "run")
    tuned = jdiff.load_pipeline(tmp_path / "run")
    original = jdiff.load_pipeline(base)
    assert tuned.family is original.family and tuned.settings == original.settings
    assert tuned.scheduler.config == original.scheduler.config
    changed = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                           tuned.params["unet"], original.params["unet"])
    assert max(jax.tree.leaves(changed)) > 1e-4  # the U-Net trained
    for name in ("text_encoder", "text_encoder_2", "vae"):  # and nothing else did
        jax.tree.map(np.testing.assert_array_equal, tuned.params[name], original.params[name])

    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    prompts = ["a red circle", "circle"]
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = reference(prompts, latents=latents, num_inference_steps=3, guidance_scale=5.0,
                         output_type="np").images
    ours = jdiff.generate(tuned, prompts, steps=3, guidance=5.0, latents=nchw_to_nhwc(latents), mesh=one_device)
    before = jdiff.generate(original, prompts, steps=3, guidance=5.0, latents=nchw_to_nhwc(latents),
                            mesh=one_device)
    assert expected.std() > 0.02
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    assert np.abs(ours - before).max() > 2 * TOL  # and the trained model draws differently


def test_learning_rate_zero_exports_the_input_checkpoint(sdxl, tmp_path):
    base, pictures = sdxl
    config = finetune_config(base, pictures, num_devices=1)  # one device: the cheapest run
    config.data.update(cache_latents=False, random_crop=True, random_flip=True)  # each batch cropped afresh
    recipe.run(config, tmp_path / "run")
    tuned, original = jdiff.load_pipeline(tmp_path / "run"), jdiff.load_pipeline(base)
    assert tuned.pipeline_class == "StableDiffusionXLPipeline" and tuned.settings == original.settings
    assert tuned.scheduler.config == original.scheduler.config
    jax.tree.map(np.testing.assert_array_equal, tuned.params, original.params)


@pytest.fixture(scope="module")
def refiner(sdxl, tmp_path_factory):
    """A tiny refiner, and the pictures again with a metadata.jsonl that scores each one."""
    root = tmp_path_factory.mktemp("sdxl_refiner_finetune")
    make_tiny_sdxl_pipeline(root / "refiner", refiner=True, seed=20)
    _, pictures = sdxl
    scored = root / "scored"
    scored.mkdir()
    lines = []
    for i, path in enumerate(sorted(p for p in pictures.iterdir() if p.suffix != ".txt")):
        (scored / path.name).write_bytes(path.read_bytes())
        lines.append(json.dumps({"file_name": path.name, "text": "a red circle" if i % 2 else "circle",
                                 "aesthetic_score": 3.0 + i / 2}))
    (scored / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root / "refiner", scored


def test_refiner_time_ids_carry_each_pictures_aesthetic_score(refiner, tmp_path):
    folder, scored = refiner
    config = finetune_config(folder, scored)
    pipe = recipe.diffusion_components(config, None, None, None, None)
    source = ImageFolder(scored, RESOLUTION)
    stage = stages.diffusion_stage(pipe, stages.make_objective(config, pipe.scheduler), latent_size=4,
                                   caption_dropout=0.0, train_text_encoder=False)
    batch = next(iter(make_loader(source, batch_size=len(source), seed=0, shuffle=False)))
    ids = stage.prepare_batch(batch)["tokens"]["time_ids"]
    expected = [np.concatenate([expected_time_ids(path)[0][:4], [score]])
                for (path, _), score in zip(source.entries, source.scores)]
    np.testing.assert_array_equal(ids, np.stack(expected))
    # without scores, the refiner pipeline's default 6.0
    unscored = stage.prepare_batch({k: v for k, v in batch.items() if k != "aesthetic_score"})
    assert (unscored["tokens"]["time_ids"][:, 4] == 6.0).all()
    # a score on some lines only, or not a number, is refused by name
    lines = (scored / "metadata.jsonl").read_text().splitlines()
    (tmp_path / "some").mkdir()
    for line in lines:
        record = json.loads(line)
        (tmp_path / "some" / record["file_name"]).write_bytes((scored / record["file_name"]).read_bytes())
    partial = [lines[0], json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "aesthetic_score"})]
    (tmp_path / "some" / "metadata.jsonl").write_text("\n".join(partial))
    with pytest.raises(ConfigError, match="1 of 2 lines give 'aesthetic_score'"):
        ImageFolder(tmp_path / "some", RESOLUTION)
    wrong = json.dumps({**json.loads(lines[0]), "aesthetic_score": "high"})
    (tmp_path / "some" / "metadata.jsonl").write_text(wrong)
    with pytest.raises(ConfigError, match="line 1: 'aesthetic_score' must be a number"):
        ImageFolder(tmp_path / "some", RESOLUTION)


def test_fine_tuned_refiner_loads_in_diffusers_and_refines_the_same(refiner, tmp_path, one_device):
    folder, scored = refiner
    config = finetune_config(folder, scored, steps=3, learning_rate=1e-3, warmup_steps=1, num_devices=1)
    recipe.run(config, tmp_path / "run")
    tuned, original = jdiff.load_pipeline(tmp_path / "run"), jdiff.load_pipeline(folder)
    assert tuned.pipeline_class == "StableDiffusionXLImg2ImgPipeline" and tuned.settings == original.settings
    changed = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                           tuned.params["unet"], original.params["unet"])
    assert max(jax.tree.leaves(changed)) > 1e-4
    reference = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle", "circle"]
    kw = dict(num_inference_steps=4, denoising_start=0.5, aesthetic_score=4.5, guidance_scale=5.0)
    expected = reference(prompts, image=latents, output_type="np", **kw).images
    ours = jdiff.generate(tuned, prompts, init_latents=nchw_to_nhwc(latents), steps=4, denoising_start=0.5,
                          aesthetic_score=4.5, guidance=5.0, mesh=one_device)
    assert expected.std() > 0.02
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_sdxl_lora_trained_with_remat_loads_in_diffusers_and_draws_the_same(sdxl, tmp_path, one_device):
    """A LoRA on the U-Net's attention and both text encoders, trained with config.remat (which a
    loaded checkpoint's models now honour); diffusers' load_lora_weights draws the export as jdiff."""
    base, pictures = sdxl
    config = finetune_config(base, pictures, steps=3, learning_rate=3e-2, warmup_steps=0, num_devices=1)
    config.remat = True
    config.lora.update(rank=4, alpha=2.0, text_encoder_targets=("q_proj", "v_proj"))
    components = recipe.diffusion_components(config, None, None, None, None)
    assert components.unet.gradient_checkpointing and components.text_encoder_2.gradient_checkpointing
    recipe.run(config, tmp_path / "run")
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(base)
    reference.load_lora_weights(str(tmp_path / "run" / "lora"))
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle", "circle"]
    expected = reference(prompts, latents=latents, num_inference_steps=3, guidance_scale=5.0, output_type="np").images
    pipe = jdiff.load_pipeline(base)
    adapted = jdiff.load_lora_weights(pipe, tmp_path / "run" / "lora")
    assert set(adapted.adapters["default_0"]) == {"unet", "text_encoder", "text_encoder_2"}
    ours = jdiff.generate(adapted, prompts, steps=3, guidance=5.0, latents=nchw_to_nhwc(latents), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    plain = jdiff.generate(pipe, prompts, steps=3, guidance=5.0, latents=nchw_to_nhwc(latents), mesh=one_device)
    assert np.abs(plain - ours).max() > 2 * TOL  # training moved the model


def test_random_crops_are_refused_where_they_cannot_apply(sdxl, tmp_path):
    base, pictures = sdxl
    config = finetune_config(base, pictures)
    config.data.update(random_flip=True, dataset="shapes")
    with pytest.raises(ConfigError, match="random_flip are for folder data"):
        recipe.run(config, tmp_path / "shapes")
    config = finetune_config(base, pictures)
    config.data.random_crop = True
    config.stages = "diffusion,controlnet"
    with pytest.raises(ConfigError, match="do not apply to the controlnet stage"):
        recipe.run(config, tmp_path / "controlnet")
    assert not (tmp_path / "controlnet" / "diffusion").exists()  # refused before any work


def test_training_sdxl_text_encoders_is_refused_by_name(sdxl, tmp_path):
    base, pictures = sdxl
    config = finetune_config(base, pictures)
    config.diffusion.train_text_encoder = True
    with pytest.raises(ConfigError, match="stable-diffusion-xl.*text_encoder_2.*train_text_encoder=False"):
        recipe.run(config, tmp_path / "refused")
