"""SDXL through generate() against diffusers' SDXL pipelines on the same random weights and noise:
text-to-image with its micro-conditioning, image-to-image, inpainting, and the base-to-refiner
hand-off, for the checkpoint's scheduler (Euler, as SDXL ships) and DPM-Solver++ 2M."""

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jdiff
from jdiff.errors import CheckpointError, ConfigError
from parity import nchw_to_nhwc
from pipeline_test import TOL, init_image_and_mask, patch_reference_noise
from tiny_models import make_tiny_sd_pipeline, make_tiny_sdxl_pipeline

PROMPTS = ["a red circle", "circle"]
XL = "diffusers.pipelines.stable_diffusion_xl."


@pytest.fixture(scope="module")
def base(tiny_sdxl_folder):
    folder = tiny_sdxl_folder
    return folder, diffusers.StableDiffusionXLPipeline.from_pretrained(folder), jdiff.load_pipeline(folder)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sdxl_refiner")
    return folder, make_tiny_sdxl_pipeline(folder, refiner=True, seed=20), jdiff.load_pipeline(folder)


def noise(seed, batch=2):
    return torch.randn(batch, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


def scheduled(reference, sampler):
    """The reference with the scheduler behind jdiff's sampler name (None: the checkpoint's own,
    Euler; the fixtures are shared, so every call sets it)."""
    cls = diffusers.DPMSolverMultistepScheduler if sampler == "dpm++2m" else diffusers.EulerDiscreteScheduler
    reference.scheduler = cls.from_config(reference.scheduler.config)
    return reference


def test_loads_base_and_refiner_as_sdxl(base, refiner):
    assert base[2].family is refiner[2].family is jdiff.FAMILIES["stable-diffusion-xl"]
    assert set(base[2].modules) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert set(refiner[2].modules) == {"unet", "vae", "text_encoder_2"}  # the refiner has one encoder
    assert refiner[2].settings == {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}
    assert jdiff.checkpoint_sampling(base[2]) == ("euler", 50)
    # force_upcast: in bfloat16 the VAE still computes in float32, the rest in bfloat16
    half = jdiff.load_pipeline(base[0], dtype=jnp.bfloat16)
    assert half.vae.dtype == jnp.float32 and half.unet.dtype == half.text_encoder_2.dtype == jnp.bfloat16


@pytest.mark.parametrize("sampler", [None, "dpm++2m"])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_text_to_image_matches_diffusers(base, sampler, guidance, one_device):
    """Guidance 5 without a negative prompt: the checkpoint's force_zeros_for_empty_prompt makes the
    unconditional half's embeddings zeros, not the empty prompt's."""
    folder, reference, pipe = base
    latents = noise(0)
    expected = scheduled(reference, sampler)(PROMPTS, latents=latents, num_inference_steps=4,
                                             guidance_scale=guidance, output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, sampler=sampler, steps=4, guidance=guidance,
                          latents=nchw_to_nhwc(latents), mesh=one_device)
    assert ours.shape == expected.shape == (2, 32, 32, 3)
    assert 0.02 < expected.std()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_micro_conditioning_and_negative_prompts_match_diffusers(base, one_device):
    folder, reference, pipe = base
    latents = noise(1)
    kw = dict(original_size=(640, 480), crops_coords_top_left=(40, 0), target_size=(320, 400))
    expected = scheduled(reference, None)(PROMPTS, negative_prompt=["red", ""], latents=latents,
                                          num_inference_steps=3, guidance_scale=4.0, output_type="np", **kw).images
    ours = jdiff.generate(pipe, PROMPTS, negative_prompts=["red", ""], steps=3, guidance=4.0,
                          latents=nchw_to_nhwc(latents), mesh=one_device, **kw)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    # the sizes reach the model: the default ones draw visibly different images
    plain = jdiff.generate(pipe, PROMPTS, negative_prompts=["red", ""], steps=3, guidance=4.0,
                           latents=nchw_to_nhwc(latents), mesh=one_device)
    assert np.abs(plain - ours).max() > 2 * TOL


def test_second_encoder_prompts_match_diffusers(base, refiner, one_device):
    """prompts_2 / negative_prompts_2 reach OpenCLIP bigG as diffusers' prompt_2 / negative_prompt_2
    do; a None entry falls back to the first prompt. The refiner's one encoder reads `prompts`."""
    folder, reference, pipe = base
    latents = noise(2)
    kw = dict(negative_prompt=["red", ""], negative_prompt_2=["blue square", "circle"])
    expected = scheduled(reference, None)(PROMPTS, prompt_2=["green square", "circle"], latents=latents,
                                          num_inference_steps=3, guidance_scale=4.0, output_type="np", **kw).images
    ours = jdiff.generate(pipe, PROMPTS, prompts_2=["green square", None], negative_prompts=["red", ""],
                          negative_prompts_2=["blue square", "circle"], steps=3, guidance=4.0,
                          latents=nchw_to_nhwc(latents), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    same = jdiff.generate(pipe, PROMPTS, negative_prompts=["red", ""], steps=3, guidance=4.0,
                          latents=nchw_to_nhwc(latents), mesh=one_device)
    assert np.abs(same - ours).max() > 1e-3  # the second encoder's prompt reaches the model (a tiny one: weakly)
    _, _, refiner_pipe = refiner
    init = nchw_to_nhwc(noise(3))
    refined = [jdiff.generate(refiner_pipe, PROMPTS, init_latents=init, steps=3, mesh=one_device, **extra)
               for extra in ({}, {"prompts_2": "green square"})]
    np.testing.assert_array_equal(refined[0], refined[1])


def test_negative_micro_conditioning_matches_diffusers(base, one_device):
    """Compared one image at a time: diffusers 0.42 repeats the [negative, positive] pair of time
    ids over the batch, which puts the negative ids beside the second prompt's conditional half when
    they differ (batch > 1). jdiff keeps each image's ids with its own halves: a batch equals its
    images generated alone."""
    folder, reference, pipe = base
    kw = dict(negative_original_size=(160, 160), negative_crops_coords_top_left=(20, 20), negative_target_size=(240, 320))
    latents = noise(7)
    singles = []
    for i, prompt in enumerate(PROMPTS):
        expected = scheduled(reference, None)(prompt, latents=latents[i:i + 1], num_inference_steps=3,
                                              guidance_scale=4.0, output_type="np", **kw).images
        singles.append(jdiff.generate(pipe, prompt, steps=3, guidance=4.0, latents=nchw_to_nhwc(latents[i:i + 1]),
                                      mesh=one_device, **kw))
        np.testing.assert_allclose(singles[-1], expected, rtol=0, atol=TOL)
    batch = jdiff.generate(pipe, PROMPTS, steps=3, guidance=4.0, latents=nchw_to_nhwc(latents), mesh=one_device, **kw)
    np.testing.assert_allclose(batch, np.concatenate(singles), rtol=0, atol=1e-5)
    plain = jdiff.generate(pipe, PROMPTS, steps=3, guidance=4.0, latents=nchw_to_nhwc(latents), mesh=one_device)
    assert np.abs(plain - batch).max() > 2 * TOL


@pytest.mark.parametrize("sampler", [None, "dpm++2m"])
def test_image_to_image_matches_diffusers(base, sampler, monkeypatch, one_device):
    folder, reference, pipe = base
    start = noise(2)
    patch_reference_noise(monkeypatch, XL + "pipeline_stable_diffusion_xl_img2img", start)
    image, _ = init_image_and_mask()
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**scheduled(reference, sampler).components)
    expected = img2img(PROMPTS, image=image, strength=0.6, num_inference_steps=5, guidance_scale=4.0,
                       output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, sampler=sampler, init_image=image, strength=0.6, steps=5, guidance=4.0,
                          latents=nchw_to_nhwc(start), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_inpainting_matches_diffusers(base, monkeypatch, one_device):
    folder, reference, pipe = base
    start = noise(3)
    patch_reference_noise(monkeypatch, XL + "pipeline_stable_diffusion_xl_inpaint", start)
    image, mask = init_image_and_mask()
    inpaint = diffusers.StableDiffusionXLInpaintPipeline(**scheduled(reference, None).components)
    expected = inpaint(PROMPTS, image=image, mask_image=mask, strength=0.75, num_inference_steps=4,
                       guidance_scale=6.0, output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, init_image=image, mask=mask, strength=0.75, steps=4, guidance=6.0,
                          latents=nchw_to_nhwc(start), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("sampler", [None, "dpm++2m"])
def test_base_to_refiner_hand_off_matches_diffusers(base, refiner, sampler, monkeypatch, one_device):
    """The base runs the noisiest 70% of the levels and returns latents; the refiner (aesthetic
    score ids, one text encoder, empty negative prompt encoded) continues from them un-noised."""
    _, base_ref, base_pipe = base
    _, refiner_ref, refiner_pipe = refiner
    start = noise(4)
    kw = dict(num_inference_steps=6, guidance_scale=5.0)
    handed = scheduled(base_ref, sampler)(PROMPTS, latents=start, denoising_end=0.7, output_type="latent", **kw).images
    ours_handed = jdiff.generate(base_pipe, PROMPTS, sampler=sampler, steps=6, guidance=5.0, latents=nchw_to_nhwc(start),
                                 denoising_end=0.7, output_type="latent", mesh=one_device)
    np.testing.assert_allclose(ours_handed, nchw_to_nhwc(handed), rtol=1e-3, atol=1e-3)
    expected = scheduled(refiner_ref, sampler)(PROMPTS, image=handed, denoising_start=0.7, aesthetic_score=7.0,
                                               output_type="np", **kw).images
    ours = jdiff.generate(refiner_pipe, PROMPTS, sampler=sampler, steps=6, guidance=5.0, init_latents=ours_handed,
                          denoising_start=0.7, aesthetic_score=7.0, mesh=one_device)
    assert 0.02 < expected.std()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_hand_off_fractions_and_micro_conditioning_do_not_recompile(base, one_device):
    from jdiff import pipeline

    _, _, pipe = base
    kw = dict(steps=4, guidance=3.0, mesh=one_device, output_type="latent")
    jdiff.generate(pipe, PROMPTS, denoising_end=0.5, original_size=(64, 64), **kw)
    before = pipeline._generate._cache_size()
    jdiff.generate(pipe, PROMPTS, denoising_end=0.8, original_size=(128, 96), crops_coords_top_left=(8, 8), **kw)
    jdiff.generate(pipe, ["circle", "red"], denoising_end=0.3, negative_prompts=["a", "b"], **kw)
    assert pipeline._generate._cache_size() == before


def test_saved_pipeline_loads_in_diffusers_and_draws_the_same(base, refiner, tmp_path, one_device):
    for (_, reference, pipe), name in ((base, "base"), (refiner, "refiner")):
        jdiff.save_pipeline(pipe, tmp_path / name)
        reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / name)
        assert type(reloaded) is type(reference)
        assert reloaded.config.get("requires_aesthetics_score") == reference.config.get("requires_aesthetics_score")
        ours = jdiff.load_pipeline(tmp_path / name)
        assert ours.settings == pipe.settings
    latents = noise(5)
    reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "base")
    expected = reloaded(PROMPTS, latents=latents, num_inference_steps=3, guidance_scale=5.0, output_type="np").images
    ours = jdiff.generate(jdiff.load_pipeline(tmp_path / "base"), PROMPTS, steps=3, latents=nchw_to_nhwc(latents),
                          mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_bad_sdxl_inputs_get_clear_errors(base, refiner, tmp_path, one_device):
    _, _, pipe = base
    with pytest.raises(ConfigError, match="original_size must be a .height, width. pair"):
        jdiff.generate(pipe, PROMPTS, original_size=(1, 2, 3), steps=2, mesh=one_device)
    with pytest.raises(ConfigError, match="denoising_end must be a fraction"):
        jdiff.generate(pipe, PROMPTS, denoising_end=1.5, steps=2, mesh=one_device)
    with pytest.raises(ConfigError, match="denoising_start continues from"):
        jdiff.generate(pipe, PROMPTS, denoising_start=0.5, steps=2, mesh=one_device)
    with pytest.raises(ConfigError, match="init_latents must be"):
        jdiff.generate(refiner[2], PROMPTS, init_latents=np.zeros((2, 4, 4, 3)), steps=2, mesh=one_device)
    with pytest.raises(ConfigError, match="Heun"):
        jdiff.generate(pipe, PROMPTS, sampler="heun", denoising_end=0.5, steps=4, mesh=one_device)
    # an SD 1.x model takes no micro-conditioning
    make_tiny_sd_pipeline(tmp_path / "sd")
    sd = jdiff.load_pipeline(tmp_path / "sd")
    with pytest.raises(ConfigError, match="original_size.*do not take"):
        jdiff.generate(sd, PROMPTS, original_size=(64, 64), steps=2, mesh=one_device)
    with pytest.raises(ConfigError, match="prompts_2 is the prompt of a text encoder 2.*take 1 prompt"):
        jdiff.generate(sd, PROMPTS, prompts_2="red", steps=2, mesh=one_device)
    with pytest.raises(ConfigError, match="negative_prompts_3 is the prompt of a text encoder 3 .SD3"):
        jdiff.generate(pipe, PROMPTS, negative_prompts_3="red", steps=2, mesh=one_device)
    with pytest.raises(ConfigError, match="prompts_2 has 3 entries for 2 prompts"):
        jdiff.generate(pipe, PROMPTS, prompts_2=["a", "b", "c"], steps=2, mesh=one_device)
    # a refiner folder that lost its requires_aesthetics_score: the widths disagree, and the error says why
    import json
    import shutil

    shutil.copytree(refiner[0], tmp_path / "refiner", ignore=shutil.ignore_patterns("_tokenizer_src"))
    index = json.loads((tmp_path / "refiner" / "model_index.json").read_text())
    index["requires_aesthetics_score"] = False
    (tmp_path / "refiner" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="requires_aesthetics_score: true"):
        jdiff.load_pipeline(tmp_path / "refiner")



def test_sample_py_hands_each_batch_from_base_to_refiner(base, refiner, tmp_path):
    import sample
    from jdiff import image_io, pipeline

    out = tmp_path / "out"
    (tmp_path / "prompts.txt").write_text('a red circle\ncircle\n{"prompt": "red", "prompt_2": "blue square"}\n')
    before = pipeline._generate._cache_size()
    assert sample.main(["--model", str(base[0]), "--refiner", str(refiner[0]), "--high-noise-frac", "0.7",
                        "--prompts-file", str(tmp_path / "prompts.txt"), "--steps", "4", "--seed", "3",
                        "--negative-prompt", "square", "--negative-prompt-2", "green",
                        "--batch-size", "2", "--out", str(out)]) == 0
    assert pipeline._generate._cache_size() - before <= 2  # one program per model, reused by the padded batch
    meta = image_io.read_png_parameters(out / "00002.png")
    assert meta["refiner"] == str(refiner[0]) and meta["high_noise_frac"] == 0.7 and meta["guidance"] == 5.0
    assert meta["prompt_2"] == "blue square" and meta["negative_prompt_2"] == "green"
    # the third image, by hand: the base's part, then the refiner's, from the same seed (the
    # refiner's one encoder reads the first prompts, as in diffusers)
    texts = dict(negative_prompts="square", prompts_2="blue square", negative_prompts_2="green")
    latents = jdiff.generate(base[2], ["red"], steps=4, seed=5, denoising_end=0.7, output_type="latent", **texts)
    by_hand = jdiff.generate(refiner[2], ["red"], steps=4, seed=5, init_latents=latents, denoising_start=0.7,
                             negative_prompts="square")
    np.testing.assert_allclose(image_io.load_image(out / "00002.png"), by_hand[0], atol=1 / 255)


@pytest.mark.parametrize("scheduler, steps", [("EulerAncestralDiscreteScheduler", 1),  # SDXL-Turbo as shipped
                                              ("EulerDiscreteScheduler", 4)])  # SDXL-Lightning as shipped
def test_distilled_checkpoints_run_as_shipped(base, scheduler, steps, tmp_path, one_device):
    """Trailing timestep spacing and guidance 0 need no flag: the checkpoint's scheduler is used."""
    import json
    import shutil

    folder = tmp_path / "distilled"
    shutil.copytree(base[0], folder, ignore=shutil.ignore_patterns("_tokenizer_src"))
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(_class_name=scheduler, timestep_spacing="trailing")
    config_file.write_text(json.dumps(config))
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    latents = noise(8)
    expected = reference(PROMPTS, latents=latents, num_inference_steps=steps, guidance_scale=0.0,
                         output_type="np").images
    ours = jdiff.generate(jdiff.load_pipeline(folder), PROMPTS, steps=steps, guidance=0.0,
                          latents=nchw_to_nhwc(latents), mesh=one_device)
    assert 0.02 < expected.std()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
