"""Input sources of ``condmoe-prep``, by subcommand name."""

from __future__ import annotations

from condmoe.data_prep.sources.base import CommandSource, Source, SourcePlan
from condmoe.data_prep.sources.coco import CocoSource
from condmoe.data_prep.sources.imagefolder import ImageFolderSource
from condmoe.data_prep.sources.karpathy import KarpathySource
from condmoe.data_prep.sources.nyud import NyudSource
from condmoe.data_prep.sources.pascal_mt import PascalMtSource
from condmoe.data_prep.sources.taskonomy import TaskonomySource
from condmoe.data_prep.sources.text import TextSource
from condmoe.data_prep.sources.video_captions import MsrvttSource, MsvdSource
from condmoe.data_prep.sources.video_csv import VideoCsvSource
from condmoe.data_prep.sources.wds_reindex import WdsReindexSource

__all__ = ["SOURCES", "CommandSource", "Source", "SourcePlan"]

SOURCES: dict[str, type[CommandSource]] = {
    cls.name: cls
    for cls in (
        ImageFolderSource,
        CocoSource,
        KarpathySource,
        VideoCsvSource,
        MsrvttSource,
        MsvdSource,
        TextSource,
        WdsReindexSource,
        PascalMtSource,
        NyudSource,
        TaskonomySource,
    )
}
