"""``msrvtt`` and ``msvd``: the video caption benchmarks in their released layouts -> video-text samples.

Clips are decoded, sampled and stored as by ``video_csv`` (:func:`data_prep.video.video_sample`: ``f00.jpg`` ... or
one ``.mp4``); ``.txt`` holds every caption of the clip, one per line, and ``.json`` the list as written (as
:mod:`data_prep.sources.coco` does for images). A job writes one split (``--split train|val|test``); a clip whose
file is missing or unreadable is skipped when its sample is written (``missing_file``, ``bad_video``), so it never
moves another clip to another split.

- ``msrvtt``: ``videodatainfo.json`` (``videos``: ``video_id``, ``split`` = ``train``/``validate``/``test``;
  ``sentences``: ``video_id``, ``caption``; several files are merged, e.g. ``train_val_videodatainfo.json`` and
  ``test_videodatainfo.json``), clips ``<videos>/<video_id>.mp4``. With ``--test-csv`` (JSFusion's 1k-A file,
  columns ``key,vid_key,video_id,sentence``) test is its 1,000 clips with their one CSV sentence each, in file
  order, and train every annotated clip not among them (the 9k training set), or ``--train-7k`` only the official
  train + validate clips not among them; there is no val split then.
- ``msvd``: ``AllVideoDescriptions.txt`` (``<clip_id> <caption>`` lines, ``#`` comments), clips
  ``<videos>/<clip_id>.avi``. The clips sorted by id (code points) are cut into the first ``--train-clips`` (1,200),
  the next ``--val-clips`` (100) and the last ``--test-clips`` (670).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from pathlib import Path
from typing import Any, ClassVar

from condmoe.data_prep.argtypes import positive_int
from condmoe.data_prep.errors import ErrorItem, UserError
from condmoe.data_prep.sources.base import CommandSource, SourcePlan
from condmoe.data_prep.sources.coco import caption_line
from condmoe.data_prep.sources.common import json_bytes, read_json_file, require_dir, require_file
from condmoe.data_prep.sources.karpathy import captions_txt
from condmoe.data_prep.video import VideoOptions, video_sample

__all__ = ["MsrvttSource", "MsvdSource", "clip_order_key"]

_SPLITS = ("train", "val", "test")
_MSRVTT_SPLITS = {"train": "train", "val": "validate", "test": "test"}


def clip_order_key(clip_id: str) -> tuple[Any, ...]:
    """Sort key that puts ``video9`` before ``video10`` (digit runs compare as numbers, the rest as text)."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", clip_id) if part)


def _plain_id(value: Any) -> bool:
    # Clip ids become file names under --videos: nothing that could leave that directory.
    return isinstance(value, str) and bool(value.strip()) and value == value.strip() and "/" not in value \
        and "\\" not in value and not value.startswith(".")


class _ClipCaptionSource(CommandSource):
    """Clips named by id under ``--videos``, each with its captions; subclasses list them."""

    #: File name suffix of the clips.
    extension: ClassVar[str]

    def __init__(self, videos: str | os.PathLike, video: VideoOptions, split: str) -> None:
        if split not in _SPLITS:
            raise UserError(f"--split {split!r}: {self.name} has train, val and test")
        self.videos = Path(videos)
        self.video = video
        self.split = split

    def params(self) -> dict[str, Any]:
        """The clip directory and the video options (subclasses add their inputs)."""
        return {"videos": str(self.videos), "video": vars(self.video).copy()}

    def item_id(self, item: Any) -> str:
        """The clip's file name."""
        return f"{item[0]}{self.extension}"

    def make_sample(self, item: Any) -> dict[str, bytes]:
        """Decode and sample the clip; ``.txt`` holds its captions one per line."""
        clip_id, captions, extra = item
        members, meta = video_sample(self.videos / f"{clip_id}{self.extension}", self.video)
        meta.update(extra, clip_id=clip_id, captions=captions)
        return {**members, "txt": captions_txt(captions), "json": json_bytes(meta)}


def _clip_items(clips: list[str], captions: dict[str, list[str]], extras: list[dict[str, Any]]) -> list[Any]:
    """Items ``[clip id, captions, extra meta]`` of ``clips`` in order; a clip without a caption is ``no_captions``."""
    return [[c, captions[c], e] if captions.get(c) else ErrorItem(c, "no_captions", "the clip has no caption")
            for c, e in zip(clips, extras)]


class MsrvttSource(_ClipCaptionSource):
    """MSR-VTT from ``videodatainfo.json``, optionally with the 1k-A test split.

    Args:
        annotations: One or more ``videodatainfo.json``-style files.
        videos: Directory of the ``<video_id>.mp4`` clips.
        video: Sampling and storage options.
        split: ``train``, ``val`` or ``test``.
        test_csv: JSFusion's ``MSRVTT_JSFUSION_test.csv`` (1k-A), or ``None`` for the official split.
        train_7k: With ``test_csv``: train on the official train + validate clips only.
    """

    name = "msrvtt"
    summary = "MSR-VTT videodatainfo.json + clip dir -> video-text (all captions; official or 1k-A split)"
    extension = ".mp4"

    def __init__(
        self,
        annotations: list[str | os.PathLike],
        videos: str | os.PathLike,
        video: VideoOptions,
        split: str = "train",
        test_csv: str | os.PathLike | None = None,
        train_7k: bool = False,
    ) -> None:
        super().__init__(videos, video, split)
        self.annotations = [Path(a) for a in annotations]
        self.test_csv = Path(test_csv) if test_csv is not None else None
        self.train_7k = train_7k
        if self.test_csv is not None and split == "val":
            raise UserError("--split val: the 1k-A protocol (--test-csv) has no val split (its train holds the "
                            "official validate clips); evaluate on test")
        if train_7k and self.test_csv is None:
            raise UserError("--train-7k needs --test-csv (it picks the 1k-A training set)")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add ``--annotations``, ``--videos``, ``--test-csv``, ``--train-7k`` and the video options."""
        parser.add_argument("--annotations", type=Path, nargs="+", required=True,
                            help="videodatainfo.json (or train_val_ and test_videodatainfo.json: merged)")
        parser.add_argument("--videos", type=Path, required=True, help="directory of the <video_id>.mp4 clips")
        parser.add_argument("--test-csv", type=Path,
                            help="MSRVTT_JSFUSION_test.csv: the 1k-A split (test: its 1,000 clips, one caption each)")
        parser.add_argument("--train-7k", action="store_true",
                            help="with --test-csv: train on official train + validate minus the test clips, not all "
                            "annotated clips minus them (9k)")
        VideoOptions.add_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MsrvttSource:
        """Build from parsed arguments (``--split`` chooses the split)."""
        return cls(
            [require_file(a, "--annotations") for a in args.annotations],
            require_dir(args.videos, "--videos"),
            VideoOptions.from_args(args),
            split=args.split,
            test_csv=require_file(args.test_csv, "--test-csv") if args.test_csv else None,
            train_7k=args.train_7k,
        )

    def params(self) -> dict[str, Any]:
        """Inputs, protocol and video options."""
        return {**super().params(), "annotations": [str(a) for a in self.annotations],
                "test_csv": str(self.test_csv) if self.test_csv else None, "train_7k": self.train_7k}

    def _load(self) -> tuple[dict[str, str], dict[str, list[str]], list[tuple[str, ErrorItem]]]:
        """``(split of each clip, captions of each clip, problems)``; a problem has the clip id it belongs to or ``""``
        (every split reports it)."""
        splits: dict[str, str] = {}
        captions: dict[str, list[str]] = {}
        bad: list[tuple[str, ErrorItem]] = []
        rows: list[tuple[str, int, Any]] = []
        for path in self.annotations:
            data = read_json_file(path, "--annotations")
            if not isinstance(data, dict) or not isinstance(data.get("videos"), list) \
                    or not isinstance(data.get("sentences"), list):
                raise UserError(f"--annotations {path}: expected an object with 'videos' and 'sentences' lists")
            for i, row in enumerate(data["videos"]):
                clip = row.get("video_id") if isinstance(row, dict) else None
                split = row.get("split") if isinstance(row, dict) else None
                where = f"{path.name}:videos[{i}]"
                if not _plain_id(clip):
                    bad.append(("", ErrorItem(where, "bad_json_row", "missing or invalid 'video_id'")))
                elif split not in ("train", "validate", "test"):
                    bad.append(("", ErrorItem(where, "bad_json_row", f"'split' {split!r} is not train, validate or "
                                              "test")))
                elif clip in splits:
                    bad.append(("", ErrorItem(where, "bad_json_row", f"duplicate video_id {clip!r}")))
                else:
                    splits[clip] = split
                    captions[clip] = []
            rows.extend((path.name, i, row) for i, row in enumerate(data["sentences"]))
        for name, i, row in rows:  # after every file's videos: a sentence may come before its video's file
            clip = row.get("video_id") if isinstance(row, dict) else None
            caption = row.get("caption") if isinstance(row, dict) else None
            where = f"{name}:sentences[{i}]"
            if not isinstance(clip, str) or clip not in captions:
                bad.append(("", ErrorItem(where, "bad_json_row", f"video_id {clip!r} is not in videos")))
            elif not isinstance(caption, str) or not caption_line(caption):
                bad.append((clip, ErrorItem(where, "bad_json_row", "missing or empty 'caption'")))
            else:
                captions[clip].append(caption)
        return splits, captions, bad

    def _read_test_csv(self) -> tuple[list[Any], set[str]]:
        """The 1k-A test items in file order (bad rows in place) and their clip ids."""
        assert self.test_csv is not None
        try:
            with open(self.test_csv, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = [(reader.line_num, row) for row in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"--test-csv {self.test_csv}: cannot read ({e})") from None
        if "video_id" not in header or "sentence" not in header:
            raise UserError(f"--test-csv {self.test_csv}: needs 'video_id' and 'sentence' columns, has {header}")
        items: list[Any] = []
        seen: set[str] = set()
        for line, row in rows:
            where = f"{self.test_csv.name}:{line}"
            clip, sentence = row.get("video_id"), row.get("sentence")
            if None in row or not _plain_id(clip) or not isinstance(sentence, str) or not caption_line(sentence):
                items.append(ErrorItem(where, "bad_csv_row", "needs a video_id and a sentence"))
            elif clip in seen:
                items.append(ErrorItem(where, "bad_csv_row", f"duplicate video_id {clip!r}"))
            else:
                seen.add(clip)
                items.append([clip, [sentence], {"key": row.get("key"), "vid_key": row.get("vid_key")}])
        if not seen:
            raise UserError(f"--test-csv {self.test_csv}: no rows")
        return items, seen

    def plan(self, existing_classes: list[str] | None) -> SourcePlan:
        """The split's clips (natural id order; 1k-A test in CSV order) as ``[clip id, captions, meta]``; bad rows
        after them."""
        if self.test_csv is not None and self.split == "test":  # the CSV alone: the JSON's captions are not used
            items, _ = self._read_test_csv()
            clips = [item[0] for item in items if not isinstance(item, ErrorItem)]
            report = [f"msrvtt test (1k-A): {len(clips)} clips, one caption each"]
            return SourcePlan(items=items, notes={"protocol": "1k-A", "num_clips": len(clips)}, report=report)
        splits, captions, bad = self._load()
        test = self._read_test_csv()[1] if self.test_csv is not None else set()
        if self.test_csv is None:
            official, protocol = (_MSRVTT_SPLITS[self.split],), "official"
        elif self.train_7k:
            official, protocol = ("train", "validate"), "1k-A 7k"
        else:
            official, protocol = ("train", "validate", "test"), "1k-A 9k"
        clips = sorted((c for c, s in splits.items() if s in official and c not in test), key=clip_order_key)
        if not clips:
            raise UserError(f"--annotations: no clip in the {self.split} split ({protocol})")
        items = _clip_items(clips, captions, [{"msrvtt_split": splits[c]} for c in clips])
        num_captions = sum(len(captions[c]) for c in clips)
        mine = set(clips)
        items.extend(e for clip, e in bad if not clip or clip in mine)
        report = [f"msrvtt {self.split} ({protocol}): {len(clips)} clips, {num_captions} captions"]
        if self.test_csv is not None and self.split == "train":
            missing = len(test - set(splits))
            report.append(f"1k-A: {len(test)} test clips left out of train"
                          + (f" ({missing} of them not in --annotations)" if missing else ""))
        notes = {"protocol": protocol, "num_clips": len(clips), "num_captions": num_captions}
        return SourcePlan(items=items, notes=notes, report=report)


class MsvdSource(_ClipCaptionSource):
    """MSVD from ``AllVideoDescriptions.txt`` with the standard split by sorted clip id.

    Args:
        descriptions: ``AllVideoDescriptions.txt``.
        videos: Directory of the ``<clip_id>.avi`` clips.
        video: Sampling and storage options.
        split: ``train``, ``val`` or ``test``.
        sizes: Clips of train, val and test.
    """

    name = "msvd"
    summary = "MSVD AllVideoDescriptions.txt + clip dir -> video-text (all captions; standard 1200/100/670 split)"
    extension = ".avi"

    def __init__(
        self,
        descriptions: str | os.PathLike,
        videos: str | os.PathLike,
        video: VideoOptions,
        split: str = "train",
        sizes: tuple[int, int, int] = (1200, 100, 670),
    ) -> None:
        super().__init__(videos, video, split)
        self.descriptions = Path(descriptions)
        self.sizes = sizes

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add ``--descriptions``, ``--videos``, the split sizes and the video options."""
        parser.add_argument("--descriptions", type=Path, required=True, help="AllVideoDescriptions.txt")
        parser.add_argument("--videos", type=Path, required=True, help="directory of the <clip_id>.avi clips")
        for split, size, where in (("train", 1200, "first"), ("val", 100, "next"), ("test", 670, "last")):
            parser.add_argument(f"--{split}-clips", type=positive_int, default=size,
                                help=f"{split}: the {where} N clips in sorted id order (default: %(default)s)")
        VideoOptions.add_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MsvdSource:
        """Build from parsed arguments (``--split`` chooses the split)."""
        return cls(
            require_file(args.descriptions, "--descriptions"),
            require_dir(args.videos, "--videos"),
            VideoOptions.from_args(args),
            split=args.split,
            sizes=(args.train_clips, args.val_clips, args.test_clips),
        )

    def params(self) -> dict[str, Any]:
        """Inputs, split sizes and video options."""
        return {**super().params(), "descriptions": str(self.descriptions), "sizes": list(self.sizes)}

    def _read(self) -> tuple[dict[str, list[str]], list[tuple[str, ErrorItem]]]:
        """Captions per clip id (file order) and bad lines with the clip they belong to (``""``: none)."""
        try:
            data = self.descriptions.read_bytes()
        except OSError as e:
            raise UserError(f"--descriptions {self.descriptions}: cannot read ({e})") from None
        captions: dict[str, list[str]] = {}
        bad: list[tuple[str, ErrorItem]] = []
        for number, raw in enumerate(data.splitlines(), 1):
            where = f"{self.descriptions.name}:{number}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                bad.append(("", ErrorItem(where, "bad_line", f"not UTF-8 ({e})")))
                continue
            if not line or line.startswith("#"):
                continue
            clip, _, caption = line.partition(" ")
            if not _plain_id(clip):
                bad.append(("", ErrorItem(where, "bad_line", f"invalid clip id {clip!r}")))
                continue
            captions.setdefault(clip, [])
            if caption_line(caption):
                captions[clip].append(caption.strip())
            else:
                bad.append((clip, ErrorItem(where, "bad_line", "a clip id without a caption")))
        return captions, bad

    def plan(self, existing_classes: list[str] | None) -> SourcePlan:
        """The split's clips in sorted id order as ``[clip id, captions, meta]``; bad lines after them."""
        captions, bad = self._read()
        order = sorted(captions)
        num_train, num_val, num_test = self.sizes
        if num_train + num_val + num_test > len(order):
            raise UserError(
                f"--descriptions {self.descriptions}: {len(order)} clips, fewer than --train-clips {num_train} + "
                f"--val-clips {num_val} + --test-clips {num_test}; give split sizes that add up to at most "
                f"{len(order)}"
            )
        ranges = {"train": (0, num_train), "val": (num_train, num_train + num_val),
                  "test": (len(order) - num_test, len(order))}
        start, stop = ranges[self.split]
        clips = order[start:stop]
        mine = set(clips)
        items = _clip_items(clips, captions, [{"msvd_index": i} for i in range(start, stop)])
        items.extend(e for clip, e in bad if not clip or clip in mine)
        num_captions = sum(len(captions[c]) for c in clips)
        report = [f"msvd {self.split}: {len(clips)} clips (sorted ids {start}-{stop - 1}), {num_captions} captions"]
        unused = len(order) - num_train - num_val - num_test
        if unused:
            report.append(f"warning: {unused} clip(s) between val and test are in no split (the file has "
                          f"{len(order)} clips, the split sizes add up to {len(order) - unused})")
        notes = {"num_clips": len(clips), "num_captions": num_captions, "num_clips_in_file": len(order),
                 "unused_clips": unused}
        return SourcePlan(items=items, notes=notes, report=report)
