"""``coco``: a COCO-style captions file plus its image directory -> image-text pairs.

The JSON needs ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``, ``caption``), as in COCO's
``captions_train2017.json``. Each image becomes one sample with every caption kept: ``.txt`` holds the captions one
per line (a caption's own line breaks become spaces and surrounding whitespace is dropped, so splitting ``.txt`` on
``"\\n"`` gives exactly the captions) and ``.json`` holds the list as written in the file.

Images are ordered by id. Malformed ``images``/``annotations`` entries and images without a caption are listed as
skipped (``bad_json_row``, ``no_captions``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from condmoe.data_prep.errors import ErrorItem, UserError
from condmoe.data_prep.imaging import ImageOptions, reencode_image
from condmoe.data_prep.sources.base import CommandSource, SourcePlan
from condmoe.data_prep.sources.common import json_bytes, require_dir, require_file

__all__ = ["CocoSource", "caption_line"]


def caption_line(caption: str) -> str:
    """A caption as one line of ``.txt``: inner line breaks become spaces, outer whitespace is stripped."""
    return " ".join(caption.splitlines()).strip()


def _id_key(image_id: int | str) -> tuple[int, int | str]:
    # COCO ids are ints; other exports use strings. Ints sort numerically and before strings.
    return (0, image_id) if isinstance(image_id, int) else (1, str(image_id))


class CocoSource(CommandSource):
    """COCO-style captions.

    Args:
        annotations: The captions JSON file.
        images: Directory that ``file_name`` entries are relative to.
        image: Re-encoding options.
    """

    name = "coco"
    summary = "COCO-style captions JSON + image dir -> image-text pairs (all captions per image)"

    def __init__(self, annotations: str | os.PathLike, images: str | os.PathLike, image: ImageOptions) -> None:
        self.annotations = Path(annotations)
        self.images = Path(images)
        self.image = image

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add ``--annotations``, ``--images`` and the image options."""
        parser.add_argument("--annotations", type=Path, required=True, help="captions JSON (images + annotations)")
        parser.add_argument("--images", type=Path, required=True, help="directory the file_name entries are in")
        ImageOptions.add_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CocoSource:
        """Build from parsed arguments."""
        return cls(
            require_file(args.annotations, "--annotations"),
            require_dir(args.images, "--images"),
            ImageOptions.from_args(args),
        )

    def params(self) -> dict[str, Any]:
        """Inputs and image options."""
        return {
            "annotations": str(self.annotations),
            "images": str(self.images),
            "image_size": self.image.short_side,
            "jpeg_quality": self.image.quality,
        }

    def _load(self) -> tuple[list[Any], list[Any]]:
        try:
            with open(self.annotations, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"--annotations {self.annotations}: cannot read JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise UserError(f"--annotations {self.annotations}: expected an object with an 'images' list")
        if not isinstance(data.get("annotations"), list):
            raise UserError(f"--annotations {self.annotations}: expected an object with an 'annotations' list")
        return data["images"], data["annotations"]

    def plan(self, existing_classes: list[str] | None) -> SourcePlan:
        """One item ``[image id, file name, captions]`` per image with captions, by id; bad rows after them."""
        images, annotations = self._load()
        bad: list[ErrorItem] = []
        files: dict[int | str, str] = {}
        for i, row in enumerate(images):
            image_id = row.get("id") if isinstance(row, dict) else None
            file_name = row.get("file_name") if isinstance(row, dict) else None
            if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
                bad.append(ErrorItem(f"images[{i}]", "bad_json_row", "missing or invalid 'id'"))
            elif not isinstance(file_name, str) or not file_name:
                bad.append(ErrorItem(f"images[{i}]", "bad_json_row", "missing or invalid 'file_name'"))
            elif image_id in files:
                bad.append(ErrorItem(f"images[{i}]", "bad_json_row", f"duplicate image id {image_id!r}"))
            else:
                files[image_id] = file_name
        captions: dict[int | str, list[str]] = {image_id: [] for image_id in files}
        for i, row in enumerate(annotations):
            image_id = row.get("image_id") if isinstance(row, dict) else None
            caption = row.get("caption") if isinstance(row, dict) else None
            if not isinstance(caption, str) or not caption_line(caption):
                bad.append(ErrorItem(f"annotations[{i}]", "bad_json_row", "missing or empty 'caption'"))
            elif not isinstance(image_id, (int, str)) or isinstance(image_id, bool) or image_id not in captions:
                bad.append(ErrorItem(f"annotations[{i}]", "bad_json_row", f"image_id {image_id!r} is not in images"))
            else:
                captions[image_id].append(caption)
        items: list[Any] = []
        for image_id in sorted(files, key=_id_key):
            if captions[image_id]:
                items.append([image_id, files[image_id], captions[image_id]])
            else:
                items.append(ErrorItem(files[image_id], "no_captions", f"image id {image_id!r} has no caption"))
        items.extend(bad)
        if not items:
            raise UserError(f"--annotations {self.annotations}: no images")
        num_captions = sum(len(c) for c in captions.values())
        return SourcePlan(items=items, notes={"num_images": len(files), "num_captions": num_captions})

    def item_id(self, item: Any) -> str:
        """The image's ``file_name``."""
        return str(item[1])

    def make_sample(self, item: Any) -> dict[str, bytes]:
        """Re-encode the image; ``.txt`` holds the captions one per line."""
        image_id, file_name, captions = item
        jpg, meta = reencode_image(self.images / file_name, self.image)
        meta.update(image_id=image_id, file_name=file_name, captions=captions)
        return {
            "jpg": jpg,
            "txt": "\n".join(caption_line(c) for c in captions).encode("utf-8"),
            "json": json_bytes(meta),
        }
