"""Writing samples to webdataset tar shards, plus the ``sizes.json`` / ``manifest.json`` index.

Layout written under an output root (a contract with ``train/``)::

    OUT/{dataset}/{split}/shard-000000.tar, shard-000001.tar, ...
    OUT/sizes.json       {"image/train": 3000, ...}
    OUT/manifest.json    {"version": 1, "seed": S, "datasets": {"image/train": {"num_samples": N, "shards": [...]}}}

Every shard is written under a ``.tmp`` name and renamed into place once it is closed, and the index files are written
last with ``os.replace``, so a killed run never leaves a partial shard or an index that points at one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import webdataset as wds
from tqdm import tqdm

from condmoe.data_prep import schema

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "SHARD_PATTERN",
    "SIZES_NAME",
    "ShardInfo",
    "build_manifest",
    "list_shards",
    "read_manifest",
    "sha256_file",
    "verify_manifest",
    "write_index",
    "write_json_atomic",
    "write_shards",
]

SHARD_PATTERN = "shard-%06d.tar"
MANIFEST_NAME = schema.MANIFEST
SIZES_NAME = schema.SIZES
MANIFEST_VERSION = 1
TMP_SUFFIX = ".tmp"

# Fixed tar member metadata: TarWriter stamps time.time() into every member unless told otherwise, which would make
# two runs with the same seed produce different bytes. uid/gid stay at TarInfo's default of 0. The mtime is an int:
# tarfile writes (PAX is its default format) an extra 1 KiB pax header before every member whose mtime is a float.
TAR_MTIME = 0
TAR_USER = "condmoe"
TAR_GROUP = "condmoe"
TAR_MODE = 0o444

_SHARD_RE = re.compile(r"^shard-\d{6}\.tar(\.tmp)?$")


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard, as recorded in ``manifest.json``.

    Attributes:
        name: File name relative to its ``{dataset}/{split}`` directory.
        num_samples: Number of samples (keys) in the shard.
        num_bytes: Size of the tar file in bytes.
        sha256: Hex SHA-256 of the tar file.
    """

    name: str
    num_samples: int
    num_bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-serialisable form used in the manifest."""
        return asdict(self)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large shards do not need to fit in memory.

    Args:
        path: File to hash.
        chunk_size: Read size in bytes.

    Returns:
        The lowercase hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace``.

    Readers therefore see either the old file or the complete new one, never a truncated file. Keys are sorted so
    the bytes depend only on the content.

    Args:
        path: Destination file.
        obj: JSON-serialisable object.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def list_shards(directory: str | os.PathLike) -> list[Path]:
    """Finished shards (``shard-NNNNNN.tar``) in a directory, sorted by name; temporary files are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SHARD_RE.match(p.name) and not p.name.endswith(TMP_SUFFIX))


def _remove_stale_shards(directory: Path) -> None:
    # A previous run may have written more shards than this one will (or been killed mid-shard); leftovers would be
    # picked up by anyone globbing the directory, so only files matching our own naming scheme are removed.
    for p in directory.iterdir():
        if _SHARD_RE.match(p.name) and p.is_file():
            p.unlink()


class _AtomicShardSink:
    """``opener``/``post`` pair for :class:`webdataset.ShardWriter` that renames each shard into place on close.

    ShardWriter opens its first shard eagerly, so a writer that receives no samples (or rolls over and then sees no
    more) would leave an empty tar behind; such shards are deleted instead of renamed.
    """

    def __init__(self) -> None:
        self.file: IO[bytes] | None = None
        self.count = 0
        self.shards: list[ShardInfo] = []

    def open(self, fname: str) -> IO[bytes]:
        self.file = open(fname + TMP_SUFFIX, "wb")
        self.count = 0
        return self.file

    def post(self, fname: str) -> None:
        # TarWriter does not close file objects it was handed, only tar streams, so the file is closed here.
        assert self.file is not None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        tmp = fname + TMP_SUFFIX
        if self.count == 0:
            os.unlink(tmp)
            return
        info = ShardInfo(
            name=os.path.basename(fname),
            num_samples=self.count,
            num_bytes=os.path.getsize(tmp),
            sha256=sha256_file(tmp),
        )
        os.replace(tmp, fname)
        self.shards.append(info)

    def abort(self) -> None:
        if self.file is not None:
            name = self.file.name
            self.file.close()
            self.file = None
            if os.path.exists(name):
                os.unlink(name)


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    maxcount: int = 1000,
    maxsize: float = 3e9,
    total: int | None = None,
    desc: str | None = None,
    progress: bool = True,
) -> list[ShardInfo]:
    """Write webdataset samples to ``out_dir/shard-%06d.tar`` with :class:`webdataset.ShardWriter`.

    Samples must already be encoded: ``{"__key__": str, ext: bytes, ...}`` (the writer is run with ``encoder=False``
    so the bytes on disk are exactly the ones given). Existing ``shard-*.tar`` files in ``out_dir`` are removed first.

    Args:
        samples: Encoded samples, in the order they should appear.
        out_dir: Directory to write into (created if needed).
        maxcount: Maximum samples per shard.
        maxsize: Maximum bytes per shard (ShardWriter rolls over once a shard reaches it).
        total: Number of samples, for the progress bar only.
        desc: Progress bar label.
        progress: Show a tqdm progress bar.

    Returns:
        The finished shards in order; empty shards are never written.

    Raises:
        ValueError: If ``maxcount`` or ``maxsize`` is not positive.
    """
    if maxcount < 1 or maxsize <= 0:
        raise ValueError(f"maxcount and maxsize must be positive, got {maxcount} and {maxsize}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_shards(out_dir)

    sink = _AtomicShardSink()
    # ShardWriter formats the whole path with %, so a literal % in the directory name must be escaped.
    pattern = str(out_dir).replace("%", "%%") + os.sep + SHARD_PATTERN
    writer = wds.ShardWriter(
        pattern,
        maxcount=maxcount,
        maxsize=maxsize,
        opener=sink.open,
        post=sink.post,
        verbose=0,
        encoder=False,
        mtime=TAR_MTIME,
        user=TAR_USER,
        group=TAR_GROUP,
        mode=TAR_MODE,
    )
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for sample in samples:
            writer.write(sample)
            # Counted after the write: a rollover inside write() calls post() for the previous shard first.
            sink.count += 1
            bar.update(1)
    except BaseException:
        # Not writer.close(): that would run post() and rename the partial shard into place. The tar stream is still
        # closed first, because its finaliser would otherwise try to write to the file that abort() closes.
        if writer.tarstream is not None:
            with contextlib.suppress(Exception):
                writer.tarstream.close()
        sink.abort()
        raise
    finally:
        bar.close()
    writer.close()
    return sink.shards


def build_manifest(
    seed: int,
    datasets: Mapping[str, Sequence[ShardInfo]],
    **extra: Any,
) -> dict[str, Any]:
    """Assemble the ``manifest.json`` content.

    Args:
        seed: Generation seed.
        datasets: ``"{dataset}/{split}"`` -> its shards in order.
        **extra: Additional top-level keys (e.g. generation parameters).

    Returns:
        ``{"version": 1, "seed": seed, "datasets": {name: {"num_samples": N, "shards": [...]}}, **extra}``.
    """
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "seed": seed,
        "datasets": {
            name: {"num_samples": sum(s.num_samples for s in shards), "shards": [s.to_dict() for s in shards]}
            for name, shards in datasets.items()
        },
    }
    for key, value in extra.items():
        if key in manifest:
            raise ValueError(f"extra manifest key {key!r} collides with a reserved key")
        manifest[key] = value
    return manifest


def write_index(out: str | os.PathLike, manifest: Mapping[str, Any]) -> dict[str, int]:
    """Write ``sizes.json`` and then ``manifest.json`` (the completion marker) atomically.

    Args:
        out: Dataset root.
        manifest: Output of :func:`build_manifest`.

    Returns:
        The sizes mapping ``"{dataset}/{split}" -> num_samples``.
    """
    out = Path(out)
    sizes = {name: int(d["num_samples"]) for name, d in manifest["datasets"].items()}
    write_json_atomic(out / SIZES_NAME, sizes)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return sizes


def read_manifest(out: str | os.PathLike) -> dict[str, Any] | None:
    """Load ``OUT/manifest.json``; ``None`` if it is missing, unreadable or of another version."""
    path = Path(out) / MANIFEST_NAME
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return None
    return manifest


def verify_manifest(out: str | os.PathLike, manifest: Mapping[str, Any], check_sha256: bool = False) -> list[str]:
    """Check that the shards listed in a manifest exist with the recorded sizes (and hashes).

    Args:
        out: Dataset root.
        manifest: Parsed ``manifest.json``.
        check_sha256: Also re-hash every shard (reads all data).

    Returns:
        Human-readable problems; empty if the dataset on disk matches the manifest.
    """
    out = Path(out)
    problems = []
    for name, entry in manifest.get("datasets", {}).items():
        for shard in entry.get("shards", []):
            path = out / name / shard["name"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.stat().st_size != shard["num_bytes"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['num_bytes']}")
            elif check_sha256 and sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 mismatch")
    return problems
