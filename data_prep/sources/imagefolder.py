"""``imagefolder``: a directory of class folders of images -> image classification samples.

``INPUT/<class name>/**/<image>`` becomes a sample with ``.jpg`` (re-encoded), ``.cls`` (label index), ``.txt`` (the
class name) and ``.json``. Labels index the sorted class folder names (or the dataset's existing ``classes.json``
entry, or ``--classes``). Hidden files and files directly under ``INPUT`` are ignored; other files whose extension
is not an image's are listed as skipped (``not_an_image``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from condmoe.data_prep.errors import ErrorItem, UserError
from condmoe.data_prep.imaging import IMAGE_EXTENSIONS, ImageOptions, reencode_image
from condmoe.data_prep.sources.base import CommandSource, SourcePlan
from condmoe.data_prep.sources.common import (
    add_classes_argument,
    json_bytes,
    read_classes_file,
    require_dir,
    resolve_classes,
)

__all__ = ["ImageFolderSource"]


class ImageFolderSource(CommandSource):
    """Class folders of images.

    Args:
        root: The directory holding one folder per class.
        image: Re-encoding options.
        classes: Explicit class list (``--classes``), or ``None``.
    """

    name = "imagefolder"
    summary = "class folders of images -> image classification (jpg, cls, txt = class name, json)"

    def __init__(self, root: str | os.PathLike, image: ImageOptions, classes: list[str] | None = None) -> None:
        self.root = Path(root)
        self.image = image
        self.explicit_classes = classes

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add ``--input``, ``--classes`` and the image options."""
        parser.add_argument("--input", type=Path, required=True, help="directory with one sub-folder per class")
        add_classes_argument(parser)
        ImageOptions.add_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ImageFolderSource:
        """Build from parsed arguments."""
        classes = read_classes_file(args.classes) if args.classes else None
        return cls(require_dir(args.input, "--input"), ImageOptions.from_args(args), classes)

    def params(self) -> dict[str, Any]:
        """Input root and image options."""
        return {"input": str(self.root), "image_size": self.image.short_side, "jpeg_quality": self.image.quality}

    def plan(self, existing_classes: list[str] | None) -> SourcePlan:
        """One item ``[relative path, label]`` per file in a class folder, sorted by path."""
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise UserError(f"--input {self.root}: no class folders (expected INPUT/<class>/<image>)")
        classes = resolve_classes(folders, existing_classes, self.explicit_classes)
        label_of = {name: i for i, name in enumerate(classes)}
        items: list[Any] = []
        for folder in folders:
            for dirpath, dirnames, filenames in os.walk(self.root / folder):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for filename in filenames:
                    if filename.startswith("."):
                        continue
                    rel = Path(dirpath, filename).relative_to(self.root).as_posix()
                    if Path(filename).suffix.lower() in IMAGE_EXTENSIONS:
                        items.append([rel, label_of[folder]])
                    else:
                        items.append(ErrorItem(rel, "not_an_image", f"extension {Path(filename).suffix!r}"))
        # Sorted by path: os.walk order depends on the file system, the item list must not.
        items.sort(key=lambda item: item.item_id if isinstance(item, ErrorItem) else item[0])
        if not items:
            raise UserError(f"--input {self.root}: the class folders hold no files")
        return SourcePlan(items=items, classes=classes, notes={"num_class_folders": len(folders)})

    def item_id(self, item: Any) -> str:
        """The path relative to ``--input``."""
        return str(item[0])

    def make_sample(self, item: Any) -> dict[str, bytes]:
        """Re-encode the image; ``.txt`` is the class name."""
        rel, label = item
        class_name = Path(rel).parts[0]
        jpg, meta = reencode_image(self.root / rel, self.image)
        meta.update(path=rel, label=label, class_name=class_name)
        return {
            "jpg": jpg,
            "cls": str(label).encode("ascii"),
            "txt": class_name.encode("utf-8"),
            "json": json_bytes(meta),
        }
