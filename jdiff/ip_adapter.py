"""IP-Adapter (Ye et al. 2023): an image as a prompt, through decoupled cross-attention.

A CLIP image encoder embeds the picture; the adapter's image projection turns the embedding into a
few tokens shaped like text tokens; every cross-attention layer of the U-Net attends to them with
its own key and value projections (`to_k_ip`, `to_v_ip`) and adds that, times a scale, to its
attention over the text. The U-Net itself is unchanged: a Flax method interceptor adds the term
around each cross-attention call (as jdiff.lora applies LoRA), so the models know nothing of it.

Files: the IP-Adapter safetensors that diffusers' `load_ip_adapter` reads (`image_proj.*`,
`ip_adapter.<n>.to_k_ip.weight`, ...), for SD 1.x/2.x and SDXL U-Nets: the plain IP-Adapter (a
linear projection of the image embedding), IP-Adapter Plus (a resampler over the image
encoder's penultimate hidden states) and the full-face IP-Adapter (a two-layer MLP over every one of
those hidden states: one token per image patch); the image encoder is a transformers
CLIPVisionModelWithProjection folder. The image tokens and the scale travel with each
half's conditioning (`cond["image_prompt"]`), so guidance doubles them with the prompts; the
scale is traced.

Several IP-Adapters (a style and a face adapter, say) can be attached at once, as diffusers'
`load_ip_adapter` with a list of files attaches them: they share one image encoder, each reads its
own picture, and each layer adds every adapter's term with that adapter's scale. An adapter's mask
(diffusers' `ip_adapter_masks`, as `IPAdapterMaskProcessor` prepares it: resized to the output,
binarised) confines its term to part of the image: each layer scales the mask to its own grid by
PyTorch's bicubic rule, as diffusers does, and multiplies the term by it.
"""

import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

from jdiff import convert, paths
from jdiff.errors import CheckpointError, ConfigError
from jdiff.families.base import Pipeline
from jdiff.models import clip_preprocess
from jdiff.models.attention import dot_product_attention

_SECTIONS = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}  # diffusers' order of the U-Net's layers


def cross_attention_paths(unet_params) -> list[str]:
    """The U-Net's cross-attention layers (Flax paths), in the order diffusers numbers them in
    IP-Adapter files: down blocks, then up blocks, then the mid block."""
    found = {"/".join(path[:path.index("attn2") + 1]) for path in traverse_util.flatten_dict(unet_params)
             if "attn2" in path}

    def order(path: str):
        parts = path.split("/")
        return (_SECTIONS[parts[0].rsplit("_", 1)[0] if parts[0] != "mid_block" else "mid_block"],
                [int(n) for n in re.findall(r"_(\d+)", path)])

    return sorted(found, key=order)


def _read(path) -> dict[str, np.ndarray]:
    path = paths.as_path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"IP-Adapter folder {str(path)!r} holds {len(files)} .safetensors files; pass the file.")
        path = files[0]
    if not path.is_file():
        raise CheckpointError(f"IP-Adapter file {str(path)!r} does not exist.")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{str(path)!r}: jdiff reads IP-Adapter weights from .safetensors files (convert a .bin "
                              "with torch.load + safetensors.torch.save_file).")
    try:
        with paths.local_copy(path) as local:
            return safetensors.numpy.load_file(str(local))
    except Exception as e:  # truncated or garbled files raise several types
        raise CheckpointError(f"IP-Adapter file {str(path)!r} is corrupt or unreadable: {e}") from None


def load_ip_adapter(pipe: Pipeline, path, *, image_encoder=None) -> Pipeline:
    """`pipe` with the IP-Adapter(s) of `path` attached: a .safetensors file as diffusers'
    load_ip_adapter reads it (plain, Plus or full-face), or a list of them. On a pipeline that has
    IP-Adapters attached, the new ones are added after them (diffusers' load_ip_adapter replaces
    the ones loaded before: load the base pipeline again for that). All share one CLIP image encoder, as in
    diffusers: `image_encoder` (its folder; a preprocessor_config.json there sets the image
    preprocessing, else CLIP's defaults) is needed with the first adapter; given again, it must name
    the same folder."""
    if pipe.family.denoiser_name != "unet":
        raise ConfigError(f"IP-Adapter adapts a U-Net's cross-attention (SD 1.x/2.x, SDXL); {pipe.family.name} "
                          "models have none.")
    files = [path] if isinstance(path, (str, bytes)) or hasattr(path, "__fspath__") else list(path)
    if not files:
        raise ConfigError("load_ip_adapter: no IP-Adapter file given.")
    modules, params, settings = dict(pipe.modules), dict(pipe.params), dict(pipe.settings)
    if attached(pipe):
        if image_encoder is not None and _folder_name(image_encoder) != settings.get("image_encoder_folder"):
            raise ConfigError(f"the IP-Adapters attached use the image encoder in {settings.get('image_encoder_folder')!r};"
                              f" all share one (as in diffusers), so {str(image_encoder)!r} cannot join them.")
    elif image_encoder is None:
        raise ConfigError("load_ip_adapter needs image_encoder=FOLDER (a CLIPVisionModelWithProjection folder) for "
                          "the first IP-Adapter.")
    else:
        folder = paths.as_path(image_encoder)
        modules["image_encoder"], params["image_encoder"] = convert.load_clip_vision(folder, dtype=pipe.unet.dtype)
        found = (folder / clip_preprocess.CONFIG_NAME).is_file()
        settings["image_preprocess"] = clip_preprocess.ImageProcessorConfig.load(folder) if found \
            else clip_preprocess.ImageProcessorConfig()
        settings["image_encoder_folder"] = _folder_name(image_encoder)
    loaded = list(params.get("ip_adapter", []))
    for file in files:
        loaded.append(_read_adapter(pipe, modules["image_encoder"], file))
    return pipe.replace(modules=modules, params={**params, "ip_adapter": loaded}, settings=settings)


def _folder_name(folder) -> str:
    """A folder's name to compare by: absolute for a local one, as given for an object store's."""
    return os.path.abspath(folder) if paths.is_local(folder) else str(folder)


def _read_adapter(pipe: Pipeline, encoder, path) -> dict:
    """One IP-Adapter file as {kind: its image projection, "layers": {cross-attention path: to_k_ip, to_v_ip}},
    checked against the U-Net and the image encoder."""
    state = _read(path)
    # The kind, by the keys diffusers tells them apart by; each reads its own image features.
    kind = "plus" if "image_proj.latents" in state else "full" if "image_proj.proj.3.weight" in state else "projection"
    projection = {"plus": _plus_projection, "full": _full_projection, "projection": _projection}[kind](state, path)
    width = int(projection["norm_out" if kind == "plus" else "norm"]["scale"].shape[0])
    if width != pipe.unet.config.cross_attention_dim:
        raise ConfigError(f"this IP-Adapter makes {width}-wide tokens; the U-Net attends to "
                          f"{pipe.unet.config.cross_attention_dim}-wide ones: it was made for another model.")
    reads = projection[{"plus": "proj_in", "full": "ff_in", "projection": "proj"}[kind]]["kernel"].shape[0]
    hidden = kind in ("plus", "full")
    makes = encoder.config.hidden_size if hidden else encoder.config.projection_dim
    if reads != makes:
        raise ConfigError(f"this IP-Adapter reads {reads}-wide image features; the image encoder makes {makes}-wide "
                          f"ones ({'its hidden states' if hidden else 'its projected embedding'}).")
    layers = {}
    for n, layer in enumerate(cross_attention_paths(pipe.params["unet"])):
        key = 2 * n + 1  # diffusers counts attention processors, self- and cross-, from 1: cross ones are odd
        try:
            layers[layer] = {name: jnp.asarray(state[f"ip_adapter.{key}.{name}.weight"].T)
                             for name in ("to_k_ip", "to_v_ip")}
        except KeyError:
            raise CheckpointError(f"{str(path)!r} has no weights for cross-attention layer {n} ({layer}): it was "
                                  "made for another U-Net.") from None
    unused = sorted(k for k in state if k.startswith("ip_adapter.")
                    and int(k.split(".")[1]) > 2 * len(layers) - 1)
    if unused:
        raise CheckpointError(f"{str(path)!r} has weights for more cross-attention layers than this U-Net has, "
                              f"e.g. {unused[:3]}: it was made for another U-Net.")
    return {kind: projection, "layers": layers}


def _linear(state, key, bias: bool = True) -> dict:
    out = {"kernel": jnp.asarray(state[key + ".weight"].T)}
    return {**out, "bias": jnp.asarray(state[key + ".bias"])} if bias else out


def _norm(state, key) -> dict:
    return {"scale": jnp.asarray(state[key + ".weight"]), "bias": jnp.asarray(state[key + ".bias"])}


def _projection(state, path) -> dict:
    """The plain IP-Adapter's image projection: a linear map to T tokens, then a layer norm."""
    needed = ("image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight", "image_proj.norm.bias")
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"{str(path)!r} is not an IP-Adapter file: it lacks {missing}.")
    return {"proj": _linear(state, "image_proj.proj"), "norm": _norm(state, "image_proj.norm")}


def _full_projection(state, path) -> dict:
    """The full-face IP-Adapter's projection: Linear, GELU, Linear, LayerNorm on each hidden state
    (the original keys `proj.0`, `proj.2`, `proj.3`; diffusers' IPAdapterFullImageProjection)."""
    try:
        return {"ff_in": _linear(state, "image_proj.proj.0"), "ff_out": _linear(state, "image_proj.proj.2"),
                "norm": _norm(state, "image_proj.proj.3")}
    except KeyError as e:
        raise CheckpointError(f"{str(path)!r} is not a full-face IP-Adapter file: it lacks {e.args[0]!r}.") from None


PLUS_DEPTH, PLUS_HEAD_DIM = 4, 64  # what diffusers builds every IP-Adapter Plus resampler with


def _plus_projection(state, path) -> dict:
    """IP-Adapter Plus's resampler (learned queries attending to the image's hidden states), from the
    original key layout its files use (`layers.<i>.0.to_kv`, `layers.<i>.1.1`, ...)."""
    p = "image_proj."
    try:
        blocks = []
        for i in range(PLUS_DEPTH):
            b = f"{p}layers.{i}."
            key, value = np.split(state[b + "0.to_kv.weight"], 2, axis=0)
            blocks.append({"ln0": _norm(state, b + "0.norm1"), "ln1": _norm(state, b + "0.norm2"),
                           "to_q": _linear(state, b + "0.to_q", bias=False),
                           "to_k": {"kernel": jnp.asarray(key.T)}, "to_v": {"kernel": jnp.asarray(value.T)},
                           "to_out": _linear(state, b + "0.to_out", bias=False), "ff_norm": _norm(state, b + "1.0"),
                           "ff_in": _linear(state, b + "1.1", bias=False), "ff_out": _linear(state, b + "1.3", bias=False)})
        projection = {"latents": jnp.asarray(state[p + "latents"]), "proj_in": _linear(state, p + "proj_in"),
                      "proj_out": _linear(state, p + "proj_out"), "norm_out": _norm(state, p + "norm_out"),
                      "blocks": blocks}
    except KeyError as e:
        raise CheckpointError(f"{str(path)!r} is not an IP-Adapter Plus file of diffusers' shape ({PLUS_DEPTH} "
                              f"resampler layers): it lacks {e.args[0]!r}.") from None
    extra = sorted(k for k in state if k.startswith(f"{p}layers.{PLUS_DEPTH}."))
    if extra:
        raise CheckpointError(f"{str(path)!r} has a resampler deeper than {PLUS_DEPTH} layers ({extra[0]}), which "
                              "diffusers does not read either.")
    return projection


def _layer_norm(x, norm):
    return nn.LayerNorm(epsilon=1e-5).apply({"params": norm}, x)


def _resample(plus: dict, features):
    """The resampler: learned queries read the image's features through PLUS_DEPTH attention and
    feed-forward blocks, then a projection to the U-Net's token width."""
    x = features @ plus["proj_in"]["kernel"] + plus["proj_in"]["bias"]
    latents = jnp.broadcast_to(plus["latents"], (x.shape[0],) + plus["latents"].shape[1:])
    for block in plus["blocks"]:
        residual = latents
        queries = _layer_norm(latents, block["ln1"])
        context = jnp.concatenate([_layer_norm(x, block["ln0"]), queries], axis=1)
        heads = block["to_q"]["kernel"].shape[1] // PLUS_HEAD_DIM
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, PLUS_HEAD_DIM)  # noqa: E731
        q, k, v = (split(a @ block[name]["kernel"]) for a, name in
                   ((queries, "to_q"), (context, "to_k"), (context, "to_v")))
        attended = dot_product_attention(q, k, v).reshape(q.shape[0], q.shape[1], -1)
        latents = attended @ block["to_out"]["kernel"] + residual
        hidden = jax.nn.gelu(_layer_norm(latents, block["ff_norm"]) @ block["ff_in"]["kernel"], approximate=False)
        latents = hidden @ block["ff_out"]["kernel"] + latents
    return _layer_norm(latents @ plus["proj_out"]["kernel"] + plus["proj_out"]["bias"], plus["norm_out"])


def attached(pipe: Pipeline) -> bool:
    return "ip_adapter" in pipe.params


def count(pipe: Pipeline) -> int:
    """How many IP-Adapters are attached."""
    return len(pipe.params.get("ip_adapter", ()))


def _per_adapter(value, adapters: int, name: str) -> list:
    """One entry per attached adapter: with one, `value` itself; with several, a list of them."""
    if adapters == 1:
        return [value]
    if not isinstance(value, (list, tuple)) or len(value) != adapters:
        raise ConfigError(f"{adapters} IP-Adapters are attached: pass {name} as a list with one entry per adapter.")
    return list(value)


def image_pixels(pipe: Pipeline, images, batch: int) -> np.ndarray:
    """generate()'s ip_adapter_image as the image encoder's input [B, adapters, S, S, 3]. Per adapter:
    one picture for all prompts, or one per prompt (PIL, uint8 or [0, 1] floats)."""
    columns = []
    for given in _per_adapter(images, count(pipe), "ip_adapter_image"):
        pictures = given if isinstance(given, (list, tuple)) else [given]
        if len(pictures) == 1 and batch > 1:
            pictures = pictures * batch
        if len(pictures) != batch:
            raise ConfigError(f"ip_adapter_image has {len(pictures)} pictures for {batch} prompts.")
        columns.append(np.asarray(clip_preprocess.preprocess(pictures, pipe.settings.get("image_preprocess")),
                                  np.float32))
    return np.stack(columns, axis=1)


def image_scales(pipe: Pipeline, scales, batch: int) -> np.ndarray:
    """generate()'s ip_adapter_scale as [B, adapters]: one number for all, or per adapter one number
    or one per prompt."""
    columns, adapters = [], count(pipe)
    if np.ndim(scales) == 0:  # one number for every adapter, as diffusers' set_ip_adapter_scale(0.6)
        scales = [scales] * adapters if adapters > 1 else scales
    for given in _per_adapter(scales, adapters, "ip_adapter_scale"):
        if np.ndim(given) != 0 and np.size(given) != batch:
            raise ConfigError(f"ip_adapter_scale must be one number or one per prompt ({batch}) for each IP-Adapter.")
        columns.append(np.broadcast_to(np.asarray(given, np.float32), (batch,)))
    return np.stack(columns, axis=1)


def image_masks(pipe: Pipeline, masks, batch: int, height: int, width: int) -> dict:
    """generate()'s ip_adapter_mask as {"mask": [B, adapters, H, W] of 0/1, "masked": [B, adapters]},
    prepared as diffusers' IPAdapterMaskProcessor does (a PIL image resized to the output with
    Lanczos in its own mode, then grey levels; an array resized with nearest neighbours; binarised
    at 0.5). Per adapter: None (it acts everywhere, untouched, as in diffusers), one mask for all
    prompts, or a list with one per prompt; a mask is a PIL image, or [h, w] floats in [0, 1] or
    uint8 in 0..255."""
    columns, flags = [], []
    for given in _per_adapter(masks, count(pipe), "ip_adapter_mask"):
        per_prompt = list(given) if isinstance(given, (list, tuple)) else [given]
        if len(per_prompt) == 1:
            per_prompt = per_prompt * batch
        if len(per_prompt) != batch:
            raise ConfigError(f"ip_adapter_mask has {len(per_prompt)} masks for {batch} prompts.")
        flags.append(given is not None)
        columns.append(np.ones((batch, height, width), np.float32) if given is None
                       else np.stack([_binary_mask(m, height, width) for m in per_prompt]))
    return {"mask": np.stack(columns, axis=1), "masked": np.broadcast_to(np.float32(flags), (batch, len(flags))).copy()}


def _binary_mask(mask, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if isinstance(mask, Image.Image):
        if mask.size != (width, height):
            mask = mask.resize((width, height), Image.Resampling.LANCZOS)
        return (np.asarray(mask.convert("L"), np.float32) / 255 >= 0.5).astype(np.float32)
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ConfigError(f"an ip_adapter_mask is one [height, width] mask (or a PIL image); got shape {array.shape}.")
    if array.dtype == np.uint8:
        if array.max() == 1:
            raise ConfigError("a uint8 ip_adapter_mask holds only 0 and 1: give 0 and 255, or floats in [0, 1].")
        array = array.astype(np.float32) / 255
    array = np.clip(array.astype(np.float32), 0, 1)
    if array.shape != (height, width):
        array = np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.NEAREST))  # mode "F"
    return (array >= 0.5).astype(np.float32)


def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in]: PyTorch's bicubic interpolation (align_corners=False, A=-0.75, edges
    repeated, no antialiasing) as a matrix, what diffusers' mask downsampling runs."""
    a = -0.75
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
    matrix = np.zeros((size_out, size_in), np.float64)
    for i in range(size_out):
        source = (i + 0.5) * size_in / size_out - 0.5
        left, t = math.floor(source), source - math.floor(source)
        for offset, weight in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            matrix[i, min(max(left + offset, 0), size_in - 1)] += weight
    return matrix.astype(np.float32)


def mask_for_layer(mask, queries: int):
    """[B, H, W] mask -> [B, queries, 1] for a layer of `queries` positions, as diffusers'
    IPAdapterMaskProcessor.downsample does it (its grid from the mask's aspect; padded with zeros or
    cut when the grid's area differs from `queries`)."""
    height, width = mask.shape[1:]
    rows = int(math.sqrt(queries / (width / height)))
    rows += int(queries % rows != 0)
    columns = queries // rows
    small = jnp.einsum("yh,bhw,xw->byx", _bicubic_matrix(height, rows), mask, _bicubic_matrix(width, columns),
                       precision=jax.lax.Precision.HIGHEST)
    flat = small.reshape(mask.shape[0], rows * columns)[:, :queries]
    flat = jnp.pad(flat, ((0, 0), (0, queries - flat.shape[1])))
    return flat[..., None]


def image_tokens(modules, params, pixels, dtype):
    """Per adapter, (tokens for the images, tokens for the unconditional half) [B, T, D], as diffusers'
    encode_image makes them, from pixels [B, adapters, S, S, 3]: the plain IP-Adapter projects the
    image encoder's embedding, and zeros for the unconditional half; Plus resamples its penultimate
    hidden states, and those of a zero image, and the full-face adapter maps each of them through
    its MLP. Returns (tuple of the adapters' tokens, tuple of their unconditional tokens)."""
    encoder = modules["image_encoder"]
    run = lambda x, **kw: encoder.apply({"params": params["image_encoder"]}, x, **kw)  # noqa: E731
    pictured, unpictured = [], []
    for n, adapter in enumerate(params["ip_adapter"]):
        tokens = _adapter_tokens(adapter, run, pixels[:, n], dtype)
        pictured.append(tokens[0])
        unpictured.append(tokens[1])
    return tuple(pictured), tuple(unpictured)


def _adapter_tokens(adapter: dict, run, pixels, dtype):
    if "plus" in adapter or "full" in adapter:
        both = run(jnp.concatenate([pixels, jnp.zeros_like(pixels)]), output_hidden_states=True).hidden_states[-2]
        both = both.astype(jnp.float32)
        if "plus" in adapter:
            tokens = _resample(adapter["plus"], both)
        else:
            full = adapter["full"]
            hidden = jax.nn.gelu(both @ full["ff_in"]["kernel"] + full["ff_in"]["bias"], approximate=False)
            tokens = _layer_norm(hidden @ full["ff_out"]["kernel"] + full["ff_out"]["bias"], full["norm"])
        return tuple(jnp.split(tokens.astype(dtype), 2))
    projection = adapter["projection"]
    width = projection["norm"]["scale"].shape[0]
    embeds = run(pixels).image_embeds

    def project(e):
        flat = e.astype(jnp.float32) @ projection["proj"]["kernel"] + projection["proj"]["bias"]
        return _layer_norm(flat.reshape(e.shape[0], -1, width), projection["norm"]).astype(dtype)

    return project(embeds), project(jnp.zeros_like(embeds))


class WithImagePrompt:
    """A Flax module stand-in for the U-Net: `apply(..., image_prompt=(tokens, scales [B, adapters],
    masks or None))`, tokens a tuple with one [B, T, D] per adapter and masks as `image_masks` makes
    them, runs it with
    each cross-attention layer's image terms added; without image_prompt, the U-Net."""

    def __init__(self, module, adapters: list):
        self._module, self._layers = module, [adapter["layers"] for adapter in adapters]

    def __getattr__(self, name):
        return getattr(self._module, name)

    def apply(self, variables, *args, image_prompt=None, **kwargs):
        if image_prompt is None:
            return self._module.apply(variables, *args, **kwargs)
        tokens, scales, masks = image_prompt
        layer_masks = {}  # (adapter, queries) -> [B, queries, 1]: scaled once per grid, not per layer

        def mask_for(n: int, queries: int):
            if (n, queries) not in layer_masks:
                scaled = mask_for_layer(masks["mask"][:, n], queries)
                # an adapter given no mask is left as it is (a grid that does not fit would pad zeros)
                layer_masks[n, queries] = jnp.where(masks["masked"][:, n, None, None] > 0, scaled, 1.0)
            return layer_masks[n, queries]

        def interceptor(next_fun, call_args, call_kwargs, context):
            path = "/".join(context.module.path)
            if context.method_name != "__call__" or path not in self._layers[0]:
                return next_fun(*call_args, **call_kwargs)
            x, out = call_args[0], next_fun(*call_args, **call_kwargs)
            for n, layers in enumerate(self._layers):
                term = _image_term(context.module, x, tokens[n], scales[:, n], layers[path])
                if masks is not None:
                    term = term * mask_for(n, x.shape[1]).astype(term.dtype)
                out = out + term
            return out

        with nn.intercept_methods(interceptor):
            return self._module.apply(variables, *args, **kwargs)


def _image_term(attention, x, tokens, scale, layer):
    """scale * to_out(attention(to_q(x), to_k_ip(tokens), to_v_ip(tokens))), without to_out's bias
    (the layer's own call added it once)."""
    p = attention.variables["params"]
    dtype = x.dtype
    heads, dim = attention.heads, attention.dim_head
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, dim)  # noqa: E731
    q = x @ p["to_q"]["kernel"].astype(dtype)
    if "bias" in p["to_q"]:
        q = q + p["to_q"]["bias"].astype(dtype)
    k = tokens.astype(dtype) @ layer["to_k_ip"].astype(dtype)
    v = tokens.astype(dtype) @ layer["to_v_ip"].astype(dtype)
    compute = jnp.float32 if attention.upcast else dtype
    out = dot_product_attention(split(q).astype(compute), split(k).astype(compute), split(v).astype(compute))
    out = out.astype(dtype).reshape(x.shape[0], x.shape[1], heads * dim) @ p["to_out_0"]["kernel"].astype(dtype)
    return out * jnp.asarray(scale, dtype).reshape(-1, 1, 1)


def with_image_prompt(modules: dict, params) -> dict:
    """`modules` with the U-Net wrapped to take image prompts when IP-Adapters are attached."""
    if "ip_adapter" not in params:
        return modules
    return {**modules, "unet": WithImagePrompt(modules["unet"], params["ip_adapter"])}


def unet_kwargs(cond: dict) -> dict:
    """The U-Net's image_prompt keyword for one call, from the conditioning ({} without one)."""
    prompt = cond.get("image_prompt")
    return {} if prompt is None else {"image_prompt": (prompt["tokens"], prompt["scale"], prompt.get("masks"))}
