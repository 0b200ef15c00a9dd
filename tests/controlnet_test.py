"""ControlNet parity with diffusers' ControlNetModel on random weights (SD1.x and SDXL shapes): every
residual under conditioning_scale and guess_mode, global_pool_conditions and BGR checkpoints, the
U-Net that takes the residuals, saving, and the errors for bad folders, configs and inputs."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util

from jdiff.convert import _controlnet, load_controlnet, load_unet, param_shapes, save_controlnet, torch_key, torch_shape
from jdiff.errors import CheckpointError, ConfigError
from jdiff.models.controlnet import ControlNetConfig, ControlNetModel, example_inputs
from parity import max_rel_error, nchw_to_nhwc, randomize_torch

POOLED, TIME_DIM, NUM_TIME_IDS = 16, 8, 6  # tiny stand-ins for SDXL's 1280 pooled text, 256-wide time ids
SD1_UNET = dict(
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=24,
    attention_head_dim=4, norm_num_groups=8)
# Four widths: three stride-2 convolutions, so control images are 8x the latents as in released ControlNets.
CONTROL = dict(conditioning_embedding_out_channels=(8, 8, 16, 16))
SD1 = dict({k: v for k, v in SD1_UNET.items() if k != "up_block_types"}, **CONTROL)
CONFIGS = {
    # SD1.x's layout: conv projections, attention_head_dim as the head count.
    "sd1": SD1,
    # SDXL base's layout: a first level without attention, deeper transformers further down (the mid
    # block takes the last level's depth), linear projections, text_time micro-conditioning.
    "sdxl": dict(
        CONTROL, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=32, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + NUM_TIME_IDS * TIME_DIM),
    # A shuffle-style checkpoint trained on BGR images, with the residuals averaged over the image; also
    # a mid block without attention and the attention-pooled text embedding ("text").
    "pooled_bgr": dict(
        SD1, global_pool_conditions=True, controlnet_conditioning_channel_order="bgr", mid_block_type="UNetMidBlock2D",
        addition_embed_type="text", addition_embed_type_num_heads=4),
}
# (conditioning_scale, guess_mode)
SETTINGS = [(1.0, False), (0.35, False), (0.7, True)]


def jdiff_controlnet(module):
    """One compiled program per model: the scale and guess mode are traced arguments."""
    def run(params, x, t, ctx, control, scale, guess, added):
        return module.apply({"params": params}, x, t, ctx, control, conditioning_scale=scale, added_cond=added,
                            guess_mode=guess)
    return jax.jit(run)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> (diffusers ControlNet, its folder, jdiff (module, params) loaded from it, jitted apply)."""
    built = {}
    for seed, (name, config) in enumerate(CONFIGS.items()):
        torch.manual_seed(seed)
        model = randomize_torch(TorchControlNet(**config), seed=seed)  # the zero convolutions too
        # At the default scale the image's signal fades through the eight convolutions of the conditioning
        # embedding and its biases alone reach the U-Net copy (residuals moved by 2e-5 without the image).
        randomize_torch(model.controlnet_cond_embedding, scale=1.5, seed=seed)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        module, params = load_controlnet(folder)
        built[name] = model, folder, (module, params), jdiff_controlnet(module)
    return built


@pytest.fixture(scope="module")
def sd1_unet(tmp_path_factory):
    """The SD1-shaped U-Net that the "sd1" and "pooled_bgr" ControlNets fit: diffusers', and jdiff's."""
    torch.manual_seed(7)
    model = randomize_torch(TorchUNet(**SD1_UNET), seed=7)
    folder = tmp_path_factory.mktemp("unet")
    model.save_pretrained(folder)
    module, params = load_unet(folder)
    return model, folder, (module, params)


def reference_inputs(name, batch=2, latent=8, seed=0):
    config = CONFIGS[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=gen)
    t = torch.tensor([10.0, 637.5][:batch])
    ctx = torch.randn(batch, 7, config["cross_attention_dim"], generator=gen)
    # Channels of unequal brightness, as in pictures: a channel-order mistake then shows even in pooled residuals.
    control = torch.rand(batch, 3, 8 * latent, 8 * latent, generator=gen) * torch.tensor([1.0, 0.6, 0.2])[:, None, None]
    added = None
    if config.get("addition_embed_type") == "text_time":
        ids = torch.tensor([[1024.0, 768.0, 0.0, 64.0, 1024.0, 1024.0], [512.0, 512.0, 32.0, 0.0, 512.0, 512.0]])
        added = {"text_embeds": torch.randn(batch, POOLED, generator=gen), "time_ids": ids[:batch]}
    return x, t, ctx, control, added


def torch_residuals(model, x, t, ctx, control, added, scale=1.0, guess=False):
    with torch.no_grad():
        down, mid = model(x, t, ctx, control, conditioning_scale=scale, added_cond_kwargs=added, guess_mode=guess,
                          return_dict=False)
    return [nchw_to_nhwc(r) for r in down], nchw_to_nhwc(mid)


def as_jdiff(x, t, ctx, control, added):
    added = None if added is None else {k: v.numpy() for k, v in added.items()}
    return nchw_to_nhwc(x), t.numpy(), ctx.numpy(), nchw_to_nhwc(control), added


def residual_errors(ours, reference) -> list:
    (down, mid), (ref_down, ref_mid) = ours, reference
    assert len(down) == len(ref_down)
    return [max_rel_error(a, b) for a, b in zip([*down, mid], [*ref_down, ref_mid])]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_residuals_match_diffusers_float32(references, name):
    model, _, (_, params), run = references[name]
    inputs = reference_inputs(name)
    x, t, ctx, control, added = as_jdiff(*inputs)
    for scale, guess in SETTINGS:
        ours = run(params, x, t, ctx, control, scale, guess, added)
        reference = torch_residuals(model, *inputs, scale=scale, guess=guess)
        errors = residual_errors(ours, reference)
        assert max(errors) <= 1e-4, (scale, guess, errors)
    assert run._cache_size() == 1  # changing the scale or guess mode did not recompile
    # The control image moves every residual by far more than the tolerance.
    x_t, t_t, ctx_t, control_t, added_t = inputs
    without = torch_residuals(model, x_t, t_t, ctx_t, torch.zeros_like(control_t), added_t, scale=scale, guess=guess)
    assert min(residual_errors(without, reference)) > 1e-2


def test_guess_mode_and_scale_shape_the_residuals(references):
    """Not only parity: the factors are the documented ones (so a shared mistake cannot pass)."""
    _, _, (_, params), run = references["sd1"]
    x, t, ctx, control, added = as_jdiff(*reference_inputs("sd1"))
    plain = run(params, x, t, ctx, control, 1.0, False, added)
    guessed = run(params, x, t, ctx, control, 0.5, True, added)
    residuals, guessed = [*plain[0], plain[1]], [*guessed[0], guessed[1]]
    factors = 0.5 * np.logspace(-1, 0, len(residuals))  # 0.1 at the first skip to 1 at the mid block
    for r, g, f in zip(residuals, guessed, factors):
        np.testing.assert_allclose(g, f * np.asarray(r), rtol=1e-5, atol=1e-6)


def test_global_pool_averages_and_ignores_guess_mode(references):
    model, _, (module, params), run = references["pooled_bgr"]
    x, t, ctx, control, added = as_jdiff(*reference_inputs("pooled_bgr"))
    down, mid = run(params, x, t, ctx, control, 0.7, False, added)
    assert [r.shape for r in down] == [(2, 1, 1, 32)] * 3 + [(2, 1, 1, 64)] and mid.shape == (2, 1, 1, 64)
    guessed_down, guessed_mid = run(params, x, t, ctx, control, 0.7, True, added)
    jax.tree.map(np.testing.assert_array_equal, (down, mid), (guessed_down, guessed_mid))


def test_bgr_checkpoint_reads_the_channels_reversed(references):
    _, _, (module, params), run = references["pooled_bgr"]
    x, t, ctx, control, added = as_jdiff(*reference_inputs("pooled_bgr"))
    as_rgb = jdiff_controlnet(ControlNetModel(dataclasses.replace(module.config,
                                                                  controlnet_conditioning_channel_order="rgb")))
    bgr = run(params, x, t, ctx, control, 1.0, False, added)
    rgb_on_flipped = as_rgb(params, x, t, ctx, control[..., ::-1], 1.0, False, added)
    rgb_on_same = as_rgb(params, x, t, ctx, control, 1.0, False, added)
    assert max(residual_errors(rgb_on_flipped, bgr)) <= 1e-6
    assert max(residual_errors(rgb_on_same, bgr)) > 1e-3  # the order matters for this image


@pytest.mark.parametrize("name", ["sd1", "pooled_bgr"])
def test_unet_with_controlnet_matches_diffusers(references, sd1_unet, name):
    """ControlNet then U-Net, each side with its own residuals, as the pipelines chain them."""
    model, _, (_, params), run = references[name]
    unet_model, _, (unet, unet_params) = sd1_unet
    inputs = reference_inputs(name)
    x, t, ctx, control, added = as_jdiff(*inputs)
    x_t, t_t, ctx_t, control_t, _ = inputs
    with torch.no_grad():
        down_t, mid_t = model(x_t, t_t, ctx_t, control_t, conditioning_scale=0.8, return_dict=False)
        reference = nchw_to_nhwc(unet_model(x_t, t_t, ctx_t, down_block_additional_residuals=down_t,
                                            mid_block_additional_residual=mid_t).sample)
        plain = nchw_to_nhwc(unet_model(x_t, t_t, ctx_t).sample)
    down, mid = run(params, x, t, ctx, control, 0.8, False, added)
    out = jax.jit(lambda p, *a, **r: unet.apply({"params": p}, *a, **r))(
        unet_params, x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert max_rel_error(out, reference) <= 1e-4
    assert max_rel_error(plain, reference) > 1e-2  # the residuals changed the prediction


def test_unet_residual_errors(sd1_unet):
    _, _, (unet, params) = sd1_unet
    x, t, ctx = np.zeros((1, 8, 8, 4)), np.zeros((1,)), np.zeros((1, 7, 24))
    skips = [np.zeros((1, 8, 8, 32))] * 2 + [np.zeros((1, 4, 4, 32)), np.zeros((1, 4, 4, 64))]
    mid = np.zeros((1, 4, 4, 64))
    trace = lambda **residuals: jax.eval_shape(lambda: unet.apply({"params": params}, x, t, ctx, **residuals))
    assert trace(down_block_additional_residuals=skips, mid_block_additional_residual=mid).shape == (1, 8, 8, 4)
    with pytest.raises(ValueError, match="together"):
        trace(down_block_additional_residuals=skips)
    with pytest.raises(ValueError, match="together"):
        trace(mid_block_additional_residual=mid)
    with pytest.raises(ValueError, match="has 3 entries, but this U-Net has 4 skip connections"):
        trace(down_block_additional_residuals=skips[:3], mid_block_additional_residual=mid)


def test_fresh_controlnet_adds_nothing(references):
    """Initialised as ControlNet training starts: the zero convolutions make every residual zero."""
    module, _ = references["sd1"][2]
    run = references["sd1"][3]  # compiled for these shapes already
    params = jax.jit(lambda: module.init(jax.random.key(0), *example_inputs(module.config)))()["params"]
    x, t, ctx, control, added = as_jdiff(*reference_inputs("sd1"))
    down, mid = run(params, x, t, ctx, control, 1.0, False, added)
    assert all(not np.any(r) for r in [*down, mid])
    zero_kernels = {path[:-1] for path, v in traverse_util.flatten_dict(params).items()
                    if path[-1] == "kernel" and not np.any(v)}
    assert zero_kernels == {("controlnet_cond_embedding", "conv_out"), ("controlnet_mid_block",),
                            *[(f"controlnet_down_blocks_{i}",) for i in range(len(down))]}


def test_save_round_trip_loads_in_diffusers(references, tmp_path):
    model, folder, (module, params), _ = references["sdxl"]
    save_controlnet(module, params, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "ControlNetModel" and saved["addition_embed_type"] == "text_time"
    module2, params2 = load_controlnet(tmp_path)
    assert module2.config == module.config
    jax.tree.map(np.testing.assert_array_equal, params, params2)

    reloaded = TorchControlNet.from_pretrained(tmp_path).eval()
    assert sorted(reloaded.state_dict()) == sorted(model.state_dict())
    inputs = reference_inputs("sdxl")
    ours, theirs = torch_residuals(reloaded, *inputs, scale=0.6), torch_residuals(model, *inputs, scale=0.6)
    assert max(residual_errors(ours, theirs)) == 0.0


def test_param_tree_mirrors_the_checkpoint(references):
    _, _, (_, params), _ = references["sd1"]
    assert params["controlnet_cond_embedding"]["blocks_5"]["kernel"].shape == (3, 3, 16, 16)
    assert params["controlnet_down_blocks_3"]["kernel"].shape == (1, 1, 64, 64)
    assert params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"].shape == (24, 32)


def test_released_sd15_shapes_match_diffusers_tensor_for_tensor():
    """lllyasviel's SD1.5 ControlNets are diffusers' defaults with 768-wide text: full size, without
    allocating it (diffusers on the meta device, jdiff under eval_shape)."""
    config = dict(cross_attention_dim=768)
    with torch.device("meta"):
        reference = {k: tuple(v.shape) for k, v in TorchControlNet(**config).state_dict().items()}
    module = ControlNetModel(ControlNetConfig.from_dict(config))
    flat = traverse_util.flatten_dict(param_shapes(_controlnet(), module))
    ours = {torch_key(path): tuple(torch_shape(path, spec.shape)) for path, spec in flat.items()}
    assert ours == _controlnet().canonical_keys(reference)  # diffusers' list items renamed as loading does
    assert sum(int(np.prod(shape)) for shape in ours.values()) == 361_279_120


def test_folder_errors(references, sd1_unet, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_controlnet(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="holds a UNet2DConditionModel, not a ControlNetModel"):
        load_controlnet(sd1_unet[1])
    _, folder, _, _ = references["sd1"]
    (tmp_path / "bad").mkdir()
    raw = json.loads((folder / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**raw, "controlnet_conditioning_channel_order": "brg"}))
    with pytest.raises(ConfigError, match=r"bad/config.json: controlnet_conditioning_channel_order 'brg'"):
        load_controlnet(tmp_path / "bad")


@pytest.mark.parametrize("change, message", [
    (dict(mid_block_type=None), r"mid_block_type must be one of .* got None"),
    (dict(class_embed_type="timestep"), r"'class_embed_type' = 'timestep' is not supported"),
    (dict(up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), r"unknown config field 'up_block_types'"),
    (dict(conditioning_embedding_out_channels=()), "conditioning_embedding_out_channels must list positive widths"),
    (dict(layers_per_block=(1, 2)), r"layers_per_block is one int, got \(1, 2\)"),
    (dict(down_block_types=("CrossAttnDownBlock2D", "SimpleDownBlock2D")), "'SimpleDownBlock2D' is not supported"),
    (dict(layers_per_block=2, transformer_layers_per_block=((1,), 1)),
     "transformer_layers_per_block gives 1 depths for CrossAttnDownBlock2D at level 0, which has 2 attentions"),
    (dict(block_out_channels=(32, 62)), "62 channels do not split into 4 attention heads"),
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        ControlNetConfig.from_dict({**CONFIGS["sd1"], **change})


def test_nested_depths_need_no_up_blocks():
    """A U-Net needs reverse_transformer_layers_per_block with nested depths; a ControlNet has no up path."""
    config = ControlNetConfig.from_dict({**CONFIGS["sd1"], "transformer_layers_per_block": ((1, 2), 1)})
    assert config.encoder.transformer_depths(0) == (1,) and config.encoder.mid_transformer_depth == 1


def test_wrong_control_image_size_is_a_clear_error(references):
    module, params = references["sd1"][2]
    x, t, ctx, control, _ = as_jdiff(*reference_inputs("sd1"))
    with pytest.raises(ValueError, match=r"controlnet_cond is 32x32 pixels; for 8x8 latents this ControlNet takes "
                                         r"64x64 \(8 times the latent size\)"):
        jax.eval_shape(lambda: module.apply({"params": params}, x, t, ctx, control[:, :32, :32]))
