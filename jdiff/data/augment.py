"""Random crops and horizontal flips of a folder's pictures, as diffusers' training scripts offer
them (`--center_crop` off, `--random_flip`): each picture, its shorter side scaled to the
resolution, is flipped with probability 1/2, then cropped to a square at a random place, and the
crop's (top, left) in the flipped picture is recorded (SDXL conditions on it).

    loader = make_loader(Uncropped(folder), ..., augment=CropAndFlip(R, random_crop=True, random_flip=True))
    latents = encode_source(encode, FixedCrops(folder, CropAndFlip(...), seed))  # one draw per picture

Through the loader the draw depends on the seed and the example's place in the endless shuffled
stream, so every epoch crops afresh and a resumed run draws what an uninterrupted one would. Latents
encoded once (data.cache_latents) can only hold one crop per picture: `FixedCrops` draws it from
(seed, index).
"""

import grain
import numpy as np

from jdiff.data.image_folder import ImageFolder, center_crop


class CropAndFlip(grain.transforms.RandomMap):
    """An uncropped example's "image" [H, W, 3] (shorter side = resolution) -> a [R, R, 3] square,
    flipped and placed at random as asked, with its "crop_top_left"."""

    def __init__(self, resolution: int, random_crop: bool, random_flip: bool):
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        pixels = example["image"]
        if self.random_flip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        if self.random_crop:
            top = int(rng.integers(0, pixels.shape[0] - self.resolution + 1))
            left = int(rng.integers(0, pixels.shape[1] - self.resolution + 1))
            pixels = pixels[top:top + self.resolution, left:left + self.resolution]
        else:
            pixels, (top, left) = center_crop(pixels, self.resolution)
        return {**example, "image": np.ascontiguousarray(pixels), "crop_top_left": np.asarray((top, left), np.int32)}


class Uncropped:
    """An ImageFolder's pictures before cropping (`ImageFolder.picture`), for a loader that crops."""

    def __init__(self, folder: ImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict:
        return self.folder.picture(int(index))


class FixedCrops:
    """An ImageFolder's pictures each cropped and flipped once, by a draw from (seed, index)."""

    def __init__(self, folder: ImageFolder, augment: CropAndFlip, seed: int):
        self.folder, self.augment, self.seed = folder, augment, seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        return self.augment.random_map(self.folder.picture(int(index)), rng)
