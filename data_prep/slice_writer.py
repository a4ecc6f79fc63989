"""Writing one slice of the item list to its shard file(s), each renamed into place only once complete.

Slice ``g`` (a fixed, contiguous run of items, see :mod:`data_prep.plan`) is written to ``shard-{g:06d}.tar``. If it
grows past the byte limit it continues in ``shard-{g:06d}_01.tar``, ``_02`` ...: these names sort right after the
first file and before the next slice's, so name order is item order.

A file is written under ``<name>.<pid>.tmp`` and renamed into place after it is closed and synced. The pid keeps two
processes that write the same slice (a rerun racing a leftover worker) from sharing a temporary file; since the
bytes are deterministic, whichever rename lands last leaves the same complete file.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import webdataset as wds

from condmoe.data_prep.shards import TAR_GROUP, TAR_MODE, TAR_MTIME, TAR_USER, ShardInfo, sha256_file

__all__ = ["SLICE_FILE_RE", "SliceWriter", "remove_slice_files", "shard_name", "tar_member_bytes"]

# Final and temporary names of slice files; group 1 is the slice index.
SLICE_FILE_RE = re.compile(r"^shard-(\d{6,})(?:_\d{2,})?\.tar(?:\.\d+\.tmp)?$")

_BLOCK = 512


def shard_name(slice_index: int, chunk: int) -> str:
    """File name of chunk ``chunk`` (0 for the first file) of slice ``slice_index``."""
    return f"shard-{slice_index:06d}.tar" if chunk == 0 else f"shard-{slice_index:06d}_{chunk:02d}.tar"


def tar_member_bytes(payload_size: int) -> int:
    """Bytes a member with ``payload_size`` bytes of data takes in a ustar archive (header + padded data)."""
    return _BLOCK + -(-payload_size // _BLOCK) * _BLOCK


def remove_slice_files(directory: str | os.PathLike, slice_index: int) -> None:
    """Delete every final or temporary file of one slice (what a killed run may have left)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        match = SLICE_FILE_RE.match(p.name)
        if match and int(match.group(1)) == slice_index:
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
        # Same fixed member metadata as data_prep.shards, so equal samples give byte-identical tars.
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
