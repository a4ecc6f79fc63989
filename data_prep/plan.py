"""Which items go to which shard and which part: pure arithmetic on the sorted item list.

The item list is cut into slices of ``shard_size`` consecutive items (slice ``g`` = items ``[g*S, (g+1)*S)``), and
part ``p`` of ``P`` owns the contiguous slice range ``[p*G//P, (p+1)*G//P)`` of the ``G`` slices. Neither depends on
``--workers`` or on the order in which slices finish, and slice ``g`` always becomes ``shard-{g:06d}.tar``, so the
shards and the manifest are the same for any number of workers or parts, and after any resume.

The fingerprint hashes everything that decides the bytes on disk (source, options, every item); progress recorded
under one fingerprint is never reused under another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from condmoe.data_prep.errors import ErrorItem

__all__ = ["PLAN_VERSION", "SliceTask", "fingerprint", "num_slices", "part_slices", "slice_bounds"]

# Bumped when sample encoding or slicing changes, so old progress is not resumed by a new version.
PLAN_VERSION = 1


def num_slices(num_items: int, shard_size: int) -> int:
    """Number of slices (shards before byte rollover) for ``num_items`` items."""
    return -(-num_items // shard_size)


def slice_bounds(slice_index: int, num_items: int, shard_size: int) -> tuple[int, int]:
    """``[start, stop)`` item range of a slice."""
    start = slice_index * shard_size
    return start, min(num_items, start + shard_size)


def part_slices(total_slices: int, num_parts: int, part_index: int) -> range:
    """The slices owned by one part (possibly empty when there are more parts than slices).

    Raises:
        ValueError: If ``part_index`` is not in ``[0, num_parts)``.
    """
    if num_parts < 1 or not 0 <= part_index < num_parts:
        raise ValueError(f"part index {part_index} is not in [0, {num_parts})")
    return range(part_index * total_slices // num_parts, (part_index + 1) * total_slices // num_parts)


def _item_json(item: Any) -> Any:
    return item.to_json() if isinstance(item, ErrorItem) else item


def fingerprint(params: Mapping[str, Any], items: Iterable[Any]) -> str:
    """SHA-256 over the JSON of ``params`` and of every item, in order.

    Args:
        params: Source name, source options and sharding options.
        items: The source's item list (JSON-serialisable values or :class:`ErrorItem`).

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps({"plan_version": PLAN_VERSION, **params}, sort_keys=True).encode("utf-8"))
    for item in items:
        # One item at a time, so a list of millions of items is never serialised as one string.
        digest.update(b"\n")
        digest.update(json.dumps(_item_json(item), sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class SliceTask:
    """One unit of work for a worker: write slice ``index`` from ``items`` (global item numbers from ``first``).

    Attributes:
        index: Global slice index.
        first: Global index of ``items[0]`` (sample keys are global item indices).
        items: The slice's items.
        directory: The ``{dataset}/{split}`` directory to write to.
        max_bytes: Byte limit of one shard file.
    """

    index: int
    first: int
    items: list[Any]
    directory: str
    max_bytes: int
