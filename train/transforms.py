"""Image augmentation for training streams, seeded per sample so a resumed run sees the same augmented pixels.

Each sample's randomness comes from ``random.Random(seed(stream seed, sample key))``: independent of which worker
reads the sample or in which order, so streams stay reproducible with any number of workers.
"""

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image


def stable_seed(*parts) -> int:
    """A 31-bit seed from any mix of ints and strings, equal in every process and run.

    (webdataset's ``make_seed`` mixes Python's ``hash()``, which is randomised per process for strings.)
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Augment:
    """Per-task image augmentation (all off by default; ``train.config.AugmentConfig`` fills it)."""

    random_resized_crop: bool = False
    crop_scale_min: float = 0.5
    hflip: float = 0.0
    rand_augment: str = ""

    @property
    def active(self) -> bool:
        return self.random_resized_crop or self.hflip > 0 or bool(self.rand_augment)


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale_min: float,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: area fraction in [scale_min, 1], log-uniform aspect ratio; ten tries,
    then the centred full-ratio crop."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def augment_image(image: Image.Image, size: int, augment: Augment, rng: random.Random) -> Image.Image:
    """Crop (random resized or none), flip, RandAugment (timm), resize to ``size`` x ``size``."""
    image = image.convert("RGB")
    if augment.random_resized_crop:
        image = image.crop(random_resized_crop_box(*image.size, rng, augment.crop_scale_min))
    if augment.hflip > 0 and rng.random() < augment.hflip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if augment.rand_augment:
        from timm.data.auto_augment import rand_augment_transform

        # timm draws from the `random` module and numpy's global generator: seed both from this sample's generator.
        random.seed(rng.getrandbits(32))
        np.random.seed(rng.getrandbits(32))
        image = rand_augment_transform(augment.rand_augment, {"img_mean": (128, 128, 128)})(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return image


def resize_nearest(array_HW: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes to ``size`` x ``size`` (pixel centres), for label maps of any
    dtype: class indices and NaN stay exact."""
    h, w = array_HW.shape[:2]
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return array_HW[rows[:, None], cols[None, :]]


def augment_dense(image: Image.Image, maps: dict[str, np.ndarray], size: int, augment: Augment,
                  rng: random.Random | None, normals: frozenset[str] = frozenset()) -> tuple[Image.Image, dict]:
    """The same crop and flip for an image and its label maps (``[H, W]`` or ``[H, W, C]`` arrays at the image's
    resolution), then the image resized (bicubic) and the maps resized (nearest) to ``size``. A horizontal flip
    negates the x component of the maps named in ``normals`` (Mod-Squad's Taskonomy loader flipped normals without
    it, which turns the flipped half of the data into wrong labels). RandAugment does not apply: its geometric ops
    would move the pixels away from their labels (the config refuses it for dense tasks)."""
    image = image.convert("RGB")
    if rng is not None and augment.random_resized_crop:
        left, top, right, bottom = random_resized_crop_box(*image.size, rng, augment.crop_scale_min)
        image = image.crop((left, top, right, bottom))
        maps = {k: v[top:bottom, left:right] for k, v in maps.items()}
    if rng is not None and augment.hflip > 0 and rng.random() < augment.hflip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        maps = {k: v[:, ::-1] for k, v in maps.items()}
        for k in normals & maps.keys():
            flipped = maps[k].copy()
            flipped[..., 0] = -flipped[..., 0]
            maps[k] = flipped
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return image, {k: np.ascontiguousarray(resize_nearest(v, size)) for k, v in maps.items()}
