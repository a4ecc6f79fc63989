"""``condmoe-prep verify``: check a prepared directory against its manifest, one line per problem.

For every split in ``manifest.json``: each shard exists with the recorded size and SHA-256 and holds the recorded
number of samples (members of a sample adjacent, as webdataset needs); with decoding on, every member is decoded by
its extension (images with Pillow, videos with PyAV, ``.cls`` as a label within ``classes.json``, ``.txt`` as UTF-8,
``.json`` as JSON). Members named in ``dense.json`` are checked against their label's spec instead: a PNG map has
its image's size and a single-channel mode (``normal``: RGB; an RGB map with three equal channels passes, as training
converts it), ``index`` values are classes or ``ignore``; a ``soft`` ``.npy`` is a finite, non-negative vector of
``num_classes`` scores. A sample without some label is fine. ``sizes.json`` must match the manifest, and no unlisted
``*.tar`` may sit in a split directory (training globs them).
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from condmoe.data_prep import schema
from condmoe.data_prep.errors import UserError
from condmoe.data_prep.index import read_classes
from condmoe.data_prep.shard_writer import sha256_file
from condmoe.data_prep.tarscan import read_member, scan_tar

__all__ = ["MAX_TAIL", "check_label", "check_member", "check_shard", "verify_dataset"]

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
_GREY_MODES = ("L", "P", "I;16", "I")  # the single-channel modes of binary, scalar and index maps
_MAX_PROBLEMS_PER_SHARD = 10  # a shard of garbage should not print thousands of lines
# Our shards end in zero blocks padded to tarfile's 10 KiB record; a longer or non-zero tail is damage.
MAX_TAIL = 64 * 1024


def check_member(ext: str, data: bytes, num_classes: int | None) -> str | None:
    """Decode one member by its extension; the problem as text, or ``None`` if it is fine."""
    last = ext.rsplit(".", 1)[-1]
    try:
        if last in _IMAGE_EXTS:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        elif last in _VIDEO_EXTS:
            with av.open(io.BytesIO(data)) as container:
                if not any(True for _ in container.decode(video=0)):
                    return "no decodable video frame"
        elif last == "cls":
            label = int(data.decode("ascii"))
            if label < 0 or (num_classes is not None and label >= num_classes):
                return f"label {label} outside [0, {num_classes})"
        elif last == "txt":
            data.decode("utf-8")
        elif last == "json":
            json.loads(data)
    # Decoders raise many exception types on corrupt data; each one is a problem to report, not a crash.
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_label(spec: dict[str, Any], data: bytes, size: tuple[int, int] | None) -> str | None:
    """Decode one dense label member against its ``dense.json`` spec; the problem as text, or ``None`` if it is fine.

    Args:
        spec: The label's spec (``encoding`` and the fields it needs, see :mod:`data_prep.schema`).
        data: The member's bytes.
        size: ``(width, height)`` of the sample's image, or ``None`` to skip the size check.
    """
    encoding = spec["encoding"]
    try:
        if encoding == "soft":
            scores = np.load(io.BytesIO(data), allow_pickle=False)
            if scores.ndim != 1 or len(scores) != spec["num_classes"]:
                return f"scores of shape {scores.shape}, expected ({spec['num_classes']},)"
            bad = ~(np.isfinite(scores) & (scores >= 0))
            return f"score {scores[bad][0]} is not finite and >= 0 ({bad.sum()} such)" if bad.any() else None
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode, values = image.mode, np.asarray(image)
            if size is not None and image.size != size:
                return f"{image.size[0]}x{image.size[1]}, the image is {size[0]}x{size[1]}"
    except Exception as e:  # as in check_member: a corrupt member is a problem to report
        return f"{type(e).__name__}: {e}"
    if encoding == "normal":
        return None if mode == "RGB" else f"mode {mode}, expected RGB"
    if mode == "RGB":
        if not (values == values[..., :1]).all():
            return "RGB with unequal channels, expected a single-channel map"
        values = values[..., 0]
    elif mode not in _GREY_MODES:
        return f"mode {mode}, expected a single-channel map ({', '.join(_GREY_MODES)})"
    if encoding == "index":
        bad = (values < 0) | ((values >= spec["num_classes"]) & (values != spec["ignore"]))
        if bad.any():
            return (f"class {values[bad][0]} outside [0, {spec['num_classes']}) and not ignore {spec['ignore']} "
                    f"({bad.sum()} pixels)")
    return None


def _image_size(members: list[tuple[str, bytes]]) -> tuple[int, int] | None:
    """``(width, height)`` of a sample's image (``None`` if it has none or it is unreadable: check_member says)."""
    data = next((data for ext, data in members if ext in (schema.IMAGE, "png")), None)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None


def check_shard(path: str | os.PathLike, shard: dict[str, Any], decode: bool, num_classes: int | None,
                dense: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Problems of one shard (empty if it matches its manifest entry).

    Args:
        path: The shard file.
        shard: Its manifest entry (``num_samples``, ``num_bytes``, ``sha256``).
        decode: Decode every member.
        num_classes: Number of classes of the dataset, for the ``.cls`` range check.
        dense: The dataset's dense labels, member -> spec (from ``dense.json``), checked with :func:`check_label`.
    """
    dense = dense or {}
    path = Path(path)
    if not path.is_file():
        return [f"{path}: missing"]
    problems = []
    if path.stat().st_size != shard["num_bytes"]:
        problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['num_bytes']}")
    if sha256_file(path) != shard["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest")
    keys: set[str] = set()
    member_problems = []
    try:
        with open(path, "rb") as f:
            scan = scan_tar(f, max_tail=MAX_TAIL)
            for sample in scan.samples:
                if sample.key in keys:  # webdataset would read the scattered members as two samples
                    member_problems.append(f"{path}: sample {sample.key}: members not adjacent")
                keys.add(sample.key)
                if not decode:
                    continue
                members = [(member.ext, read_member(f, member)) for member in sample.members]
                size = _image_size(members) if dense else None
                for ext, data in members:
                    spec = dense.get(ext)
                    problem = check_member(ext, data, num_classes) if spec is None else check_label(spec, data, size)
                    if problem is not None:
                        member_problems.append(f"{path}: sample {sample.key}: {ext}: {problem}")
        if scan.damage is not None:
            problems.append(f"{path}: unreadable tar ({scan.damage})")
    except OSError as e:
        problems.append(f"{path}: unreadable tar ({type(e).__name__}: {e})")
    if len(keys) != shard["num_samples"]:
        problems.append(f"{path}: {len(keys)} samples, manifest says {shard['num_samples']}")
    if len(member_problems) > _MAX_PROBLEMS_PER_SHARD:
        more = len(member_problems) - _MAX_PROBLEMS_PER_SHARD
        member_problems = [*member_problems[:_MAX_PROBLEMS_PER_SHARD], f"{path}: ... {more} more sample problems"]
    return problems + member_problems


def _check_shard_args(args: tuple[str, dict[str, Any], bool, int | None, dict[str, dict[str, Any]]]) -> list[str]:
    return check_shard(*args)


def verify_dataset(out: str | os.PathLike, decode: bool = True, workers: int = 1) -> tuple[list[str], int, int]:
    """Check every shard of a prepared directory.

    Args:
        out: Dataset root.
        decode: Decode every member (slower; without it only sizes, hashes and sample counts are checked).
        workers: Processes that check shards in parallel.

    Returns:
        The problems (one line each, empty if all is well), and the numbers of shards and samples checked.
    """
    out = Path(out)
    manifest = schema.read_manifest(out)
    if manifest is None:
        return [f"{out / schema.MANIFEST}: missing, unreadable or of another version"], 0, 0
    problems: list[str] = []
    try:
        with open(out / schema.SIZES, encoding="utf-8") as f:
            sizes = json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"{out / schema.SIZES}: unreadable ({e})")
        sizes = None
    try:
        classes = read_classes(out)
    except UserError as e:
        problems.append(str(e))
        classes = {}
    try:
        dense = schema.read_dense(out, missing_ok=True)
    except (OSError, ValueError) as e:
        problems.append(str(e))
        dense = {}
    jobs = []
    num_samples = 0
    for name, entry in sorted(manifest["datasets"].items()):
        shards = entry["shards"]
        counted = sum(s["num_samples"] for s in shards)
        num_samples += counted
        if counted != entry["num_samples"]:
            problems.append(f"{out / schema.MANIFEST}: {name}: shards hold {counted} samples, entry says "
                            f"{entry['num_samples']}")
        if sizes is not None and sizes.get(name) != entry["num_samples"]:
            problems.append(f"{out / schema.SIZES}: {name} is {sizes.get(name)}, manifest says {entry['num_samples']}")
        dataset = name.split("/")[0]
        num_classes = len(classes[dataset]) if dataset in classes else None
        labels = {spec["member"]: spec for spec in dense.get(dataset, {}).values()}
        jobs.extend((str(out / name / s["name"]), s, decode, num_classes, labels) for s in shards)
        listed = {s["name"] for s in shards}
        split_dir = out / name
        if split_dir.is_dir():
            stray = [p for p in sorted(split_dir.glob("*.tar")) if p.name not in listed]
            problems.extend(f"{p}: not in the manifest" for p in stray)
    if sizes is not None:
        extra = sorted(set(sizes) - set(manifest["datasets"]))
        problems.extend(f"{out / schema.SIZES}: {name} is not in the manifest" for name in extra)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            results = list(pool.map(_check_shard_args, jobs, chunksize=1))
    else:
        results = [check_shard(*job) for job in jobs]
    for shard_problems in results:
        problems.extend(shard_problems)
    return problems, len(jobs), num_samples
