"""Bad checkpoints get clear errors: missing pieces, pickles, wrong shapes, unknown fields, corruption."""

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy
from diffusers import UNet2DConditionModel as TorchUNet

from jdiff.convert import load_unet, load_vae, torch_key
from jdiff.errors import CheckpointError, ConfigError

TINY = dict(
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=24,
    attention_head_dim=4, norm_num_groups=8,
)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    TorchUNet(**TINY).save_pretrained(folder)
    return folder


@pytest.fixture
def copy(unet_folder, tmp_path):
    target = tmp_path / "unet"
    shutil.copytree(unet_folder, target)
    return target


def test_torch_key_names_list_items_with_dots():
    path = ("down_blocks_0", "attentions_1", "transformer_blocks_0", "attn1", "to_out_0", "kernel")
    assert torch_key(path) == "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight"
    # `linear_1` is a name, not a list item.
    assert torch_key(("time_embedding", "linear_1", "bias")) == "time_embedding.linear_1.bias"


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_unet(tmp_path / "nowhere")


def test_missing_config(copy):
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json.*missing"):
        load_unet(copy)


def test_missing_weights(copy):
    (copy / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        load_unet(copy)


def test_pickled_weights_only(copy):
    (copy / WEIGHTS).rename(copy / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"PyTorch pickles.*safe_serialization=True"):
        load_unet(copy)


def test_tensor_shape_disagrees_with_config(copy):
    state = safetensors.numpy.load_file(str(copy / WEIGHTS))
    state["down_blocks.0.resnets.0.conv1.weight"] = np.zeros((32, 16, 3, 3), np.float32)
    safetensors.numpy.save_file(state, str(copy / WEIGHTS))
    with pytest.raises(CheckpointError) as err:
        load_unet(copy)
    message = str(err.value)
    assert "down_blocks.0.resnets.0.conv1.weight" in message
    assert "(32, 16, 3, 3)" in message and "(32, 32, 3, 3)" in message


def test_missing_and_unexpected_tensors(copy):
    state = safetensors.numpy.load_file(str(copy / WEIGHTS))
    state["extra.weight"] = state.pop("conv_in.bias")
    safetensors.numpy.save_file(state, str(copy / WEIGHTS))
    with pytest.raises(CheckpointError, match="conv_in.bias"):
        load_unet(copy)
    del state["extra.weight"]
    state["conv_in.bias"] = np.zeros(32, np.float32)
    state["extra.weight"] = np.zeros(3, np.float32)
    safetensors.numpy.save_file(state, str(copy / WEIGHTS))
    with pytest.raises(CheckpointError, match="extra.weight"):
        load_unet(copy)


def test_unknown_config_field_names_close_matches(copy):
    config = json.loads((copy / "config.json").read_text())
    config["layers_per_blok"] = 2
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"unknown config field 'layers_per_blok'.*'layers_per_block'"):
        load_unet(copy)


def test_unsupported_config_value(copy):
    config = json.loads((copy / "config.json").read_text())
    config["addition_embed_type"] = "text_image"  # Kandinsky 2.1's; jdiff implements "text" and "text_time"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="addition_embed_type.*not supported"):
        load_unet(copy)


def test_corrupt_weights(copy):
    data = (copy / WEIGHTS).read_bytes()
    (copy / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_unet(copy)


def test_invalid_json(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_unet(copy)


def test_wrong_component(copy):
    with pytest.raises(CheckpointError, match="holds a UNet2DConditionModel, not a AutoencoderKL"):
        load_vae(copy)


def test_fp16_checkpoint_loads_as_param_dtype(copy):
    state = safetensors.numpy.load_file(str(copy / WEIGHTS))
    safetensors.numpy.save_file({k: v.astype(np.float16) for k, v in state.items()}, str(copy / WEIGHTS))
    _, params = load_unet(copy)
    assert params["conv_in"]["kernel"].dtype == np.float32
    np.testing.assert_allclose(
        params["conv_in"]["kernel"], state["conv_in.weight"].astype(np.float16).transpose(2, 3, 1, 0), rtol=0
    )


def test_random_component_has_the_loaded_parameter_tree():
    """random_component builds what load_component would from the same config, with parameters
    drawn on the device in param_dtype (bench/device.py's models)."""
    import jax
    import jax.numpy as jnp

    from jdiff import convert

    config = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  cross_attention_dim=32, attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    module, params = convert.random_component("unet", config, jax.random.key(0), dtype=jnp.bfloat16,
                                              param_dtype=jnp.bfloat16)
    expected = convert.param_shapes(convert._unet(), module)
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    assert all(p.shape == e.shape and p.dtype == jnp.bfloat16 for p, e in zip(jax.tree.leaves(params),
                                                                                jax.tree.leaves(expected)))
    assert module.config.block_out_channels == (32, 64) and module.dtype == jnp.bfloat16
    assert any(float(jnp.abs(p).max()) > 0 for p in jax.tree.leaves(params))  # drawn, not zeros
    with pytest.raises(ValueError, match="unknown component kind 'controlnet'"):
        convert.random_component("controlnet", config, jax.random.key(0))
