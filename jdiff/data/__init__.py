"""Training data: a reader for a folder of the user's captioned images, a set of VAE latents
encoded once, captions' conditioning encoded once, and the grain loader that batches any
random-access source (the embedded shapes set lives with the application, in jdiff/app/)."""

from jdiff.data.conditioning import ConditionedSource, encode_conditioning
from jdiff.data.image_folder import ImageFolder, WithControl
from jdiff.data.latents import LatentSource, encode_source
from jdiff.data.loader import decode_example, make_loader, steps_per_epoch, to_model_range

__all__ = ["ConditionedSource", "ImageFolder", "LatentSource", "decode_example", "encode_conditioning",
           "encode_source", "make_loader", "steps_per_epoch", "to_model_range", "WithControl"]
