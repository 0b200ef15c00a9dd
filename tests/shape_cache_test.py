"""jdiff.shape_cache: parameter shapes traced once per config, read back by later loads."""

import jax
import jax.numpy as jnp
import pytest

from jdiff import convert, shape_cache
from jdiff.models.unet import UNet2DConditionModel, UNetConfig

CONFIG = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
              attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture
def traces(tmp_path, monkeypatch):
    """The cache in a fresh folder, and a count of the traces convert.param_shapes makes."""
    monkeypatch.setenv("JDIFF_CACHE", str(tmp_path))
    calls = []
    real = jax.eval_shape
    monkeypatch.setattr(convert.jax, "eval_shape", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def shapes(**config):
    module = UNet2DConditionModel(UNetConfig.from_dict({**CONFIG, **config}), dtype=jnp.float32)
    return convert.param_shapes(convert._unet(), module)


def test_second_load_reads_the_traced_tree(traces):
    first = shapes()
    assert len(traces) == 1 and len(list(shape_cache.cache_dir().glob("*.json"))) == 1
    second = shapes()
    assert len(traces) == 1  # not traced again
    assert jax.tree.structure(first) == jax.tree.structure(second)
    assert jax.tree.leaves(first) == jax.tree.leaves(second)  # shapes and dtypes


def test_another_config_or_dtype_is_traced_anew(traces):
    shapes()
    wider = shapes(block_out_channels=(32, 96))
    assert len(traces) == 2
    assert wider["conv_in"]["kernel"].shape[-1] == 32 and wider["down_blocks_1"]["resnets_0"]["conv1"]["kernel"].shape[-1] == 96
    module = UNet2DConditionModel(UNetConfig.from_dict(CONFIG), dtype=jnp.float32, param_dtype=jnp.bfloat16)
    tree = convert.param_shapes(convert._unet(), module)
    assert len(traces) == 3 and tree["conv_in"]["kernel"].dtype == jnp.bfloat16


def test_damaged_or_unwritable_cache_only_costs_a_trace(traces, tmp_path, monkeypatch):
    expected = shapes()
    (entry,) = shape_cache.cache_dir().glob("*.json")
    entry.write_text("{not json")
    assert jax.tree.leaves(shapes()) == jax.tree.leaves(expected) and len(traces) == 2
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setenv("JDIFF_CACHE", str(blocked))  # the cache folder cannot be made
    assert jax.tree.leaves(shapes()) == jax.tree.leaves(expected) and len(traces) == 3
