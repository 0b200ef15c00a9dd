"""CLIP image encoder (IP-Adapter's) parity with transformers on random weights, its folder round
trip, and the preprocessing against transformers' CLIPImageProcessor."""

import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor
from transformers import CLIPVisionConfig as TorchConfig
from transformers import CLIPVisionModelWithProjection as TorchVision

from jdiff.convert import load_clip_vision, save_clip_vision
from jdiff.errors import CheckpointError, ConfigError
from jdiff.models.clip_preprocess import ImageProcessorConfig, preprocess
from parity import max_rel_error, nchw_to_nhwc, randomize_torch

# OpenAI's ViT-L/14 uses quick_gelu; the ViT-H and ViT-bigG encoders of IP-Adapter use gelu.
ACTIVATIONS = ["quick_gelu", "gelu"]


@pytest.fixture(scope="module", params=ACTIVATIONS)
def reference(request, tmp_path_factory):
    """(folder, torch model, pixels NCHW, torch outputs) for a tiny random encoder."""
    folder = tmp_path_factory.mktemp(f"clip_vision_{request.param}")
    config = TorchConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, projection_dim=16, hidden_act=request.param)
    torch.manual_seed(0)
    model = randomize_torch(TorchVision(config))
    model.save_pretrained(folder)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(pixels, output_hidden_states=True)
    return folder, model, pixels, ref


@pytest.fixture(scope="module")
def ours(reference):
    folder, _, pixels, _ = reference
    module, params = load_clip_vision(folder)
    out = module.apply({"params": params}, nchw_to_nhwc(pixels.numpy()), output_hidden_states=True)
    return module, params, out


def test_matches_transformers_float32(reference, ours):
    _, _, _, ref = reference
    _, _, out = ours
    assert out.image_embeds.shape == (2, 16) and out.last_hidden_state.shape == (2, 1 + 16, 32)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3 + 1
    errors = {
        "image_embeds": max_rel_error(out.image_embeds, ref.image_embeds),
        "last_hidden_state": max_rel_error(out.last_hidden_state, ref.last_hidden_state),
        "penultimate": max_rel_error(out.hidden_states[-2], ref.hidden_states[-2]),  # IP-Adapter Plus
        "embeddings": max_rel_error(out.hidden_states[0], ref.hidden_states[0]),
    }
    assert max(errors.values()) <= 1e-4, errors
    # Every layer changes the state (a layer that did nothing would make these checks weaker).
    for before, after in zip(ref.hidden_states, ref.hidden_states[1:]):
        assert max_rel_error(before, after) > 0.05


def test_save_round_trip_is_bit_exact_and_loads_in_transformers(reference, ours, tmp_path):
    _, model, pixels, _ = reference
    module, params, _ = ours
    save_clip_vision(module, params, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["CLIPVisionModelWithProjection"] and saved["model_type"] == "clip_vision_model"
    module2, params2 = load_clip_vision(tmp_path)
    assert module2.config == module.config
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    reloaded = TorchVision.from_pretrained(tmp_path).eval()
    assert reloaded.config.hidden_act == model.config.hidden_act
    with torch.no_grad():
        expected, got = model(pixels), reloaded(pixels)
    torch.testing.assert_close(got.image_embeds, expected.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)


def test_wrong_pixel_shape(ours):
    module, params, _ = ours
    with pytest.raises(ValueError, match=r"NHWC \[B, 32, 32, 3\]"):
        module.apply({"params": params}, np.zeros((1, 3, 32, 32), np.float32))  # NCHW by mistake
    with pytest.raises(ValueError, match=r"shape \(1, 64, 64, 3\)"):
        module.apply({"params": params}, np.zeros((1, 64, 64, 3), np.float32))  # not the trained size


def test_bad_folders(reference, tmp_path):
    folder = reference[0]
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip_vision(tmp_path / "nowhere")
    config = json.loads((folder / "config.json").read_text())

    def write(name, **changes):
        bad = tmp_path / name
        bad.mkdir()
        (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        (bad / "config.json").write_text(json.dumps({**config, **changes}))
        return bad

    with pytest.raises(CheckpointError, match="holds a CLIPTextModel, not a CLIPVisionModelWithProjection"):
        load_clip_vision(write("text", architectures=["CLIPTextModel"]))
    with pytest.raises(ConfigError, match="'patch_sise'.*'patch_size'"):
        load_clip_vision(write("typo", patch_sise=8))
    with pytest.raises(ConfigError, match="model_type 'clip' is not a CLIP vision model"):
        load_clip_vision(write("whole_clip", model_type="clip"))
    with pytest.raises(ConfigError, match="image_size must be a positive integer"):
        load_clip_vision(write("pair", image_size=[32, 32]))
    # A config that disagrees with the weights: 8x8 patches stored, 4x4 configured.
    with pytest.raises(CheckpointError, match="patch_embedding.weight.*config implies"):
        load_clip_vision(write("patches", patch_size=4))


# ----------------------------------------------------------------------------------------------
# Preprocessing.


def random_pictures(seed=0):
    rng = np.random.default_rng(seed)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
                [(37, 53), (300, 200), (224, 224), (113, 517)]]
    pictures.append(Image.fromarray(rng.integers(0, 256, (61, 40, 4), dtype=np.uint8), "RGBA"))
    pictures.append(Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8), "L"))
    return pictures


def transformers_pixels(processor, picture) -> np.ndarray:
    return nchw_to_nhwc(processor(images=picture, return_tensors="np").pixel_values)


def test_preprocess_matches_clip_image_processor_defaults():
    processor = CLIPImageProcessor()
    for picture in random_pictures():
        ours = preprocess(picture)
        assert ours.shape == (1, 224, 224, 3) and ours.dtype == np.float32
        assert np.max(np.abs(ours - transformers_pixels(processor, picture))) <= 1e-5, picture.size


@pytest.mark.parametrize("saved", [
    # What transformers 5 writes: a shortest edge below the crop, so the crop pads with zeros.
    dict(size={"shortest_edge": 20}, crop_size={"height": 32, "width": 24}, image_mean=[0.5, 0.4, 0.3],
         image_std=[0.2, 0.3, 0.25]),
    # A fixed (height, width) resize and a filter other than bicubic.
    dict(size={"height": 40, "width": 30}, crop_size={"height": 32, "width": 32}, resample=2),
], ids=["shortest_edge", "height_width"])
def test_preprocess_reads_preprocessor_config(tmp_path, saved):
    CLIPImageProcessor(**saved).save_pretrained(tmp_path)
    processor = CLIPImageProcessor.from_pretrained(tmp_path)
    config = ImageProcessorConfig.load(tmp_path)
    crop = (saved["crop_size"]["height"], saved["crop_size"]["width"])
    assert config.crop_size == crop
    batch = [np.asarray(p.convert("RGB")) for p in random_pictures(1)]  # uint8 arrays this time
    ours = preprocess(batch, tmp_path)
    assert ours.shape == (len(batch), *crop, 3)
    for image, pixels in zip(batch, ours):
        assert np.max(np.abs(pixels - transformers_pixels(processor, image)[0])) <= 1e-5


def test_preprocess_legacy_feature_extractor_config(tmp_path):
    """SD pipelines' `feature_extractor/` (CLIPFeatureExtractor era) writes sizes as bare ints."""
    legacy = {"crop_size": 24, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
              "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
              "resample": 3, "size": 24}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    processor = CLIPImageProcessor.from_pretrained(tmp_path)
    picture = random_pictures()[1]
    ours = preprocess(picture, tmp_path / "preprocessor_config.json")
    assert ours.shape == (1, 24, 24, 3)
    assert np.max(np.abs(ours - transformers_pixels(processor, picture))) <= 1e-5


def test_preprocess_floats_are_their_uint8_pixels():
    picture = random_pictures()[0]
    floats = np.asarray(picture, np.float32) / 255.0
    np.testing.assert_array_equal(preprocess(floats), preprocess(picture))


def test_preprocess_errors(tmp_path):
    with pytest.raises(ValueError, match="HWC with 1 or 3 channels"):
        preprocess(np.zeros((3, 32, 32, 5), np.uint8))
    with pytest.raises(ConfigError, match="does not exist"):
        preprocess(np.zeros((32, 32, 3), np.uint8), tmp_path)
    with pytest.raises(ConfigError, match="size .* is not supported"):
        ImageProcessorConfig.from_dict({"size": {"longest_edge": 300}})
    with pytest.raises(ConfigError, match="unknown config field 'image_meen'"):
        ImageProcessorConfig.from_dict({"image_meen": [0.5, 0.5, 0.5]})
