"""The dataset index of a prepared root: turning the per-part progress of a split into its manifest entry.

:func:`finalize_split` (what ``condmoe-prep merge`` and a single-part run do) checks that every part of the run
finished every slice it owns, then writes (in this order) ``{dataset}/{split}/errors.jsonl``, the dataset's
``classes.json`` entry, the tokenizer (if asked), ``sizes.json`` and ``manifest.json``. Shard files of the split
that the run does not list (an older run's, a killed write's temporary file) are deleted, so the reader's ``*.tar``
glob sees exactly the manifest.

Several splits share ``OUT/manifest.json``, ``sizes.json`` and ``classes.json``; their read-modify-write happens
under an exclusive lock on ``OUT/.prep.lock``, so splits prepared or merged concurrently do not lose each other's
entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condmoe.data_prep import schema
from condmoe.data_prep.errors import UserError
from condmoe.data_prep.progress import PROGRESS_DIR, list_part_files, part_file_name, read_part_file
from condmoe.data_prep.shard_writer import SHARD_FILE_RE, sha256_file
from condmoe.data_prep.tarscan import read_member, scan_tar

__all__ = [
    "MergeError",
    "SplitSummary",
    "drop_entry",
    "finalize_split",
    "index_lock",
    "iter_train_texts",
    "progress_splits",
    "prune_split",
    "read_classes",
    "train_tokenizer",
    "verify_manifest",
]

LOCK_NAME = ".prep.lock"


class MergeError(Exception):
    """The progress of a split cannot be merged; ``problems`` holds one line per reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class SplitSummary:
    """What :func:`finalize_split` wrote.

    Attributes:
        name: ``"{dataset}/{split}"``.
        num_items: Items listed by the source.
        num_samples: Samples written.
        num_shards: Shard files.
        num_bytes: Total shard bytes.
        skipped: Skipped items per reason.
        errors_path: The ``errors.jsonl`` file.
        report: Lines to show: the source's report (stats cross-check and the like) and stray ``*.tar`` files.
        tokenizer: The tokenizer directory, if one was trained.
    """

    name: str
    num_items: int
    num_samples: int
    num_shards: int
    num_bytes: int
    skipped: dict[str, int]
    errors_path: Path
    report: list[str] = field(default_factory=list)
    tokenizer: Path | None = None


@contextlib.contextmanager
def index_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``OUT/.prep.lock`` (released when the block ends or the process dies)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / LOCK_NAME, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_classes(out: str | os.PathLike) -> dict[str, list[str]]:
    """``OUT/classes.json`` so far (empty before the first labelled split).

    Raises:
        UserError: If the file is damaged (rather than overwrite the other datasets' classes with nothing).
    """
    try:
        return schema.read_classes(out, missing_ok=True)
    except ValueError as e:
        raise UserError(f"{e}; repair or delete it") from None


def verify_manifest(out: str | os.PathLike, manifest: Mapping[str, Any], check_sha256: bool = False) -> list[str]:
    """Check that the shards a manifest lists exist with the recorded sizes (and hashes).

    Args:
        out: Dataset root.
        manifest: Parsed ``manifest.json`` (or just its ``datasets`` part).
        check_sha256: Also re-hash every shard (reads all data).

    Returns:
        One line per problem; empty if the shards on disk match the manifest.
    """
    out = Path(out)
    problems = []
    for name, entry in manifest.get("datasets", {}).items():
        for shard in entry.get("shards", []):
            path = out / name / shard["name"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.stat().st_size != shard["num_bytes"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['num_bytes']}")
            elif check_sha256 and sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 mismatch")
    return problems


def drop_entry(out: str | os.PathLike, name: str) -> None:
    """Remove ``name`` from ``manifest.json`` and ``sizes.json`` before its shards are rewritten.

    Without this, a run killed while rewriting would leave an index that lists shards with other contents.
    """
    if not (Path(out) / schema.MANIFEST).is_file():
        return  # nothing lists the shards (and no lock file is left in a root that has no index yet)
    with index_lock(out):
        manifest = schema.read_manifest(out)
        if manifest is not None and name in manifest.get("datasets", {}):
            del manifest["datasets"][name]
            schema.write_index(out, manifest)


def progress_splits(out: str | os.PathLike) -> list[tuple[str, str]]:
    """``(dataset, split)`` pairs under ``out`` that have a progress directory, sorted."""
    return sorted((p.parent.parent.name, p.parent.name) for p in Path(out).glob(f"*/*/{PROGRESS_DIR}") if p.is_dir())


def _load_parts(progress_dir: Path, name: str) -> tuple[dict[str, Any], list[Any]]:
    files = list_part_files(progress_dir)
    if not files:
        raise MergeError([f"{name}: no progress files in {progress_dir} (was this split prepared here?)"])
    parts: dict[int, tuple[dict[str, Any], dict[int, Any]]] = {}
    problems = []
    for path in files:
        try:
            header, slices, _ = read_part_file(path)
        except (OSError, ValueError) as e:
            problems.append(f"{name}: {e}")
            continue
        parts[int(header["part_index"])] = (header, slices)
    if problems:
        raise MergeError(problems)
    headers = [h for h, _ in parts.values()]
    if len({(h["fingerprint"], h["num_parts"]) for h in headers}) > 1:
        counts = sorted({h["num_parts"] for h in headers})
        raise MergeError([f"{name}: {progress_dir} mixes progress of different runs (num_parts {counts} or other "
                          "inputs/options); rerun every part with --overwrite"])
    num_parts = int(headers[0]["num_parts"])
    for p in range(num_parts):
        if p not in parts:
            missing = progress_dir / part_file_name(p, num_parts)
            problems.append(f"{name}: part {p} of {num_parts} missing (no {missing}); run that part")
            continue
        header, slices = parts[p]
        owned = range(*header["slices"])
        left = [g for g in owned if g not in slices]
        if left:
            problems.append(f"{name}: part {p} of {num_parts} incomplete ({len(left)} of {len(owned)} shards missing); "
                            "rerun that part")
    if problems:
        raise MergeError(problems)
    records = [r for _, (_, slices) in sorted(parts.items()) for _, r in sorted(slices.items())]
    return headers[0], records


def prune_split(split_dir: str | os.PathLike, listed: set[str]) -> list[str]:
    """Delete the shard files of a split that the index does not list (an older run's, a killed write's).

    Training reads every ``*.tar`` of the split, so they must go before the index is written.

    Returns:
        A warning line for each other ``*.tar`` there (not named like ours, so not ours to delete).
    """
    unknown = []
    for p in sorted(Path(split_dir).iterdir()):
        if SHARD_FILE_RE.match(p.name):
            if p.name not in listed:
                p.unlink(missing_ok=True)
        elif p.name.endswith(".tar"):
            unknown.append(f"warning: {p}: not written by condmoe-prep but read by training (*.tar); move it away")
    return unknown


def iter_train_texts(
    out: str | os.PathLike, datasets: Mapping[str, Mapping[str, Any]], classes: Mapping[str, list[str]]
) -> Iterator[str]:
    """The BPE training texts: every ``.txt`` of the train splits (val stays unseen), in split and shard order, then
    the class names (so labels used as prompts encode compactly).

    Args:
        out: Dataset root.
        datasets: The manifest's ``datasets``.
        classes: ``classes.json``.

    Raises:
        MergeError: If a shard is damaged.
    """
    for name, entry in sorted(datasets.items()):
        if not name.endswith("/train"):
            continue
        for shard in entry["shards"]:
            path = Path(out) / name / shard["name"]
            with open(path, "rb") as f:
                scan = scan_tar(f)
                if scan.damage is not None:
                    raise MergeError([f"{path}: {scan.damage}"])
                for sample in scan.samples:
                    for member in sample.members:
                        if member.name.endswith(".txt"):
                            yield read_member(f, member).decode("utf-8", errors="replace")
    for names in classes.values():
        yield from names


def train_tokenizer(out: str | os.PathLike, vocab_size: int = 8000) -> Path:
    """Train the byte-level BPE on the ``.txt`` of every train split in the manifest (plus all class names).

    The tokenizer goes to ``OUT/tokenizer`` and is recorded in the manifest.

    Args:
        out: Dataset root.
        vocab_size: Vocabulary upper bound.

    Returns:
        The tokenizer directory.

    Raises:
        MergeError: If the manifest has no train split.
    """
    # tokenizers and transformers are imported only when a tokenizer is asked for.
    from condmoe.data_prep.bpe import bpe_vocab_size, train_bpe

    out = Path(out)
    with index_lock(out):
        manifest = schema.read_manifest(out)
        if manifest is None or not any(n.endswith("/train") for n in manifest.get("datasets", {})):
            raise MergeError([f"{out}: --train-bpe needs a prepared train split (none in the manifest)"])
        texts = iter_train_texts(out, manifest["datasets"], read_classes(out))
        tokenizer = train_bpe(texts, out / schema.TOKENIZER_DIR, vocab_size)
        manifest["tokenizer"] = {"path": tokenizer.name, "vocab_size": bpe_vocab_size(tokenizer)}
        schema.write_index(out, manifest)
    return tokenizer


def finalize_split(
    out: str | os.PathLike, dataset: str, split: str, train_bpe: bool = False, vocab_size: int = 8000
) -> SplitSummary:
    """Merge the progress of every part of ``{dataset}/{split}`` into the index files.

    Args:
        out: Dataset root.
        dataset: Dataset name.
        split: Split name.
        train_bpe: Train the byte-level BPE (:mod:`data_prep.bpe`) on the text of every train split in the manifest
            and save it to ``OUT/tokenizer``.
        vocab_size: BPE vocabulary upper bound.

    Returns:
        What was written.

    Raises:
        MergeError: If a part is missing or incomplete, progress files disagree, or a recorded shard is gone.
    """
    out = Path(out)
    name = f"{dataset}/{split}"
    split_dir = out / dataset / split
    header, records = _load_parts(split_dir / PROGRESS_DIR, name)
    shards = [s for r in records for s in r.shards]
    problems = []
    for s in shards:
        path = split_dir / s["name"]
        if not path.is_file() or path.stat().st_size != s["num_bytes"]:
            problems.append(f"{path}: recorded as written but missing or resized; rerun the prep command that wrote "
                            "it (same --num-parts/--part-index): it rewrites such shards")
    if problems:
        raise MergeError(problems)
    strays = prune_split(split_dir, {s["name"] for s in shards})
    errors = [e for r in records for e in r.errors]
    errors_path = split_dir / schema.ERRORS
    schema.write_jsonl(errors_path, errors)

    skipped = dict(sorted(Counter(e["reason"] for e in errors).items()))
    entry = schema.manifest_entry(
        shards,
        source=header["source"],
        params=header["params"],
        shard_size=header["shard_size"],
        shard_bytes=header["shard_bytes"],
        fingerprint=header["fingerprint"],
        num_items=header["num_items"],
        skipped=skipped,
        notes=header["notes"],
    )
    with index_lock(out):
        manifest = schema.read_manifest(out) or schema.new_manifest()
        manifest["datasets"][name] = entry
        if header["classes"] is not None:
            classes = read_classes(out)
            classes[dataset] = header["classes"]
            schema.write_json(out / schema.CLASSES, classes)
            manifest.setdefault("classes", {})[dataset] = header["classes"]
        schema.write_index(out, manifest)
    tokenizer = train_tokenizer(out, vocab_size) if train_bpe else None
    return SplitSummary(
        name=name,
        num_items=int(header["num_items"]),
        num_samples=entry["num_samples"],
        num_shards=len(shards),
        num_bytes=sum(s["num_bytes"] for s in shards),
        skipped=skipped,
        errors_path=errors_path,
        report=[*header["report"], *strays],
        tokenizer=tokenizer,
    )
