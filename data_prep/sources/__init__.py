"""Input sources of ``condmoe-prep``, by subcommand name."""

from __future__ import annotations

from data_prep.sources.base import Source, SourcePlan
from data_prep.sources.coco import CocoSource
from data_prep.sources.imagefolder import ImageFolderSource
from data_prep.sources.text import TextSource
from data_prep.sources.video_csv import VideoCsvSource
from data_prep.sources.wds_reindex import WdsReindexSource

__all__ = ["SOURCES", "Source", "SourcePlan"]

SOURCES: dict[str, type[Source]] = {
    cls.name: cls for cls in (ImageFolderSource, CocoSource, VideoCsvSource, TextSource, WdsReindexSource)
}
