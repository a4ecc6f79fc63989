"""``video_csv``: a CSV/TSV listing videos with a label or a caption -> video classification or video-text samples.

The file needs a header row. ``--path-column`` (default ``path``) holds the video path, absolute or relative to
``--video-root`` (default: the CSV's directory); ``--label-column`` makes a classification dataset (``.cls`` = label
index, ``.txt`` = label name) and ``--caption-column`` a video-text dataset (``.txt`` = the caption, kept as written).
Without either flag a ``label`` column is used if present, else ``caption`` or ``text``. Both may be given.

Labels index the sorted label names (numerically when every label is an integer, so labels ``0..K-1`` keep their
value), or the dataset's existing ``classes.json`` entry, or ``--classes``. Rows are kept in file order; rows with a
missing field are listed as skipped (``bad_csv_row``).
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path
from typing import Any

from condmoe.data_prep.errors import ErrorItem, UserError
from condmoe.data_prep.sources.base import CommandSource, SourcePlan
from condmoe.data_prep.sources.common import (
    add_classes_argument,
    json_bytes,
    read_classes_file,
    require_dir,
    require_file,
    resolve_classes,
)
from condmoe.data_prep.video import VideoOptions, video_sample

__all__ = ["VideoCsvSource", "label_sort_key"]


def label_sort_key(labels: list[str]) -> list[str]:
    """Labels in class order: numerically if all are integers, else as strings."""
    if labels and all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


class VideoCsvSource(CommandSource):
    """Videos listed in a CSV/TSV file.

    Args:
        table: The CSV/TSV file.
        video_root: Directory that relative paths are resolved against.
        video: Sampling and storage options.
        path_column: Column with the video path.
        label_column: Column with the class label, or ``None``.
        caption_column: Column with the caption, or ``None``.
        delimiter: Field separator, or ``None`` for tab in ``.tsv``/``.tab`` files and comma otherwise.
        classes: Explicit class list, or ``None``.
    """

    name = "video_csv"
    summary = "CSV/TSV of (video path, label) or (video path, caption) -> video classification or video-text"

    def __init__(
        self,
        table: str | os.PathLike,
        video_root: str | os.PathLike,
        video: VideoOptions,
        path_column: str = "path",
        label_column: str | None = None,
        caption_column: str | None = None,
        delimiter: str | None = None,
        classes: list[str] | None = None,
    ) -> None:
        self.table = Path(table)
        self.video_root = Path(video_root)
        self.video = video
        self.path_column = path_column
        self.label_column = label_column
        self.caption_column = caption_column
        if delimiter is None:
            delimiter = "\t" if self.table.suffix.lower() in (".tsv", ".tab") else ","
        self.delimiter = delimiter
        self.explicit_classes = classes

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add the table, column and video flags."""
        parser.add_argument("--csv", type=Path, required=True, help="CSV/TSV file with a header row")
        parser.add_argument("--video-root", type=Path, help="directory relative paths are in (default: the CSV's)")
        parser.add_argument("--path-column", default="path", help="column of video paths (default: %(default)s)")
        parser.add_argument("--label-column", help="column of class labels (classification)")
        parser.add_argument("--caption-column", help="column of captions (video-text)")
        parser.add_argument("--delimiter", help="field separator, 'tab' for a tab (default: tab for .tsv, else comma)")
        add_classes_argument(parser)
        VideoOptions.add_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> VideoCsvSource:
        """Build from parsed arguments."""
        table = require_file(args.csv, "--csv")
        root = require_dir(args.video_root, "--video-root") if args.video_root else table.parent
        # A literal tab is awkward to type in a shell, so "tab" and "\\t" name it.
        delimiter = "\t" if args.delimiter in ("tab", "\\t") else args.delimiter
        if delimiter is not None and len(delimiter) != 1:
            raise UserError(f"--delimiter must be one character or 'tab', got {args.delimiter!r}")
        classes = read_classes_file(args.classes) if args.classes else None
        video = VideoOptions.from_args(args)
        return cls(
            table, root, video, args.path_column, args.label_column, args.caption_column, delimiter, classes
        )

    def params(self) -> dict[str, Any]:
        """Inputs, columns and video options."""
        return {
            "csv": str(self.table),
            "video_root": str(self.video_root),
            "path_column": self.path_column,
            "label_column": self.label_column,
            "caption_column": self.caption_column,
            "delimiter": self.delimiter,
            "video": vars(self.video).copy(),
        }

    def _read(self) -> tuple[list[str], list[tuple[int, dict[str | None, Any]]]]:
        try:
            with open(self.table, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f, delimiter=self.delimiter)
                header = list(reader.fieldnames or [])
                rows = [(reader.line_num, row) for row in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"--csv {self.table}: cannot read ({e})") from None
        return header, rows

    def _columns(self, header: list[str]) -> tuple[str | None, str | None]:
        label, caption = self.label_column, self.caption_column
        if label is None and caption is None:
            label = "label" if "label" in header else None
            caption = next((c for c in ("caption", "text") if c in header), None) if label is None else None
        for flag, column in (("--path-column", self.path_column), ("--label-column", label),
                             ("--caption-column", caption)):
            if column is not None and column not in header:
                raise UserError(f"--csv {self.table}: no column {column!r} ({flag}); the header has {header}")
        if label is None and caption is None:
            raise UserError(f"--csv {self.table}: no 'label', 'caption' or 'text' column; pass --label-column or "
                            f"--caption-column (the header has {header})")
        return label, caption

    def plan(self, existing_classes: list[str] | None) -> SourcePlan:
        """One item ``[path, label index, label name, caption, line]`` per row (``None`` for absent), in file order."""
        header, rows = self._read()
        if not header:
            raise UserError(f"--csv {self.table}: empty file (a header row is required)")
        label_col, caption_col = self._columns(header)
        parsed: list[Any] = []
        for line, row in rows:
            where = f"{self.table.name}:{line}"
            if None in row or any(v is None for v in row.values()):
                parsed.append(ErrorItem(where, "bad_csv_row", f"expected {len(header)} fields"))
                continue
            fields = {"path": row[self.path_column].strip()}
            if label_col:
                fields["label"] = row[label_col].strip()
            if caption_col:
                fields["caption"] = row[caption_col]
            empty = [name for name, value in fields.items() if not value.strip()]
            if empty:
                parsed.append(ErrorItem(where, "bad_csv_row", f"empty {', '.join(empty)}"))
            else:
                parsed.append((line, fields))
        classes = None
        if label_col:
            labels = {fields["label"] for _, fields in (p for p in parsed if not isinstance(p, ErrorItem))}
            classes = resolve_classes(label_sort_key(list(labels)), existing_classes, self.explicit_classes)
        label_of = {name: i for i, name in enumerate(classes or [])}
        items: list[Any] = []
        for entry in parsed:
            if isinstance(entry, ErrorItem):
                items.append(entry)
                continue
            line, fields = entry
            label = fields.get("label")
            items.append([fields["path"], label_of.get(label), label, fields.get("caption"), line])
        if not items:
            raise UserError(f"--csv {self.table}: no rows")
        return SourcePlan(items=items, classes=classes, notes={"num_rows": len(rows)})

    def item_id(self, item: Any) -> str:
        """The video path and its CSV line."""
        return f"{item[0]} ({self.table.name}:{item[4]})"

    def make_sample(self, item: Any) -> dict[str, bytes]:
        """Decode and sample the clip; ``.txt`` is the caption, or the label name for classification."""
        path, label, class_name, caption, _ = item
        members, meta = video_sample(self.video_root / path, self.video)  # an absolute path replaces the root
        meta["path"] = path
        sample: dict[str, bytes] = dict(members)
        if label is not None:
            sample["cls"] = str(label).encode("ascii")
            meta.update(label=label, class_name=class_name)
        if caption is not None:
            meta["caption"] = caption
        sample["txt"] = (caption if caption is not None else class_name).encode("utf-8")
        sample["json"] = json_bytes(meta)
        return sample
