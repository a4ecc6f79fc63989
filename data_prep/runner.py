"""Running one part of a preparation job: plan, resume, write slices with worker processes, then index.

A job is ``(source, OUT, dataset, split)``, optionally cut into ``--num-parts`` parts (SLURM array tasks), each
run by ``--workers`` processes. Every part lists all inputs (listing is cheap and deterministic), computes the global
slices (:mod:`data_prep.plan`), skips the slices its progress file already records, and writes the rest; each
finished slice is appended to the progress file by this (parent) process after the worker has renamed its shard
files into place. A single-part job then writes the index itself; a multi-part job is indexed by
``condmoe-prep merge``. The synthetic generator writes its splits with :func:`write_part` too, then its own index.

Killing a part at any moment (SIGKILL included) and running the same command again finishes the job with the same
shards and manifest as an uninterrupted run: a slice is either recorded (its files are complete and final) or
rewritten from scratch.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from condmoe.data_prep import schema
from condmoe.data_prep.errors import ErrorItem, SkipSample, UserError, error_record
from condmoe.data_prep.index import (
    SplitSummary,
    drop_entry,
    finalize_split,
    index_lock,
    read_classes,
    verify_manifest,
)
from condmoe.data_prep.plan import SliceTask, fingerprint, num_slices, part_slices, slice_bounds
from condmoe.data_prep.progress import PROGRESS_DIR, PartLog, SliceRecord, list_part_files, read_part_header
from condmoe.data_prep.shard_writer import SliceWriter, remove_shard_files
from condmoe.data_prep.sources.base import Source

__all__ = ["PartResult", "PrepOptions", "run_part", "write_part", "write_slice"]


@dataclass(frozen=True)
class PrepOptions:
    """Where and how to write.

    Attributes:
        out: Dataset root.
        dataset: Dataset name (``OUT/<dataset>/<split>``).
        split: Split name.
        shard_size: Items per slice, i.e. at most this many samples per shard.
        shard_bytes: Approximate byte limit per shard file (a slice continues in ``_01``, ``_02`` files).
        workers: Worker processes (1 = write in this process).
        num_parts: Parts the job is cut into.
        part_index: This part.
        overwrite: Discard progress that another run (other inputs, options or part count) left in this split.
            Progress of this very run is always resumed: redoing it would write the same bytes.
        progress: Show a progress bar.
        train_bpe: Train the BPE tokenizer when indexing.
        vocab_size: BPE vocabulary upper bound.
    """

    out: Path
    dataset: str
    split: str = "train"
    shard_size: int = 1000
    shard_bytes: int = 500 * 10**6
    workers: int = 1
    num_parts: int = 1
    part_index: int = 0
    overwrite: bool = False
    progress: bool = True
    train_bpe: bool = False
    vocab_size: int = 8000

    def validate(self) -> None:
        """Raise :class:`UserError` for a bad name or number."""
        for flag, value in (("--dataset", self.dataset), ("--split", self.split)):
            if not value or "/" in value or "\\" in value or value.startswith((".", "_")):
                raise UserError(f"{flag} {value!r}: must be a plain name (no '/', not starting with '.' or '_')")
        if min(self.shard_size, self.shard_bytes, self.workers, self.num_parts) < 1:
            raise UserError("--shard-size, --shard-bytes, --workers and --num-parts must be positive")
        if not 0 <= self.part_index < self.num_parts:
            raise UserError(f"--part-index {self.part_index} is not in [0, {self.num_parts}) (SLURM: use --array=0-N)")
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} exists and is not a directory")


@dataclass
class PartResult:
    """Outcome of :func:`run_part`.

    Attributes:
        name: ``"{dataset}/{split}"``.
        part_index: This part.
        num_parts: Parts of the job.
        num_items: Items owned by this part.
        num_samples: Samples this part has written (all runs).
        num_bytes: Bytes of this part's shards.
        num_shards: Shard files of this part.
        shards: Those files' manifest records (``name``, ``num_samples``, ``num_bytes``, ``sha256``), in order.
        skipped: Skipped items of this part per reason.
        ran_items: Items processed by this invocation (0 when everything was already done).
        elapsed: Seconds spent writing in this invocation.
        already_complete: The manifest already held this exact job; nothing was done.
        summary: The index summary when this invocation wrote it (single-part jobs).
        report: Lines from the source to show the user.
    """

    name: str
    part_index: int
    num_parts: int
    num_items: int = 0
    num_samples: int = 0
    num_bytes: int = 0
    num_shards: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    ran_items: int = 0
    elapsed: float = 0.0
    already_complete: bool = False
    summary: SplitSummary | None = None
    report: list[str] = field(default_factory=list)


def write_slice(source: Source, task: SliceTask, on_item: Callable[[], None] | None = None) -> SliceRecord:
    """Write one slice: every item becomes a sample or an error record; files are final when this returns.

    Args:
        source: The planned source.
        task: Slice index, first global item index, items, directory and byte limit.
        on_item: Called after each item (progress counting).

    Returns:
        The record to append to the part's progress file.
    """
    remove_shard_files(task.directory, task.index)  # a killed earlier attempt may have left some
    writer = SliceWriter(task.directory, task.index, task.max_bytes)
    errors = []
    try:
        for offset, item in enumerate(task.items):
            if isinstance(item, ErrorItem):
                errors.append(error_record(item.item_id, item.reason, item.detail))
            else:
                try:
                    members = source.make_sample(item)
                except SkipSample as e:
                    errors.append(error_record(source.item_id(item), e.reason, e.detail))
                else:
                    # Keys are global item numbers: unique in the split, and stable across resumes and part counts.
                    writer.write({"__key__": f"{task.first + offset:0{source.key_digits}d}", **members})
            if on_item is not None:
                on_item()
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    return SliceRecord(task.index, len(task.items), [s.to_dict() for s in shards], errors)


# Worker-process state, set once by the pool initializer (the source is inherited or unpickled once, not per task).
_WORKER: tuple[Source, Any] | None = None


def _die_with_parent(parent: int) -> None:
    # A SIGKILLed parent cannot stop its pool; orphaned workers would go on writing slices that the rerun writes
    # too. Linux can deliver SIGKILL to a child when its parent dies (PR_SET_PDEATHSIG = 1).
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(source: Source, counter: Any, parent: int) -> None:
    global _WORKER
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent, which stops the pool
    _WORKER = (source, counter)


def _count(counter: Any) -> None:
    with counter.get_lock():
        counter.value += 1


def _run_task(task: SliceTask) -> SliceRecord:
    assert _WORKER is not None
    source, counter = _WORKER
    return write_slice(source, task, lambda: _count(counter))


def _check_other_parts(progress_dir: Path, header: dict[str, Any], overwrite: bool) -> None:
    for path in list_part_files(progress_dir):
        try:
            other = read_part_header(path)
            same = other.get("fingerprint") == header["fingerprint"] and other.get("num_parts") == header["num_parts"]
        except (OSError, ValueError):
            same = False
        if same:
            continue
        if not overwrite:
            raise UserError(
                f"{progress_dir.parent} holds progress of a different run (other inputs, options or --num-parts: "
                f"{path.name}); rerun with --overwrite to discard it"
            )
        path.unlink(missing_ok=True)


def _iter_tasks(items: list[Any], slices: list[int], options: PrepOptions, directory: Path) -> Iterator[SliceTask]:
    for g in slices:
        start, stop = slice_bounds(g, len(items), options.shard_size)
        yield SliceTask(g, start, items[start:stop], str(directory), options.shard_bytes)


def _run_slices(
    source: Source, tasks: Iterator[SliceTask], workers: int, bar: tqdm, on_record: Callable[[SliceRecord], None]
) -> None:
    if workers == 1:
        for task in tasks:
            on_record(write_slice(source, task, lambda: bar.update(1)))
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    counter = ctx.Value("q", 0)
    seen = 0
    init = (source, counter, os.getpid())
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init) as pool:
        pending: set[Future[SliceRecord]] = set()
        try:
            while True:
                # A bounded number of slices in flight: each submission pickles its items.
                while len(pending) < 2 * workers and (task := next(tasks, None)) is not None:
                    pending.add(pool.submit(_run_task, task))
                if not pending:
                    break
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    on_record(future.result())
                now = counter.value
                bar.update(now - seen)
                seen = now
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _tally(result: PartResult, records: list[SliceRecord]) -> None:
    skipped: Counter[str] = Counter()
    for r in records:
        skipped.update(e["reason"] for e in r.errors)
        result.num_samples += sum(s["num_samples"] for s in r.shards)
        result.num_bytes += sum(s["num_bytes"] for s in r.shards)
        result.num_shards += len(r.shards)
        result.shards.extend(r.shards)
    result.skipped = dict(sorted(skipped.items()))


def _intact(split_dir: Path, record: SliceRecord) -> bool:
    return all(
        (split_dir / s["name"]).is_file() and (split_dir / s["name"]).stat().st_size == s["num_bytes"]
        for s in record.shards
    )


def _already_complete(options: PrepOptions, name: str, digest: str) -> bool:
    manifest = schema.read_manifest(options.out)
    entry = (manifest or {}).get("datasets", {}).get(name)
    if entry is None or entry.get("fingerprint") != digest:
        return False
    if verify_manifest(options.out, {"datasets": {name: entry}}):
        return False
    return not options.train_bpe or (options.out / schema.TOKENIZER_DIR / "tokenizer.json").is_file()


def _write_dense(options: PrepOptions, labels: dict[str, dict[str, Any]]) -> None:
    """Add this run's labels to the dataset's ``dense.json`` entry (the labels of its other splits stay).

    Raises:
        UserError: If a label is already there with another spec (another split prepared with other options), unless
            ``overwrite``; or if ``dense.json`` is damaged.
    """
    path = options.out / schema.DENSE
    try:
        with index_lock(options.out):
            entry = schema.read_dense(options.out, missing_ok=True).get(options.dataset, {})
            clash = [label for label, spec in labels.items() if label in entry and entry[label] != spec]
            if clash and not options.overwrite:
                label = clash[0]
                raise UserError(f"{path}: {options.dataset}/{label} is {entry[label]}, this run's is {labels[label]} "
                                "(another split was prepared with other label options); use the same options, or "
                                "--overwrite to replace it")
            schema.write_dense(options.out, options.dataset, {**entry, **labels})
    except ValueError as e:
        raise UserError(f"{e}; repair or delete {path}") from None


def run_part(source: Source, options: PrepOptions) -> PartResult:
    """Prepare (or finish preparing) one part of ``OUT/<dataset>/<split>``; a single-part job is then indexed.

    A SLURM requeue can rerun the same command line, ``--overwrite`` included, without losing finished slices.

    Args:
        source: The input source.
        options: Output and execution options.

    Returns:
        Counts for this part, and the index summary when the job has a single part.

    Raises:
        UserError: For bad options, unreadable inputs, or another run's progress in the way (without
            ``overwrite``).
        data_prep.index.MergeError: If indexing a single-part job finds recorded shards missing.
    """
    result = write_part(source, options)
    if options.num_parts == 1 and not result.already_complete:
        result.summary = finalize_split(
            options.out, options.dataset, options.split, train_bpe=options.train_bpe, vocab_size=options.vocab_size
        )
    return result


def write_part(source: Source, options: PrepOptions) -> PartResult:
    """Write (or finish writing) the shards of one part and record them in its progress file; no index (but the
    dataset's ``dense.json`` entry, for a source with dense labels, is written first).

    Args:
        source: The input source.
        options: Output and execution options.

    Returns:
        Counts and shards of this part (``already_complete`` if the manifest already holds this exact job).

    Raises:
        UserError: As :func:`run_part`.
    """
    options.validate()
    name = f"{options.dataset}/{options.split}"
    split_dir = options.out / options.dataset / options.split
    plan = source.plan(read_classes(options.out).get(options.dataset))
    dense = source.dense_labels()
    if dense is not None:
        _write_dense(options, dense)
    items = plan.items
    params = source.params()
    digest = fingerprint(
        {
            "source": source.name,
            "params": params,
            "classes": plan.classes,
            "shard_size": options.shard_size,
            "shard_bytes": options.shard_bytes,
        },
        items,
    )
    result = PartResult(name, options.part_index, options.num_parts, report=list(plan.report))
    if _already_complete(options, name, digest):
        result.already_complete = True
        return result

    total = num_slices(len(items), options.shard_size)
    mine = part_slices(total, options.num_parts, options.part_index)
    header = {
        "version": 1,
        "fingerprint": digest,
        "num_parts": options.num_parts,
        "part_index": options.part_index,
        "num_items": len(items),
        "num_slices": total,
        "slices": [mine.start, mine.stop],
        "source": source.name,
        "dataset": options.dataset,
        "split": options.split,
        "params": params,
        "shard_size": options.shard_size,
        "shard_bytes": options.shard_bytes,
        "classes": plan.classes,
        "notes": plan.notes,
        "report": plan.report,
    }
    progress_dir = split_dir / PROGRESS_DIR
    split_dir.mkdir(parents=True, exist_ok=True)
    _check_other_parts(progress_dir, header, options.overwrite)
    log = PartLog(progress_dir, header)
    if not log.load():
        log.start()

    # A recorded slice whose files were deleted or changed size since is written again (its new record wins).
    todo = [g for g in mine if g not in log.done or not _intact(split_dir, log.done[g])]
    bounds = [slice_bounds(g, len(items), options.shard_size) for g in mine]
    result.num_items = sum(stop - start for start, stop in bounds)
    if todo:
        drop_entry(options.out, name)  # the shards are about to change: the old index must not list them
        redo = set(todo)
        done_items = result.num_items - sum(stop - start for g, (start, stop) in zip(mine, bounds) if g in redo)
        start = time.perf_counter()
        label = name if options.num_parts == 1 else f"{name} part {options.part_index}/{options.num_parts}"
        bar = tqdm(
            total=result.num_items,
            initial=done_items,
            desc=label,
            unit="sample",
            disable=not options.progress,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not a flood
        )
        try:
            _run_slices(source, _iter_tasks(items, todo, options, split_dir), options.workers, bar, log.append)
        finally:
            bar.close()
        result.elapsed = time.perf_counter() - start
        result.ran_items = result.num_items - done_items
    _tally(result, [log.done[g] for g in mine])
    return result
