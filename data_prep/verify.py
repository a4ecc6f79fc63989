"""``condmoe-prep verify``: check a prepared directory against its manifest, one line per problem.

For every split in ``manifest.json``: each shard exists with the recorded size and SHA-256 and holds the recorded
number of samples (members of a sample adjacent, as webdataset needs); with decoding on, every member is decoded by
its extension (images with Pillow, videos with PyAV, ``.cls`` as a label within ``classes.json``, ``.txt`` as UTF-8,
``.json`` as JSON). ``sizes.json`` must match the manifest, and no unlisted ``*.tar`` may sit in a split directory
(training globs them).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import av
from PIL import Image

from condmoe.data_prep.merge import read_classes
from condmoe.data_prep.shards import MANIFEST_NAME, SIZES_NAME, read_manifest, sha256_file

__all__ = ["check_member", "check_shard", "verify_dataset"]

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
_MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)\.([^/]*)$")  # webdataset's key/extension split
_MAX_PROBLEMS_PER_SHARD = 10  # a shard of garbage should not print thousands of lines


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


def _iter_members(path: Path) -> Iterator[tuple[str, str, bytes]]:
    with tarfile.open(path, "r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            match = _MEMBER_RE.match(member.name)
            key, ext = (match.group(1), match.group(2)) if match else (member.name, "")
            f = tf.extractfile(member)
            yield key, ext, f.read() if f is not None else b""


def check_shard(path: str | os.PathLike, shard: dict[str, Any], decode: bool, num_classes: int | None) -> list[str]:
    """Problems of one shard (empty if it matches its manifest entry).

    Args:
        path: The shard file.
        shard: Its manifest entry (``num_samples``, ``num_bytes``, ``sha256``).
        decode: Decode every member.
        num_classes: Number of classes of the dataset, for the ``.cls`` range check.
    """
    path = Path(path)
    if not path.is_file():
        return [f"{path}: missing"]
    problems = []
    if path.stat().st_size != shard["num_bytes"]:
        problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['num_bytes']}")
    if sha256_file(path) != shard["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest")
    keys: set[str] = set()
    current = None
    member_problems = []
    try:
        for key, ext, data in _iter_members(path):
            if key != current:
                if key in keys:  # webdataset would read the scattered members as two samples
                    member_problems.append(f"{path}: sample {key}: members not adjacent")
                keys.add(key)
                current = key
            if decode and (problem := check_member(ext, data, num_classes)) is not None:
                member_problems.append(f"{path}: sample {key}: {ext}: {problem}")
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{path}: unreadable tar ({type(e).__name__}: {e})")
    if len(keys) != shard["num_samples"]:
        problems.append(f"{path}: {len(keys)} samples, manifest says {shard['num_samples']}")
    if len(member_problems) > _MAX_PROBLEMS_PER_SHARD:
        more = len(member_problems) - _MAX_PROBLEMS_PER_SHARD
        member_problems = [*member_problems[:_MAX_PROBLEMS_PER_SHARD], f"{path}: ... {more} more sample problems"]
    return problems + member_problems


def _check_shard_args(args: tuple[str, dict[str, Any], bool, int | None]) -> list[str]:
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
    manifest = read_manifest(out)
    if manifest is None:
        return [f"{out / MANIFEST_NAME}: missing, unreadable or of another version"], 0, 0
    problems: list[str] = []
    try:
        with open(out / SIZES_NAME, encoding="utf-8") as f:
            sizes = json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"{out / SIZES_NAME}: unreadable ({e})")
        sizes = None
    classes = read_classes(out)
    jobs = []
    num_samples = 0
    for name, entry in sorted(manifest["datasets"].items()):
        shards = entry["shards"]
        counted = sum(s["num_samples"] for s in shards)
        num_samples += counted
        if counted != entry["num_samples"]:
            problems.append(f"{out / MANIFEST_NAME}: {name}: shards hold {counted} samples, entry says "
                            f"{entry['num_samples']}")
        if sizes is not None and sizes.get(name) != entry["num_samples"]:
            problems.append(f"{out / SIZES_NAME}: {name} is {sizes.get(name)}, manifest says {entry['num_samples']}")
        dataset = name.split("/")[0]
        num_classes = len(classes[dataset]) if dataset in classes else None
        jobs.extend((str(out / name / s["name"]), s, decode, num_classes) for s in shards)
        listed = {s["name"] for s in shards}
        split_dir = out / name
        if split_dir.is_dir():
            stray = [p for p in sorted(split_dir.glob("*.tar")) if p.name not in listed]
            problems.extend(f"{p}: not in the manifest" for p in stray)
    if sizes is not None:
        extra = sorted(set(sizes) - set(manifest["datasets"]))
        problems.extend(f"{out / SIZES_NAME}: {name} is not in the manifest" for name in extra)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            results = list(pool.map(_check_shard_args, jobs, chunksize=1))
    else:
        results = [check_shard(*job) for job in jobs]
    for shard_problems in results:
        problems.extend(shard_problems)
    return problems, len(jobs), num_samples
