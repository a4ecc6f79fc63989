"""Deterministic generator of condmoe's embedded default multi-task dataset (no download needed).

Two datasets, each with a ``train`` and a ``val`` split:

* ``image``: RGB pictures of one of ten drawn shapes (the class) with a random colour, size, position and small
  rotation on a dark noisy gradient with distractor specks, plus a caption that names colour, size, shape and position
  (so image-text retrieval needs more than the class).
* ``video``: short clips of a shape moving left, right, up or down (the class), with a caption such as
  "a green square moving left".

Every sample is rendered from its own random stream, ``SeedSequence([seed, dataset, split, index])``, so content does
not depend on shard size or generation order, train and val never share a stream, and the same seed always gives
byte-identical shards (fixed JPEG settings, fixed tar metadata; see :mod:`data_prep.shards`). The drawing primitives
(shape masks, palette, backgrounds, noise) live in :mod:`data_prep.shapes`; ``COLORS`` is re-exported here.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from condmoe.data_prep import schema
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
from condmoe.data_prep.shards import (
    MANIFEST_NAME,
    SIZES_NAME,
    ShardInfo,
    build_manifest,
    read_manifest,
    verify_manifest,
    write_index,
    write_json_atomic,
    write_shards,
)

__all__ = [
    "COLORS",
    "GENERATOR_VERSION",
    "IMAGE_CLASSES",
    "POSITIONS",
    "SIZES",
    "SPLITS",
    "VIDEO_CLASSES",
    "SyntheticConfig",
    "complete_dataset_sizes",
    "iter_image_samples",
    "iter_video_samples",
    "render_image",
    "render_video",
    "write_synthetic_dataset",
]

_logger = logging.getLogger(__name__)

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

_JPEG_QUALITY = 90

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


# --------------------------------------------------------------------------------------------------------------------
# Encoding to webdataset samples
# --------------------------------------------------------------------------------------------------------------------


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: at 32-64 px, 4:2:0 subsampling visibly smears the colour that captions talk about.
    img.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def _json_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def iter_image_samples(seed: int, split: str, num_samples: int, image_size: int = 64) -> Iterator[dict[str, Any]]:
    """Encoded webdataset samples ``{key}.jpg/.cls/.txt/.json`` for one image split.

    Args:
        seed: Dataset seed.
        split: ``"train"`` or ``"val"``.
        num_samples: Number of samples; keys are ``000000`` .. ``num_samples - 1``.
        image_size: Side length in pixels.

    Yields:
        Dicts with ``__key__`` and bytes values, ready for :func:`data_prep.shards.write_shards`.
    """
    for index in range(num_samples):
        img, meta = render_image(seed, split, index, image_size)
        yield {
            "__key__": f"{index:06d}",
            schema.IMAGE: _jpeg(img),
            schema.LABEL: str(meta["label"]).encode("ascii"),
            schema.TEXT: meta["caption"].encode("utf-8"),
            "json": _json_bytes(meta),
        }


def iter_video_samples(
    seed: int, split: str, num_samples: int, video_size: int = 32, num_frames: int = 8
) -> Iterator[dict[str, Any]]:
    """Encoded webdataset samples ``{key}.f00.jpg`` .. ``{key}.fNN.jpg`` plus ``.cls/.txt/.json`` for one video split.

    Args:
        seed: Dataset seed.
        split: ``"train"`` or ``"val"``.
        num_samples: Number of clips.
        video_size: Frame side length in pixels.
        num_frames: Frames per clip (at most 100, so frame extensions stay two digits).

    Yields:
        Dicts with ``__key__`` and bytes values.
    """
    for index in range(num_samples):
        frames, meta = render_video(seed, split, index, video_size, num_frames)
        sample: dict[str, Any] = {"__key__": f"{index:06d}"}
        for t, frame in enumerate(frames):
            sample[schema.frame_member(t)] = _jpeg(frame)
        sample[schema.LABEL] = str(meta["label"]).encode("ascii")
        sample[schema.TEXT] = meta["caption"].encode("utf-8")
        sample["json"] = _json_bytes(meta)
        yield sample


# --------------------------------------------------------------------------------------------------------------------
# Whole dataset
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of :func:`write_synthetic_dataset`; they are stored in the manifest to detect a complete dataset."""

    seed: int = 0
    image_size: int = 64
    video_size: int = 32
    num_frames: int = 8
    num_train_images: int = 3000
    num_val_images: int = 500
    num_train_videos: int = 400
    num_val_videos: int = 100
    shard_size: int = 1000
    video_shard_size: int = 200
    vocab_size: int = 1000
    tokenizer: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message for the first invalid field."""
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("image_size", "video_size"):
            if getattr(self, name) < 16:
                raise ValueError(f"{name} must be >= 16 pixels, got {getattr(self, name)}")
        if not 2 <= self.num_frames <= 100:
            raise ValueError(f"num_frames must be in [2, 100], got {self.num_frames}")
        for name in (
            "num_train_images",
            "num_val_images",
            "num_train_videos",
            "num_val_videos",
            "shard_size",
            "video_shard_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.tokenizer and self.vocab_size < 256 + 6:
            raise ValueError(f"vocab_size must be >= 262 (256 bytes + 6 special tokens), got {self.vocab_size}")

    def split_sizes(self) -> dict[str, int]:
        """``"{dataset}/{split}"`` -> number of samples, in writing order."""
        return {
            "image/train": self.num_train_images,
            "image/val": self.num_val_images,
            "video/train": self.num_train_videos,
            "video/val": self.num_val_videos,
        }

    def params(self) -> dict[str, Any]:
        """Everything that determines the bytes on disk, as stored in ``manifest.json``."""
        params = asdict(self)
        if not self.tokenizer:
            params["vocab_size"] = None
        params["generator_version"] = GENERATOR_VERSION
        return params


def complete_dataset_sizes(out: str | os.PathLike, config: SyntheticConfig) -> dict[str, int] | None:
    """Sizes of an existing dataset under ``out`` if it is complete and was generated with ``config``.

    Complete means: ``manifest.json`` exists with the same parameters, every listed shard exists with the recorded
    size, and the tokenizer (if requested) is present. Hashes are not recomputed.

    Args:
        out: Dataset root.
        config: Expected parameters.

    Returns:
        The ``sizes.json`` mapping, or ``None`` if the dataset must be (re)generated.
    """
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None or manifest.get("params") != config.params():
        return None
    if verify_manifest(out, manifest):
        return None
    if config.tokenizer and not (out / "tokenizer" / "tokenizer.json").is_file():
        return None
    return {name: int(d["num_samples"]) for name, d in manifest["datasets"].items()}


def write_synthetic_dataset(
    out: str | os.PathLike,
    seed: int = 0,
    image_size: int = 64,
    video_size: int = 32,
    num_frames: int = 8,
    num_train_images: int = 3000,
    num_val_images: int = 500,
    num_train_videos: int = 400,
    num_val_videos: int = 100,
    shard_size: int = 1000,
    video_shard_size: int = 200,
    vocab_size: int = 1000,
    tokenizer: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, int]:
    """Generate the synthetic image + video dataset as webdataset shards under ``out``.

    Writes ``{image,video}/{train,val}/shard-NNNNNN.tar``, ``classes.json``, ``tokenizer/`` (unless
    ``tokenizer=False``) and finally ``sizes.json`` and ``manifest.json``. If ``out`` already holds a complete dataset
    with the same parameters, nothing is written (unless ``overwrite``).

    Args:
        out: Output root (created if needed).
        seed: Generation seed; the same seed gives byte-identical shards.
        image_size: Image side in pixels.
        video_size: Video frame side in pixels.
        num_frames: Frames per video clip.
        num_train_images: Images in ``image/train``.
        num_val_images: Images in ``image/val``.
        num_train_videos: Clips in ``video/train``.
        num_val_videos: Clips in ``video/val``.
        shard_size: Maximum images per shard.
        video_shard_size: Maximum clips per shard.
        vocab_size: BPE vocabulary size (an upper bound: the captions may support fewer merges).
        tokenizer: Train and save the BPE tokenizer under ``out/tokenizer``.
        overwrite: Regenerate even if a complete dataset with the same parameters exists.
        progress: Show tqdm progress bars.

    Returns:
        ``{"image/train": n, "image/val": n, "video/train": n, "video/val": n}``.

    Raises:
        ValueError: If a parameter is out of range.
        OSError: If ``out`` cannot be written.
    """
    config = SyntheticConfig(
        seed=seed,
        image_size=image_size,
        video_size=video_size,
        num_frames=num_frames,
        num_train_images=num_train_images,
        num_val_images=num_val_images,
        num_train_videos=num_train_videos,
        num_val_videos=num_val_videos,
        shard_size=shard_size,
        video_shard_size=video_shard_size,
        vocab_size=vocab_size,
        tokenizer=tokenizer,
    )
    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        existing = complete_dataset_sizes(out, config)
        if existing is not None:
            _logger.info("%s already holds a complete dataset with these parameters; skipping", out)
            return existing

    # The index goes first, so that a run killed halfway can never be mistaken for a complete dataset.
    for name in (MANIFEST_NAME, SIZES_NAME):
        (out / name).unlink(missing_ok=True)
    write_json_atomic(out / "classes.json", {"image": list(IMAGE_CLASSES), "video": list(VIDEO_CLASSES)})

    start = time.perf_counter()
    captions: list[str] = []
    datasets: dict[str, list[ShardInfo]] = {}
    for name, count in config.split_sizes().items():
        dataset, split = name.split("/")
        if dataset == "image":
            samples = iter_image_samples(seed, split, count, image_size)
            maxcount = shard_size
        else:
            samples = iter_video_samples(seed, split, count, video_size, num_frames)
            maxcount = video_shard_size
        if split == "train":
            samples = _collect_captions(samples, captions)
        datasets[name] = write_shards(
            samples, out / dataset / split, maxcount=maxcount, total=count, desc=name, progress=progress
        )
    _logger.info("wrote %d samples in %.1f s", sum(config.split_sizes().values()), time.perf_counter() - start)

    tokenizer_entry = None
    if tokenizer:
        # Imported here: tokenizers is only needed when a tokenizer is requested.
        from condmoe.data_prep.bpe import bpe_vocab_size, train_bpe

        texts = [*captions, *IMAGE_CLASSES, *VIDEO_CLASSES]
        tok_dir = train_bpe(texts, out / "tokenizer", vocab_size=vocab_size)
        tokenizer_entry = {"path": tok_dir.name, "vocab_size": bpe_vocab_size(tok_dir)}

    manifest = build_manifest(
        seed,
        datasets,
        params=config.params(),
        classes={"image": list(IMAGE_CLASSES), "video": list(VIDEO_CLASSES)},
        tokenizer=tokenizer_entry,
    )
    return write_index(out, manifest)


def _collect_captions(samples: Iterator[dict[str, Any]], sink: list[str]) -> Iterator[dict[str, Any]]:
    for sample in samples:
        sink.append(sample["txt"].decode("utf-8"))
        yield sample
