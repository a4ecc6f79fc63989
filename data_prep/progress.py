"""Per-part progress files: which slices of a part are completely written.

``{dataset}/{split}/_progress/part-PPPPP-of-NNNNN.jsonl`` is a JSON-lines file. Line 1, the header, says what is
being built (fingerprint, part, slice range, classes, notes); it is written to a temporary file and renamed, so the
file never exists without it. Every further line records one finished slice: its shard files (name, count, bytes,
sha256) and its skipped items. A slice line is appended, flushed and fsynced only after the slice's files have been
renamed into place, so the file never claims a shard that is not there.

Appending is O(1) per slice where rewriting a JSON file would be O(slices). A kill during an append can leave a torn
last line (no newline): it is not a record, the slice counts as not done, and the torn bytes are cut off before the
next append.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condmoe.data_prep.schema import write_text_atomic

__all__ = [
    "PROGRESS_DIR",
    "PartLog",
    "SliceRecord",
    "list_part_files",
    "part_file_name",
    "read_part_file",
    "read_part_header",
]

PROGRESS_DIR = "_progress"
_PART_RE = re.compile(r"^part-(\d{5,})-of-(\d{5,})\.jsonl$")


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True) + "\n"


def part_file_name(part_index: int, num_parts: int) -> str:
    """``part-00003-of-00008.jsonl``."""
    return f"part-{part_index:05d}-of-{num_parts:05d}.jsonl"


def list_part_files(progress_dir: str | os.PathLike) -> list[Path]:
    """Progress files in a directory, sorted by name."""
    progress_dir = Path(progress_dir)
    if not progress_dir.is_dir():
        return []
    return sorted(p for p in progress_dir.iterdir() if _PART_RE.match(p.name))


@dataclass
class SliceRecord:
    """A finished slice, as stored in a progress line.

    Attributes:
        index: Global slice index.
        num_items: Items in the slice (written + skipped).
        shards: ``ShardInfo.to_dict()`` of each file, in order.
        errors: ``errors.jsonl`` records of the skipped items, in item order.
    """

    index: int
    num_items: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The progress line's content."""
        return {
            "kind": "slice",
            "slice": self.index,
            "num_items": self.num_items,
            "shards": self.shards,
            "errors": self.errors,
        }


def read_part_header(path: str | os.PathLike) -> dict[str, Any]:
    """Only the header of a progress file (cheap: other parts' files are checked without reading their records).

    Raises:
        ValueError: If the first line is missing or not a header.
    """
    with open(path, "rb") as f:
        first = f.readline()
    try:
        header = json.loads(first) if first.endswith(b"\n") else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("kind") != "header":
        raise ValueError(f"{path}: first line is not a progress header")
    return header


def read_part_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[int, SliceRecord], int]:
    """Parse a progress file.

    Returns:
        The header, the finished slices by index, and the byte length of the complete lines (anything after it is a
        torn append).

    Raises:
        ValueError: If the header is missing or a complete line is not valid JSON (the file was edited or damaged
            some other way than by a kill).
    """
    data = Path(path).read_bytes()
    valid = data.rfind(b"\n") + 1
    lines = data[:valid].splitlines()
    if not lines:
        raise ValueError(f"{path}: no header line")
    try:
        header = json.loads(lines[0])
        records = [json.loads(line) for line in lines[1:]]
    except ValueError as e:
        raise ValueError(f"{path}: damaged progress file ({e})") from None
    if not isinstance(header, dict) or header.get("kind") != "header":
        raise ValueError(f"{path}: first line is not a progress header")
    slices = {}
    for r in records:
        slices[int(r["slice"])] = SliceRecord(int(r["slice"]), int(r["num_items"]), r["shards"], r["errors"])
    return header, slices, valid


class PartLog:
    """The progress file of one part, opened for appending.

    Args:
        progress_dir: ``{dataset}/{split}/_progress``.
        header: Header content (``kind`` is added); an existing file is only reused if its header is equal.
    """

    def __init__(self, progress_dir: str | os.PathLike, header: dict[str, Any]) -> None:
        self.header = {"kind": "header", **header}
        self.path = Path(progress_dir) / part_file_name(header["part_index"], header["num_parts"])
        self.done: dict[int, SliceRecord] = {}

    def load(self) -> bool:
        """Read finished slices from an existing file with the same header, cutting off a torn last line.

        Returns:
            ``True`` if progress was resumed, ``False`` if there was no file or its header differs (the caller
            decides whether to discard it).
        """
        if not self.path.is_file():
            return False
        old_header, slices, valid = read_part_file(self.path)
        if old_header != self.header:
            return False
        if valid != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(valid)
        self.done = slices
        return True

    def start(self) -> None:
        """Create the file with just its header (replacing any previous file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, _line(self.header))
        self.done = {}

    def append(self, record: SliceRecord) -> None:
        """Record a finished slice durably (its shard files must already be in place)."""
        line = _line(record.to_json())
        with open(self.path, "ab") as f:
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self.done[record.index] = record

