"""Training data: the embedded captioned shapes set (generator and tfds builder), a reader for a
folder of the user's captioned images, a set of VAE latents encoded once, and the grain pipeline
that batches any of them."""

from jdiff.data.image_folder import ImageFolder
from jdiff.data.latents import LatentSource, encode_source
from jdiff.data.pipeline import decode_example, make_loader, steps_per_epoch, to_model_range
from jdiff.data.shapes_tfds import CaptionedShapes, load_shapes

__all__ = ["CaptionedShapes", "ImageFolder", "LatentSource", "decode_example", "encode_source", "load_shapes",
           "make_loader", "steps_per_epoch", "to_model_range"]
