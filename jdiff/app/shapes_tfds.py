"""The captioned shapes set as a tensorflow-datasets builder that builds and reads without TensorFlow.

What keeps TensorFlow out: images are handed to tfds as PNG bytes encoded with PIL (tfds encodes a
numpy image with `tf.image.encode_png`, but stores ready-made bytes as they are and decodes with PIL
when OpenCV is absent), the files are ArrayRecord (random access, no TFRecord reader), and reading
goes through `as_data_source`, never `tfds.load` / `as_dataset`.

Measured on the development machine (2 CPU cores, shared with another job): building 10,000 train
examples at 32 px takes about 5 s (0.5 ms each: 0.2 ms drawing, the rest PNG encoding and tfds
writing; 2.2 MB per 1,000 examples) and 10 s at 64 px (7.7 MB per 1,000); reads in random order
decode about 5,000 examples/s, and the grain loader delivers about 3,000 examples/s.
"""

import dataclasses
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jdiff import paths
from jdiff.app import shapes
from jdiff.errors import ConfigError
from jdiff.paths import Path


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Which examples a build holds. The name encodes every field, so builds never collide."""
    resolution: int = 32
    num_train: int = 10_000
    num_test: int = 1_000
    seed: int = 0


def shapes_config(resolution: int = 32, num_train: int = 10_000, num_test: int = 1_000,
                  seed: int = 0) -> ShapesConfig:
    resolution = shapes.check_resolution(resolution)
    for name, value in (("num_train", num_train), ("num_test", num_test), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or value < (1 if name != "seed" else 0):
            raise ConfigError(f"shapes {name} must be a {'non-negative' if name == 'seed' else 'positive'} "
                              f"integer (got {value!r}).")
    return ShapesConfig(name=f"{resolution}px_train{num_train}_test{num_test}_seed{seed}",
                        description=f"{resolution}x{resolution} images, {num_train} train and "
                                    f"{num_test} test examples, seed {seed}.",
                        resolution=resolution, num_train=int(num_train), num_test=int(num_test), seed=int(seed))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # compress_level=1: the noisy background barely compresses anyway and level 1 is much faster.
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
    """Procedurally drawn shapes with English captions (see jdiff/app/shapes.py)."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "1.1.0": "Squares as wide as their diameter (were 0.9 of it), distinct from circles.",
                     "1.2.0": "Small objects 0.19-0.22 of the side (were 0.15-0.19), large 0.26-0.29 (were 0.25-0.29)."}
    BUILDER_CONFIGS = [shapes_config(32), shapes_config(64)]
    # tfds infers the builder's source file through the `importlib_resources` backport, which
    # jdiff does not depend on. The path only locates download checksums, and nothing is downloaded.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return self.dataset_info_from_configs(
            description="One or two coloured shapes on a grey background, captioned in plain English. "
                        "The test split's first object has a (colour, shape, position) combination "
                        "that never occurs in the train split.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "shape": tfds.features.ClassLabel(names=shapes.SHAPES),
                "colour": tfds.features.ClassLabel(names=shapes.COLOURS),
                "size": tfds.features.ClassLabel(names=shapes.SIZES),
                "position": tfds.features.ClassLabel(names=shapes.POSITIONS),
                "num_objects": np.int32,
                # (shape, colour, size, position) of every object, rows padded with -1.
                "objects": tfds.features.Tensor(shape=(shapes.MAX_OBJECTS, 4), dtype=np.int32),
            }),
            supervised_keys=("image", "caption"),
            # Keeps record i == shapes.example(i), so any record can be checked against its
            # generator; the training loader shuffles anyway.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        return {"train": self._generate_examples("train", config.num_train),
                "test": self._generate_examples("test", config.num_test)}

    def _generate_examples(self, split: str, count: int):
        config = self.builder_config
        for index in range(count):
            example = shapes.example(index, split, config.resolution, config.seed)
            example["image"] = _png(example["image"])
            yield index, example


def default_data_dir(workdir) -> Path:
    """<workdir>/data; for a workdir in an object store, a local cache folder instead
    ($JDIFF_DATA_DIR, default ~/.cache/jdiff/data): grain reads array_record files from local disks
    only, and the set is a pure function of its config, so each host can build its own copy."""
    if paths.is_local(workdir):
        return Path(workdir) / "data"
    return Path(os.environ.get("JDIFF_DATA_DIR") or os.path.expanduser("~/.cache/jdiff/data"))


def load_shapes(data_dir, split: str = "train", resolution: int = 32, num_train: int = 10_000,
                num_test: int = 1_000, seed: int = 0):
    """A random-access source over one split (len, and [i] -> dict of numpy values; the caption is
    UTF-8 bytes, which `make_loader` decodes), built into `data_dir` on first use (seconds for
    10,000 examples at 32 px) and read from there afterwards. Record i is `shapes.example(i, split)`.

    tfds builds into a temporary folder and renames it when complete, so a reader never sees half a
    build; but several processes building into one shared data_dir at once would collide, so on a
    multi-host run build on process 0 first (or give each host its own data_dir).
    """
    if split not in shapes.SPLITS:
        raise ConfigError(f"unknown shapes split {split!r}; expected one of {shapes.SPLITS}.")
    if not paths.is_local(data_dir):
        raise ConfigError(f"shapes data_dir {str(data_dir)!r} is not on a local filesystem: grain reads "
                          f"array_record files from local disks only. Leave data.data_dir empty (a workdir in an "
                          f"object store builds the set in $JDIFF_DATA_DIR or ~/.cache/jdiff/data) or name a "
                          f"local folder.")
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"shapes data_dir {str(data_dir)!r} exists and is not a directory.")
    config = shapes_config(resolution, num_train, num_test, seed)
    # tfds insists on the very object of BUILDER_CONFIGS when a name matches one of them.
    config = CaptionedShapes.builder_configs.get(config.name, config)
    builder = CaptionedShapes(data_dir=str(data_dir), config=config, file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder.as_data_source(split=split)
