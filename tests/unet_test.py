"""U-Net parity with diffusers' UNet2DConditionModel on random weights, for every supported option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from jdiff.convert import load_unet, save_unet
from parity import max_rel_error, nchw_to_nhwc, randomize_torch

TWO_BLOCKS = dict(
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=24,
    attention_head_dim=4, norm_num_groups=8,
)
CONFIGS = {
    # SD1.x shape: conv projections, attention_head_dim as the head count.
    "sd1": dict(TWO_BLOCKS),
    # SD2.x shape: linear projections, per-block heads, float32 attention, deeper transformers.
    "sd2": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=(1, 2, 1), cross_attention_dim=24, attention_head_dim=(2, 4, 4),
        use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=(1, 2, 1),
        norm_num_groups=16,
    ),
    # Inpainting input, other sinusoid layout, scale-shift time conditioning, LCM guidance embedding.
    "inpaint_options": dict(
        TWO_BLOCKS, in_channels=9, flip_sin_to_cos=False, freq_shift=1,
        resnet_time_scale_shift="scale_shift", time_cond_proj_dim=16, time_embedding_dim=96,
        only_cross_attention=(True, False), conv_in_kernel=1, conv_out_kernel=1,
        attention_head_dim=(2, 4), center_input_sample=True,
    ),
    "mid_without_attention": dict(TWO_BLOCKS, mid_block_type="UNetMidBlock2D", mid_block_scale_factor=1.5,
                                  downsample_padding=0, act_fn="mish"),
    "no_mid_block": dict(TWO_BLOCKS, mid_block_type=None, norm_eps=1e-6),
    # A bool only_cross_attention reaches the down/up blocks but not diffusers' cross-attention mid block.
    "only_cross_attention": dict(TWO_BLOCKS, only_cross_attention=True),
    # The attention-pooled text added to the time embedding (DeepFloyd IF's TextTimeEmbedding).
    "text_time_embedding": dict(TWO_BLOCKS, addition_embed_type="text", addition_embed_type_num_heads=4),
}


def make_reference(tmp_path, name, **overrides):
    config = {**CONFIGS[name], **overrides}
    torch.manual_seed(0)
    model = randomize_torch(TorchUNet(**config))
    model.save_pretrained(tmp_path)
    return model, config


def reference_inputs(config, size=16, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.get("in_channels", 4), size, size, generator=gen)
    t = torch.tensor([10.0, 637.5][:batch])
    ctx = torch.randn(batch, 7, config["cross_attention_dim"], generator=gen)
    cond = torch.randn(batch, config["time_cond_proj_dim"], generator=gen) if config.get("time_cond_proj_dim") else None
    return x, t, ctx, cond


def run_both(model, config, tmp_path, size=16, dtype=jnp.float32):
    x, t, ctx, cond = reference_inputs(config, size)
    with torch.no_grad():
        ref = nchw_to_nhwc(model(x, t, ctx, timestep_cond=cond).sample)
    module, params = load_unet(tmp_path, dtype=dtype)
    args = [nchw_to_nhwc(x), t.numpy(), ctx.numpy()] + ([cond.numpy()] if cond is not None else [])
    out = jax.jit(lambda p, *a: module.apply({"params": p}, *a))(params, *args)
    return np.asarray(out, np.float32), ref


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers_float32(tmp_path, name):
    model, config = make_reference(tmp_path, name)
    out, ref = run_both(model, config, tmp_path)
    assert max_rel_error(out, ref) <= 1e-4


def test_odd_latent_size_upsamples_to_the_skip_size(tmp_path):
    # 3 blocks on 10x10 latents: 10 -> 5 -> 3 going down, so going up 3 -> 5 is not a doubling.
    model, config = make_reference(tmp_path, "sd2")
    out, ref = run_both(model, config, tmp_path, size=10)
    assert out.shape == (2, 10, 10, 4)
    assert max_rel_error(out, ref) <= 1e-4


def test_bfloat16_compute_stays_close(tmp_path):
    model, config = make_reference(tmp_path, "sd2")
    out, ref = run_both(model, config, tmp_path, dtype=jnp.bfloat16)
    assert np.isfinite(out).all()
    assert max_rel_error(out, ref) <= 0.05


def test_gradient_checkpointing_gives_the_same_values_and_gradients(tmp_path):
    make_reference(tmp_path, "sd1")
    x, t, ctx, _ = (np.asarray(a) if a is not None else None for a in reference_inputs(CONFIGS["sd1"]))
    x = nchw_to_nhwc(x)
    results = []
    for remat in (False, True):
        module, params = load_unet(tmp_path, gradient_checkpointing=remat)
        loss = lambda p: jnp.mean(module.apply({"params": p}, x, t, ctx) ** 2)
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (v0, g0), (v1, g1) = results
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_save_round_trip_is_bit_exact_and_loads_in_diffusers(tmp_path):
    model, config = make_reference(tmp_path / "ref", "inpaint_options")
    module, params = load_unet(tmp_path / "ref")
    save_unet(module, params, tmp_path / "ours")
    module2, params2 = load_unet(tmp_path / "ours")
    assert module2.config == module.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, params2)

    reloaded = TorchUNet.from_pretrained(tmp_path / "ours").eval()
    x, t, ctx, cond = reference_inputs(config)
    with torch.no_grad():
        a = model(x, t, ctx, timestep_cond=cond).sample
        b = reloaded(x, t, ctx, timestep_cond=cond).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_param_tree_mirrors_the_checkpoint(tmp_path):
    make_reference(tmp_path, "sd1")
    _, params = load_unet(tmp_path)
    assert params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["ff"]["net_0"]["proj"]["kernel"].shape == (32, 256)
    assert params["up_blocks_1"]["resnets_1"]["conv1"]["kernel"].shape == (3, 3, 64, 32)
