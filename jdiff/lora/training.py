"""New adapters to train: which layers they adapt, and their initial matrices.

Targets follow PEFT's `target_modules`: a target names a layer when the layer's diffusers name is
the target or ends with "." + target ("to_q" adapts every attention's query projection, "conv1"
every resnet's first convolution). The trainable tree holds only `down` and `up`; alpha is a
setting, added back by `with_alpha` (an optimiser must never update it).
"""

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from jdiff.errors import ConfigError
from jdiff.lora import names


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to train: rank, alpha (scale alpha / rank; diffusers' scripts use alpha = rank) and the
    targeted layers by component ({"unet": ("to_q", ...), "text_encoder": (...)})."""

    rank: int
    alpha: float
    targets: Mapping[str, tuple[str, ...]]


def target_layers(params, targets: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """{jdiff layer path: kernel shape} of the layers `targets` name (PEFT's suffix rule)."""
    layers = names.adaptable_layers(params)
    chosen = {}
    for path, shape in layers.items():
        dotted = names.dotted_name(path).removeprefix("text_model.")
        if any(dotted == t or dotted.endswith("." + t) for t in targets):
            chosen[path] = shape
    return chosen


def init_adapter(params: Mapping[str, dict], targets: Mapping[str, Sequence[str]], rank: int, rng) -> dict:
    """{component: {path: {"down", "up"}}} for the targeted layers of each component: `down` as PEFT
    initialises lora_A (Kaiming-uniform, as a torch Linear), `up` zero, so training starts at the
    base model exactly."""
    if rank < 1:
        raise ConfigError(f"LoRA rank must be at least 1, got {rank}.")
    tree = {}
    for number, (component, component_targets) in enumerate(sorted(targets.items())):
        if not component_targets:
            continue
        if component not in params:
            raise ConfigError(f"LoRA targets for {component!r}, which this pipeline does not have.")
        layers = target_layers(params[component], component_targets)
        if not layers:
            raise ConfigError(f"LoRA targets {list(component_targets)} name no layer of the {component}.")
        for index, (path, shape) in enumerate(sorted(layers.items())):
            fan_in = shape[:-1]
            init = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(len(fan_in))),
                                                        out_axis=-1)
            down = init(jax.random.fold_in(jax.random.fold_in(rng, number), index), fan_in + (rank,), jnp.float32)
            tree.setdefault(component, {})[path] = {"down": down, "up": jnp.zeros((rank, shape[-1]), jnp.float32)}
    if not tree:
        raise ConfigError("no LoRA targets given.")
    return tree


def with_alpha(tree: Mapping, alpha: float) -> dict:
    """The adapter tree generate() and the writers take: each layer with its alpha."""
    return {component: {path: {**layer, "alpha": jnp.float32(alpha)} for path, layer in layers.items()}
            for component, layers in tree.items()}
