"""jdiff vs diffusers (PyTorch) on this machine: one forward call of an SD3-Medium-shaped and a
Flux-shaped transformer, float32, at 512x512 (1024 image tokens), batch 1.

Same widths as the released models (SD3 Medium: 24 heads x 64, joint width 4096, pooled 2048; Flux:
24 heads x 128, joint width 4096, pooled 768, guidance embedding), fewer blocks so both copies fit
in this machine's memory. Both sides run the same random weights (written by diffusers with
`save_pretrained`, loaded by jdiff), in one process, one after the other, each warmed up first.

    python bench/dit_forward.py                     # both, results to bench/results/dit_forward.json
    python bench/dit_forward.py --only flux --repeats 2
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
from models import compare
from report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jdiff.convert import load_flux_transformer, load_sd3_transformer  # noqa: E402
from jdiff.models import flux_transformer  # noqa: E402

# SD3 Medium's config with 4 of its 24 blocks.
SD3_MEDIUM = dict(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, pos_embed_max_size=192)
# Flux.1-dev's config with 1 of its 19 double-stream and 2 of its 38 single-stream blocks.
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def bench_sd3(folder: Path, repeats: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**SD3_MEDIUM).eval()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    model.save_pretrained(folder / "sd3")
    x, t = torch.randn(1, 16, 64, 64), torch.tensor([500.0])
    context, pooled = torch.randn(1, 77 + 256, 4096), torch.randn(1, 2048)  # CLIP 77 + T5 256 tokens
    module, params = load_sd3_transformer(folder / "sd3")
    args = (params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()),
            jnp.asarray(context.numpy()), jnp.asarray(pooled.numpy()))
    fn = lambda p, x, t, c, y: module.apply({"params": p}, x, t, c, y)
    return compare("sd3_medium_shaped_4_blocks_b1_512x512",
                     lambda: model(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample,
                     fn, args, repeats, dict(params_millions=round(params_m, 1), batch=1, image_tokens=1024,
                                             text_tokens=333, blocks="4 of 24"))


def bench_flux(folder: Path, repeats: int):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_DEV).eval()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    model.save_pretrained(folder / "flux")
    latents = torch.randn(1, 16, 64, 64)
    packed = FluxPipeline._pack_latents(latents, 1, 16, 64, 64)  # [1, 1024, 64]
    image_ids = FluxPipeline._prepare_latent_image_ids(1, 32, 32, "cpu", torch.float32)
    text_ids = torch.zeros(512, 3)
    context, pooled = torch.randn(1, 512, 4096), torch.randn(1, 768)
    sigma, guidance = torch.tensor([0.5]), torch.tensor([3.5])
    module, params = load_flux_transformer(folder / "flux")
    args = (params, jnp.asarray(packed.numpy()), jnp.asarray(sigma.numpy()), jnp.asarray(context.numpy()),
            jnp.asarray(pooled.numpy()), jnp.asarray(guidance.numpy()))
    ids = (np.asarray(flux_transformer.image_ids(64, 64)), np.zeros((512, 3), np.float32))
    np.testing.assert_array_equal(ids[0], image_ids.numpy())
    fn = lambda p, x, s, c, y, g: module.apply({"params": p}, x, s, c, y, *ids, g)
    return compare("flux_dev_shaped_1_double_2_single_b1_512x512",
                     lambda: model(hidden_states=packed, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                                   encoder_hidden_states=context, txt_ids=text_ids, img_ids=image_ids).sample,
                     fn, args, repeats, dict(params_millions=round(params_m, 1), batch=1, image_tokens=1024,
                                             text_tokens=512, blocks="1 of 19 double, 2 of 38 single"),
                     to_jax_layout=lambda a: a)  # packed tokens on both sides


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["sd3", "flux"], default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dit_forward.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "sd3"):
            results.append(bench_sd3(Path(tmp), args.repeats))
        if args.only in (None, "flux"):
            results.append(bench_flux(Path(tmp), args.repeats))
    write_report(args.out, results)


if __name__ == "__main__":
    main()
