"""The names a LoRA file may give a layer, resolved to the jdiff parameter path of that layer.

A layer that LoRA can adapt is a module with a `kernel` (a linear layer or a convolution). Files
name it in one of three spellings:

    diffusers / PEFT   down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
    kohya (SD 1.x)     down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q
    kohya (SDXL)       input_blocks_4_1_transformer_blocks_0_attn1_to_q   (the original LDM/SGM U-Net)

Every table here is built from the parameter tree of the loaded model, so a name either resolves
to an existing layer or is reported as matching nothing; there is no guessing by string rewrites.
"""

import re

from flax import traverse_util

from jdiff.convert import torch_key

# Inside an SGM ResBlock the diffusers resnet's layers have their own names.
_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def adaptable_layers(params) -> dict[str, tuple[int, ...]]:
    """{jdiff path 'a/b/c': kernel shape} of every layer with a kernel."""
    return {"/".join(path[:-1]): tuple(value.shape) for path, value in traverse_util.flatten_dict(params).items()
            if path[-1] == "kernel"}


def dotted_name(path: str) -> str:
    """The PyTorch module name of a jdiff layer path ('down_blocks_0/resnets_0/conv1' ->
    'down_blocks.0.resnets.0.conv1')."""
    return torch_key(tuple(path.split("/")) + ("kernel",)).removesuffix(".weight")


def _unet_blocks(paths) -> tuple[int, set[int]]:
    """(resnets per down block, the up blocks that have attentions), read off the layer paths."""
    resnets = {int(m[1]) for p in paths if (m := re.match(r"down_blocks_0/resnets_(\d+)/", p))}
    attended = {int(m[1]) for p in paths if (m := re.match(r"up_blocks_(\d+)/attentions_", p))}
    return len(resnets), attended


def sgm_name(dotted: str, layers_per_block: int, up_with_attention: set[int]) -> str | None:
    """The original (LDM/SGM) U-Net's name of a diffusers U-Net layer, as kohya's SDXL files spell
    it; None for a layer that has no such name."""
    for prefix, sgm in _SGM_TOP.items():
        if dotted == prefix:
            return sgm
    per_level = layers_per_block + 1

    def resnet_inner(rest: str) -> str | None:
        layer, _, tail = rest.partition(".")
        return _SGM_RESNET.get(layer) if not tail else None

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", dotted):
        index = 1 + int(m[1]) * per_level + int(m[3])
        if m[2] == "attentions":
            return f"input_blocks.{index}.1.{m[4]}"
        inner = resnet_inner(m[4])
        return inner and f"input_blocks.{index}.0.{inner}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", dotted):
        return f"input_blocks.{1 + int(m[1]) * per_level + layers_per_block}.0.op"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", dotted):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        inner = resnet_inner(m[3])
        return inner and f"middle_block.{2 * int(m[2])}.{inner}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", dotted):
        index = int(m[1]) * per_level + int(m[3])
        if m[2] == "attentions":
            return f"output_blocks.{index}.1.{m[4]}"
        inner = resnet_inner(m[4])
        return inner and f"output_blocks.{index}.0.{inner}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", dotted):
        block = int(m[1])
        return f"output_blocks.{block * per_level + layers_per_block}.{2 if block in up_with_attention else 1}.conv"
    return None


def kohya_name(dotted: str) -> str:
    return dotted.replace(".", "_")


def name_table(component: str, params) -> dict[str, str]:
    """{every accepted spelling of a layer's name: its jdiff path} for one component's params.

    Spellings: the diffusers/PEFT dotted name, the kohya underscored one and, for a U-Net, the SGM
    names of kohya's SDXL files; for a CLIP text encoder also the names without `text_model.`
    (transformers 5 writes a CLIPTextModel's keys without it)."""
    paths = adaptable_layers(params)
    table = {}
    layers_per_block, up_with_attention = _unet_blocks(paths) if component == "unet" else (0, set())
    for path in paths:
        dotted = dotted_name(path)
        names = [dotted]
        if dotted.startswith("text_model."):
            names.append(dotted.removeprefix("text_model."))
        if component == "unet" and layers_per_block:
            sgm = sgm_name(dotted, layers_per_block, up_with_attention)
            if sgm:
                names.append(sgm)
        for name in names:
            table[name] = path
            table[kohya_name(name)] = path
    return table


def preferred_kohya_name(component: str, path: str, sgm: bool, params) -> str:
    """The kohya name a writer gives a layer: SGM block names for SDXL (as kohya's sd-scripts
    writes them), the diffusers names otherwise."""
    dotted = dotted_name(path)
    if component == "unet" and sgm:
        layers_per_block, up_with_attention = _unet_blocks(adaptable_layers(params))
        dotted = sgm_name(dotted, layers_per_block, up_with_attention) or dotted
    return kohya_name(dotted)
