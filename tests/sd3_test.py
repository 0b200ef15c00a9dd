"""SD3 through generate() against diffusers' StableDiffusion3 pipelines on the same random weights
and noise: text-to-image with and without guidance and negative prompts, without T5, image-to-image,
and a saved folder that diffusers loads."""

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jdiff
from jdiff.errors import CheckpointError, ConfigError
from parity import nchw_to_nhwc
from pipeline_test import TOL, patch_reference_noise
from tiny_models import make_tiny_sd3_pipeline

PROMPTS = ["a red circle", "circle"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd3")
    return folder, make_tiny_sd3_pipeline(folder), jdiff.load_pipeline(folder)


def noise(seed, batch=2):
    return torch.randn(batch, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_loads_as_sd3_with_its_own_sampler(sd3):
    folder, _, pipe = sd3
    assert pipe.family is jdiff.FAMILIES["stable-diffusion-3"]
    assert set(pipe.modules) == {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert jdiff.checkpoint_sampling(pipe) == ("flow_euler", 28)
    assert pipe.default_size == 64 and pipe.latent_channels == 16
    half = jdiff.load_pipeline(folder, dtype=jnp.bfloat16)
    assert half.transformer.dtype == half.text_encoder_3.dtype == jnp.bfloat16 and half.vae.dtype == jnp.float32
    with pytest.raises(ConfigError, match="rectified-flow.*flow_euler"):
        jdiff.generate(pipe, PROMPTS, sampler="dpm++2m", steps=2)


@pytest.mark.parametrize("guidance", [7.0, 1.0])
def test_text_to_image_matches_diffusers(sd3, guidance, one_device):
    _, reference, pipe = sd3
    latents = noise(0)
    expected = reference(PROMPTS, latents=latents, num_inference_steps=4, guidance_scale=guidance,
                         output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, steps=4, guidance=guidance, latents=nchw_to_nhwc(latents), mesh=one_device)
    assert ours.shape == expected.shape == (2, 64, 64, 3)
    assert 0.02 < expected.std()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_negative_prompts_and_long_t5_prompts_match_diffusers(sd3, one_device):
    _, reference, pipe = sd3
    latents = noise(1)
    prompts = ["a small red circle at the top left and a large blue square at the bottom right " * 3, "circle"]
    for length in (256, 20):  # diffusers' default; one that cuts the T5 prompt too
        expected = reference(prompts, negative_prompt=["red", ""], latents=latents, num_inference_steps=3,
                             guidance_scale=4.0, output_type="np", max_sequence_length=length).images
        with pytest.warns(UserWarning, match="longer than"):  # CLIP's 77 tokens cut the first prompt
            ours = jdiff.generate(pipe, prompts, negative_prompts=["red", ""], steps=3, guidance=4.0,
                                  latents=nchw_to_nhwc(latents), mesh=one_device, max_sequence_length=length)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    with pytest.raises(ConfigError, match="max_sequence_length must be"):
        jdiff.generate(pipe, prompts, max_sequence_length=600)


def test_second_and_third_encoder_prompts_match_diffusers(sd3, one_device):
    """prompts_2 reach CLIP-G and prompts_3 T5, as diffusers' prompt_2 / prompt_3 (and negatives)."""
    _, reference, pipe = sd3
    latents = noise(5)
    # (diffusers' SD3 takes a single prompt_2 for one image only: it is given one per image)
    expected = reference(PROMPTS, prompt_2=["green square"] * 2, prompt_3=["blue", "a large square"],
                         negative_prompt=["red", ""], negative_prompt_2=["", "circle"], negative_prompt_3="small",
                         latents=latents, num_inference_steps=3, guidance_scale=4.0, output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, prompts_2="green square", prompts_3=["blue", "a large square"],
                          negative_prompts=["red", ""], negative_prompts_2=["", "circle"], negative_prompts_3="small",
                          steps=3, guidance=4.0, latents=nchw_to_nhwc(latents), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    plain = jdiff.generate(pipe, PROMPTS, negative_prompts=["red", ""], steps=3, guidance=4.0,
                           latents=nchw_to_nhwc(latents), mesh=one_device)
    assert np.abs(plain - ours).max() > 1e-3


def test_without_t5_matches_diffusers(tmp_path, one_device):
    reference = make_tiny_sd3_pipeline(tmp_path, with_t5=False)
    pipe = jdiff.load_pipeline(tmp_path)
    assert "text_encoder_3" not in pipe.modules
    latents = noise(2)
    for length in (None, 40):  # without T5, the length is the count of zero vectors
        kw = {} if length is None else {"max_sequence_length": length}
        expected = reference(PROMPTS, latents=latents, num_inference_steps=3, guidance_scale=5.0, output_type="np",
                             **kw).images
        ours = jdiff.generate(pipe, PROMPTS, steps=3, guidance=5.0, latents=nchw_to_nhwc(latents), mesh=one_device,
                              **kw)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_image_to_image_matches_diffusers(sd3, monkeypatch, one_device):
    folder, _, pipe = sd3
    reference = diffusers.StableDiffusion3Img2ImgPipeline.from_pretrained(folder)
    rng = np.random.default_rng(0)
    image = rng.random((2, 64, 64, 3)).astype(np.float32)
    latents = noise(3)
    patch_reference_noise(monkeypatch, "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img",
                          latents)
    expected = reference(PROMPTS, image=torch.tensor(image).permute(0, 3, 1, 2), strength=0.7, num_inference_steps=5,
                         guidance_scale=3.0, output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, init_image=image, strength=0.7, steps=5, guidance=3.0,
                          latents=nchw_to_nhwc(latents), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_saved_folder_loads_in_diffusers_and_draws_the_same(sd3, tmp_path, one_device):
    _, reference, pipe = sd3
    jdiff.save_pipeline(pipe, tmp_path / "saved")
    reloaded = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path / "saved")
    latents = noise(4)
    kw = dict(latents=latents, num_inference_steps=2, guidance_scale=3.0, output_type="np")
    np.testing.assert_allclose(reloaded(PROMPTS, **kw).images, reference(PROMPTS, **kw).images, rtol=0, atol=1e-5)
    again = jdiff.load_pipeline(tmp_path / "saved")
    assert again.family is pipe.family and set(again.modules) == set(pipe.modules)


def test_mismatched_encoders_and_noise_schedule_training_fields_are_refused(sd3, tmp_path):
    import shutil

    from transformers import T5Config, T5EncoderModel

    folder = tmp_path / "bad"
    shutil.copytree(sd3[0], folder)
    shutil.rmtree(folder / "text_encoder_3")  # another T5, narrower than the transformer's joint width
    T5EncoderModel(T5Config(vocab_size=60, d_model=40, d_kv=8, d_ff=64, num_layers=1, num_heads=5,
                            feed_forward_proj="gated-gelu")).save_pretrained(folder / "text_encoder_3")
    with pytest.raises(CheckpointError, match="T5's d_model 40 is not joint_attention_dim 48"):
        jdiff.load_pipeline(folder)
    from jdiff import schedules

    with pytest.raises(ConfigError, match=r"\['beta_start'\] cannot be set for training FlowMatch"):
        schedules.training_scheduler(sd3[2].scheduler, {"beta_start": 0.001})
    with pytest.raises(ConfigError, match="guided by `guidance`"):  # true CFG is for guidance-embedding models
        jdiff.generate(sd3[2], PROMPTS, negative_prompts=["red", ""], true_cfg_scale=3.0, steps=1)


def test_only_the_prompts_that_are_too_long_are_warned_about(sd3):
    """A long prompt in the batch pads the others; the warning must still name only the long one."""
    import warnings

    pipe = sd3[2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.family.tokenize(pipe, ["red " * 100, "circle"], max_sequence_length=20)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3  # the CLIP-L, CLIP-G and T5 tokenizers each cut the long prompt
    assert all(m.startswith("prompt 'red red") for m in messages)


def test_weights_sharded_over_fsdp_and_tensor_draw_the_same(sd3):
    import jax
    from jax.sharding import Mesh

    from jdiff import sharding

    pipe = sd3[2]
    kw = dict(steps=2, guidance=4.0, seed=2)
    split = jdiff.generate(pipe, PROMPTS, mesh=sharding.make_mesh({"fsdp": 4, "tensor": 2}), **kw)
    one = jdiff.generate(pipe, PROMPTS, mesh=Mesh(jax.devices()[:1], ("data",)), **kw)
    np.testing.assert_allclose(split, one, rtol=0, atol=1e-5)
