"""Helpers shared by the sources: the ``--classes`` option, label lists, ``.json`` members, input checks."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from condmoe.data_prep.errors import UserError

__all__ = ["add_classes_argument", "json_bytes", "read_classes_file", "require_dir", "require_file", "resolve_classes"]


def json_bytes(meta: dict[str, Any]) -> bytes:
    """A sample's ``.json`` member: sorted keys, UTF-8, so equal metadata gives equal bytes."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def read_json_file(path: Path, flag: str) -> Any:
    """The parsed JSON of ``path``; raises :class:`UserError` naming ``flag`` if it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path}: cannot read JSON ({e})") from None


def require_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a ``Path``; raises :class:`UserError` naming ``flag`` if it is not a directory."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{flag} {p}: not a directory" if p.exists() else f"{flag} {p}: no such directory")
    return p


def require_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a ``Path``; raises :class:`UserError` naming ``flag`` if it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {p}: not a file" if p.exists() else f"{flag} {p}: no such file")
    return p


def add_classes_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--classes FILE`` (the full ordered class list, overriding ``classes.json`` and the inputs)."""
    parser.add_argument(
        "--classes",
        type=Path,
        help="file with the class names in label order (one per line, or a JSON list); default: the dataset's "
        "entry in OUT/classes.json if present, else the sorted names found in the inputs",
    )


def read_classes_file(path: str | os.PathLike) -> list[str]:
    """Class names from a JSON list or a one-name-per-line text file (blank lines ignored).

    Raises:
        UserError: If the file is missing, empty or has duplicates.
    """
    p = require_file(path, "--classes")
    text = p.read_text(encoding="utf-8")
    try:
        parsed = json.loads(text)
        names = [str(n) for n in parsed] if isinstance(parsed, list) else None
    except ValueError:
        names = None
    if names is None:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UserError(f"--classes {p}: no class names")
    if len(set(names)) != len(names):
        raise UserError(f"--classes {p}: duplicate class names")
    return names


def resolve_classes(found: Iterable[str], existing: list[str] | None, explicit: list[str] | None) -> list[str]:
    """The class list of a labelled source.

    An explicit ``--classes`` list wins, then the dataset's existing ``classes.json`` entry (so val gets the labels
    of the train split written before it), then the names found, in the order given (callers sort them).

    Args:
        found: Class names that occur in the inputs, in the order the default list should have (duplicates are
            dropped).
        existing: The ``classes.json`` entry, if any.
        explicit: The ``--classes`` list, if given.

    Raises:
        UserError: If the inputs hold a class missing from the explicit or existing list.
    """
    found = list(dict.fromkeys(found))
    for names, origin in ((explicit, "--classes"), (existing, "dataset's classes.json entry")):
        if names is None:
            continue
        missing = [n for n in found if n not in set(names)]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise UserError(
                f"the inputs have {len(missing)} class(es) not in the {origin} ({shown}); pass --classes FILE with "
                "the complete list"
            )
        return list(names)
    return found
