"""ControlNet training: a new ControlNet starts as diffusers' from_unet does (a no-op), trains with the
base frozen on shapes with their outlines as control images, resumes exactly, and is written as a
folder diffusers reads."""

import jax
import numpy as np
import pytest
import torch

import jdiff
from jdiff import control, convert, train_lib
from jdiff.app import shapes, stages
from jdiff.app.shapes_control import OutlineControl
from jdiff.app.shapes_tfds import load_shapes
from jdiff.configs import tiny
from jdiff.data import ImageFolder, make_loader
from jdiff.models import controlnet
from parity import nchw_to_nhwc

WIDTHS = (8, 8, 16, 16)  # three stride-2 convolutions: the tiny VAE's factor 8


@pytest.fixture(scope="module")
def base(tiny_sd_folder):
    """The tiny SD pipeline with a new ControlNet attached (as jdiff.control names it)."""
    pipe = jdiff.load_pipeline(tiny_sd_folder)
    module, params = controlnet.from_unet(pipe.unet, pipe.params["unet"], jax.random.key(0),
                                          conditioning_embedding_out_channels=WIDTHS)
    return pipe.replace(modules={**pipe.modules, "controlnet": module}, params={**pipe.params, "controlnet": params})


def test_a_new_controlnet_is_diffusers_from_unet_and_changes_nothing(base, tiny_sd_folder, tmp_path, one_device):
    from diffusers import ControlNetModel, StableDiffusionPipeline

    convert.save_controlnet(base.controlnet, base.params["controlnet"], tmp_path / "cn")
    ours = ControlNetModel.from_pretrained(tmp_path / "cn").state_dict()
    reference = ControlNetModel.from_unet(StableDiffusionPipeline.from_pretrained(tiny_sd_folder).unet,
                                          conditioning_embedding_out_channels=WIDTHS).state_dict()
    assert ours.keys() == reference.keys()
    for key in ours:  # the control embedding's convolutions are random in both, its last one zero
        if not key.startswith("controlnet_cond_embedding.") or key.startswith("controlnet_cond_embedding.conv_out"):
            assert torch.equal(ours[key], reference[key]), key
    outline = shapes.outline(shapes.scene(0, "train"), 32)
    noise = nchw_to_nhwc(torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)))
    plain = jdiff.generate(jdiff.load_pipeline(tiny_sd_folder), "a red circle", steps=3, latents=noise, mesh=one_device)
    controlled = jdiff.generate(base, "a red circle", steps=3, latents=noise, control_image=outline, mesh=one_device)
    np.testing.assert_array_equal(controlled, plain)  # zero convolutions: no effect until trained


def _train(base, workdir, data_dir, **section):
    config = tiny.get_config()
    config.diffusion_train.update(log_every=1, checkpoint_every=2, **section)
    source = OutlineControl(load_shapes(data_dir, "train", num_train=64, num_test=16), "train", 32)
    stage = stages.diffusion_stage(base, stages.make_objective(config, base.scheduler), latent_size=4,
                                   caption_dropout=0.1, train_text_encoder=False, controlnet=True)
    loader = make_loader(source, batch_size=8, seed=0)
    return train_lib.train(stage, config.diffusion_train, workdir, loader, total_batch=8)


def test_trains_only_the_controlnet_and_resumes_exactly(base, tmp_path, tiny_shapes_dir, one_device):
    straight = _train(base, tmp_path / "straight", tiny_shapes_dir, steps=4)
    assert set(straight.state.params) == {"controlnet"}  # the U-Net, VAE and text encoder are frozen
    trained = jax.device_get(straight.state.params["controlnet"])
    zero_convs = [trained[k]["kernel"] for k in trained if k.startswith("controlnet_down_blocks")]
    assert all(np.abs(k).max() > 0 for k in zero_convs)  # the connections left zero
    first = _train(base, tmp_path / "resumed", tiny_shapes_dir, steps=4, run_steps=2)
    second = _train(base, tmp_path / "resumed", tiny_shapes_dir, steps=4)
    assert [h["step"] for h in second.history] == [3, 4]
    np.testing.assert_allclose([h["loss"] for h in first.history + second.history],
                               [h["loss"] for h in straight.history], rtol=1e-6)

    # The trained ControlNet, written as diffusers writes one, steers generation once reloaded.
    convert.save_controlnet(base.controlnet, trained, tmp_path / "trained")
    pipe = control.load_controlnet(jdiff.load_pipeline(base.source), tmp_path / "trained")
    outline = shapes.outline(shapes.scene(1, "train"), 32)
    noise = nchw_to_nhwc(torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)))
    steered = jdiff.generate(pipe, "a red circle", steps=3, latents=noise, control_image=outline, mesh=one_device)
    plain = jdiff.generate(jdiff.load_pipeline(base.source), "a red circle", steps=3, latents=noise, mesh=one_device)
    assert np.abs(steered - plain).max() > 0


def test_sdxl_controlnet_trains_and_diffusers_draws_with_it(tiny_sdxl_folder, tmp_path, tiny_shapes_dir, one_device):
    """SDXL: a ControlNet made from the U-Net (with its text-time embedding) trains with the base
    frozen, the time ids of every example reaching it, and the written folder draws in diffusers'
    StableDiffusionXLControlNetPipeline what it draws in jdiff."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    pipe = jdiff.load_pipeline(tiny_sdxl_folder)
    module, params = controlnet.from_unet(pipe.unet, pipe.params["unet"], jax.random.key(1),
                                          conditioning_embedding_out_channels=WIDTHS)
    assert module.config.addition_embed_type == "text_time"
    base = pipe.replace(modules={**pipe.modules, "controlnet": module}, params={**pipe.params, "controlnet": params})
    config = tiny.get_config()
    config.diffusion_train.update(steps=3, log_every=1, learning_rate=1e-2)
    source = OutlineControl(load_shapes(tiny_shapes_dir, "train", num_train=64, num_test=16), "train", 32)
    stage = stages.diffusion_stage(base, stages.make_objective(config, base.scheduler), latent_size=4,
                                   caption_dropout=0.1, train_text_encoder=False, controlnet=True)
    result = train_lib.train(stage, config.diffusion_train, tmp_path / "run", make_loader(source, batch_size=8, seed=0),
                             total_batch=8)
    assert set(result.state.params) == {"controlnet"} and all(np.isfinite(h["loss"]) for h in result.history)
    trained = jax.device_get(result.state.params["controlnet"])
    assert np.abs(trained["controlnet_mid_block"]["kernel"]).max() > 0  # the zero connections moved

    convert.save_controlnet(module, trained, tmp_path / "trained")
    outline = shapes.outline(shapes.scene(2, "train"), 32)
    start = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    ours = jdiff.generate(control.load_controlnet(pipe, tmp_path / "trained"), "a red circle", steps=3, guidance=5.0,
                          latents=nchw_to_nhwc(start), control_image=outline, mesh=one_device)
    c = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder).components
    reference = StableDiffusionXLControlNetPipeline(
        **{k: c[k] for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")},
        controlnet=ControlNetModel.from_pretrained(tmp_path / "trained"))
    expected = reference("a red circle", image=torch.from_numpy(outline.transpose(2, 0, 1)[None].copy()), latents=start,
                         num_inference_steps=3, guidance_scale=5.0, output_type="np").images
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2 / 255)
    plain = jdiff.generate(pipe, "a red circle", steps=3, guidance=5.0, latents=nchw_to_nhwc(start), mesh=one_device)
    assert np.abs(plain - ours).max() > 3 * 2 / 255  # the trained ControlNet steers, beyond the parity tolerance


def test_controlnet_stage_refuses_what_it_cannot_do(base, tiny_sd_folder):
    config = tiny.get_config()
    objective = stages.make_objective(config, base.scheduler)
    with pytest.raises(jdiff.ConfigError, match="ControlNet attached"):
        stages.diffusion_stage(jdiff.load_pipeline(tiny_sd_folder), objective, latent_size=4, caption_dropout=0.0,
                               train_text_encoder=False, controlnet=True)
    with pytest.raises(jdiff.ConfigError, match="frozen"):
        stages.diffusion_stage(base, objective, latent_size=4, caption_dropout=0.0, train_text_encoder=True,
                               controlnet=True)


def test_outline_control_images_mark_each_object():
    for index in range(20):
        placed = shapes.scene(index, "train")
        edges = shapes.outline(placed, 64)[..., 0] > 0.5
        assert edges.any()
        for p in placed:  # every object's outline passes through its bounding box, not its centre
            x, y, r = p.x * 64, p.y * 64, p.diameter * 32
            box = edges[int(y - r) - 1:int(y + r) + 2, int(x - r) - 1:int(x + r) + 2]
            assert box.sum() > 4 * r  # at least about two sides' worth of edge pixels
            assert not edges[int(y), int(x)]


def test_control_scores_read_real_images_and_their_own_outlines(tiny_shapes_dir):
    from jdiff.app import shapes_control_eval

    source = load_shapes(tiny_shapes_dir, "test", num_train=64, num_test=16)
    images = [source[i]["image"] for i in range(16)]
    scenes = [shapes.scene(i, "test") for i in range(16)]
    own = shapes_control_eval.score(images, scenes)
    assert own["objects"] == sum(len(s) for s in scenes)
    assert own["box_iou"] > 0.6 and own["in_controlled_cell"] > 0.9 and own["colour_accuracy"] > 0.9
    shuffled = shapes_control_eval.score(images, scenes[1:] + scenes[:1])  # each image against another scene
    assert shuffled["box_iou"] < own["box_iou"] / 2 and shuffled["in_controlled_cell"] < 0.5
    assert shapes_control_eval.iou((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(1 / 7)


def test_recipe_controlnet_stage_trains_exports_and_evaluates(tiny_sd_folder, tiny_shapes_dir, tmp_path):
    import json
    import shutil

    from jdiff.app import recipe

    shutil.copytree(tiny_sd_folder, tmp_path / "pipeline")  # stands for the diffusion stage's export
    config = tiny.get_config()
    config.stages = "controlnet"
    config.data.data_dir = str(tiny_shapes_dir)
    config.controlnet.conditioning_embedding_out_channels = WIDTHS  # the tiny SD model's VAE: factor 8
    results = recipe.run(config, tmp_path)["controlnet"]
    for case in ("with_controlnet", "without_controlnet"):
        assert results[case]["num_prompts"] == 8
        assert set(results[case]) >= {"box_iou", "in_controlled_cell", "colour_accuracy", "shape_accuracy"}
    assert json.loads((tmp_path / "controlnet_evaluation.json").read_text()) == results
    from diffusers import ControlNetModel

    ControlNetModel.from_pretrained(tmp_path / "controlnet" / "export")  # diffusers reads the export
    steps = sorted(int(p.name) for p in (tmp_path / "controlnet" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    assert recipe.run(config, tmp_path)["controlnet"] == results  # a rerun finds the stage done


def write_controlled_pictures(folder, count: int = 8):
    """`count` random pictures, each with a control image (a coarse mask of it, saved at twice its
    size) named in metadata.jsonl, as diffusers' train_controlnet.py datasets are laid out."""
    import json

    from PIL import Image

    folder.mkdir(parents=True)
    rng, lines = np.random.default_rng(0), []
    for i in range(count):
        picture = rng.integers(0, 255, (32, 32, 3), np.uint8)
        Image.fromarray(picture).save(folder / f"{i}.png")
        mask = np.where(picture.mean(-1, keepdims=True) > 127, 255, 0).astype(np.uint8).repeat(3, -1)
        Image.fromarray(mask).resize((64, 64), Image.Resampling.NEAREST).save(folder / f"{i}_control.png")
        lines.append({"file_name": f"{i}.png", "text": "a red circle" if i % 2 else "circle",
                      "conditioning_image": f"{i}_control.png"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    return folder


def test_recipe_trains_a_controlnet_on_a_folder_for_a_pretrained_model(tiny_sd_folder, tmp_path):
    """train.py --config.data.dataset=folder --config.stages=controlnet --config.pretrained=...: the
    pictures' control images reach the batches, the export is diffusers' (with diffusers' default
    control embedding cut to the VAE's factor), the samples pair control and drawn images, and
    controlnet.init continues from an earlier ControlNet."""
    from diffusers import ControlNetModel

    from jdiff import image_io
    from jdiff.app import recipe

    pictures = write_controlled_pictures(tmp_path / "pictures")
    config = tiny.get_config()
    config.update(stages="controlnet", pretrained=str(tiny_sd_folder))
    config.data.update(dataset="folder", folder=str(pictures))
    config.controlnet_train.update(steps=3, learning_rate=1e-2)
    results = recipe.run(config, tmp_path / "run")["controlnet"]
    export = tmp_path / "run" / "controlnet" / "export"
    written = ControlNetModel.from_pretrained(export)
    assert tuple(written.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)  # the tiny VAE: factor 8
    _, trained = convert.load_controlnet(export)
    assert np.abs(trained["controlnet_mid_block"]["kernel"]).max() > 0  # trained: the zero connection moved

    assert results == {"samples": str(tmp_path / "run" / "controlnet" / "samples.png"), "num_samples": 8}
    grid = image_io.load_image(results["samples"])
    assert grid.shape == (8 * 32 + 7 * 2, 2 * 32 + 2, 3)  # rows of (control image, drawn image)
    source = ImageFolder(pictures, 32, control_column="conditioning_image")
    np.testing.assert_allclose(grid[34:66, :32], source.control_image(1), atol=1 / 255)
    assert image_io.read_png_parameters(results["samples"])["prompts"][:2] == ["circle", "a red circle"]
    assert recipe.run(config, tmp_path / "run")["controlnet"] == results  # a rerun finds the stage done

    config.controlnet.init = str(export)  # continue from it: with learning rate 0 it stays as it was
    config.controlnet_train.update(steps=1, learning_rate=0.0)
    recipe.run(config, tmp_path / "again")
    _, continued = convert.load_controlnet(tmp_path / "again" / "controlnet" / "export")
    jax.tree.map(np.testing.assert_array_equal, continued, trained)

    config.pretrained = ""  # no model to steer
    with pytest.raises(jdiff.ConfigError, match="needs a model to steer"):
        recipe.run(config, tmp_path / "none")
