"""``argparse`` value types shared by the ``condmoe-prep`` subcommands (each error is one readable line)."""

from __future__ import annotations

import argparse
import re

__all__ = ["byte_size", "non_negative_int", "positive_int"]

_BYTE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BYTE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*$", re.IGNORECASE)


def positive_int(text: str) -> int:
    """Parse an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """Parse an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def byte_size(text: str) -> int:
    """Parse a positive byte count with an optional decimal unit: ``500000``, ``64M``, ``1.5G``, ``2GB``."""
    match = _BYTE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 500M or 2G, got {text!r}")
    value = int(float(match.group(1)) * _BYTE_UNITS[match.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value
