"""``condmoe-prep subset``: a seeded fraction of one split of a prepared dataset, written as a new dataset root.

Uni-Perceiver prompt-tunes on 1% of a downstream dataset (ImageNet: ``ceil(1%)`` of every class). From a prepared
root ``SRC`` this makes ``OUT`` holding only ``--dataset``:

* the chosen split (``train`` by default) cut down to the selected samples, re-sharded with
  :func:`data_prep.shard_writer.write_shards` (bytes of every member unchanged, keys kept, source order kept);
* the dataset's other splits (``val`` ...) hard-linked (copied across file systems) with their manifest entries;
* the dataset's ``classes.json`` entry, the tokenizer, and a consistent ``sizes.json`` / ``manifest.json``.

Selection: every usable sample gets the rank ``blake2b(key, key=seed)``. A split whose samples carry ``.cls``
labels keeps, in every class ``c``, the ``ceil(fraction * n_c)`` samples of smallest rank; a split without labels
keeps ``ceil(fraction * n)`` overall. The ranks depend on the seed and the key only, so the selection does not depend
on how the source is sharded. ``fraction`` is a :class:`fractions.Fraction`, so the ceiling is exact.

Corrupt source samples are skipped, counted per reason and listed in ``OUT/DATASET/SPLIT/errors.jsonl``: an
unreadable or truncated shard (the samples the manifest promises beyond the damage are counted as lost), a key seen
twice, a ``.cls`` that is not a label in ``classes.json`` (or missing in a labelled split) while scanning; a selected
sample whose members do not decode (checked like ``condmoe-prep verify``) is skipped too, and its class's picks are
brought back to ``ceil(fraction * usable)`` with the next samples in rank order. Every sample of the source split
ends up kept, not selected, or counted as skipped.

``OUT`` is built in a temporary directory and moved into place when complete (``manifest.json`` last), so it holds
either nothing or a finished dataset root.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from condmoe.data_prep import schema
from condmoe.data_prep.errors import UserError, error_record
from condmoe.data_prep.index import read_classes
from condmoe.data_prep.plan import fingerprint
from condmoe.data_prep.shard_writer import write_shards
from condmoe.data_prep.tarscan import END_MARKER, TarScan, read_member, scan_tar
from condmoe.data_prep.verify import MAX_TAIL, check_member

__all__ = ["SubsetError", "SubsetSummary", "make_subset", "quota", "rank"]

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


class SubsetError(Exception):
    """The source cannot give a usable subset (a split to copy is damaged, nothing usable to keep)."""


def rank(key: str, seed: int) -> int:
    """The seeded rank of a sample key: the smallest ranks of a class are kept."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest(), "big")


def quota(fraction: Fraction, n: int) -> int:
    """``ceil(fraction * n)``, exact (``fraction`` as a :class:`~fractions.Fraction`)."""
    return math.ceil(Fraction(fraction) * n)


@dataclass(slots=True)
class _Sample:
    key: str
    label: int | None
    shard: int  # index in the source split's shard list
    start: int  # byte range of the sample's members (headers included) in the shard
    end: int


@dataclass
class SubsetSummary:
    """What :func:`make_subset` wrote.

    Attributes:
        name: ``"{dataset}/{split}"``.
        out: The output root.
        total: Samples in the source split (usable + skipped).
        kept: Samples written.
        fraction: The fraction asked for.
        seed: The selection seed.
        labelled: Whether the selection was per class.
        per_class: ``label -> (usable samples, kept samples)`` (one entry, label ``None``, when not labelled).
        num_shards: Shards written.
        num_bytes: Their total size.
        skipped: Skipped source samples per reason.
        errors_path: The ``errors.jsonl`` listing them.
        copied: The other splits copied unchanged.
    """

    name: str
    out: Path
    total: int
    kept: int
    fraction: Fraction
    seed: int
    labelled: bool
    per_class: dict[int | None, tuple[int, int]]
    num_shards: int
    num_bytes: int
    skipped: dict[str, int]
    errors_path: Path
    copied: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The one-line report printed by the CLI."""
        kept = [k for _, k in self.per_class.values()]
        if self.labelled:
            how = f"per class over {len(kept)} classes, min {min(kept)} max {max(kept)} kept"
        else:
            how = "overall, no labels"
        skipped = ", ".join(f"{r} {n}" for r, n in self.skipped.items())
        skipped = f"skipped {sum(self.skipped.values())}: {skipped} (listed in {self.errors_path})" if skipped \
            else "skipped 0"
        copied = f"; copied {', '.join(self.copied)}" if self.copied else ""
        return (f"{self.name}: kept {self.kept} of {self.total} samples (fraction {float(self.fraction):g} {how}, "
                f"seed {self.seed}) in {self.num_shards} shard(s), {self.num_bytes / 1e6:.1f} MB; {skipped}{copied} "
                f"-> {self.out}")


class _Problems:
    """Skipped source samples: ``errors.jsonl`` records and counts per reason (counts are samples)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()

    def add(self, item: str, reason: str, detail: str, samples: int = 1) -> None:
        record = error_record(item, reason, detail)
        if samples != 1:
            record["samples"] = samples
        self.records.append(record)
        self.counts[reason] += samples


def _parse_label(data: bytes, num_classes: int | None) -> int:
    label = int(data.decode("ascii"))
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise ValueError(f"label {label} outside [0, {num_classes})")
    return label


def _scan_shard(path: Path, shard: int, expected: int, num_classes: int | None,
                problems: _Problems) -> list[_Sample]:
    """The samples of one source shard with their labels and byte ranges; damage goes to ``problems``."""
    samples = []
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(open(path, "rb"))
        except OSError as e:
            scan = TarScan([], f"not a readable tar: {e}")
        else:
            scan = scan_tar(f, max_tail=MAX_TAIL)
        for found in scan.samples:
            item = f"{path.name}:{found.key}"
            if not found.complete:
                problems.add(item, "truncated_tar", scan.damage or "")
                continue
            label = None
            try:
                cls = [m for m in found.members if m.ext == "cls"]
                for member in cls:
                    label = _parse_label(read_member(f, member), num_classes)
            except (ValueError, OSError) as e:
                problems.add(item, "bad_label", f"cls: {e}")
                continue
            samples.append(_Sample(found.key, label, shard, found.start, found.end))
    if expected > len(scan.samples):
        # Samples the manifest promises but the tar does not hold (past the damage, or a shard replaced since).
        lost = expected - len(scan.samples)
        reason = "truncated_tar" if scan.damage is not None and scan.samples else "bad_tar"
        problems.add(path.name, reason, f"{scan.damage or 'sound tar'}: holds {len(scan.samples)} of the {expected} "
                     f"samples the manifest lists; {lost} lost", samples=lost)
    return samples


def _read_members(f: IO[bytes], sample: _Sample) -> dict[str, bytes]:
    """The members of one sample, read from its byte range: ``{ext: data}``."""
    f.seek(sample.start)
    chunk = f.read(sample.end - sample.start)
    if len(chunk) != sample.end - sample.start:
        raise OSError(f"short read ({len(chunk)} of {sample.end - sample.start} bytes)")
    # The range holds whole members only; an end-of-archive marker makes it a tar of its own.
    buffer = io.BytesIO(chunk + bytes(END_MARKER))
    scan = scan_tar(buffer)
    if scan.damage is not None:
        raise ValueError(f"byte range of {sample.key}: {scan.damage}")
    members: dict[str, bytes] = {}
    for found in scan.samples:
        if found.key != sample.key:
            raise ValueError(f"member {found.members[0].name} of another sample in the byte range of {sample.key}")
        for member in found.members:
            members[member.ext] = read_member(buffer, member)
    return members


def _reason(ext: str) -> str:
    last = ext.rsplit(".", 1)[-1]
    if last in _IMAGE_EXTS:
        return "bad_image"
    if last in _VIDEO_EXTS:
        return "bad_video"
    return {"cls": "bad_label", "txt": "bad_text", "json": "bad_json"}.get(last, "bad_member")


def _iter_read(paths: list[Path], samples: Iterable[_Sample]) -> Iterator[tuple[_Sample, dict[str, bytes] | Exception]]:
    """``(sample, members)`` in source order, each shard opened once; a read failure is yielded, not raised."""
    current: tuple[int, IO[bytes]] | None = None
    try:
        for sample in sorted(samples, key=lambda s: (s.shard, s.start)):
            try:
                if current is None or current[0] != sample.shard:
                    if current is not None:
                        current[1].close()
                        current = None
                    current = (sample.shard, open(paths[sample.shard], "rb"))
                members: dict[str, bytes] | Exception = _read_members(current[1], sample)
            except (OSError, ValueError) as e:
                members = e
            yield sample, members
    finally:
        if current is not None:
            current[1].close()


def _failures(paths: list[Path], samples: list[_Sample], num_classes: int | None,
              problems: _Problems) -> set[str]:
    """Keys of the samples whose members cannot be read or decoded (each recorded in ``problems``)."""
    bad = set()
    for sample, members in _iter_read(paths, samples):
        item = f"{paths[sample.shard].name}:{sample.key}"
        if isinstance(members, Exception):
            problems.add(item, "bad_tar", f"{type(members).__name__}: {members}")
            bad.add(sample.key)
            continue
        for ext, data in members.items():
            if (problem := check_member(ext, data, num_classes)) is not None:
                # Decoders name the in-memory file by its address ("<_io.BytesIO object at 0x...>"): not reproducible.
                problems.add(item, _reason(ext), f"{ext}: {_ADDRESS_RE.sub('', problem)}")
                bad.add(sample.key)
                break
    return bad


def _select(groups: dict[int | None, list[_Sample]], fraction: Fraction, seed: int, paths: list[Path],
            num_classes: int | None, problems: _Problems, progress: bool) -> tuple[list[_Sample], dict]:
    """The kept samples and ``label -> (usable, kept)``, ``kept == ceil(fraction * usable)`` in every class.

    The picks are decoded; an undecodable one is skipped, no longer counts as usable, and the class's picks are
    topped up (or trimmed) in rank order to the new quota, until every pick decodes.
    """
    order = {label: sorted(members, key=lambda s: (rank(s.key, seed), s.key)) for label, members in groups.items()}
    usable = {label: len(members) for label, members in groups.items()}
    chosen = {label: order[label][:quota(fraction, n)] for label, n in usable.items()}
    next_index = {label: len(c) for label, c in chosen.items()}
    pending = [s for c in chosen.values() for s in c]
    bar = tqdm(total=len(pending), desc="checking", unit="sample", disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        while pending:
            bad = _failures(paths, pending, num_classes, problems)
            bar.update(len(pending))
            pending = []
            for label, picks in chosen.items():
                good = [s for s in picks if s.key not in bad]
                if len(good) == len(picks):
                    continue
                usable[label] -= len(picks) - len(good)
                want = quota(fraction, usable[label])
                extra = order[label][next_index[label]:next_index[label] + max(0, want - len(good))]
                next_index[label] += len(extra)
                chosen[label] = good[:want] + extra  # picks stay in rank order
                pending.extend(extra)
            bar.total += len(pending)
    finally:
        bar.close()
    labels = sorted(groups, key=lambda x: (x is None, x))  # ints, or the single None of an unlabelled split
    per_class = {label: (usable[label], len(chosen[label])) for label in labels}
    return [s for c in chosen.values() for s in c], per_class


def _copy_file(src: Path, dst: Path) -> None:
    """Hard link (shards are never rewritten in place: writers rename new files over old ones), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _check_out(out: Path, ignore: str | None = None) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(p.name != ignore for p in out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; give a new directory (or delete this one)")


def make_subset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dataset: str,
    fraction: Fraction | float | str,
    split: str = "train",
    seed: int = 0,
    shard_size: int = 1000,
    shard_bytes: int = 500 * 10**6,
    progress: bool = True,
) -> SubsetSummary:
    """Write the ``fraction`` subset of ``SRC/dataset/split`` (plus the dataset's other splits) as the root ``out``.

    Args:
        src: A prepared dataset root (``manifest.json`` listing ``dataset/split``).
        out: The new root; must not exist or be empty.
        dataset: The dataset to take; other datasets of ``src`` are left out.
        fraction: In ``(0, 1]``; per class when the samples carry ``.cls`` labels, else overall.
        split: The split to cut down; the dataset's other splits are copied unchanged.
        seed: Selection seed.
        shard_size: Samples per output shard.
        shard_bytes: Approximate bytes per output shard.
        progress: Show progress bars (stderr).

    Returns:
        What was written.

    Raises:
        UserError: Bad arguments: fraction out of range, ``src`` not a prepared root or without the split, ``out``
            not empty.
        SubsetError: A split to copy is damaged, or no usable sample is left.
        OSError: Writing ``out`` failed.
    """
    src, out = Path(src), Path(out)
    fraction = Fraction(str(fraction)) if isinstance(fraction, float) else Fraction(fraction)
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], got {fraction}")
    if shard_size < 1 or shard_bytes < 1:
        raise UserError(f"--shard-size and --shard-bytes must be positive, got {shard_size} and {shard_bytes}")
    if not dataset or "/" in dataset or not split or "/" in split:
        raise UserError(f"--dataset and --split must be plain names, got {dataset!r} and {split!r}")
    if not src.is_dir():
        raise UserError(f"--src {src}: no such directory")
    manifest = schema.read_manifest(src)
    if manifest is None:
        raise UserError(f"--src {src}: no readable {schema.MANIFEST} (not a condmoe-prep output, or not merged yet)")
    name = f"{dataset}/{split}"
    datasets = manifest.get("datasets", {})
    if name not in datasets:
        raise UserError(f"--src {src} has no {name} (it has: {', '.join(sorted(datasets)) or 'nothing'})")
    _check_out(out)

    entry = datasets[name]
    classes = read_classes(src).get(dataset)
    num_classes = len(classes) if classes is not None else None
    problems = _Problems()

    # Pass 1: keys, labels and byte ranges of every sample (tar headers and .cls members only).
    shard_entries = entry["shards"]
    paths = [src / name / s["name"] for s in shard_entries]
    samples: list[_Sample] = []
    seen: set[str] = set()
    for i, (path, s) in enumerate(tqdm(list(zip(paths, shard_entries)), desc=f"scanning {name}", unit="shard",
                                       disable=not progress, leave=False, dynamic_ncols=True)):
        for sample in _scan_shard(path, i, int(s["num_samples"]), num_classes, problems):
            if sample.key in seen:
                problems.add(f"{path.name}:{sample.key}", "duplicate_key", "key seen earlier in the split; skipped")
                continue
            seen.add(sample.key)
            samples.append(sample)
    del seen
    labelled = any(s.label is not None for s in samples)
    groups: dict[int | None, list[_Sample]] = {}
    for sample in samples:
        if labelled and sample.label is None:
            problems.add(f"{paths[sample.shard].name}:{sample.key}", "missing_label", "no .cls in a labelled split")
            continue
        groups.setdefault(sample.label, []).append(sample)
    del samples

    # Pass 2: decode the picks (replacing undecodable ones), then pass 3 writes them.
    kept, per_class = _select(groups, fraction, seed, paths, num_classes, problems, progress)
    total = sum(n for n, _ in per_class.values()) + sum(problems.counts.values())
    if not kept:
        raise SubsetError(f"{src / name}: no usable sample ({sum(problems.counts.values())} of {total} skipped: "
                          f"{dict(problems.counts)})")

    # Built in a temporary directory: a sibling of a new OUT, renamed into place at the end; inside an existing empty
    # OUT (the same file system even if OUT is a mount point), its entries moved up at the end, manifest.json last.
    target = out.resolve()
    inside = target.is_dir()
    if inside:
        tmp = target / f".subset-{os.getpid()}.tmp"
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.subset-{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        new_entries = {}
        copied = []
        for other, other_entry in sorted(datasets.items()):
            if other.split("/")[0] != dataset or other == name:
                continue
            (tmp / other).mkdir(parents=True)
            for s in other_entry["shards"]:
                shard_path = src / other / s["name"]
                if not shard_path.is_file() or shard_path.stat().st_size != s["num_bytes"]:
                    raise SubsetError(f"{shard_path}: missing or not the size the manifest records; run "
                                      f"condmoe-prep verify {src}")
                _copy_file(shard_path, tmp / other / s["name"])
            if (src / other / schema.ERRORS).is_file():
                shutil.copy2(src / other / schema.ERRORS, tmp / other / schema.ERRORS)
            new_entries[other] = other_entry
            copied.append(other)

        def encoded() -> Iterator[dict[str, Any]]:
            for sample, members in _iter_read(paths, kept):
                if isinstance(members, Exception):  # it decoded a moment ago: the source changed under us
                    raise SubsetError(f"{paths[sample.shard]}: sample {sample.key}: {members}")
                yield {"__key__": sample.key, **members}

        shards = write_shards(encoded(), tmp / name, shard_size=shard_size, shard_bytes=shard_bytes, total=len(kept),
                              desc=f"writing {name}", progress=progress)
        schema.write_jsonl(tmp / name / schema.ERRORS, problems.records)
        skipped = dict(sorted(problems.counts.items()))
        params = {"src": str(src), "dataset": dataset, "split": split, "fraction": float(fraction),
                  "fraction_exact": str(fraction), "seed": seed}
        new_entries[name] = schema.manifest_entry(
            [s.to_dict() for s in shards],
            source="subset",
            params=params,
            shard_size=shard_size,
            shard_bytes=shard_bytes,
            fingerprint=fingerprint({"source": "subset", "params": {**params, "src": None},
                                     "shard_size": shard_size, "shard_bytes": shard_bytes},
                                    [s["sha256"] for s in shard_entries]),
            num_items=total,
            skipped=skipped,
            notes={
                "labelled": labelled,
                "usable": sum(n for n, _ in per_class.values()),
                **({"per_class": {str(label): {"usable": n, "kept": k} for label, (n, k) in per_class.items()}}
                   if labelled else {}),
                "source_entry": {k: v for k, v in entry.items() if k not in ("shards", "num_samples")},
            },
        )
        new_manifest = schema.new_manifest(manifest.get("seed"))
        new_manifest["datasets"] = dict(sorted(new_entries.items()))
        if classes is not None:
            schema.write_json(tmp / schema.CLASSES, {dataset: classes})
            new_manifest["classes"] = {dataset: classes}
        tokenizer = manifest.get("tokenizer")
        tok_dir = src / (tokenizer["path"] if isinstance(tokenizer, dict) and "path" in tokenizer else "tokenizer")
        if tok_dir.is_dir():
            shutil.copytree(tok_dir, tmp / tok_dir.name)
            if tokenizer is not None:
                new_manifest["tokenizer"] = tokenizer
        schema.write_index(tmp, new_manifest)
        _check_out(target, ignore=tmp.name)
        if inside:
            for entry in sorted(p for p in tmp.iterdir() if p.name != schema.MANIFEST):
                os.rename(entry, target / entry.name)
            os.rename(tmp / schema.MANIFEST, target / schema.MANIFEST)
            tmp.rmdir()
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SubsetSummary(
        name=name,
        out=out,
        total=total,
        kept=len(kept),
        fraction=fraction,
        seed=seed,
        labelled=labelled,
        per_class=per_class,
        num_shards=len(shards),
        num_bytes=sum(s.num_bytes for s in shards),
        skipped=skipped,
        errors_path=out / name / schema.ERRORS,
        copied=copied,
    )
