"""What each sample of condmoe's embedded synthetic dataset shows: layout, captions and rendering.

Two datasets, each with a ``train`` and a ``val`` split:

* ``image``: RGB pictures of one of ten drawn shapes (the class) with a random colour, size, position and small
  rotation on a dark noisy gradient with distractor specks, plus a caption that names colour, size, shape and position
  (so image-text retrieval needs more than the class).
* ``video``: short clips of a shape moving left, right, up or down (the class), with a caption such as
  "a green square moving left".

Every sample is rendered from its own random stream, ``SeedSequence([seed, dataset, split, index])``, so content does
not depend on shard size or generation order, train and val never share a stream, and the same seed always gives
byte-identical images. The drawing primitives (shape masks, palette, backgrounds, noise) live in
:mod:`data_prep.shapes`; ``COLORS`` is re-exported here. Encoding and writing the dataset is :mod:`data_prep.synthetic`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from condmoe.data_prep.shapes import (
    COLORS,
    add_specks,
    composite,
    finish_image,
    gradient_background,
    sample_blur_radius,
    shape_colour,
    shape_mask,
)

__all__ = [
    "COLORS",
    "GENERATOR_VERSION",
    "IMAGE_CLASSES",
    "POSITIONS",
    "SIZES",
    "SPLITS",
    "VIDEO_CLASSES",
    "render_image",
    "render_video",
]

# Bumped whenever rendering changes, so a cached dataset from an older generator is not mistaken for a current one.
GENERATOR_VERSION = 1

IMAGE_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "hexagon",
    "heart",
    "crescent",
)
VIDEO_CLASSES: tuple[str, ...] = ("moving left", "moving right", "moving up", "moving down")
_DIRECTIONS: tuple[tuple[int, int], ...] = ((-1, 0), (1, 0), (0, -1), (0, 1))  # (dx, dy) per VIDEO_CLASSES entry

# Shape radius as a fraction of the frame side; the gaps between ranges (after jitter) keep "small"/"medium"/"large"
# unambiguous.
SIZES: dict[str, float] = {"small": 0.12, "medium": 0.18, "large": 0.25}
_VIDEO_SIZES: dict[str, float] = {"small": 0.15, "medium": 0.21}  # a large shape would have no room to move at 32 px
_SIZE_JITTER = 0.08
# Shape centre as a fraction of the frame side, before jitter and clamping into the frame.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
_POSITION_JITTER = 0.05
_MAX_ROTATION_DEG = 15.0

SPLITS: tuple[str, ...] = ("train", "val")
_DATASET_IDS = {"image": 1, "video": 2}
_SPLIT_IDS = {"train": 1, "val": 2}
_LABEL_STREAM = 7  # distinct stream for the class-balancing permutations

_IMAGE_TEMPLATES = (
    "a {size} {color} {shape} {where}",
    "a {size} {color} {shape} {where} on a dark background",
    "there is a {size} {color} {shape} {where}",
    "a picture of a {size} {color} {shape} {where}",
    "{a_color} {shape} of {size} size {where}",
    "{where_lead}, a {size} {color} {shape}",
)
_CORNER_PHRASES = ("in the {pos} corner", "at the {pos}", "in the {pos} of the image")
_CENTER_PHRASES = ("in the center", "near the center", "at the center of the image")
_VIDEO_TEMPLATES = (
    "{a_color} {shape} moving {direction}",
    "a {size} {color} {shape} moving {direction}",
    "{a_color} {shape} moving {direction} across the frame",
    "a video of {a_color} {shape} moving {direction}",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _rng(seed: int, dataset: str, split: str, *extra: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _DATASET_IDS[dataset], _SPLIT_IDS[split], *extra]))


def _balanced_label(seed: int, dataset: str, split: str, index: int, num_classes: int) -> int:
    # Each block of num_classes consecutive samples holds every class once, in a seeded random order: classes stay
    # exactly balanced even in tiny splits, without the label being a function of the index.
    block, offset = divmod(index, num_classes)
    perm = _rng(seed, dataset, split, _LABEL_STREAM, block).permutation(num_classes)
    return int(perm[offset])


# --------------------------------------------------------------------------------------------------------------------
# Rendering (layout, captions and whole samples; the drawing primitives are in data_prep.shapes)
# --------------------------------------------------------------------------------------------------------------------


def _place(rng: np.random.Generator, position: str, radius: float, size_px: int) -> tuple[float, float]:
    fx, fy = POSITIONS[position]
    jx, jy = rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, size=2)
    # Clamp so the whole shape (with rotation slack) stays inside the frame.
    lo, hi = 1.05 * radius + 1.0, size_px - 1.05 * radius - 1.0
    return float(np.clip((fx + jx) * size_px, lo, hi)), float(np.clip((fy + jy) * size_px, lo, hi))


def _image_caption(rng: np.random.Generator, shape: str, colour: str, size: str, position: str) -> str:
    phrases = _CENTER_PHRASES if position == "center" else _CORNER_PHRASES
    where = phrases[int(rng.integers(len(phrases)))].format(pos=position)
    template = _IMAGE_TEMPLATES[int(rng.integers(len(_IMAGE_TEMPLATES)))]
    return template.format(
        size=size,
        color=colour,
        shape=shape,
        where=where,
        where_lead=where,
        a_color=f"{_article(colour)} {colour}",
    )


def render_image(seed: int, split: str, index: int, image_size: int = 64) -> tuple[Image.Image, dict[str, Any]]:
    """Render one image sample.

    Args:
        seed: Dataset seed.
        split: ``"train"`` or ``"val"``.
        index: Sample index within the split.
        image_size: Side length in pixels.

    Returns:
        The RGB image and its metadata: ``label``, ``class_name``, ``caption``, ``color``, ``size``, ``position``,
        ``rotation`` (degrees).
    """
    label = _balanced_label(seed, "image", split, index, len(IMAGE_CLASSES))
    shape = IMAGE_CLASSES[label]
    rng = _rng(seed, "image", split, index)
    colour = list(COLORS)[int(rng.integers(len(COLORS)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    radius = SIZES[size] * (1.0 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)) * image_size
    angle = float(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    cx, cy = _place(rng, position, radius, image_size)

    img = gradient_background(rng, image_size)
    add_specks(rng, img)
    mask = shape_mask(shape, image_size, cx, cy, radius, angle)
    composite(img, mask, shape_colour(rng, colour), ramp_dir=float(rng.uniform(0.0, 2.0 * math.pi)))
    pil = finish_image(img, rng, sample_blur_radius(rng, image_size))
    meta = {
        "label": label,
        "class_name": shape,
        "caption": _image_caption(rng, shape, colour, size, position),
        "color": colour,
        "size": size,
        "position": position,
        "rotation": round(angle, 2),
    }
    return pil, meta


def render_video(
    seed: int, split: str, index: int, video_size: int = 32, num_frames: int = 8
) -> tuple[list[Image.Image], dict[str, Any]]:
    """Render one video sample: a shape moving in one of four directions over a static noisy background.

    Args:
        seed: Dataset seed.
        split: ``"train"`` or ``"val"``.
        index: Sample index within the split.
        video_size: Frame side length in pixels.
        num_frames: Number of frames.

    Returns:
        The frames and the metadata: ``label``, ``class_name``, ``caption``, ``shape``, ``color``, ``size``,
        ``num_frames``.
    """
    label = _balanced_label(seed, "video", split, index, len(VIDEO_CLASSES))
    direction = VIDEO_CLASSES[label]
    dx, dy = _DIRECTIONS[label]
    rng = _rng(seed, "video", split, index)
    shape = IMAGE_CLASSES[int(rng.integers(len(IMAGE_CLASSES)))]
    colour = list(COLORS)[int(rng.integers(len(COLORS)))]
    size = list(_VIDEO_SIZES)[int(rng.integers(len(_VIDEO_SIZES)))]
    radius = _VIDEO_SIZES[size] * (1.0 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)) * video_size
    angle = float(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    spin = float(rng.uniform(-2.0, 2.0))  # degrees per frame, so frames are not pure translations of each other

    # Travel 35-50% of the frame along the motion axis (less if the shape would leave it), start anywhere that keeps
    # the whole path inside, and wobble a little across the axis.
    lo, hi = 1.05 * radius + 1.0, video_size - 1.05 * radius - 1.0
    travel = min(rng.uniform(0.35, 0.5) * video_size, hi - lo)
    start = rng.uniform(lo, hi - travel)
    across = rng.uniform(lo, hi)
    steps = np.linspace(0.0, travel, num_frames) if num_frames > 1 else np.zeros(1)
    along = start + steps if (dx + dy) > 0 else hi - (start - lo) - steps
    wobble = np.clip(across + rng.normal(0.0, 0.3, size=num_frames), lo, hi)
    xs, ys = (along, wobble) if dx != 0 else (wobble, along)

    background = gradient_background(rng, video_size)
    add_specks(rng, background)
    fill = shape_colour(rng, colour)
    # Shading and blur are properties of the clip, drawn once, so they do not flicker between frames.
    ramp_dir = float(rng.uniform(0.0, 2.0 * math.pi))
    blur = sample_blur_radius(rng, video_size)
    frames = []
    for t in range(num_frames):
        img = background.copy()
        mask = shape_mask(shape, video_size, float(xs[t]), float(ys[t]), radius, angle + spin * t)
        composite(img, mask, fill, ramp_dir)
        frames.append(finish_image(img, rng, blur))

    template = _VIDEO_TEMPLATES[int(rng.integers(len(_VIDEO_TEMPLATES)))]
    direction_word = direction.removeprefix("moving ")
    caption = template.format(
        size=size, color=colour, shape=shape, direction=direction_word, a_color=f"{_article(colour)} {colour}"
    )
    meta = {
        "label": label,
        "class_name": direction,
        "caption": caption,
        "shape": shape,
        "color": colour,
        "size": size,
        "num_frames": num_frames,
    }
    return frames, meta
