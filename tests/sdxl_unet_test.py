"""SDXL U-Nets (base and refiner shapes) against diffusers' UNet2DConditionModel on random weights:
the text_time micro-conditioning, per-block and per-attention transformer depths, blocks without
attention, saving, and the errors for missing or mis-sized added conditioning."""

import json

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util

from jdiff.convert import _unet, load_unet, param_shapes, save_unet, torch_key, torch_shape
from jdiff.errors import ConfigError
from jdiff.models.unet import (SDXL_BASE, UNet2DConditionModel, UNetConfig, example_inputs,
                               text_embeds_width)
from parity import max_rel_error, nchw_to_nhwc, randomize_torch

POOLED = 16  # tiny stand-in for SDXL's 1280-wide pooled text embedding
TIME_DIM = 8  # tiny stand-in for addition_time_embed_dim 256
TEXT_TIME = dict(use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                 cross_attention_dim=32, norm_num_groups=8)
CONFIGS = {
    # SDXL base's layout (three levels, the first without attention, 6 time ids) with one depth per
    # attention, down and up, as distilled SDXLs (SSD-1B) store them: the mid block takes the first
    # depth of the last level, the up blocks take reverse_transformer_layers_per_block.
    "base": dict(
        TEXT_TIME, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=((1, 1), (1, 2), (2, 1)),
        reverse_transformer_layers_per_block=((1, 2, 1), (2, 1, 1), (1, 1, 1)), attention_head_dim=(2, 4, 8),
        projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM),
    # SDXL refiner's layout (four levels, attention only in the middle two, 5 time ids) with one
    # depth per block, reversed for the up blocks; the mid block takes the last level's depth although
    # that level's down block has no attention.
    "refiner": dict(
        TEXT_TIME, block_out_channels=(24, 48, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2, 3), attention_head_dim=(2, 4, 8, 8),
        projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM),
}
NUM_TIME_IDS = {"base": 6, "refiner": 5}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> (diffusers model, its saved folder, jdiff's (module, params) loaded from it), built
    once for the module: loading traces the whole model, which dominates these tests' time."""
    built = {}
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        model = randomize_torch(TorchUNet(**config))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        built[name] = model, folder, load_unet(folder)
    return built


def reference_inputs(name, size=16, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=gen)
    t = torch.tensor([10.0, 637.5][:batch])
    ctx = torch.randn(batch, 7, CONFIGS[name]["cross_attention_dim"], generator=gen)
    # Sizes, crop corners (and aesthetic scores for the refiner): SDXL's ids are pixel counts.
    ids = torch.tensor([[1024.0, 768.0, 0.0, 64.0, 1024.0, 1024.0], [512.0, 512.0, 32.0, 0.0, 6.0, 2.5]])
    added = {"text_embeds": torch.randn(batch, POOLED, generator=gen), "time_ids": ids[:batch, :NUM_TIME_IDS[name]]}
    return x, t, ctx, added


def jdiff_inputs(x, t, ctx, added):
    return (nchw_to_nhwc(x), t.numpy(), ctx.numpy()), {k: v.numpy() for k, v in added.items()}


def torch_forward(model, x, t, ctx, added):
    with torch.no_grad():
        return model(x, t, ctx, added_cond_kwargs=added).sample


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers_float32(references, name):
    model, _, (module, params) = references[name]
    x, t, ctx, added = reference_inputs(name)
    ref = nchw_to_nhwc(torch_forward(model, x, t, ctx, added))
    args, added_np = jdiff_inputs(x, t, ctx, added)
    out = jax.jit(lambda p, *a: module.apply({"params": p}, *a, added_cond=added_np))(params, *args)
    assert max_rel_error(out, ref) <= 1e-4


def transformer_depth(params, block: str, j: int) -> int:
    return len([k for k in params[block][f"attentions_{j}"] if k.startswith("transformer_blocks")])


def test_depths_follow_diffusers_expansion(references):
    _, params = references["base"][2]
    assert [transformer_depth(params, "down_blocks_1", j) for j in range(2)] == [1, 2]
    assert [transformer_depth(params, "down_blocks_2", j) for j in range(2)] == [2, 1]
    assert transformer_depth(params, "mid_block", 0) == 2  # the first depth of the last level
    assert [transformer_depth(params, "up_blocks_0", j) for j in range(3)] == [1, 2, 1]
    assert [transformer_depth(params, "up_blocks_1", j) for j in range(3)] == [2, 1, 1]
    assert "attentions_0" not in params["down_blocks_0"] and "attentions_0" not in params["up_blocks_2"]

    _, params = references["refiner"][2]
    assert transformer_depth(params, "mid_block", 0) == 3  # the last level's, from a block without attention
    assert [transformer_depth(params, f"up_blocks_{i}", 0) for i in (1, 2)] == [2, 1]  # reversed


def test_save_round_trip_loads_in_diffusers(references, tmp_path):
    model, _, (module, params) = references["refiner"]
    save_unet(module, params, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["addition_embed_type"], saved["addition_time_embed_dim"],
            saved["projection_class_embeddings_input_dim"]) == ("text_time", TIME_DIM, POOLED + 5 * TIME_DIM)
    module2, params2 = load_unet(tmp_path)
    assert module2.config == module.config
    jax.tree.map(np.testing.assert_array_equal, params, params2)

    reloaded = TorchUNet.from_pretrained(tmp_path).eval()
    inputs = reference_inputs("refiner")
    torch.testing.assert_close(torch_forward(model, *inputs), torch_forward(reloaded, *inputs), rtol=0, atol=0)


def test_missing_added_cond_names_what_is_missing(references):
    module, params = references["base"][2]
    (x, t, ctx), added = jdiff_inputs(*reference_inputs("base"))
    with pytest.raises(ValueError, match=r"addition_embed_type 'text_time'.*added_cond.*missing text_embeds, time_ids"):
        module.apply({"params": params}, x, t, ctx)
    with pytest.raises(ValueError, match=r"missing time_ids"):
        module.apply({"params": params}, x, t, ctx, added_cond={"text_embeds": added["text_embeds"]})


def test_wrong_added_cond_width_is_a_clear_error(references):
    module, params = references["base"][2]
    (x, t, ctx), added = jdiff_inputs(*reference_inputs("refiner"))  # 5 time ids for a 6-id U-Net
    with pytest.raises(ValueError, match=r"text_embeds width 16 \+ 5 time_ids x addition_time_embed_dim 8 = 56, "
                                         r"but projection_class_embeddings_input_dim is 64"):
        module.apply({"params": params}, x, t, ctx, added_cond=added)


@pytest.mark.parametrize("change, message", [
    (dict(addition_time_embed_dim=None), "text_time' needs addition_time_embed_dim"),
    (dict(projection_class_embeddings_input_dim=TIME_DIM), "leaves no room for the text embeddings"),
    (dict(reverse_transformer_layers_per_block=None), "needs reverse_transformer_layers_per_block"),
    (dict(reverse_transformer_layers_per_block=((1, 2), (1, 1, 1))), "one entry per up block"),
    (dict(transformer_layers_per_block=(1, (2,), 1), reverse_transformer_layers_per_block=(1, 1, 1)),
     r"gives 1 depths for CrossAttnDownBlock2D at level 1, which has 2 attentions"),
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        UNetConfig.from_dict({**CONFIGS["base"], **change})


def test_released_sdxl_base_shapes_match_diffusers_tensor_for_tensor():
    """The full-size config, without allocating it: diffusers on the meta device vs our eval_shape.
    (The refiner's, SDXL_REFINER, matched too when checked by hand: 2,259,526,660 parameters; its
    mechanisms are the ones above, so it is not repeated here for time.)"""
    config, ids = SDXL_BASE, 6
    with torch.device("meta"):
        reference = {k: tuple(v.shape) for k, v in TorchUNet(**config).state_dict().items()}
    module = UNet2DConditionModel(UNetConfig.from_dict(config))
    flat = traverse_util.flatten_dict(param_shapes(_unet(), module))
    ours = {torch_key(path): tuple(torch_shape(path, spec.shape)) for path, spec in flat.items()}
    assert ours == reference
    assert sum(int(np.prod(shape)) for shape in ours.values()) == 2_567_463_684
    # The pipelines' split of projection_class_embeddings_input_dim: 1280 pooled text + ids x 256.
    assert text_embeds_width(module.config, ids) == 1280
    assert example_inputs(module.config, num_time_ids=ids)[-1]["text_embeds"].shape == (1, 1280)
