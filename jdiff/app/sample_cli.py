"""Generate images from a diffusers-format checkpoint: python sample.py --model DIR --prompt "..."
(in a checkout; `jdiff-sample` once installed)."""

import argparse
import sys

import jax
import jax.numpy as jnp

import jdiff
from jdiff import depth, distributed, image_io
from jdiff.app import batch_generation, prompts
from jdiff.errors import CheckpointError, ConfigError
from jdiff.paths import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="diffusers pipeline folder (SD 1.x/2.x, SDXL, SD3, Flux), or a "
                   "Hugging Face repo id (org/name) already in the local Hugging Face cache")
    p.add_argument("--revision", help="with a repo id: the branch, tag or commit (default main)")
    p.add_argument("--variant", help="diffusers' weight variant to load, e.g. fp16 (*.fp16.safetensors)")
    p.add_argument("--model-config", help="with a single-file --model (model.safetensors): the diffusers folder "
                   "or cached repo id of the same model that supplies configs and tokenizer")
    p.add_argument("--refiner", help="SDXL: a refiner pipeline folder that finishes each image")
    p.add_argument("--high-noise-frac", type=float, default=0.8,
                   help="with --refiner: the fraction of the noise levels the base model runs")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts-file", help="text lines, or JSON lines {prompt, negative_prompt, seed, height, "
                        "width, prompt_2, negative_prompt_2, prompt_3, negative_prompt_3}")
    p.add_argument("--negative-prompt", help="default: none (the empty prompt, or zeros where an SDXL "
                   "checkpoint asks for them)")
    for n, encoders in ((2, "SDXL's OpenCLIP bigG, SD3's CLIP-G, Flux's T5"), (3, "SD3's T5")):
        p.add_argument(f"--prompt-{n}", help=f"the prompt of text encoder {n} ({encoders}; diffusers' prompt_{n}); "
                       "default: the prompt")
        p.add_argument(f"--negative-prompt-{n}", help=f"the negative prompt of text encoder {n}; default: the "
                       "negative prompt")
    p.add_argument("--sampler", choices=jdiff.SAMPLERS, help="default: the checkpoint's own scheduler")
    p.add_argument("--steps", type=int, help="default: what diffusers' pipeline of the checkpoint runs (50 for SD)")
    p.add_argument("--guidance", type=float, help="default: diffusers' for the family (7.5 SD, 5.0 SDXL)")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--true-cfg-scale", type=float, default=1.0,
                   help="Flux: classifier-free guidance with --negative-prompt on top of the embedded guidance")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, help="images per call, split over every device of every "
                   "host (default: the number of devices, at least 4)")
    p.add_argument("--height", type=int, help="default: the model's size (a prompts file's lines may set their own)")
    p.add_argument("--width", type=int)
    p.add_argument("--buckets", metavar="WxH,WxH,...", help="resolution buckets: each image is drawn at the bucket "
                   "of the nearest aspect ratio, then scaled and centre-cropped to its size, so mixed sizes compile "
                   "once per bucket (e.g. 512x512,640x384,384x640)")
    p.add_argument("--init-image", help="image-to-image: the starting picture")
    p.add_argument("--strength", type=float, default=0.8, help="image-to-image: how much to change")
    p.add_argument("--mask", help="inpainting: white = repaint (needs --init-image)")
    p.add_argument("--depth-map", help="depth-to-image models (SD 2 depth): a depth estimate of --init-image "
                   "(.npy, or a greyscale 8/16-bit image; larger = nearer)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA file or folder (diffusers/PEFT or kohya), at SCALE (default 1.0); repeatable")
    p.add_argument("--controlnet", action="append", default=[], metavar="FOLDER",
                   help="a diffusers ControlNet folder (SD 1.x/2.x, SDXL); repeatable, one --control-image each")
    p.add_argument("--control-image", action="append", default=[], metavar="PATH",
                   help="with --controlnet: its control image (edges, depth, ...) at the output size")
    p.add_argument("--controlnet-scale", action="append", type=float, default=[], metavar="SCALE",
                   help="with --controlnet: the weight of its residuals (default 1.0); one for all, or one each")
    p.add_argument("--control-guidance-start", type=float, default=0.0,
                   help="with --controlnet: the fraction of the steps after which the ControlNets steer")
    p.add_argument("--control-guidance-end", type=float, default=1.0,
                   help="with --controlnet: the fraction of the steps after which they stop")
    p.add_argument("--guess-mode", action="store_true",
                   help="with --controlnet: steer the conditional half only (for prompts that say little)")
    p.add_argument("--ip-adapter", action="append", default=[], metavar="FILE",
                   help="an IP-Adapter .safetensors (SD 1.x/2.x, SDXL): prompt with --ip-adapter-image too; "
                        "repeat for several (they share --image-encoder), each with its own image")
    p.add_argument("--image-encoder", metavar="FOLDER", help="with --ip-adapter: its CLIP image encoder folder "
                   "(CLIPVisionModelWithProjection)")
    p.add_argument("--ip-adapter-image", action="append", default=[], metavar="PATH",
                   help="with --ip-adapter: the image prompt; one per --ip-adapter")
    p.add_argument("--ip-adapter-scale", action="append", type=float, default=[], metavar="SCALE",
                   help="with --ip-adapter: its weight (default 1.0); one for all, or one per --ip-adapter")
    p.add_argument("--ip-adapter-mask", action="append", default=[], metavar="PATH",
                   help="with --ip-adapter: where it acts (white), a mask image; one per --ip-adapter")
    p.add_argument("--vae-tiling", nargs="?", const=-1, type=int, metavar="TILE",
                   help="decode (and encode --init-image) in overlapping tiles, as diffusers' enable_vae_tiling: "
                        "for images larger than the VAE's own size; TILE pixels (default: the VAE's sample_size)")
    p.add_argument("--max-sequence-length", type=int,
                   help="SD3 and Flux: the T5 prompt's token count (diffusers' defaults: 256 and 512)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compile-cache", help="folder for compiled programs (JAX's persistent compilation cache and "
                   "generate's serialised executables): a later run with the same model and sizes skips tracing "
                   "and compiling")
    p.add_argument("--out", default="samples", help="NNNNN.png, manifest.jsonl and grid.png (the first 64); "
                   "a rerun of the same command skips the images already written")
    p.add_argument("--overwrite", action="store_true", help="replace the images of an earlier run in --out")
    p.add_argument("--coordinator-address", help="multi-process: host:port of process 0 (TPU pods and "
                   "SLURM are detected without it)")
    p.add_argument("--num-processes", type=int, help="multi-process: how many processes")
    p.add_argument("--process-id", type=int, help="multi-process: this process's index")
    return p.parse_args(argv)


def parse_lora(spec: str) -> tuple[str, float]:
    """'PATH' or 'PATH:SCALE' -> (path, scale)."""
    path, _, scale = spec.rpartition(":")
    if not path or scale.startswith("//"):  # no scale; "gs://bucket/lora" has a colon of its own
        return spec, 1.0
    try:
        return path, float(scale)
    except ValueError:
        raise ConfigError(f"--lora {spec!r}: the part after the last ':' must be a scale (a number).") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        if args.batch_size is None:
            args.batch_size = max(4, jax.device_count())
        if args.compile_cache:
            batch_generation.enable_compilation_cache(args.compile_cache, executables=True)
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}.")
        entries = prompts.read_prompts_file(args.prompts_file) if args.prompts_file else [{"prompt": args.prompt}]
        encoder_prompts = {key: getattr(args, key) for key in prompts.ENCODER_PROMPT_KEYS}
        jobs = prompts.make_jobs(entries, args.num_images, args.seed, args.negative_prompt, encoder_prompts)
        buckets = prompts.parse_buckets(args.buckets) if args.buckets is not None else None
        pipe = jdiff.load_pipeline(args.model, dtype=jnp.dtype(args.dtype), variant=args.variant,
                                   revision=args.revision, config=args.model_config)
        lora_scales = {}
        for i, spec in enumerate(args.lora):
            path, scale = parse_lora(spec)
            name = f"lora_{i}"
            pipe = jdiff.load_lora_weights(pipe, path, adapter_name=name)
            lora_scales[name] = scale
        default_sampler, default_steps = jdiff.checkpoint_sampling(pipe)
        guidance = pipe.family.default_guidance if args.guidance is None else args.guidance
        settings = dict(sampler=args.sampler or default_sampler, steps=args.steps or default_steps,
                        guidance=guidance, height=args.height,
                        width=args.width, eta=args.eta, guidance_rescale=args.guidance_rescale)
        if args.true_cfg_scale != 1.0:
            settings["true_cfg_scale"] = args.true_cfg_scale
        if lora_scales:
            settings["lora_scales"] = lora_scales
        if args.vae_tiling is not None:
            settings["vae_tiling"] = True if args.vae_tiling == -1 else args.vae_tiling
        if args.max_sequence_length is not None:
            settings["max_sequence_length"] = args.max_sequence_length
        refiner = None
        if args.refiner:
            if args.init_image or args.mask:
                raise ConfigError("--refiner finishes text-to-image runs; it does not take --init-image or --mask.")
            refiner_pipe = jdiff.load_pipeline(args.refiner, dtype=jnp.dtype(args.dtype), variant=args.variant)
            refiner = batch_generation.Refiner(refiner_pipe, args.high_noise_frac,
                                               {"sampler": args.sampler or jdiff.checkpoint_sampling(refiner_pipe)[0]})
        if args.controlnet or args.control_image:
            if len(args.control_image) != len(args.controlnet):
                raise ConfigError(f"{len(args.controlnet)} --controlnet and {len(args.control_image)} --control-image: "
                                  "give one control image per ControlNet.")
            if len(args.controlnet_scale) not in (0, 1, len(args.controlnet)):
                raise ConfigError("--controlnet-scale: give one scale for all ControlNets or one per --controlnet.")
            pipe = jdiff.load_controlnet(pipe, args.controlnet)
            scales = args.controlnet_scale or [1.0]
            settings.update(control_image=[image_io.load_image(path) for path in args.control_image],
                            controlnet_conditioning_scale=scales * len(args.controlnet) if len(scales) == 1 else scales,
                            control_guidance_start=args.control_guidance_start,
                            control_guidance_end=args.control_guidance_end, guess_mode=args.guess_mode)
        recorded_scales = None
        if args.ip_adapter or args.ip_adapter_image or args.ip_adapter_mask or args.ip_adapter_scale:
            count = len(args.ip_adapter)
            if not (count and args.image_encoder and len(args.ip_adapter_image) == count):
                raise ConfigError("an image prompt needs --ip-adapter, --image-encoder and one --ip-adapter-image per "
                                  f"--ip-adapter (got {count} and {len(args.ip_adapter_image)}).")
            if len(args.ip_adapter_scale) not in (0, 1, count) or len(args.ip_adapter_mask) not in (0, count):
                raise ConfigError("--ip-adapter-scale: one for all or one per --ip-adapter; --ip-adapter-mask: one per "
                                  "--ip-adapter.")
            pipe = jdiff.load_ip_adapter(pipe, args.ip_adapter, image_encoder=args.image_encoder)
            scales = args.ip_adapter_scale or [1.0]
            given = dict(ip_adapter_image=[image_io.load_image(path) for path in args.ip_adapter_image],
                         ip_adapter_scale=scales * count if len(scales) == 1 else scales)
            if args.ip_adapter_mask:  # as opened: resized in its own mode, as diffusers' mask processor does
                given["ip_adapter_mask"] = [image_io.open_image(path) for path in args.ip_adapter_mask]
            # generate() takes one adapter's values as they are, several adapters' as lists
            settings.update({k: v[0] for k, v in given.items()} if count == 1 else given)
            recorded_scales = given["ip_adapter_scale"] if count > 1 else None  # a list: not in the settings record
        if args.init_image:
            settings.update(init_image=image_io.load_image(args.init_image), strength=args.strength)
        if args.mask:
            settings["mask"] = image_io.load_image(args.mask, mode="L")
        if args.depth_map:
            settings["depth_map"] = depth.read_depth_map(args.depth_map)
        # Everything else that changes the pixels goes into each PNG and the run record too.
        inputs = {k: v for k, v in (("init_image", args.init_image), ("mask", args.mask), ("depth_map", args.depth_map),
                                    ("refiner", args.refiner),
                                    ("controlnet", args.controlnet), ("control_image", args.control_image),
                                    ("controlnet_scale", args.controlnet and args.controlnet_scale),
                                    ("ip_adapter", args.ip_adapter), ("image_encoder", args.image_encoder),
                                    ("ip_adapter_image", args.ip_adapter_image),
                                    ("ip_adapter_mask", args.ip_adapter_mask),
                                    ("ip_adapter_scale", recorded_scales),
                                    ("high_noise_frac", args.refiner and args.high_noise_frac),
                                    ("lora", args.lora), ("revision", args.revision), ("variant", args.variant),
                                    ("model_config", args.model_config), ("buckets", args.buckets)) if v}
        inputs["dtype"] = args.dtype
        stats = batch_generation.run(pipe, jobs, Path(args.out), min(args.batch_size, len(jobs)), settings, inputs,
                                     refiner, overwrite=args.overwrite, buckets=buckets)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_count() > 1:
        print(f"process {jax.process_index()}: wrote {stats.written} of the images")
    if jax.process_index() == 0:
        print(stats.summary())
        print(f"{len(jobs)} images, manifest.jsonl and grid.png in {args.out}/")
    return 0


def run() -> None:
    """The `jdiff-sample` entry point (and `python sample.py`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
