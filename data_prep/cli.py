"""``condmoe-prep``: command-line entry point for dataset preparation.

Examples::

    condmoe-prep synthetic --out data/synthetic --seed 0
    condmoe-prep imagefolder --input photos/ --out data/real --dataset photos --split train --workers 8
    condmoe-prep merge data/real
    condmoe-prep verify data/real
    condmoe-prep subset --src data/real --out data/real-1pct --dataset photos --fraction 0.01

The real-data subcommands live in :mod:`data_prep.commands`; docs/data.md describes every source.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

from condmoe.data_prep.argtypes import non_negative_int, positive_int
from condmoe.data_prep.commands import add_commands
from condmoe.data_prep.schema import read_manifest
from condmoe.data_prep.synthetic import SyntheticConfig, complete_dataset_sizes, write_synthetic_dataset

__all__ = ["build_parser", "main"]

_PROG = "condmoe-prep"


class _OneLineErrorParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single ``prog: error: message`` line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        # The default prints the full usage block first; one line is easier to spot in job logs and to grep.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``condmoe-prep`` argument parser (one subcommand per dataset source)."""
    parser = _OneLineErrorParser(prog=_PROG, description="Prepare condmoe training data as webdataset shards.")
    # Subparsers are created with the parser's own class, so their errors are one line too.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    defaults = SyntheticConfig()
    syn = sub.add_parser(
        "synthetic",
        help="generate the embedded synthetic image, video and dense dataset (no download)",
        description="Generate the embedded synthetic multi-task dataset (shape images with captions, moving-shape "
        "videos, scenes with dense label maps) as webdataset shards, plus classes.json, dense.json, sizes.json, "
        "manifest.json and a BPE tokenizer.",
    )
    d = " (default: %(default)s)"
    syn.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    syn.add_argument("--seed", type=non_negative_int, default=defaults.seed, help="generation seed" + d)
    syn.add_argument("--image-size", type=positive_int, default=defaults.image_size, help="image side in px" + d)
    syn.add_argument("--video-size", type=positive_int, default=defaults.video_size, help="frame side in px" + d)
    syn.add_argument("--num-frames", type=positive_int, default=defaults.num_frames, help="frames per clip" + d)
    for kind, plural in (("image", "images"), ("video", "videos")):
        for split in ("train", "val"):
            syn.add_argument(
                f"--num-{split}-{plural}",
                type=positive_int,
                default=getattr(defaults, f"num_{split}_{plural}"),
                help=f"{kind}s in {kind}/{split}" + d,
            )
    for split in ("train", "val"):
        syn.add_argument(f"--num-{split}-dense", type=non_negative_int, default=getattr(defaults, f"num_{split}_dense"),
                         help=f"scenes with dense label maps in dense/{split} (0 for both: none)" + d)
    syn.add_argument("--shard-size", type=positive_int, default=defaults.shard_size, help="max images per shard" + d)
    syn.add_argument(
        "--video-shard-size", type=positive_int, default=defaults.video_shard_size,
        help="max clips (and dense scenes) per shard" + d,
    )
    syn.add_argument("--vocab-size", type=positive_int, default=defaults.vocab_size, help="max BPE vocabulary" + d)
    syn.add_argument("--no-tokenizer", action="store_true", help="do not train the BPE tokenizer")
    syn.add_argument("--overwrite", action="store_true", help="regenerate even if OUT already holds this dataset")
    syn.add_argument("--no-progress", action="store_true", help="disable progress bars")
    # The subcommand's own parser reports its errors, so messages name it ("condmoe-prep synthetic: error: ...").
    syn.set_defaults(func=_run_synthetic, command_parser=syn)
    add_commands(sub)
    return parser


def _summarise(out: Path, elapsed: float | None) -> None:
    manifest = read_manifest(out)
    if manifest is None:  # pragma: no cover - write_synthetic_dataset always writes one
        return
    total_samples = total_shards = total_bytes = 0
    for name, entry in manifest["datasets"].items():
        shards = entry["shards"]
        nbytes = sum(s["num_bytes"] for s in shards)
        print(f"{name}: {entry['num_samples']} samples in {len(shards)} shard(s), {nbytes / 1e6:.1f} MB")
        total_samples += entry["num_samples"]
        total_shards += len(shards)
        total_bytes += nbytes
    timing = f" in {elapsed:.1f} s" if elapsed is not None else ""
    tok = manifest.get("tokenizer")
    tok_text = f", tokenizer {out / tok['path']} (vocab {tok['vocab_size']})" if tok else ""
    print(
        f"total: {total_samples} samples in {total_shards} shard(s), {total_bytes / 1e6:.1f} MB{timing}{tok_text} "
        f"-> {out}"
    )


def _run_synthetic(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    config = SyntheticConfig(
        seed=args.seed,
        image_size=args.image_size,
        video_size=args.video_size,
        num_frames=args.num_frames,
        num_train_images=args.num_train_images,
        num_val_images=args.num_val_images,
        num_train_videos=args.num_train_videos,
        num_val_videos=args.num_val_videos,
        num_train_dense=args.num_train_dense,
        num_val_dense=args.num_val_dense,
        shard_size=args.shard_size,
        video_shard_size=args.video_shard_size,
        vocab_size=args.vocab_size,
        tokenizer=not args.no_tokenizer,
    )
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    out: Path = args.out
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")
    if not args.overwrite and out.is_dir() and complete_dataset_sizes(out, config) is not None:
        print(f"{out} already holds a complete dataset with these parameters; skipping (use --overwrite to redo)")
        _summarise(out, None)
        return 0
    start = time.perf_counter()
    try:
        write_synthetic_dataset(out, **asdict(config), overwrite=True, progress=not args.no_progress)
    except (OSError, ValueError) as e:
        parser.error(f"cannot write dataset to {out}: {e}")
    _summarise(out, time.perf_counter() - start)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``condmoe-prep``.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit code (0 on success). Usage and I/O errors print one line to stderr and raise ``SystemExit(2)``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, args.command_parser)


if __name__ == "__main__":
    sys.exit(main())
