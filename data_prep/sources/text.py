"""``text``: plain text files -> an MLM corpus, one document per sample (``.txt``, the document's bytes as written).

``--unit line`` (default) makes every non-blank line a document; ``--unit paragraph`` makes every run of non-blank
lines separated by blank lines one document (its inner line breaks kept). Directories are searched recursively for
``--glob`` (default ``*.txt``). Documents that are not valid UTF-8 are listed as skipped (``bad_text``).

Listing reads every file once (to find document offsets); workers then read only their documents' byte ranges.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from condmoe.data_prep.errors import ErrorItem, SkipSample, UserError
from condmoe.data_prep.sources.base import CommandSource, SourcePlan

__all__ = ["TextSource", "iter_documents"]


def iter_documents(path: str | os.PathLike, unit: str) -> Iterator[tuple[int, int, int]]:
    """``(start, end, first line number)`` of each document in a file, by bytes, without the final line break.

    Args:
        path: Text file.
        unit: ``"line"`` or ``"paragraph"``.
    """
    start = end = first = -1
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            content = line.rstrip(b"\r\n")
            if content.strip():
                if unit == "line":
                    yield offset, offset + len(content), number
                elif start < 0:
                    start, end, first = offset, offset + len(content), number
                else:
                    end = offset + len(content)
            elif start >= 0:  # a blank line ends the paragraph
                yield start, end, first
                start = -1
            offset += len(line)
    if start >= 0:
        yield start, end, first


class TextSource(CommandSource):
    """Plain text files.

    Args:
        inputs: Files and directories.
        unit: ``"line"`` or ``"paragraph"``.
        pattern: File name pattern used inside directories.
    """

    name = "text"
    summary = "plain text files (a document per line, or blank-line separated paragraphs) -> MLM corpus (txt)"

    def __init__(self, inputs: list[Path], unit: str = "line", pattern: str = "*.txt") -> None:
        self.inputs = [Path(p) for p in inputs]
        self.unit = unit
        self.pattern = pattern

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add ``--input``, ``--unit`` and ``--glob``."""
        parser.add_argument("--input", type=Path, nargs="+", required=True, help="text files and/or directories")
        parser.add_argument(
            "--unit",
            choices=("line", "paragraph"),
            default="line",
            help="a document per non-blank line, or per blank-line separated paragraph (default: %(default)s)",
        )
        parser.add_argument("--glob", default="*.txt", help="file pattern inside directories (default: %(default)s)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TextSource:
        """Build from parsed arguments."""
        for p in args.input:
            if not p.exists():
                raise UserError(f"--input {p}: no such file or directory")
        return cls(args.input, args.unit, args.glob)

    def params(self) -> dict[str, Any]:
        """Inputs and splitting options."""
        return {"inputs": [str(p) for p in self.inputs], "unit": self.unit, "glob": self.pattern}

    def _files(self) -> list[Path]:
        files: list[Path] = []
        for p in self.inputs:
            if p.is_dir():
                found = (f for f in p.rglob(self.pattern) if f.is_file())
                visible = (f for f in found if not any(part.startswith(".") for part in f.relative_to(p).parts))
                files.extend(sorted(visible))
            else:
                files.append(p)
        return list(dict.fromkeys(files))  # a file named twice is read once

    def plan(self, existing_classes: list[str] | None) -> SourcePlan:
        """One item ``[file, start byte, end byte, line number]`` per document, files in order."""
        files = self._files()
        if not files:
            raise UserError(f"--input: no files matching {self.pattern!r}")
        items: list[Any] = []
        for path in files:
            try:
                items.extend([str(path), start, end, line] for start, end, line in iter_documents(path, self.unit))
            except OSError as e:
                items.append(ErrorItem(str(path), "unreadable_file", str(e)))
        return SourcePlan(items=items, notes={"num_files": len(files)})

    def item_id(self, item: Any) -> str:
        """``file:line``."""
        return f"{item[0]}:{item[3]}"

    def make_sample(self, item: Any) -> dict[str, bytes]:
        """The document's bytes, checked to be UTF-8."""
        path, start, end, _ = item
        try:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
        except OSError as e:
            raise SkipSample("missing_file", str(e)) from None
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipSample("bad_text", f"not UTF-8: {e}") from None
        return {"txt": data}
