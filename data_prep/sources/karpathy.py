"""``karpathy``: Karpathy's split files of COCO and Flickr30k -> image-text pairs of the standard splits.

``dataset_coco.json`` / ``dataset_flickr30k.json`` hold ``images``, each with ``filename``, ``split`` (``train``,
``restval``, ``val`` or ``test``), ``sentences`` (``raw``, ``tokens``), ``imgid`` and, for COCO, ``filepath``
(``train2014``/``val2014``) and ``cocoid``. A job writes one of the three splits (``--split``): ``train`` (Karpathy's
``train`` + ``restval``, or ``train`` alone with ``--no-restval``), ``val`` or ``test``. Each image becomes one sample
with every raw sentence, as :mod:`data_prep.sources.coco` stores them: ``.txt`` one caption per line, ``.json`` the
list as written.

Images are ordered by id (``cocoid`` if the entry has one, else ``imgid``), so sample keys follow the ids. Entries
with a bad field and sentences without text are listed as skipped (``bad_json_row``), images of the split without a
sentence as ``no_captions``; a missing image file is skipped as ``missing_file`` when its sample is written.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from condmoe.data_prep.errors import ErrorItem, UserError
from condmoe.data_prep.imaging import ImageOptions, reencode_image
from condmoe.data_prep.sources.base import CommandSource, SourcePlan
from condmoe.data_prep.sources.coco import caption_line
from condmoe.data_prep.sources.common import json_bytes, read_json_file, require_dir, require_file

__all__ = ["KARPATHY_SPLITS", "KarpathySource", "captions_txt"]

#: Output split -> the Karpathy ``split`` values it takes (``restval`` goes to train unless ``--no-restval``).
KARPATHY_SPLITS: dict[str, tuple[str, ...]] = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def captions_txt(captions: list[str]) -> bytes:
    """A sample's ``.txt``: the captions one per line (:func:`caption_line` each), UTF-8."""
    return "\n".join(caption_line(c) for c in captions).encode("utf-8")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class KarpathySource(CommandSource):
    """One split of a Karpathy split file.

    Args:
        split_json: ``dataset_coco.json``, ``dataset_flickr30k.json`` or another file of that format.
        images: Directory that ``filepath/filename`` (COCO) or ``filename`` (Flickr30k) is relative to.
        image: Re-encoding options.
        split: ``train``, ``val`` or ``test``.
        restval: Put Karpathy's ``restval`` images into ``train``.
    """

    name = "karpathy"
    summary = "Karpathy split JSON (COCO, Flickr30k) + image dir -> image-text pairs of its train, val or test split"

    def __init__(
        self,
        split_json: str | os.PathLike,
        images: str | os.PathLike,
        image: ImageOptions,
        split: str = "train",
        restval: bool = True,
    ) -> None:
        if split not in KARPATHY_SPLITS:
            raise UserError(f"--split {split!r}: a Karpathy split file has train, val and test")
        self.split_json = Path(split_json)
        self.images = Path(images)
        self.image = image
        self.split = split
        self.restval = restval

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add ``--split-json``, ``--images``, ``--no-restval`` and the image options."""
        parser.add_argument("--split-json", type=Path, required=True,
                            help="Karpathy split file: dataset_coco.json or dataset_flickr30k.json")
        parser.add_argument("--images", type=Path, required=True,
                            help="image root: COCO's holds train2014/ and val2014/, Flickr30k's the .jpg files")
        parser.add_argument("--no-restval", action="store_true",
                            help="train split without Karpathy's restval images (COCO: 82,783 instead of 113,287)")
        ImageOptions.add_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> KarpathySource:
        """Build from parsed arguments (``--split`` chooses the split)."""
        return cls(
            require_file(args.split_json, "--split-json"),
            require_dir(args.images, "--images"),
            ImageOptions.from_args(args),
            split=args.split,
            restval=not args.no_restval,
        )

    def karpathy_splits(self) -> tuple[str, ...]:
        """The Karpathy ``split`` values this job writes."""
        return tuple(s for s in KARPATHY_SPLITS[self.split] if self.restval or s != "restval")

    def params(self) -> dict[str, Any]:
        """Inputs, the Karpathy splits taken and the image options."""
        return {
            "split_json": str(self.split_json),
            "images": str(self.images),
            "karpathy_splits": list(self.karpathy_splits()),
            "image_size": self.image.short_side,
            "jpeg_quality": self.image.quality,
        }

    def _entry(self, i: int, row: Any) -> tuple[Any, list[ErrorItem]]:
        """``(item or None, problems)`` of ``images[i]``; ``None`` without problems: another split's image."""
        where = f"images[{i}]"
        if not isinstance(row, dict):
            return None, [ErrorItem(where, "bad_json_row", "not an object")]
        split = row.get("split")
        if split not in ("train", "restval", "val", "test"):
            return None, [ErrorItem(where, "bad_json_row", f"'split' {split!r} is not train, restval, val or test")]
        if split not in self.karpathy_splits():
            return None, []
        image_id = row["cocoid"] if "cocoid" in row else row.get("imgid")
        filename, filepath = row.get("filename"), row.get("filepath", "")
        if not _is_id(image_id):
            return None, [ErrorItem(where, "bad_json_row", "missing or invalid 'cocoid'/'imgid'")]
        if not isinstance(filename, str) or not filename or not isinstance(filepath, str):
            return None, [ErrorItem(where, "bad_json_row", "missing or invalid 'filename'/'filepath'")]
        sentences = row.get("sentences")
        if not isinstance(sentences, list):
            return None, [ErrorItem(where, "bad_json_row", "missing or invalid 'sentences'")]
        captions, bad = [], []
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if isinstance(raw, str) and caption_line(raw):
                captions.append(raw)
            else:
                bad.append(ErrorItem(f"{where}.sentences[{j}]", "bad_json_row", "missing or empty 'raw'"))
        meta = {"imgid": row.get("imgid"), "karpathy_split": split}
        if "cocoid" in row:
            meta["cocoid"] = image_id
        return [image_id, f"{filepath}/{filename}" if filepath else filename, captions, meta], bad

    def plan(self, existing_classes: list[str] | None) -> SourcePlan:
        """One item ``[image id, path, captions, meta]`` per image of the split, by id; bad rows after them."""
        data = read_json_file(self.split_json, "--split-json")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise UserError(f"--split-json {self.split_json}: expected an object with an 'images' list")
        bad: list[ErrorItem] = []
        entries: dict[int, list[Any]] = {}
        for i, row in enumerate(data["images"]):
            entry, problems = self._entry(i, row)
            if entry is not None and entry[0] in entries:
                problems = [ErrorItem(f"images[{i}]", "bad_json_row", f"duplicate image id {entry[0]}")]
            elif entry is not None:
                entries[entry[0]] = entry
            bad.extend(problems)
        if not entries:
            wanted = " or ".join(self.karpathy_splits())
            raise UserError(f"--split-json {self.split_json}: no image with split {wanted}")
        items: list[Any] = []
        for image_id in sorted(entries):
            entry = entries[image_id]
            items.append(entry if entry[2] else ErrorItem(entry[1], "no_captions", f"image id {image_id} has none"))
        items.extend(bad)
        num_captions = sum(len(e[2]) for e in entries.values())
        dataset = data.get("dataset")
        report = [f"{dataset or self.split_json.name} {'+'.join(self.karpathy_splits())}: {len(entries)} images, "
                  f"{num_captions} captions"]
        notes = {"dataset": dataset, "num_images": len(entries), "num_captions": num_captions}
        return SourcePlan(items=items, notes=notes, report=report)

    def item_id(self, item: Any) -> str:
        """The image's path under ``--images``."""
        return str(item[1])

    def make_sample(self, item: Any) -> dict[str, bytes]:
        """Re-encode the image; ``.txt`` holds the captions one per line."""
        image_id, path, captions, extra = item
        jpg, meta = reencode_image(self.images / path, self.image)
        meta.update(extra, image_id=image_id, file_name=path, captions=captions)
        return {"jpg": jpg, "txt": captions_txt(captions), "json": json_bytes(meta)}
