"""A seconds-long run of the whole recipe (tests and smoke checks): tiny models, few steps."""

from jdiff.configs import default


def get_config():
    config = default.get_config()
    config.data.num_train = 64
    config.data.num_test = 16
    config.vae.block_out_channels = (8, 16)
    config.vae.norm_num_groups = 4
    config.text.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config.unet.update(block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=2,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    for section in (config.vae_train, config.diffusion_train, config.controlnet_train, config.reward_train,
                    config.consistency_train):
        section.update(steps=6, batch_size=8, warmup_steps=2, log_every=2, checkpoint_every=3, eval_every=6)
    config.sample.update(steps=2, num_prompts=4)
    config.evaluate.update(num_prompts=8, batch_size=8)
    config.controlnet.update(num_prompts=8)
    config.reward.update(steps=3, num_prompts=8)
    config.consistency.update(time_cond_proj_dim=32, num_prompts=8, eval_steps=(1, 2))
    config.noise.update(num_prompts=10, batch_size=8, iterations=2, steps=3)
    return config
