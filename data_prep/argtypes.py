"""``argparse`` value types shared by the ``condmoe-prep`` subcommands (each error is one readable line)."""

from __future__ import annotations

import argparse
import re
from fractions import Fraction

__all__ = ["byte_size", "fraction", "non_negative_int", "positive_int"]

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


def fraction(text: str) -> Fraction:
    """Parse a fraction in ``(0, 1]``, exactly: ``0.01``, ``1e-2`` and ``1/100`` all give ``Fraction(1, 100)``.

    Exact, so that ``ceil(fraction * n)`` has no float rounding (``0.07 * 100`` is ``7.000000000000001``).
    """
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] such as 0.01 or 1/100, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
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
