"""The ``condmoe-prep`` subcommands that prepare real data: one per source, plus ``merge``, ``verify`` and ``subset``.

Every handler gets the parsed arguments and its own subcommand parser; user mistakes go through
``parser.error`` (one line, exit code 2), data problems found by ``merge``/``verify`` print one line each and return
1 (``subset``: a damaged split to copy, no usable sample).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from condmoe.data_prep.argtypes import byte_size, fraction, non_negative_int, positive_int
from condmoe.data_prep.errors import UserError
from condmoe.data_prep.index import MergeError, SplitSummary, finalize_split, progress_splits, train_tokenizer
from condmoe.data_prep.runner import PartResult, PrepOptions, run_part
from condmoe.data_prep.schema import MANIFEST, read_manifest
from condmoe.data_prep.sources import SOURCES
from condmoe.data_prep.subset import SubsetError, make_subset
from condmoe.data_prep.verify import verify_dataset

__all__ = ["add_commands", "parts_from_env"]

_D = " (default: %(default)s)"


def parts_from_env(
    num_parts: int | None, part_index: int | None, env: Mapping[str, str] = os.environ
) -> tuple[int, int]:
    """``(num_parts, part_index)``: the flags if given, else the SLURM array variables, else ``(1, 0)``.

    ``SLURM_ARRAY_TASK_ID`` is taken relative to ``SLURM_ARRAY_TASK_MIN``, so ``--array=1-8`` works like ``0-7``.

    Raises:
        UserError: If a SLURM variable is not an integer.
    """
    try:
        if num_parts is None:
            num_parts = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
        if part_index is None:
            part_index = int(env.get("SLURM_ARRAY_TASK_ID", "0")) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    except ValueError as e:
        raise UserError(f"cannot read the SLURM array variables ({e}); pass --num-parts and --part-index") from None
    return num_parts, part_index


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("output and execution")
    p.add_argument("--out", type=Path, required=True, help="output root (created if missing)")
    p.add_argument("--dataset", required=True, help="dataset name: shards go to OUT/DATASET/SPLIT")
    p.add_argument("--split", default="train", help="split name" + _D)
    p.add_argument("--shard-size", type=positive_int, default=1000, help="items per shard" + _D)
    p.add_argument(
        "--shard-bytes",
        type=byte_size,
        default=500 * 10**6,
        help="approximate bytes per shard file, e.g. 500M or 2G; a fuller shard continues in a _NN file" + _D,
    )
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes" + _D)
    p.add_argument(
        "--num-parts", type=positive_int, help="cut the job into parts (default: $SLURM_ARRAY_TASK_COUNT or 1)"
    )
    p.add_argument(
        "--part-index", type=non_negative_int, help="this part (default: $SLURM_ARRAY_TASK_ID - MIN, or 0)"
    )
    p.add_argument("--train-bpe", action="store_true", help="train the BPE tokenizer into OUT/tokenizer")
    p.add_argument("--vocab-size", type=positive_int, default=8000, help="BPE vocabulary upper bound" + _D)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard progress another run (other inputs/options/--num-parts) left in OUT/DATASET/SPLIT",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the source subcommands, ``merge``, ``verify`` and ``subset`` to ``condmoe-prep``'s subparsers."""
    for name, source in SOURCES.items():
        aliases = [name.replace("_", "-")] if "_" in name else []
        p = sub.add_parser(name, aliases=aliases, help=source.summary, description=source.summary + ".")
        source.add_arguments(p)
        _add_job_arguments(p)
        p.set_defaults(func=_run_source, command_parser=p, source_class=source)

    merge = sub.add_parser(
        "merge",
        help="index the parts of multi-part jobs (after every part has finished)",
        description="Merge the per-part progress of every split under DIR into manifest.json, sizes.json, "
        "classes.json and errors.jsonl; fails, naming them, if parts are missing or incomplete.",
    )
    merge.add_argument("dir", type=Path, help="the --out directory of the parts")
    merge.add_argument("--train-bpe", action="store_true", help="then train the BPE tokenizer into DIR/tokenizer")
    merge.add_argument("--vocab-size", type=positive_int, default=8000, help="BPE vocabulary upper bound" + _D)
    merge.set_defaults(func=_run_merge, command_parser=merge)

    verify = sub.add_parser(
        "verify",
        help="check every shard against the manifest",
        description="Check every shard listed in DIR/manifest.json: size, sha256, sample count, and that every "
        "member decodes. Prints one line per problem and exits with 1 if there is any.",
    )
    verify.add_argument("dir", type=Path, help="a condmoe-prep output directory")
    verify.add_argument("--no-decode", action="store_true", help="skip decoding (sizes, hashes and counts only)")
    verify.add_argument("--workers", type=positive_int, default=1, help="processes" + _D)
    verify.set_defaults(func=_run_verify, command_parser=verify)

    subset = sub.add_parser(
        "subset",
        help="a seeded fraction (per class if labelled) of one split, as a new dataset root",
        description="Write OUT, a complete dataset root holding DATASET from SRC: SPLIT cut down to ceil(FRACTION * n) "
        "samples of every class (of the whole split if its samples have no .cls label), chosen by a seeded hash of "
        "the sample key; the dataset's other splits, its classes.json entry and the tokenizer copied; sizes.json and "
        "manifest.json rewritten. Corrupt source samples are skipped, counted and listed in OUT/DATASET/SPLIT/"
        "errors.jsonl.",
    )
    subset.add_argument("--src", type=Path, required=True, help="a prepared dataset root (condmoe-prep output)")
    subset.add_argument("--out", type=Path, required=True, help="the new dataset root (must not exist or be empty)")
    subset.add_argument("--dataset", required=True, help="dataset of SRC to take (only this one is written)")
    subset.add_argument("--fraction", type=fraction, required=True, help="in (0, 1], e.g. 0.01 or 1/100")
    subset.add_argument("--split", default="train", help="split to cut down; the others are copied" + _D)
    subset.add_argument("--seed", type=non_negative_int, default=0, help="selection seed" + _D)
    subset.add_argument("--shard-size", type=positive_int, default=1000, help="samples per output shard" + _D)
    subset.add_argument(
        "--shard-bytes", type=byte_size, default=500 * 10**6, help="approximate bytes per output shard" + _D
    )
    subset.add_argument("--no-progress", action="store_true", help="no progress bars")
    subset.set_defaults(func=_run_subset, command_parser=subset)


def _skipped_line(skipped: Mapping[str, int]) -> str:
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
    return f"skipped {sum(skipped.values())}: {reasons}" if skipped else "skipped 0"


def _print_summary(summary: SplitSummary, out: Path) -> None:
    print(
        f"{summary.name}: {summary.num_samples} samples in {summary.num_shards} shard(s), "
        f"{summary.num_bytes / 1e6:.1f} MB from {summary.num_items} items"
    )
    print(f"{_skipped_line(summary.skipped)} (listed in {summary.errors_path})")
    if summary.num_samples == 0:
        print(f"warning: no usable input: {summary.name} has no shard, training cannot read it")
    for line in summary.report:
        print(line)
    tokenizer = f", tokenizer {summary.tokenizer}" if summary.tokenizer else ""
    print(f"index: {out / MANIFEST}{tokenizer}")


def _print_part(result: PartResult, out: Path) -> None:
    if result.ran_items:
        rate = result.ran_items / max(result.elapsed, 1e-9)
        print(f"processed {result.ran_items} items in {result.elapsed:.1f} s ({rate:.0f} samples/s)")
    if result.summary is not None:
        _print_summary(result.summary, out)
        return
    print(
        f"{result.name} part {result.part_index} of {result.num_parts}: {result.num_samples} samples in "
        f"{result.num_shards} shard(s), {result.num_bytes / 1e6:.1f} MB from {result.num_items} items"
    )
    print(_skipped_line(result.skipped))
    for line in result.report:
        print(line)
    print(f"when every part is done: condmoe-prep merge {out}")


def _run_source(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        source = args.source_class.from_args(args)
        num_parts, part_index = parts_from_env(args.num_parts, args.part_index)
        options = PrepOptions(
            out=args.out,
            dataset=args.dataset,
            split=args.split,
            shard_size=args.shard_size,
            shard_bytes=args.shard_bytes,
            workers=args.workers,
            num_parts=num_parts,
            part_index=part_index,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            train_bpe=args.train_bpe,
            vocab_size=args.vocab_size,
        )
        result = run_part(source, options)
    except UserError as e:
        parser.error(str(e))
    except MergeError as e:
        for line in e.problems:
            print(f"{parser.prog}: error: {line}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    if result.already_complete:
        entry = (read_manifest(args.out) or {}).get("datasets", {}).get(result.name, {})
        print(
            f"{result.name}: already complete in {args.out} ({entry.get('num_samples')} samples, "
            f"{len(entry.get('shards', []))} shard(s)); nothing to do (delete that directory to redo it)"
        )
        return 0
    _print_part(result, args.out)
    return 0


def _run_merge(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.dir.is_dir():
        parser.error(f"{args.dir}: no such directory")
    splits = progress_splits(args.dir)
    if not splits:
        parser.error(f"{args.dir}: no prepared splits (no DATASET/SPLIT/_progress directories)")
    failed = False
    for dataset, split in splits:
        try:
            _print_summary(finalize_split(args.dir, dataset, split), args.dir)
        except UserError as e:
            parser.error(str(e))
        except MergeError as e:
            failed = True
            for line in e.problems:
                print(f"{parser.prog}: error: {line}", file=sys.stderr)
    if failed:
        return 1
    if args.train_bpe:
        try:
            print(f"tokenizer: {train_tokenizer(args.dir, args.vocab_size)}")
        except MergeError as e:
            print(f"{parser.prog}: error: {e.problems[0]}", file=sys.stderr)
            return 1
    return 0


def _run_verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.dir.is_dir():
        parser.error(f"{args.dir}: no such directory")
    problems, num_shards, num_samples = verify_dataset(args.dir, decode=not args.no_decode, workers=args.workers)
    for line in problems:
        print(line)
    if problems:
        print(f"{parser.prog}: {len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    what = "sizes, hashes, counts" if args.no_decode else "sizes, hashes, counts, decoding"
    print(f"OK: {num_shards} shard(s), {num_samples} samples ({what})")
    return 0


def _run_subset(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        summary = make_subset(
            args.src,
            args.out,
            args.dataset,
            args.fraction,
            split=args.split,
            seed=args.seed,
            shard_size=args.shard_size,
            shard_bytes=args.shard_bytes,
            progress=not args.no_progress,
        )
    except UserError as e:
        parser.error(str(e))
    except (SubsetError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0
