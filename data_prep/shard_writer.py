"""The one shard writer of data_prep/: samples to webdataset tar shards, each renamed into place once complete.

Slice ``g`` (a fixed, contiguous run of ``shard_size`` items, see :mod:`data_prep.plan`) is written to
``shard-{g:06d}.tar``. If it grows past the byte limit it continues in ``shard-{g:06d}_01.tar``, ``_02`` ...: these
names sort right after the first file and before the next slice's, so name order is item order. The runner writes
one slice per task (:class:`SliceWriter`); :func:`write_shards` cuts a single stream of samples the same way.

Members are written by webdataset's ``TarWriter`` with fixed metadata (time, owner, mode), so equal samples give
byte-identical shards on every run.

A file is written under ``<name>.<pid>.tmp`` and renamed into place after it is closed and synced. The pid keeps two
processes that write the same slice (a rerun racing a leftover worker) from sharing a temporary file; since the
bytes are deterministic, whichever rename lands last leaves the same complete file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import webdataset as wds
from tqdm import tqdm

from condmoe.data_prep.tarscan import BLOCK

__all__ = [
    "SHARD_FILE_RE",
    "ShardInfo",
    "SliceWriter",
    "list_shards",
    "remove_shard_files",
    "sha256_file",
    "shard_name",
    "tar_member_bytes",
    "write_shards",
]

# Final and temporary names of shard files; group 1 is the slice index, group 2 the temporary suffix.
SHARD_FILE_RE = re.compile(r"^shard-(\d{6,})(?:_\d{2,})?\.tar(\.\d+\.tmp)?$")

# Fixed tar member metadata: TarWriter stamps time.time() into every member unless told otherwise, which would make
# two runs with the same seed produce different bytes. uid/gid stay at TarInfo's default of 0. The mtime is an int:
# tarfile writes (PAX is its default format) an extra 1 KiB pax header before every member whose mtime is a float.
TAR_MTIME = 0
TAR_USER = "condmoe"
TAR_GROUP = "condmoe"
TAR_MODE = 0o444


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
        """The JSON form used in the manifest and the progress files."""
        return asdict(self)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks so large shards do not need to fit in memory."""
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def shard_name(slice_index: int, chunk: int) -> str:
    """File name of chunk ``chunk`` (0 for the first file) of slice ``slice_index``."""
    return f"shard-{slice_index:06d}.tar" if chunk == 0 else f"shard-{slice_index:06d}_{chunk:02d}.tar"


def tar_member_bytes(payload_size: int) -> int:
    """Bytes a member with ``payload_size`` bytes of data takes in a ustar archive (header + padded data)."""
    return BLOCK + -(-payload_size // BLOCK) * BLOCK


def list_shards(directory: str | os.PathLike) -> list[Path]:
    """Finished shard files of a split directory in name (= item) order; temporary files are left out."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if (m := SHARD_FILE_RE.match(p.name)) and m.group(2) is None)


def remove_shard_files(directory: str | os.PathLike, slice_index: int | None = None) -> None:
    """Delete the final and temporary files of one slice, or of every slice (what an earlier run may have left).

    Only names of our own scheme are touched: anything else in the directory is the user's.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        match = SHARD_FILE_RE.match(p.name)
        if match and (slice_index is None or int(match.group(1)) == slice_index):
            p.unlink(missing_ok=True)


class SliceWriter:
    """Writes encoded samples of one slice, rolling over to a new file when the next sample would pass ``max_bytes``.

    Args:
        directory: The ``{dataset}/{split}`` directory.
        slice_index: Global slice index (names the files).
        max_bytes: Approximate upper bound of one file (a single sample larger than it still gets a file of its own;
            the tar end marker and record padding add up to 10 KiB).
    """

    def __init__(self, directory: str | os.PathLike, slice_index: int, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.slice_index = slice_index
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._chunk = -1
        self._file: IO[bytes] | None = None
        self._tar: wds.TarWriter | None = None
        self._count = 0
        self._bytes = 0

    def _tmp_path(self) -> Path:
        return self.directory / f"{shard_name(self.slice_index, self._chunk)}.{os.getpid()}.tmp"

    def _open(self) -> None:
        self._chunk += 1
        self._file = open(self._tmp_path(), "wb")
        self._tar = wds.TarWriter(
            self._file, encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_GROUP, mode=TAR_MODE
        )
        self._count = 0
        self._bytes = 0

    def _finish(self) -> None:
        assert self._file is not None and self._tar is not None
        self._tar.close()  # writes the end-of-archive blocks; the file object stays open (TarWriter does not own it)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp = self._tmp_path()
        final = self.directory / shard_name(self.slice_index, self._chunk)
        self.shards.append(ShardInfo(final.name, self._count, tmp.stat().st_size, sha256_file(tmp)))
        os.replace(tmp, final)
        self._file = self._tar = None

    def write(self, sample: Mapping[str, Any]) -> None:
        """Append one sample (``{"__key__": str, ext: bytes, ...}``)."""
        size = sum(tar_member_bytes(len(v)) for k, v in sample.items() if k != "__key__")
        if self._tar is not None and self._count > 0 and self._bytes + size > self.max_bytes:
            self._finish()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._tar.write(dict(sample))
        self._count += 1
        self._bytes += size

    def close(self) -> list[ShardInfo]:
        """Finish the last file and return every file of the slice in order (none if no sample was written)."""
        if self._tar is not None:
            self._finish()
        # The renames must be durable before the caller records the slice as done (matters after a power loss).
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.shards

    def abort(self) -> None:
        """Drop the file being written (after an exception); files already renamed stay, the slice is redone."""
        if self._tar is not None:
            with contextlib.suppress(Exception):
                self._tar.close()
        if self._file is not None:
            self._file.close()
            self._tmp_path().unlink(missing_ok=True)
        self._file = self._tar = None


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    directory: str | os.PathLike,
    shard_size: int = 1000,
    shard_bytes: int = 500 * 10**6,
    total: int | None = None,
    desc: str | None = None,
    progress: bool = True,
) -> list[ShardInfo]:
    """Write a stream of encoded samples as the shards of one split directory, ``shard_size`` samples per slice.

    Shard files of an earlier run in ``directory`` are deleted first. If the stream raises, the shards finished so
    far stay and the one being written is deleted.

    Args:
        samples: ``{"__key__": str, ext: bytes, ...}`` in order (written as given: no encoding).
        directory: The ``{dataset}/{split}`` directory (created if needed).
        shard_size: Samples per slice.
        shard_bytes: Approximate byte limit of one file (a fuller slice continues in ``_01`` ...).
        total: Number of samples, for the progress bar only.
        desc: Progress bar label.
        progress: Show a tqdm progress bar.

    Returns:
        The finished shards in order (none for an empty stream).

    Raises:
        ValueError: If ``shard_size`` or ``shard_bytes`` is not positive.
    """
    if shard_size < 1 or shard_bytes < 1:
        raise ValueError(f"shard_size and shard_bytes must be positive, got {shard_size} and {shard_bytes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_shard_files(directory)
    shards: list[ShardInfo] = []
    writer: SliceWriter | None = None
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for i, sample in enumerate(samples):
            if i % shard_size == 0:
                if writer is not None:
                    shards.extend(writer.close())
                writer = SliceWriter(directory, i // shard_size, shard_bytes)
            assert writer is not None
            writer.write(sample)
            bar.update(1)
        if writer is not None:
            shards.extend(writer.close())
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    return shards
