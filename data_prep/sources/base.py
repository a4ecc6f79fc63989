"""The interface every input source implements, and the plan it returns.

A source turns what a user has (class folders, a COCO JSON, a CSV of videos, text files, img2dataset shards, or the
synthetic generator's seed) into an ordered list of small JSON-serialisable items, then each item into one encoded
sample. The runner does the rest (slicing, workers, parts, resume, errors, manifest), so a source knows nothing
about shards. A :class:`CommandSource` is also a ``condmoe-prep`` subcommand (one job per dataset and split).

Items must be self-contained (everything :meth:`Source.make_sample` needs besides the source's options: a path, a
label index, a caption), because workers receive the source object and a slice of items, never the whole plan.
"""

from __future__ import annotations

import abc
import argparse
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["CommandSource", "Source", "SourcePlan"]


@dataclass
class SourcePlan:
    """What :meth:`Source.plan` found.

    Attributes:
        items: Items in their final order (sorted, or in file order), :class:`data_prep.errors.ErrorItem` included.
        classes: Class names for ``classes.json`` (label ``i`` is ``classes[i]``), or ``None`` for a dataset without
            labels.
        notes: Facts for the manifest and the final report (e.g. a cross-check of img2dataset's stats files).
        report: Lines to print at the end of the run (e.g. the stats cross-check; problems start with "warning:").
    """

    items: list[Any]
    classes: list[str] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    report: list[str] = field(default_factory=list)


class Source(abc.ABC):
    """Base class of the input sources: what the runner needs to write a split."""

    #: Source name (recorded in the manifest; the subcommand name of a :class:`CommandSource`).
    name: ClassVar[str]
    #: Digits of the sample keys, which are global item numbers (zero-padded so that key order is item order).
    key_digits: ClassVar[int] = 9

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """Everything (besides the items) that decides the output bytes; stored in the manifest."""

    @abc.abstractmethod
    def plan(self, existing_classes: list[str] | None) -> SourcePlan:
        """List the inputs.

        Args:
            existing_classes: The dataset's entry in ``classes.json`` if there is one (so a val split gets the
                labels of the train split prepared before it).

        Raises:
            data_prep.errors.UserError: If the inputs cannot be listed at all (missing directory, unreadable index
                file, classes that contradict ``classes.json``).
        """

    def dense_labels(self) -> dict[str, dict[str, Any]] | None:
        """The dataset's ``dense.json`` entry (label name -> spec, :mod:`data_prep.schema`) if its samples carry dense
        label maps, else ``None``; the runner writes it before the shards."""
        return None

    @abc.abstractmethod
    def item_id(self, item: Any) -> str:
        """Short description of an item for ``errors.jsonl``."""

    @abc.abstractmethod
    def make_sample(self, item: Any) -> dict[str, bytes]:
        """Encoded members of the item's sample (without ``__key__``), e.g. ``{"jpg": ..., "txt": ..., "json": ...}``.

        Raises:
            data_prep.errors.SkipSample: If the item cannot become a sample.
        """


class CommandSource(Source):
    """A source that is also a ``condmoe-prep`` subcommand."""

    #: One-line description for ``--help``.
    summary: ClassVar[str]

    @staticmethod
    @abc.abstractmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add the source's own flags (inputs and media options) to its subcommand parser."""

    @classmethod
    @abc.abstractmethod
    def from_args(cls, args: argparse.Namespace) -> CommandSource:
        """Build the source from parsed arguments.

        Raises:
            data_prep.errors.UserError: For a missing input or an invalid option value.
        """
