"""``wds_reindex``: img2dataset / video2dataset output -> re-indexed, re-encoded and validated shards in our layout.

The input directory holds ``NNNNN.tar`` shards (samples with ``.jpg``/``.png``/``.webp`` or ``.mp4``/``.webm``...,
``.txt``, ``.json``), and beside each one the downloader's ``NNNNN_stats.json`` (and ``NNNNN.parquet``). Every
sample with a medium and a ``.txt`` becomes one of ours: the image re-encoded like the other image sources, or the
video sampled like ``video_csv`` (a sample with a video member is a video sample); ``.txt`` kept as is; ``.json`` the
original metadata plus our sizes and ``source_shard``/``source_key``. New keys are global item numbers.

Listing reads only tar headers (and the ``.json`` of a sample without a medium). A truncated or damaged tar keeps
the samples before the damage; the cut sample is skipped (``truncated_tar``). A sample without a medium or ``.txt``
is skipped (``missing_key``).

What the downloader itself lost never reaches the tars (img2dataset writes only successes; video2dataset writes a
failed sample without its medium, its ``.json`` ``status`` a ``failed_to_*``). It is counted per category (the
stats files' ``failed_to_*`` fields, else the samples' ``status``) and per error message (``status_dict``, else the
samples' ``error_message``), reported and stored in the manifest notes (``upstream_failures``, ``upstream_errors``),
apart from the samples this command skips.

The stats files' ``successes`` are summed and cross-checked, shard by shard, against the samples actually found in
the tars, failed ones excluded (and against the ``status == "success"`` rows of the parquet files when pyarrow is
installed; without it the stats files alone are used). Mismatches are printed at the end and stored in the
manifest; ``sizes.json`` holds the number of samples actually written, which equals the stats total when everything
checks out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from condmoe.data_prep.errors import ErrorItem, SkipSample, UserError
from condmoe.data_prep.imaging import ImageOptions, reencode_image
from condmoe.data_prep.sources.base import CommandSource, SourcePlan
from condmoe.data_prep.sources.common import json_bytes, require_dir
from condmoe.data_prep.tarscan import TarSample, read_member, scan_tar
from condmoe.data_prep.video import VideoOptions, video_sample

__all__ = ["WdsReindexSource"]

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
_MAX_WARNINGS = 20  # per run; the full lists are in the manifest entry's notes
_MAX_ERROR_MESSAGES = 50  # distinct upstream error messages kept in the notes (URLs make many of them unique)


def _read_stats(tar: Path) -> dict[str, Any] | None:
    """The downloader's ``NNNNN_stats.json`` beside ``tar`` as a JSON object, or ``None``."""
    try:
        with open(tar.with_name(f"{tar.stem}_stats.json"), encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _stats_failures(stats: dict[str, Any]) -> tuple[Counter, Counter]:
    """What a stats file says the downloader lost: counts per category (its ``failed_to_*`` fields:
    ``failed_to_download``, ``failed_to_resize`` (img2dataset), ``failed_to_subsample`` (video2dataset)) and per error
    message (``status_dict`` without ``success``, e.g. ``HTTP Error 404: Not Found``, ``Image decoding error``)."""
    categories = Counter({k: _count(v) for k, v in stats.items() if k.startswith("failed_to_") and _count(v)})
    status = stats.get("status_dict")
    messages = Counter({str(k): _count(v) for k, v in status.items() if k != "success" and _count(v)}
                       if isinstance(status, dict) else {})
    return categories, messages


def _sample_status(tar: Path, sample: TarSample) -> tuple[str, str] | None:
    """``(status, error_message)`` of a sample the downloader recorded as failed (video2dataset writes such samples
    with only their ``.json``), or ``None``."""
    member = next((m for m in sample.members if m.ext.lower() == "json"), None)
    if member is None:
        return None
    try:
        with open(tar, "rb") as f:
            meta = json.loads(read_member(f, member))
    except (OSError, ValueError):
        return None
    status = meta.get("status") if isinstance(meta, dict) else None
    if not isinstance(status, str) or status == "success":
        return None
    return status, str(meta.get("error_message") or status)


def _parquet_successes(tar: Path) -> int | None:
    path = tar.with_name(f"{tar.stem}.parquet")
    if not path.is_file() or importlib.util.find_spec("pyarrow") is None:
        return None
    import pyarrow.parquet as pq  # optional: only img2dataset's parquet cross-check needs it

    try:
        status = pq.read_table(path, columns=["status"]).column("status").to_pylist()
    except Exception:  # pyarrow raises many types for a bad file, and this cross-check is optional
        return None
    return sum(1 for s in status if s == "success")


def _top_errors(messages: Counter) -> dict[str, int]:
    """The most frequent error messages (at most ``_MAX_ERROR_MESSAGES``; the rest summed under ``"(other)"``)."""
    top = dict(messages.most_common(_MAX_ERROR_MESSAGES))
    rest = sum(messages.values()) - sum(top.values())
    return {**dict(sorted(top.items())), **({"(other)": rest} if rest else {})}


def _upstream_lines(notes: dict[str, Any]) -> list[str]:
    """The downloader's own failures (never in the tars, so not among the skipped): per category and message."""
    failures = notes["upstream_failures"]
    if not failures:
        return ["upstream failures 0 (per the downloader's stats files and sample statuses)"]
    per_reason = ", ".join(f"{k} {v}" for k, v in failures.items())
    lines = [f"upstream failures {sum(failures.values())} (not in the input tars): {per_reason}"]
    if notes["upstream_errors"]:
        lines.append("upstream errors: " + ", ".join(f"{k} {v}" for k, v in notes["upstream_errors"].items()))
    return lines


class WdsReindexSource(CommandSource):
    """Existing webdataset shards from img2dataset or video2dataset.

    Args:
        root: Directory with the ``*.tar`` shards and their ``*_stats.json``.
        image: Image re-encoding options.
        video: Video sampling options.
    """

    name = "wds_reindex"
    summary = "img2dataset / video2dataset shards (+ _stats.json, parquet) -> re-indexed, validated shards"

    def __init__(self, root: str | os.PathLike, image: ImageOptions, video: VideoOptions) -> None:
        self.root = Path(root)
        self.image = image
        self.video = video

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add ``--input`` and the image and video options."""
        parser.add_argument("--input", type=Path, required=True, help="directory of *.tar shards and *_stats.json")
        ImageOptions.add_arguments(parser)
        VideoOptions.add_arguments(parser, with_quality=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WdsReindexSource:
        """Build from parsed arguments."""
        return cls(require_dir(args.input, "--input"), ImageOptions.from_args(args), VideoOptions.from_args(args))

    def params(self) -> dict[str, Any]:
        """Input and media options."""
        return {
            "input": str(self.root),
            "image_size": self.image.short_side,
            "jpeg_quality": self.image.quality,
            "video": vars(self.video).copy(),
        }

    def _sample_items(self, tar: Path, samples: list[TarSample], failed: Counter, messages: Counter) -> list[Any]:
        """Items of one tar's samples; samples the downloader marked as failed are counted in ``failed`` (per
        status) and ``messages`` (per error message) instead."""
        items: list[Any] = []
        for sample in samples:
            key, complete = sample.key, sample.complete
            # Extensions are matched case-insensitively (webdataset lowercases them too); a later duplicate wins.
            members = {m.ext.lower(): [m.data_offset, m.size] for m in sample.members}
            has_media = any(e in members for e in _IMAGE_EXTS + _VIDEO_EXTS)
            if has_media and "txt" in members:
                items.append([tar.name, key, members])
                continue
            upstream = _sample_status(tar, sample) if complete and not has_media else None
            if upstream is not None:
                failed[upstream[0]] += 1
                messages[upstream[1]] += 1
                continue
            missing = ", ".join(m for m, ok in (("image/video", has_media), ("txt", "txt" in members)) if not ok)
            reason = "missing_key" if complete else "truncated_tar"
            items.append(ErrorItem(f"{tar.name}:{key}", reason, f"no {missing} member (has: {', '.join(members)})"))
        return items

    def plan(self, existing_classes: list[str] | None) -> SourcePlan:
        """One item ``[tar name, key, {ext: [offset, size]}]`` per sample, tars by name, samples in tar order."""
        tars = sorted(p for p in self.root.glob("*.tar") if p.is_file())
        if not tars:
            raise UserError(f"--input {self.root}: no *.tar shards")
        items: list[Any] = []
        found_total = 0
        stats_total = parquet_total = 0
        stats_mismatches, parquet_mismatches, missing_stats, tar_problems = [], [], [], []
        upstream, upstream_errors = Counter(), Counter()
        for tar in tars:
            rel = tar.name
            scan = scan_tar(tar)  # img2dataset's writers: only the end-of-archive marker is required
            if scan.damage is not None:
                tar_problems.append({"shard": rel, "problem": scan.damage})
                if not scan.samples:
                    items.append(ErrorItem(rel, "bad_tar", scan.damage))
            failed, messages = Counter(), Counter()  # samples in this tar that the downloader marked as failed
            items.extend(self._sample_items(tar, scan.samples, failed, messages))
            found = scan.num_complete - sum(failed.values())
            found_total += found
            stats = _read_stats(tar)
            successes = _count(stats.get("successes")) if stats is not None else None
            if stats is not None and any(k.startswith("failed_to_") for k in stats):
                failed, messages = _stats_failures(stats)  # it counts the failed samples in the tar too
            upstream.update(failed)
            upstream_errors.update(messages)
            if successes is None:
                missing_stats.append(rel)
            else:
                stats_total += successes
                if successes != found:
                    stats_mismatches.append({"shard": rel, "stats_successes": successes, "found": found})
            parquet = _parquet_successes(tar)
            if parquet is not None:
                parquet_total += parquet
                if parquet != found:
                    parquet_mismatches.append({"shard": rel, "parquet_successes": parquet, "found": found})
        notes = {
            "input_shards": len(tars),
            "samples_found": found_total,
            "stats_successes": stats_total,
            "stats_mismatches": stats_mismatches,
            "missing_stats": missing_stats,
            "parquet_checked": importlib.util.find_spec("pyarrow") is not None,
            "parquet_successes": parquet_total,
            "parquet_mismatches": parquet_mismatches,
            "tar_problems": tar_problems,
            "upstream_failures": dict(sorted(upstream.items())),
            "upstream_errors": _top_errors(upstream_errors),
        }
        return SourcePlan(items=items, notes=notes, report=self._report(notes))

    @staticmethod
    def _report(notes: dict[str, Any]) -> list[str]:
        lines = [
            f"warning: stats mismatch: {m['shard']}: _stats.json says {m['stats_successes']} successes, "
            f"found {m['found']}"
            for m in notes["stats_mismatches"]
        ]
        lines += [
            f"warning: parquet mismatch: {m['shard']}: {m['parquet_successes']} success rows, found {m['found']}"
            for m in notes["parquet_mismatches"]
        ]
        lines += [f"warning: no usable stats file for {rel}" for rel in notes["missing_stats"]]
        lines += [f"warning: damaged tar: {p['shard']}: {p['problem']}" for p in notes["tar_problems"]]
        if len(lines) > _MAX_WARNINGS:
            more = len(lines) - _MAX_WARNINGS
            lines = [*lines[:_MAX_WARNINGS], f"warning: ... and {more} more (see the notes in manifest.json)"]
        summary = (
            f"stats cross-check: {notes['stats_successes']} successes in the stats files, {notes['samples_found']} "
            f"samples found in {notes['input_shards']} tar(s)"
        )
        return [summary, *_upstream_lines(notes), *lines]

    def item_id(self, item: Any) -> str:
        """``shard.tar:key``."""
        return f"{item[0]}:{item[1]}"

    def _read(self, rel: str, members: dict[str, list[int]], exts: list[str]) -> dict[str, bytes]:
        out = {}
        try:
            with open(self.root / rel, "rb") as f:
                for ext in exts:
                    offset, size = members[ext]
                    f.seek(offset)
                    out[ext] = f.read(size)
        except OSError as e:
            raise SkipSample("missing_file", str(e)) from None
        return out

    def make_sample(self, item: Any) -> dict[str, bytes]:
        """Validate and re-encode one sample."""
        rel, key, members = item
        video_ext = next((e for e in _VIDEO_EXTS if e in members), None)
        media_ext = video_ext or next(e for e in _IMAGE_EXTS if e in members)
        data = self._read(rel, members, [e for e in (media_ext, "txt", "json") if e in members])
        try:
            data["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipSample("bad_text", f"txt is not UTF-8: {e}") from None
        meta: dict[str, Any] = {}
        if "json" in data:
            try:
                meta = json.loads(data["json"])
            except ValueError as e:
                raise SkipSample("bad_json", f"json member: {e}") from None
            if not isinstance(meta, dict):
                raise SkipSample("bad_json", "json member is not an object")
        if video_ext is not None:
            media, info = video_sample(data[media_ext], self.video)
        else:
            jpg, info = reencode_image(data[media_ext], self.image)
            media = {"jpg": jpg}
        meta.update(info)
        meta.update(source_shard=rel, source_key=key)
        return {**media, "txt": data["txt"], "json": json_bytes(meta)}
