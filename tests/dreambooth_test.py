"""DreamBooth through train.py's recipe: class pictures drawn by the base model first (and reused),
instance/class pairs in every batch, and the prior-preservation loss weighted as diffusers' scripts
weigh it."""

import numpy as np
import pytest
from PIL import Image

import jdiff
from jdiff.configs import tiny
from jdiff import train_lib
from jdiff.app import dreambooth, recipe
from jdiff.data.prior_preservation import PriorPreservationSource, merge_pairs
from jdiff.errors import ConfigError
from tiny_models import write_captioned_pictures


def dreambooth_config(base, pictures, **section):
    config = tiny.get_config()
    config.pretrained = str(base)
    config.stages = "diffusion"
    config.data.update(dataset="folder", folder=str(pictures), caption_dropout=0.0)
    config.dreambooth.update(**{**dict(instance_prompt="a sks circle", class_prompt="circle", num_class_images=3,
                                       prior_loss_weight=0.5), **section})
    config.lora.update(rank=4)  # DreamBooth-LoRA, the usual way; full fine-tuning takes the same path
    config.diffusion_train.update(steps=3, learning_rate=1e-2, warmup_steps=0, log_every=1, eval_every=100,
                                  checkpoint_every=100)
    config.sample.update(num_prompts=2, steps=2, sampler="ddim", guidance=3.0)
    return config


@pytest.fixture(scope="module")
def run(tiny_sd_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("dreambooth")
    pictures = root / "subject"
    write_captioned_pictures(pictures, 32, 32, count=2)
    for caption in pictures.glob("*.txt"):  # DreamBooth pictures need no captions
        caption.unlink()
    config = dreambooth_config(tiny_sd_folder, pictures)
    histories, train = [], train_lib.train

    def recorded(*args, **kwargs):  # the logged metrics of the recipe's training
        result = train(*args, **kwargs)
        histories.append(result.history)
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_lib, "train", recorded)
        recipe.run(config, root / "run")
    return tiny_sd_folder, config, root / "run", histories[-1]


def test_class_pictures_are_the_base_models_and_are_reused(run, monkeypatch):
    base, config, workdir, _ = run
    files = sorted((workdir / "class_images").glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"]
    drawn = jdiff.generate(jdiff.load_pipeline(base), ["circle"] * 3, seed=[0, 1, 2], sampler="ddim", steps=2,
                           guidance=3.0, height=32, width=32)
    for image, file in zip(drawn, files):
        with Image.open(file) as png:
            np.testing.assert_allclose(np.asarray(png, np.float32) / 255, image, atol=0.6 / 255)
    monkeypatch.setattr("jdiff.pipeline.generate", lambda *a, **k: pytest.fail("class pictures drawn again"))
    assert dreambooth.write_class_images(config, workdir, None) == workdir / "class_images"


def test_the_loss_is_the_instance_loss_plus_the_weighted_prior_loss(run):
    _, _, workdir, history = run
    lines = [h for h in history if "instance_loss" in h]
    assert len(lines) == 3
    for line in lines:
        assert line["instance_loss"] != line["prior_loss"]  # two different halves of each batch
        np.testing.assert_allclose(line["loss"], line["instance_loss"] + 0.5 * line["prior_loss"], rtol=1e-5)
    assert (workdir / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_pairs_cycle_both_sets_and_merge_into_one_batch():
    instances = [{"image": np.full((2, 2, 3), i, np.uint8), "caption": "x"} for i in range(2)]
    classes = [{"image": np.full((2, 2, 3), 10 + i, np.uint8), "caption": "y"} for i in range(3)]
    source = PriorPreservationSource(instances, classes, "a sks dog", "a dog")
    assert len(source) == 3  # an epoch: max(instances, classes), as diffusers' DreamBooth dataset
    example = source[2]
    assert example["caption"] == "a sks dog" and example["class_caption"] == "a dog"
    assert example["image"][0, 0, 0] == 0 and example["class_image"][0, 0, 0] == 12
    batch = {k: np.stack([source[i][k] for i in range(2)]) for k in ("image", "caption", "class_image", "class_caption")}
    merged = merge_pairs(batch)
    assert list(merged["caption"]) == ["a sks dog", "a sks dog", "a dog", "a dog"]
    assert list(merged["prior"]) == [0, 0, 1, 1]
    assert [int(v) for v in merged["image"][:, 0, 0, 0]] == [0, 1, 10, 11]


def test_bad_dreambooth_settings_get_clear_errors(run, tmp_path):
    base, config, _, _ = run
    pictures = config.data.folder
    scratch = dreambooth_config(base, pictures)
    scratch.pretrained = ""
    scratch.lora.rank = 0
    with pytest.raises(ConfigError, match="DreamBooth.*set config.pretrained"):
        recipe.run(scratch, tmp_path / "a")
    cached = dreambooth_config(base, pictures)
    cached.data.cache_text_embeddings = True
    with pytest.raises(ConfigError, match="cache_text_embeddings"):
        recipe.run(cached, tmp_path / "b")
    negative = dreambooth_config(base, pictures, prior_loss_weight=-1.0)
    with pytest.raises(ConfigError, match="prior_loss_weight"):
        recipe.run(negative, tmp_path / "c")
