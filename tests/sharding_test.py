"""Meshes with data, fsdp and tensor axes: layout rules, the same losses as one device, about 1/8 of
the state per device under fsdp=8, and a checkpoint restored onto a different mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jdiff.configs import default, tiny
from jdiff import families, sharding, train_lib
from jdiff.app.caption_tokenizer import write_caption_tokenizer
from jdiff.app import stages
from jdiff.app.shapes_tfds import load_shapes
from jdiff.data import make_loader, to_model_range
from jdiff.errors import ConfigError


def mesh(**sizes):
    return sharding.make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])


def test_mesh_shapes_and_errors():
    assert dict(mesh(data=2, fsdp=4).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(sharding.make_mesh({"data": -1, "tensor": 2}).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ConfigError, match="do not divide by 3"):
        sharding.make_mesh({"data": -1, "fsdp": 3})
    with pytest.raises(ConfigError, match="needs 4 devices but 8"):
        sharding.make_mesh({"data": 2, "fsdp": 2})
    with pytest.raises(ConfigError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})
    with pytest.raises(ConfigError, match="at most one -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ConfigError, match="does not split over data x fsdp = 8"):
        sharding.batch_size_per_process(mesh(fsdp=8), 12)


def test_partition_rules():
    m = mesh(data=2, fsdp=2, tensor=2)
    spec = lambda path, shape: sharding.partition_spec(path.split("/"), shape, m)  # noqa: E731
    assert spec("down_blocks_0/resnets_0/conv1/kernel", (3, 3, 32, 64)) == P(None, None, None, "fsdp")
    assert spec("attn1/to_q/kernel", (64, 64)) == P("fsdp", "tensor")
    assert spec("attn1/to_out_0/kernel", (64, 64)) == P("tensor", "fsdp")
    assert spec("ff/net_0/proj/kernel", (64, 512)) == P("fsdp", "tensor")
    assert spec("ff/net_2/kernel", (256, 64)) == P("tensor", "fsdp")
    assert spec("encoder/layers_0/mlp/fc1/kernel", (32, 64)) == P("fsdp", "tensor")
    assert spec("embeddings/token_embedding/embedding", (600, 128)) == P(None, "fsdp")
    assert spec("conv_out/kernel", (3, 3, 320, 3)) == P(None, None, None, None)  # small: not worth it
    big = mesh(fsdp=8)
    # Output channels 4 do not split 8 ways: a large kernel goes on its largest divisible dimension.
    assert sharding.partition_spec(["conv_out", "kernel"], (3, 3, 1280, 4), big) == P(None, None, "fsdp", None)
    assert sharding.partition_spec(["norm", "scale"], (320,), big) == P(None)
    assert sharding.partition_spec(["attn1", "to_q", "kernel"], (64, 64), mesh(data=8)) == P(None, None)


def test_fsdp_puts_an_eighth_of_the_default_models_train_state_on_each_device(tmp_path):
    config = default.get_config()
    unet = families.build(config, tokenizer=write_caption_tokenizer(tmp_path, ["a red circle"])).unet
    params = jax.eval_shape(lambda: unet.init(jax.random.key(0), jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,)),
                                              jnp.zeros((1, 32, config.text.hidden_size)))["params"])
    state = jax.eval_shape(lambda p: (p, optax.adamw(1e-3).init(p), p), params)  # params, Adam moments, EMA
    shardings = sharding.tree_shardings(state, mesh(fsdp=8))
    total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))
    per_device = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                     for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
    assert per_device / total < 0.135, per_device / total  # 1/8 = 0.125 plus the replicated norms and biases


def vae_config(**mesh_sizes):
    config = tiny.get_config()
    # Wider than the tiny VAE so that kernels, not norms and biases, hold most of the bytes, and with
    # the mid-block attention so that the tensor axis has heads to split.
    config.vae.update(block_out_channels=(32, 64), norm_num_groups=8, mid_block_add_attention=True)
    config.data.resolution = 16
    config.vae_train.update(steps=12, log_every=1, checkpoint_every=4, warmup_steps=2, batch_size=8,
                            learning_rate=1e-3, mesh={"data": 1, "fsdp": 1, "tensor": 1, **mesh_sizes})
    return config


def vae_train(workdir, data_dir, config, num_devices):
    config.vae_train.num_devices = num_devices
    source = load_shapes(data_dir, "train", resolution=16, num_train=64, num_test=16)
    stage = stages.vae_stage(config, to_model_range(np.stack([source[i]["image"] for i in range(4)])))
    loader = make_loader(source, batch_size=config.vae_train.batch_size, seed=0)
    return train_lib.train(stage, config.vae_train, workdir, loader, total_batch=config.vae_train.batch_size)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The 16 px shapes set, built once for the module's runs."""
    folder = tmp_path_factory.mktemp("shapes16")
    load_shapes(folder, "train", resolution=16, num_train=64, num_test=16)
    return folder


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, data_dir):
    """The unsharded 12-step run both tests compare with (the tests only read it)."""
    return vae_train(tmp_path_factory.mktemp("one_device"), data_dir, vae_config(), num_devices=1)


@pytest.mark.slow
def test_meshes_train_like_one_device(tmp_path, data_dir, one_device_run):
    one = one_device_run
    reference = [h["loss"] for h in one.history]
    assert reference[-1] < reference[0]  # it does learn
    param_bytes = lambda state: max(sharding.bytes_per_device(state.params).values())  # noqa: E731
    # Each axis alone, then all three at once (a two-axis mix adds nothing the three-axis one lacks).
    for sizes in (dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)):
        name = "_".join(f"{k}{v}" for k, v in sizes.items())
        result = vae_train(tmp_path / name, data_dir, vae_config(**sizes), num_devices=8)
        np.testing.assert_allclose([h["loss"] for h in result.history], reference, rtol=2e-3, err_msg=name)
        if sizes == dict(fsdp=8):
            ratio = param_bytes(result.state) / param_bytes(one.state)
            assert ratio < 0.15, ratio
            opt_ratio = max(sharding.bytes_per_device(result.state.opt_state).values()) / max(
                sharding.bytes_per_device(one.state.opt_state).values())
            assert opt_ratio < 0.15, opt_ratio


@pytest.mark.slow
def test_checkpoint_from_eight_devices_resumes_on_one(tmp_path, data_dir, one_device_run):
    straight = one_device_run  # the same config, straight through on one device
    config = vae_config(fsdp=8)
    config.vae_train.run_steps = 8
    first = vae_train(tmp_path / "moved", data_dir, config, num_devices=8)
    assert int(first.state.step) == 8
    second = vae_train(tmp_path / "moved", data_dir, vae_config(), num_devices=1)  # same checkpoints, one device
    assert [h["step"] for h in second.history][0] == 9
    losses = [h["loss"] for h in first.history + second.history]
    np.testing.assert_allclose(losses, [h["loss"] for h in straight.history], rtol=2e-3)
