"""Listing the samples of an uncompressed tar from its headers: the one tar reader of data_prep/.

``scan_tar`` walks the headers (data is never read), groups adjacent members by webdataset's key rule and stops at
the first damage, which it describes instead of raising: a header ``tarfile`` rejects, a member whose data runs past
the end of the file, or an archive that does not end the way the caller expects. Everything before the damage is
kept; the sample the damage may have cut is marked incomplete. Member data is read afterwards by offset
(:func:`read_member`), only for the members a caller needs.

How a sound archive ends is the caller's choice (``max_tail``): tars from other writers (img2dataset) need only the
1024-byte end-of-archive marker after the last member; our own shards end in zero blocks padded to a 10 KiB record,
so anything else there is a garbled header.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import IO

__all__ = ["BLOCK", "MEMBER_NAME", "TarMember", "TarSample", "TarScan", "read_member", "scan_tar"]

BLOCK = 512
END_MARKER = 2 * BLOCK  # two zero blocks end a tar
# webdataset's rule (tariterators.base_plus_ext): the key is the path up to the first dot of the base name.
MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)\.([^/]*)$")


@dataclass(frozen=True, slots=True)
class TarMember:
    """One regular-file member.

    Attributes:
        name: The member name (``<key>.<ext>``).
        ext: Everything after the key's dot (``jpg``, ``f00.jpg``), as written.
        offset: Byte offset of its header (the first of its headers, extended ones included).
        data_offset: Byte offset of its data.
        size: Data size in bytes.
    """

    name: str
    ext: str
    offset: int
    data_offset: int
    size: int

    @property
    def end(self) -> int:
        """Byte offset just past its data, padded to the block size."""
        return self.data_offset + -(-self.size // BLOCK) * BLOCK


@dataclass(slots=True)
class TarSample:
    """Adjacent members that share a key.

    Attributes:
        key: The sample key.
        members: Its members in archive order (empty when the damage cut its first member).
        complete: ``False`` for the sample the damage may have cut (always the last one): it may lack members.
    """

    key: str
    members: list[TarMember] = field(default_factory=list)
    complete: bool = True

    @property
    def start(self) -> int:
        """Byte offset of its first header."""
        return self.members[0].offset

    @property
    def end(self) -> int:
        """Byte offset just past its last member."""
        return self.members[-1].end


@dataclass
class TarScan:
    """What :func:`scan_tar` found.

    Attributes:
        samples: The samples in archive order; a key that comes back later is a new sample (webdataset reads the
            scattered members as two samples too).
        damage: What is wrong with the archive, or ``None`` if it is sound.
    """

    samples: list[TarSample]
    damage: str | None = None

    @property
    def num_complete(self) -> int:
        """Samples not cut by the damage."""
        return sum(1 for s in self.samples if s.complete)


def _end_problem(f: IO[bytes], offset: int, size: int, num_samples: int, max_tail: int | None) -> str | None:
    # tarfile stops quietly at a zero block, but also at a cut or garbled header: only the tail tells them apart.
    # (Both wordings are recorded in existing manifests and errors.jsonl files, so they are kept as they were.)
    tail = size - offset
    if max_tail is None:
        if tail < END_MARKER:
            return f"no end-of-archive marker (truncated?) after {num_samples} samples"
        return None
    if not END_MARKER <= tail <= max_tail:
        return f"no end-of-archive marker at byte {offset} after {num_samples} samples"
    f.seek(offset)
    if f.read(tail).count(0) != tail:
        return f"unreadable header at byte {offset} after {num_samples} samples"
    return None


def _scan(f: IO[bytes], size: int, max_tail: int | None) -> TarScan:
    scan = TarScan([])
    samples = scan.samples
    try:
        with tarfile.open(fileobj=f, mode="r:") as tf:
            while True:
                try:
                    info = tf.next()
                except tarfile.ReadError as e:
                    scan.damage = f"damaged after {len(samples)} samples: {e}"
                    break
                if info is None:
                    scan.damage = _end_problem(f, tf.offset, size, len(samples), max_tail)
                    break
                match = MEMBER_NAME.match(info.name)
                if not info.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2)
                if not samples or samples[-1].key != key:
                    samples.append(TarSample(key))
                if info.offset_data + info.size > size:
                    scan.damage = f"truncated inside {info.name}"
                    break
                samples[-1].members.append(TarMember(info.name, ext, info.offset, info.offset_data, info.size))
    except (tarfile.TarError, OSError, EOFError) as e:
        scan.damage = f"not a readable tar: {e}"
    if scan.damage is not None and samples:
        samples[-1].complete = False  # cut inside it, or at a member boundary: it may lack later members
    return scan


def scan_tar(source: str | os.PathLike | IO[bytes], max_tail: int | None = None) -> TarScan:
    """List the samples of an uncompressed tar from its headers.

    Args:
        source: A path, or a seekable binary file (left open, its position moved).
        max_tail: ``None``: a sound archive needs at least the 1024-byte end-of-archive marker after its last
            member. A number: it must end in 1024 to ``max_tail`` bytes of zeros, anything else is damage (what
            our own shards must look like).

    Returns:
        The samples and a description of the damage (``None`` for a sound archive). An unopenable path is damage
        too (``not a readable tar: ...``).
    """
    if not isinstance(source, (str, os.PathLike)):
        size = source.seek(0, os.SEEK_END)
        source.seek(0)
        return _scan(source, size, max_tail)
    try:
        f = open(source, "rb")
    except OSError as e:
        return TarScan([], f"not a readable tar: {e}")
    with f:
        return _scan(f, os.fstat(f.fileno()).st_size, max_tail)


def read_member(f: IO[bytes], member: TarMember) -> bytes:
    """The data of a member found by :func:`scan_tar` in the same file.

    Raises:
        OSError: If the file is shorter than the member (it changed since the scan).
    """
    f.seek(member.data_offset)
    data = f.read(member.size)
    if len(data) != member.size:
        raise OSError(f"short read of {member.name} ({len(data)} of {member.size} bytes)")
    return data
