"""The data contract between ``condmoe-prep`` (writes) and ``train/`` (reads): folder layout, index files, member keys
and the frame-index rule. Standard library only: it is the one module of data_prep/ that train/ imports.

Layout of a prepared root::

    ROOT/<dataset>/<split>/shard-NNNNNN.tar   webdataset shards (samples: ``<key>.<member>``)
    ROOT/sizes.json                           {"<dataset>/<split>": num_samples, ...}
    ROOT/classes.json                         {"<dataset>": ["class name", ...], ...}
    ROOT/manifest.json                        every shard with its size, sha256 and sample count (written last)
    ROOT/tokenizer/tokenizer.json             the BPE tokenizer
    ROOT/dense.json                           {"<dataset>": {"<label>": {"member", "encoding", ...}}} (dense labels)
    ROOT/<dataset>/<split>/errors.jsonl       the inputs prep skipped, one JSON object per line (real sources)

Members of a sample: ``jpg`` (an image), ``cls`` (the class index, ASCII), ``txt`` (captions, one per line), a video
as frames ``f00.jpg ... fNN.jpg`` or as one ``mp4``, and optional ``json`` metadata.

Dense labels (multi-task dense prediction: PASCAL-Context, NYUD-v2, Taskonomy, the synthetic ``dense`` dataset) are
PNG members of the image's sample, one per label map, at the image's resolution; ``dense.json`` says for each dataset
which labels it has and how each is encoded (``DENSE_ENCODINGS``):

- ``index``: uint8 (or uint16) class index per pixel; ``num_classes`` classes, ``ignore`` (255) unlabelled, optional
  ``names``. Semantic segmentation, human parts.
- ``binary``: uint8 0 / 255, a pixel is positive when its value is >= 128. Saliency, edges.
- ``normal``: uint8 RGB, the unit normal is ``2 * v / 255 - 1`` per channel (x right, y up, z towards the camera);
  a pixel (0, 0, 0) is unlabelled.
- ``scalar``: uint8 or uint16 grey; ``value * scale`` is the quantity (depth in metres: ``scale`` 0.001 for
  millimetres), a pixel equal to ``invalid`` is unlabelled.
- ``soft``: not a map but a per-image distribution over ``num_classes`` classes (Taskonomy's ``class_object`` and
  ``class_scene``): a ``.npy`` member holding a float vector of that length, finite and non-negative.

The writers are here too, so that every index file of data_prep/ is written one way: through a temporary file that
is fsynced and renamed over the old one, so readers see the old file or the complete new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

SIZES = "sizes.json"
CLASSES = "classes.json"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
ERRORS = "errors.jsonl"
MANIFEST_VERSION = 1

IMAGE = "jpg"
LABEL = "cls"
TEXT = "txt"
VIDEO = "mp4"
META = "json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # image members train/ decodes (frames included)
DENSE = "dense.json"
DENSE_ENCODINGS = {  # encoding -> the fields its spec must have besides ``member``
    "index": ("num_classes", "ignore"),
    "binary": (),
    "normal": (),
    "scalar": ("scale", "invalid"),
    "soft": ("num_classes",),
}
# The usual member of each dense label (datasets may name others in dense.json)
DENSE_MEMBERS = {"semseg": "semseg.png", "human_parts": "parts.png", "saliency": "sal.png", "normals": "normals.png",
                 "edge": "edge.png", "depth": "depth.png"}

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
    """The split's sample count from ``sizes.json``: a positive integer; errors name the file and the key."""
    key = f"{dataset}/{split}"
    path = Path(root) / SIZES
    sizes = read_json(root, SIZES)
    if key not in sizes:
        raise ValueError(f"{path}: no entry {key!r} (has {sorted(sizes)}); prepare that split with condmoe-prep")
    value = sizes[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{path}: {key!r} is {value!r}, expected a positive integer sample count")
    return value


def _manifest_count(path: Path, key: str, entry: Any) -> int:
    """The sample count a manifest entry records, after checking that its shards add up to it."""
    try:
        total = int(entry["num_samples"])
        in_shards = sum(int(s["num_samples"]) for s in entry["shards"])
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{path}: entry {key!r} is malformed (no num_samples or shards); rerun condmoe-prep") from None
    if total != in_shards:
        raise ValueError(f"{path}: entry {key!r} says {total} samples but its shards hold {in_shards}")
    return total


def _no_manifest_reason(root: Path) -> str:
    if not (root / MANIFEST).is_file():
        return f"no {MANIFEST}"
    return f"{MANIFEST} unreadable or not version {MANIFEST_VERSION}"


def check_sizes(root: str | Path, keys: Iterable[str]) -> list[str]:
    """Check the ``sizes.json`` counts of ``keys`` (``"<dataset>/<split>"``) at start-up, reading index files only.

    Each count must be a positive integer and equal the manifest entry's, whose shards must add up to it.

    Returns:
        One line per key that the manifest does not describe (checked as a positive integer only): say so, but
        train, since the count still sizes an epoch.

    Raises:
        ValueError: One line naming the file and the key: missing, not a positive integer, or not the manifest's.
    """
    root = Path(root)
    manifest = read_manifest(root)
    datasets = manifest.get("datasets") if manifest is not None else None
    unchecked = []
    for key in dict.fromkeys(keys):
        dataset, _, split = key.partition("/")
        count = num_samples(root, dataset, split)
        entry = datasets.get(key) if isinstance(datasets, dict) else None
        if entry is None:
            why = _no_manifest_reason(root) if datasets is None else f"no entry {key!r} in {MANIFEST}"
            unchecked.append(f"{root / SIZES}: {key!r} = {count} checked as a positive integer only, not against "
                             f"the shards ({why}; `condmoe-prep verify {root}` reads them all)")
            continue
        expected = _manifest_count(root / MANIFEST, key, entry)
        if count != expected:
            raise ValueError(f"{root / SIZES}: {key!r} is {count}, but {root / MANIFEST} lists {expected} samples; "
                             "rerun the condmoe-prep command that wrote them")
    return unchecked


def read_classes(root: str | Path, missing_ok: bool = False) -> dict[str, list[str]]:
    """``classes.json``: class names per dataset.

    Args:
        root: Dataset root.
        missing_ok: Return ``{}`` if there is no ``classes.json`` yet (prep, before the first labelled split).

    Raises:
        FileNotFoundError: If the file is missing (and not ``missing_ok``).
        ValueError: If it is not a JSON object of name lists; the message names the file.
    """
    if missing_ok and not (Path(root) / CLASSES).is_file():
        return {}
    classes = read_json(root, CLASSES)
    for dataset, names in classes.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{Path(root) / CLASSES}: entry {dataset!r} is not a list of class names")
    return classes


def check_dense_spec(path: str | Path, dataset: str, label: str, spec: Any) -> dict[str, Any]:
    """One label's entry of ``dense.json``, checked: a ValueError names the file, the dataset and the label."""
    where = f"{path}: {dataset}/{label}"
    encoding = spec.get("encoding") if isinstance(spec, dict) else None
    suffix = ".npy" if encoding == "soft" else ".png"
    if not isinstance(spec, dict) or not isinstance(spec.get("member"), str) or not spec["member"].endswith(suffix):
        raise ValueError(f"{where}: expected an object with a 'member' ending in {suffix}, got {spec!r}")
    if encoding not in DENSE_ENCODINGS:
        raise ValueError(f"{where}: encoding {encoding!r} is not one of {sorted(DENSE_ENCODINGS)}")
    missing = [key for key in DENSE_ENCODINGS[encoding] if key not in spec]
    if missing:
        raise ValueError(f"{where}: a {encoding} label needs {missing}")
    if encoding in ("index", "soft") and (not isinstance(spec["num_classes"], int) or spec["num_classes"] < 2):
        raise ValueError(f"{where}: num_classes must be an integer >= 2, got {spec['num_classes']!r}")
    return spec


def read_dense(root: str | Path, missing_ok: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """``dense.json``: per dataset, its dense labels' specs (checked with :func:`check_dense_spec`).

    Raises:
        FileNotFoundError: If the file is missing (and not ``missing_ok``: then ``{}``).
        ValueError: One line naming the file, the dataset and the label.
    """
    if missing_ok and not (Path(root) / DENSE).is_file():
        return {}
    dense = read_json(root, DENSE)
    for dataset, labels in dense.items():
        if not isinstance(labels, dict) or not labels:
            raise ValueError(f"{Path(root) / DENSE}: entry {dataset!r} is not an object of label specs")
        for label, spec in labels.items():
            check_dense_spec(Path(root) / DENSE, dataset, label, spec)
    return dense


def write_dense(root: str | Path, dataset: str, labels: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Set ``dataset``'s entry of ``ROOT/dense.json`` to ``labels`` (other datasets kept), atomically.

    Each spec is checked with :func:`check_dense_spec` first. Several processes writing the same root must hold
    :func:`data_prep.index.index_lock` around the call (as for ``classes.json``), or one may drop the other's entry.

    Returns:
        The whole ``dense.json`` as written.

    Raises:
        ValueError: A bad spec (naming the dataset and the label), or an existing ``dense.json`` that is damaged
            (rather than overwrite the other datasets' entries with nothing).
    """
    path = Path(root) / DENSE
    if not labels:
        raise ValueError(f"{path}: {dataset}: no labels to write")
    entry = {label: dict(check_dense_spec(path, dataset, label, dict(spec))) for label, spec in labels.items()}
    dense = read_dense(root, missing_ok=True)
    dense[dataset] = entry
    write_json(path, dense)
    return dense


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """``manifest.json``; ``None`` if it is missing, unreadable or of another version (the split must be redone)."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return None
    return manifest


def new_manifest(seed: int | None = None) -> dict[str, Any]:
    """An empty manifest (``seed`` is the synthetic generator's; real sources have none)."""
    return {"version": MANIFEST_VERSION, "seed": seed, "datasets": {}}


def manifest_entry(shards: Sequence[Mapping[str, Any]], **fields: Any) -> dict[str, Any]:
    """One ``datasets["<dataset>/<split>"]`` entry of the manifest.

    Args:
        shards: The split's shards in order, each ``{"name", "num_samples", "num_bytes", "sha256"}``.
        **fields: How the split was made (``source``, ``params``, ``fingerprint``, ``skipped``, ``notes`` ...).

    Returns:
        ``{"num_samples": total, "shards": [...], **fields}``.

    Raises:
        ValueError: If a field would replace ``num_samples`` or ``shards``.
    """
    entry: dict[str, Any] = {
        "num_samples": sum(int(s["num_samples"]) for s in shards),
        "shards": [dict(s) for s in shards],
    }
    clash = sorted(set(fields) & set(entry))
    if clash:
        raise ValueError(f"manifest entry fields {clash} are computed from the shards")
    entry.update(fields)
    return entry


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a fsynced temporary file and ``os.replace``.

    The temporary name carries the pid, so two processes writing the same file never share one.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys (so the bytes depend only on the content), atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write one JSON object per line (sorted keys, UTF-8 as is), atomically; used for ``errors.jsonl``."""
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records))


def write_index(root: str | Path, manifest: Mapping[str, Any]) -> dict[str, int]:
    """Write ``sizes.json`` and then ``manifest.json`` (the completion marker) from a manifest.

    Returns:
        The sizes: ``"<dataset>/<split>"`` -> number of samples.
    """
    sizes = {name: int(entry["num_samples"]) for name, entry in manifest["datasets"].items()}
    write_json(Path(root) / SIZES, sizes)
    write_json(Path(root) / MANIFEST, manifest)
    return sizes
