"""What the dense multi-task sources (``pascal_mt``, ``nyud``, ``taskonomy``) share: one sample per image with one
PNG member per dense label found for it, described by the dataset's ``dense.json`` entry.

An item is ``[id, image path, [[label, path, reader], ...]]``, paths relative to the dataset root. ``plan`` looks up
every file: an image whose file is missing is listed as skipped (``missing_file``), and a label without a file is
left out of the item: its member is absent from that sample, counted per label in the manifest notes
(``missing_labels``), warned about at the end of the run and listed in the sample's ``.json`` (``missing``). Where
the dataset ships a label only in a form prep cannot read (a MATLAB ``.mat`` would need scipy), the warning says how
many images have just that file.

``make_sample`` re-encodes the image like every source (``--image-size``, ``--jpeg-quality``; the default here is
``--image-size 0``, the full size, which keeps thin edges) and stores each label map at the image's final size
(:mod:`data_prep.dense`: nearest neighbour). A label file that is unreadable, holds values its encoding does not
allow, or is not the image's size skips the whole sample (``bad_label``, ``label_size_mismatch``): a sample that
silently lacked a label it has would look unlabelled to training.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from condmoe.data_prep.dense import READERS, LabelError, check_label, encode_npy, encode_png, resize_nearest
from condmoe.data_prep.errors import ErrorItem, SkipSample, UserError
from condmoe.data_prep.imaging import ImageOptions, encode_jpeg, open_image, resize_short_side
from condmoe.data_prep.sources.base import CommandSource, SourcePlan
from condmoe.data_prep.sources.common import json_bytes, require_file

__all__ = ["DenseSource", "LabelFiles", "add_dense_arguments", "read_id_list", "select_labels"]


@dataclass(frozen=True)
class LabelFiles:
    """Where one label's files are and how each is read.

    Attributes:
        name: The label's name in ``dense.json``.
        spec: Its ``dense.json`` spec (:mod:`data_prep.dense`).
        files: ``(path template, reader)`` pairs tried in order, the first existing file is read; a template holds
            ``{id}`` and is relative to the root; a reader is a key of :data:`data_prep.dense.READERS`.
        unreadable: ``(path template, what it is)`` of files that hold the label in a form prep cannot read; counted
            when an image has one of them but none of ``files``.
    """

    name: str
    spec: dict[str, Any]
    files: tuple[tuple[str, str], ...]
    unreadable: tuple[tuple[str, str], ...] = ()


def add_dense_arguments(parser: argparse.ArgumentParser, labels: list[str]) -> None:
    """Add ``--root``, ``--labels`` and the image options (``--image-size`` defaulting to 0: the full size)."""
    parser.add_argument("--root", type=Path, required=True, help="the dataset's root directory")
    parser.add_argument(
        "--labels",
        default=",".join(labels),
        help="comma-separated labels to store (default: all, %(default)s)",
    )
    ImageOptions.add_arguments(parser)
    parser.set_defaults(image_size=0)


def select_labels(value: str, known: list[str]) -> list[str]:
    """The ``--labels`` list, checked against ``known``, in ``known``'s order.

    Raises:
        UserError: For an unknown or empty list.
    """
    asked = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in asked if name not in known]
    if unknown or not asked:
        raise UserError(f"--labels {value!r}: expected a comma-separated subset of {','.join(known)}")
    return [name for name in known if name in asked]


def read_id_list(path: str | os.PathLike, flag: str) -> list[Any]:
    """Image ids from a split list (one per line, blank lines ignored), in file order.

    Returns:
        The ids, with an :class:`ErrorItem` (``bad_id``) in the place of a repeated id or one that is not a plain
        name (a path separator, a leading dot).

    Raises:
        UserError: If the file is missing, unreadable or lists no id.
    """
    p = require_file(path, flag)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {p}: cannot read ({e})") from None
    items: list[Any] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        image_id = line.strip()
        if not image_id:
            continue
        if "/" in image_id or "\\" in image_id or image_id.startswith("."):
            items.append(ErrorItem(f"{p}:{number}", "bad_id", f"{image_id!r} is not a plain file name"))
        elif image_id in seen:
            items.append(ErrorItem(f"{p}:{number}", "bad_id", f"{image_id!r} is listed twice"))
        else:
            seen.add(image_id)
            items.append(image_id)
    if not seen:
        raise UserError(f"{flag} {p}: lists no image id")
    return items


class DenseSource(CommandSource):
    """Images and their dense label maps, found by path templates.

    Args:
        root: The dataset's root directory.
        image: Re-encoding options of the images.
        images: Path templates (with ``{id}``) of an image, tried in order.
        labels: The labels to store.
        ids: The image ids in sample order (an :class:`ErrorItem` stands for a bad entry of the split list).
        notes: More facts for the manifest notes (how the ids were found).
        report: More lines for the end of the run.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image: ImageOptions,
        images: tuple[str, ...],
        labels: list[LabelFiles],
        ids: list[Any],
        notes: dict[str, Any] | None = None,
        report: list[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.image = image
        self.images = images
        self.labels = labels
        self.ids = ids
        self.specs = {label.name: label.spec for label in labels}
        self.extra_notes = dict(notes or {})
        self.extra_report = list(report or [])

    def params(self) -> dict[str, Any]:
        """The root, image options, file templates and label specs."""
        return {
            "root": str(self.root),
            "image_size": self.image.short_side,
            "jpeg_quality": self.image.quality,
            "images": list(self.images),
            "label_files": {label.name: [list(f) for f in label.files] for label in self.labels},
            "dense": self.dense_labels(),
        }

    def dense_labels(self) -> dict[str, dict[str, Any]]:
        """The specs of the stored labels."""
        return dict(self.specs)

    def path(self, template: str, image_id: str) -> str:
        """The file of ``image_id`` that a template names, relative to the root."""
        return template.format(id=image_id)

    def _first(self, templates: tuple[str, ...], image_id: str) -> int | None:
        """The index of the first template whose file exists for ``image_id``."""
        for i, template in enumerate(templates):
            if (self.root / self.path(template, image_id)).is_file():
                return i
        return None

    def plan(self, existing_classes: list[str] | None) -> SourcePlan:
        """One item per id whose image exists, with the label files found; the counts go to the notes."""
        items: list[Any] = []
        found: Counter[str] = Counter()
        missing: Counter[str] = Counter()
        unreadable: Counter[str] = Counter()
        for image_id in self.ids:
            if isinstance(image_id, ErrorItem):
                items.append(image_id)
                continue
            first = self._first(self.images, image_id)
            if first is None:
                tried = ", ".join(self.path(t, image_id) for t in self.images)
                items.append(ErrorItem(image_id, "missing_file", f"no image under {self.root} ({tried})"))
                continue
            files = []
            for label in self.labels:
                i = self._first(tuple(t for t, _ in label.files), image_id)
                if i is None:
                    missing[label.name] += 1
                    if self._first(tuple(t for t, _ in label.unreadable), image_id) is not None:
                        unreadable[label.name] += 1
                    continue
                found[label.name] += 1
                template, reader = label.files[i]
                files.append([label.name, self.path(template, image_id), reader])
            items.append([image_id, self.path(self.images[first], image_id), files])
        num_images = sum(1 for item in items if not isinstance(item, ErrorItem))
        if num_images == 0:
            raise UserError(f"--root {self.root}: none of the {len(self.ids)} listed images exists "
                            f"(expected {self.images[0]})")
        report = list(self.extra_report)
        for label in self.labels:
            if missing[label.name]:
                report.append(f"warning: {label.name}: {missing[label.name]} of {num_images} images have no label "
                              f"file ({' or '.join(t for t, _ in label.files)}); their samples lack "
                              f"{label.spec['member']}")
            if unreadable[label.name]:
                forms = " or ".join(f"{t} ({what})" for t, what in label.unreadable)
                report.append(f"warning: {label.name}: {unreadable[label.name]} of them have only {forms}, which "
                              "condmoe-prep cannot read; convert them to PNG (docs/data.md, Dense labels)")
        notes = {
            **self.extra_notes,
            "num_images": num_images,
            "labels_found": {label.name: found[label.name] for label in self.labels},
            "missing_labels": {label.name: missing[label.name] for label in self.labels},
            "unreadable_labels": {label.name: unreadable[label.name] for label in self.labels if label.unreadable},
        }
        return SourcePlan(items=items, notes=notes, report=report)

    def item_id(self, item: Any) -> str:
        """The image id."""
        return str(item[0])

    def make_sample(self, item: Any) -> dict[str, bytes]:
        """Re-encode the image and store each label map at the image's final size."""
        image_id, image_rel, files = item
        image, (orig_w, orig_h) = open_image(self.root / image_rel, self.image.short_side)
        image = resize_short_side(image, self.image.short_side)
        sample = {"jpg": encode_jpeg(image, self.image.quality)}
        meta: dict[str, Any] = {
            "id": image_id,
            "image": image_rel,
            "width": image.size[0],
            "height": image.size[1],
            "orig_width": orig_w,
            "orig_height": orig_h,
            "labels": {},
        }
        facts = {}
        for label, rel, reader in files:
            spec = self.specs[label]
            try:
                array, info = READERS[reader](self.root / rel)
            except FileNotFoundError as e:
                raise SkipSample("missing_file", f"{rel}: {e}") from None
            except LabelError as e:
                raise SkipSample("bad_label", f"{rel}: {e}") from None
            soft = spec["encoding"] == "soft"  # a per-image vector (Taskonomy's classes), not a map
            if not soft and array.shape[:2] != (orig_h, orig_w):
                raise SkipSample("label_size_mismatch", f"{rel}: {array.shape[1]}x{array.shape[0]} px, the image "
                                 f"{image_rel} is {orig_w}x{orig_h}")
            problem = check_label(array, spec)
            if problem is not None:
                raise SkipSample("bad_label", f"{rel}: {problem}")
            sample[spec["member"]] = encode_npy(array) if soft else encode_png(resize_nearest(array, image.size))
            meta["labels"][label] = rel
            if info:
                facts[label] = info
        meta["missing"] = [name for name in self.specs if name not in meta["labels"]]
        if facts:
            meta["label_facts"] = facts
        sample["json"] = json_bytes(meta)
        return sample
