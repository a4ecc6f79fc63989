"""condmoe's embedded default multi-task dataset (no download needed), written by the runner like every source.

Two datasets, each with a ``train`` and a ``val`` split: ``image`` (one of ten drawn shapes per picture, with a
caption naming colour, size, shape and position) and ``video`` (a shape moving left, right, up or down). What a
sample shows is :mod:`data_prep.scenes`; this module encodes samples and writes the dataset. The same seed always
gives byte-identical shards, index files and tokenizer (fixed JPEG settings, fixed tar metadata).

Each of the four splits (``image``/``video`` x ``train``/``val``) is one runner job whose items are the sample
indices, so the generator gets what every source gets: slices written atomically, a progress file, resume after a
kill. The index is the generator's own: entries without provenance fields, and the generation parameters and seed at
the top of the manifest (how :func:`complete_dataset_sizes` recognises a dataset that is already there). Progress
files are deleted once the index is written, so a finished root holds only the layout of :mod:`data_prep.schema`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from condmoe.data_prep import schema
from condmoe.data_prep.dense_scenes import DENSE_LABELS, render_dense
from condmoe.data_prep.index import iter_train_texts, prune_split, verify_manifest
from condmoe.data_prep.progress import PROGRESS_DIR
from condmoe.data_prep.runner import PrepOptions, write_part
from condmoe.data_prep.scenes import (
    COLORS,
    GENERATOR_VERSION,
    IMAGE_CLASSES,
    POSITIONS,
    SIZES,
    SPLITS,
    VIDEO_CLASSES,
    render_image,
    render_video,
)
from condmoe.data_prep.sources.base import Source, SourcePlan

__all__ = [
    "COLORS",
    "GENERATOR_VERSION",
    "IMAGE_CLASSES",
    "POSITIONS",
    "SIZES",
    "SPLITS",
    "VIDEO_CLASSES",
    "SyntheticConfig",
    "SyntheticSource",
    "complete_dataset_sizes",
    "image_sample",
    "render_image",
    "render_video",
    "video_sample",
    "write_synthetic_dataset",
]

_logger = logging.getLogger(__name__)

# Shards are cut by sample count only: no synthetic shard comes near 3 GB (the byte limit webdataset's ShardWriter
# applied when the generator had its own writer).
_SHARD_BYTES = 3 * 10**9
_JPEG_QUALITY = 90


# --------------------------------------------------------------------------------------------------------------------
# Encoding samples
# --------------------------------------------------------------------------------------------------------------------


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: at 32-64 px, 4:2:0 subsampling visibly smears the colour that captions talk about.
    img.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def _json_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def image_sample(seed: int, split: str, index: int, image_size: int = 64) -> dict[str, bytes]:
    """The encoded members of one image sample: ``jpg``, ``cls``, ``txt`` (the caption) and ``json`` (metadata).

    Args:
        seed: Dataset seed.
        split: ``"train"`` or ``"val"``.
        index: Sample index within the split.
        image_size: Side length in pixels.
    """
    img, meta = render_image(seed, split, index, image_size)
    return {
        schema.IMAGE: _jpeg(img),
        schema.LABEL: str(meta["label"]).encode("ascii"),
        schema.TEXT: meta["caption"].encode("utf-8"),
        schema.META: _json_bytes(meta),
    }


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def dense_sample(seed: int, split: str, index: int, image_size: int = 64) -> dict[str, bytes]:
    """The encoded members of one ``dense`` sample: ``jpg``, one PNG per label map (``DENSE_LABELS``), ``json``."""
    img, maps, meta = render_dense(seed, split, index, image_size)
    sample = {schema.IMAGE: _jpeg(img), schema.META: _json_bytes(meta)}
    for name, array in maps.items():
        sample[DENSE_LABELS[name]["member"]] = _png(array)
    return sample


def video_sample(seed: int, split: str, index: int, video_size: int = 32, num_frames: int = 8) -> dict[str, bytes]:
    """The encoded members of one video sample: ``f00.jpg`` .. ``fNN.jpg`` plus ``cls``, ``txt`` and ``json``.

    Args:
        seed: Dataset seed.
        split: ``"train"`` or ``"val"``.
        index: Sample index within the split.
        video_size: Frame side length in pixels.
        num_frames: Frames per clip (at most 100, so frame extensions stay two digits).
    """
    frames, meta = render_video(seed, split, index, video_size, num_frames)
    sample = {schema.frame_member(t): _jpeg(frame) for t, frame in enumerate(frames)}
    sample[schema.LABEL] = str(meta["label"]).encode("ascii")
    sample[schema.TEXT] = meta["caption"].encode("utf-8")
    sample[schema.META] = _json_bytes(meta)
    return sample


# --------------------------------------------------------------------------------------------------------------------
# The dataset
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
    num_train_dense: int = 1000
    num_val_dense: int = 200
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
        if self.num_train_dense < 0 or self.num_val_dense < 0 or (self.num_train_dense > 0) != (self.num_val_dense > 0):
            raise ValueError(f"num_train_dense and num_val_dense must both be positive (or both 0: no dense dataset), "
                             f"got {self.num_train_dense} and {self.num_val_dense}")
        if self.tokenizer and self.vocab_size < 256 + 6:
            raise ValueError(f"vocab_size must be >= 262 (256 bytes + 6 special tokens), got {self.vocab_size}")

    def split_sizes(self) -> dict[str, int]:
        """``"{dataset}/{split}"`` -> number of samples, in writing order."""
        return {
            "image/train": self.num_train_images,
            "image/val": self.num_val_images,
            "video/train": self.num_train_videos,
            "video/val": self.num_val_videos,
            **({"dense/train": self.num_train_dense, "dense/val": self.num_val_dense} if self.num_train_dense else {}),
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
    manifest = schema.read_manifest(out)
    if manifest is None or manifest.get("params") != config.params():
        return None
    if verify_manifest(out, manifest):
        return None
    if config.tokenizer and not (out / schema.TOKENIZER_DIR / "tokenizer.json").is_file():
        return None
    return {name: int(d["num_samples"]) for name, d in manifest["datasets"].items()}


class SyntheticSource(Source):
    """One split of the synthetic dataset: item ``i`` is sample ``i`` of ``dataset/split``.

    Args:
        config: Generation parameters.
        dataset: ``"image"`` or ``"video"``.
        split: ``"train"`` or ``"val"``.
    """

    name = "synthetic"
    key_digits = 6

    def __init__(self, config: SyntheticConfig, dataset: str, split: str) -> None:
        if f"{dataset}/{split}" not in config.split_sizes():
            raise ValueError(f"no synthetic split {dataset}/{split}")
        self.config = config
        self.dataset = dataset
        self.split = split

    def params(self) -> dict[str, Any]:
        """The generation parameters and the split (its random streams depend on both)."""
        return {**self.config.params(), "dataset": self.dataset, "split": self.split}

    def plan(self, existing_classes: list[str] | None) -> SourcePlan:
        """The sample indices; the classes are the generator's own (``existing_classes`` is not used)."""
        count = self.config.split_sizes()[f"{self.dataset}/{self.split}"]
        if self.dataset == "dense":  # label maps, no class label (dense.json describes them)
            return SourcePlan(items=list(range(count)))
        classes = IMAGE_CLASSES if self.dataset == "image" else VIDEO_CLASSES
        return SourcePlan(items=list(range(count)), classes=list(classes))

    def item_id(self, item: Any) -> str:
        """``dataset/split:index``."""
        return f"{self.dataset}/{self.split}:{item}"

    def make_sample(self, item: Any) -> dict[str, bytes]:
        """Render and encode sample ``item``."""
        c = self.config
        if self.dataset == "image":
            return image_sample(c.seed, self.split, item, c.image_size)
        if self.dataset == "dense":
            return dense_sample(c.seed, self.split, item, c.image_size)
        return video_sample(c.seed, self.split, item, c.video_size, c.num_frames)


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
    num_train_dense: int = 1000,
    num_val_dense: int = 200,
    shard_size: int = 1000,
    video_shard_size: int = 200,
    vocab_size: int = 1000,
    tokenizer: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, int]:
    """Generate the synthetic image + video dataset as webdataset shards under ``out``.

    Writes ``classes.json``, ``{image,video}/{train,val}/shard-NNNNNN.tar`` (each split with the runner, so a killed
    run resumes where it stopped), ``tokenizer/`` (unless ``tokenizer=False``) and finally ``sizes.json`` and
    ``manifest.json``. If ``out`` already holds a complete dataset with the same parameters, nothing is written
    (unless ``overwrite``).

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
        num_train_dense: Scenes with label maps in ``dense/train`` (``data_prep.dense_scenes``; 0 with
            ``num_val_dense`` 0: no dense dataset).
        num_val_dense: Scenes in ``dense/val``.
        shard_size: Maximum images per shard.
        video_shard_size: Maximum clips (and dense scenes) per shard.
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
        num_train_dense=num_train_dense,
        num_val_dense=num_val_dense,
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
    for name in (schema.MANIFEST, schema.SIZES):
        (out / name).unlink(missing_ok=True)
    classes = {"image": list(IMAGE_CLASSES), "video": list(VIDEO_CLASSES)}
    schema.write_json(out / schema.CLASSES, classes)
    if config.num_train_dense:
        schema.write_json(out / schema.DENSE, {"dense": DENSE_LABELS})
    else:
        (out / schema.DENSE).unlink(missing_ok=True)

    start = time.perf_counter()
    datasets: dict[str, dict[str, Any]] = {}
    for name in config.split_sizes():
        dataset, split = name.split("/")
        options = PrepOptions(
            out=out,
            dataset=dataset,
            split=split,
            shard_size=video_shard_size if dataset in ("video", "dense") else shard_size,
            shard_bytes=_SHARD_BYTES,
            overwrite=True,  # progress of other parameters is stale; progress of these same ones is resumed
            progress=progress,
        )
        result = write_part(SyntheticSource(config, dataset, split), options)
        datasets[name] = schema.manifest_entry(result.shards)
        prune_split(out / dataset / split, {s["name"] for s in result.shards})  # an earlier, larger run's shards
    _logger.info("wrote %d samples in %.1f s", sum(config.split_sizes().values()), time.perf_counter() - start)

    tokenizer_entry = None
    if tokenizer:
        # Imported here: tokenizers is only needed when a tokenizer is requested.
        from condmoe.data_prep.bpe import bpe_vocab_size, train_bpe

        tok_dir = train_bpe(iter_train_texts(out, datasets, classes), out / schema.TOKENIZER_DIR, vocab_size)
        tokenizer_entry = {"path": tok_dir.name, "vocab_size": bpe_vocab_size(tok_dir)}

    manifest = schema.new_manifest(seed)
    manifest.update(datasets=datasets, params=config.params(), classes=classes, tokenizer=tokenizer_entry)
    sizes = schema.write_index(out, manifest)
    for name in datasets:
        shutil.rmtree(out / name / PROGRESS_DIR, ignore_errors=True)
    return sizes
