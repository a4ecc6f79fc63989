"""The data contract between ``condmoe-prep`` (writes) and ``train/`` (reads): folder layout, index files, member keys
and the frame-index rule. Standard library only: it is the one module of data_prep/ that train/ imports.

Layout of a prepared root::

    ROOT/<dataset>/<split>/shard-NNNNNN.tar   webdataset shards (samples: ``<key>.<member>``)
    ROOT/sizes.json                           {"<dataset>/<split>": num_samples, ...}
    ROOT/classes.json                         {"<dataset>": ["class name", ...], ...}
    ROOT/manifest.json                        every shard with its size, sha256 and sample count (written last)
    ROOT/tokenizer/tokenizer.json             the BPE tokenizer

Members of a sample: ``jpg`` (an image), ``cls`` (the class index, ASCII), ``txt`` (captions, one per line), a video
as frames ``f00.jpg ... fNN.jpg`` or as one ``mp4``, and optional ``json`` metadata.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SIZES = "sizes.json"
CLASSES = "classes.json"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"

IMAGE = "jpg"
LABEL = "cls"
TEXT = "txt"
VIDEO = "mp4"
META = "json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # image members train/ decodes (frames included)

MAX_FRAMES = 100  # frame members are named f00..f99
FRAME_MEMBER = re.compile(r"f\d{2}\.jpg")


def frame_member(t: int) -> str:
    """The member name of frame ``t`` of a video sample stored as frames."""
    if not 0 <= t < MAX_FRAMES:
        raise ValueError(f"frame index {t} is outside [0, {MAX_FRAMES})")
    return f"f{t:02d}.jpg"


def uniform_frame_indices(total: int, num_frames: int) -> list[int]:
    """The centres of ``num_frames`` equal segments of ``total`` frames (``total >= 1``), in order, repeated when the
    clip is shorter. Prep samples clips with it and training picks the frames of a stored clip with it."""
    return [min(total - 1, (2 * i + 1) * total // (2 * num_frames)) for i in range(num_frames)]


def split_dir(root: str | Path, dataset: str, split: str) -> Path:
    return Path(root) / dataset / split


def shard_urls(root: str | Path, dataset: str, split: str) -> list[str]:
    """The split's shards in name order; ``FileNotFoundError`` naming the folder when there are none."""
    folder = split_dir(root, dataset, split)
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"no shards in {folder}")
    return urls


def read_json(root: str | Path, name: str) -> dict:
    """``ROOT/name`` as a JSON object; errors name the file."""
    path = Path(root) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {root} a condmoe-prep output directory?)")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def num_samples(root: str | Path, dataset: str, split: str) -> int:
    """The split's sample count from ``sizes.json``; errors name the file and the key."""
    key = f"{dataset}/{split}"
    sizes = read_json(root, SIZES)
    if key not in sizes:
        raise ValueError(f"{Path(root) / SIZES}: no entry {key!r} (has {sorted(sizes)})")
    return int(sizes[key])


def read_classes(root: str | Path) -> dict[str, list[str]]:
    """``classes.json``: class names per dataset."""
    return read_json(root, CLASSES)
