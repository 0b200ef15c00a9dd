"""DreamBooth's training examples: a few pictures of one subject under one instance prompt, each
paired with a picture the base model drew of the subject's class (prior preservation).

Example i is instance picture i mod N and class picture i mod M, as in diffusers' DreamBooth
scripts: an epoch has max(N, M) examples. The class picture's fields carry a `class_` prefix
("class_image", "class_caption", "class_original_size", ...); the training stage puts both halves
in one batch and weighs the class half's loss by the prior loss weight.
"""

import numpy as np


class InstancePromptSource:
    """A source whose every caption is `prompt` (DreamBooth without prior preservation)."""

    def __init__(self, source, prompt: str):
        self.source, self.prompt = source, prompt

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return {**self.source[index], "caption": self.prompt}


class PriorPreservationSource:
    """Random-access source of (instance, class) pairs; usable by grain."""

    def __init__(self, instances, classes, instance_prompt: str, class_prompt: str):
        self.instances, self.classes = instances, classes
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, index: int) -> dict:
        instance = {**self.instances[index % len(self.instances)], "caption": self.instance_prompt}
        prior = {**self.classes[index % len(self.classes)], "caption": self.class_prompt}
        return {**instance, **{f"class_{key}": value for key, value in prior.items()}}


def merge_pairs(batch: dict) -> dict:
    """A batch of pairs as one batch of 2B examples, [instances; classes], with "prior" (float32
    [2B], 1 for the class half) so that a loss can tell the halves apart on any number of hosts."""
    keys = [k for k in batch if not k.startswith("class_") and f"class_{k}" in batch]
    merged = {k: np.concatenate([np.asarray(batch[k]), np.asarray(batch[f"class_{k}"])]) for k in keys}
    count = len(batch[keys[0]])
    merged["prior"] = np.concatenate([np.zeros(count, np.float32), np.ones(count, np.float32)])
    return merged
