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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import av
from PIL import Image

from condmoe.data_prep import schema
from condmoe.data_prep.errors import UserError
from condmoe.data_prep.index import read_classes
from condmoe.data_prep.shard_writer import sha256_file
from condmoe.data_prep.tarscan import read_member, scan_tar

__all__ = ["MAX_TAIL", "check_member", "check_shard", "verify_dataset"]

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
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
    member_problems = []
    try:
        with open(path, "rb") as f:
            scan = scan_tar(f, max_tail=MAX_TAIL)
            for sample in scan.samples:
                if sample.key in keys:  # webdataset would read the scattered members as two samples
                    member_problems.append(f"{path}: sample {sample.key}: members not adjacent")
                keys.add(sample.key)
                for member in sample.members if decode else ():
                    problem = check_member(member.ext, read_member(f, member), num_classes)
                    if problem is not None:
                        member_problems.append(f"{path}: sample {sample.key}: {member.ext}: {problem}")
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
        jobs.extend((str(out / name / s["name"]), s, decode, num_classes) for s in shards)
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
