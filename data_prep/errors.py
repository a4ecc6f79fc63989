"""Error types of dataset preparation: skipped inputs (counted, run continues) and user mistakes (exit code 2).

A bad input never stops a run: a source either raises :class:`SkipSample` while turning an item into a sample
(unreadable image, missing file), or puts an :class:`ErrorItem` in its item list when the problem is already visible
while listing the inputs (a bad CSV row, a sample without its image in a tar). Both end up as one line of
``errors.jsonl`` and one count per reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ErrorItem", "SkipSample", "UserError", "error_record"]

# Longer details (a whole traceback message from a codec) would bloat the progress files and errors.jsonl.
_MAX_DETAIL = 300


class UserError(Exception):
    """A mistake in the command line or the inputs it names (missing directory, bad flag value).

    The CLI prints the message as one line and exits with code 2.
    """


class SkipSample(Exception):
    """Raised by a source when one input cannot become a sample; the run records it and goes on.

    Args:
        reason: Short machine-readable category, e.g. ``"bad_image"``, ``"missing_file"``; counts are per reason.
        detail: Human-readable explanation.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ErrorItem:
    """An entry of a source's item list that is known to be bad before any decoding.

    It keeps its place in the item list, so the shard assignment of every other item does not depend on which
    inputs are bad, and it is counted exactly once, by the slice that owns it.

    Attributes:
        item_id: What to show the user (a path, ``file:line``, ``shard.tar:key``).
        reason: Category, as for :class:`SkipSample`.
        detail: Explanation.
    """

    item_id: str
    reason: str
    detail: str

    def to_json(self) -> dict[str, str]:
        """JSON form, used for the item list fingerprint."""
        return {"error": self.reason, "item": self.item_id, "detail": self.detail}


def error_record(item_id: str, reason: str, detail: str) -> dict[str, Any]:
    """One ``errors.jsonl`` entry: ``{"item": ..., "reason": ..., "detail": ...}`` with the detail shortened."""
    detail = " ".join(str(detail).split())
    if len(detail) > _MAX_DETAIL:
        detail = detail[: _MAX_DETAIL - 3] + "..."
    return {"item": item_id, "reason": reason, "detail": detail}
