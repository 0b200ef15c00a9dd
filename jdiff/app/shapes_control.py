"""The captioned-shapes set with a control image per example (`shapes.outline`: the objects'
outlines), for training and evaluating a ControlNet on it. Record i of a shapes source is
`shapes.example(i, split)`, so its scene, and so its outline, is known from the index alone."""

from jdiff.app import shapes


class OutlineControl:
    """A random-access source (len, [i]) that adds "control_image" (float32 [R, R, 3] in [0, 1]; kept
    as floats so the loader does not map it to [-1, 1] as it does uint8 images) to each example."""

    def __init__(self, source, split: str, resolution: int, seed: int = 0):
        self.source, self.split, self.resolution, self.seed = source, split, int(resolution), seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        control = shapes.outline(shapes.scene(index, self.split, self.seed), self.resolution)
        return {**self.source[index], "control_image": control}
