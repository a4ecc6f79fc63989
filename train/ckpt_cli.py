"""``condmoe-ckpt``: checks and converts condmoe checkpoints.

    condmoe-ckpt verify RUN_DIR_OR_CHECKPOINT           # every checkpoint as a resume would check it
    condmoe-ckpt consolidate CHECKPOINT --out FILE      # its fp32 master weights as one safetensors file

``verify`` checks sizes, sha256 and ``weights_only=True`` unpickling and prints one line per checkpoint (exit 0 if
all verify, 1 if any fails, 2 if there is none). ``consolidate`` reads any ZeRO stage and expert-parallel size
(``train/consolidate.py``): plain parameter names, every expert by its global id; the ``zero_to_fp32.py`` in a
run's checkpoints folder calls it."""

import argparse
import sys
import time
from pathlib import Path

from condmoe.train import checkpoint


def checkpoints_of(target: Path) -> list[Path]:
    """The checkpoint directories ``target`` names: itself (a ``step_N`` or committed directory), or the ``step_N``
    directories of a checkpoints folder or of a run folder's ``checkpoints``, oldest first."""
    if checkpoint.TAG.match(target.name) or checkpoint.is_complete(target):
        return [target]
    folder = checkpoint.checkpoint_dir(target) if checkpoint.checkpoint_dir(target).is_dir() else target
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := checkpoint.TAG.match(p.name)) and p.is_dir())
    return [p for _, p in steps]


def verify_one(path: Path) -> tuple[bool, str]:
    """Whether the checkpoint at ``path`` verifies, and its line."""
    if not checkpoint.is_complete(path):
        return True, f"{path}: incomplete (no {checkpoint.MARKER}: its save never finished; resuming never picks it)"
    t0 = time.perf_counter()
    try:
        checked = checkpoint.verify(path)
    except (ValueError, FileNotFoundError) as exc:
        return False, f"{path}: FAILED: {exc}"
    files = checkpoint.data_files(path)
    size = sum((path / name).stat().st_size for name in files)
    what = "sha256 and weights_only" if checked else "UNVERIFIED: committed without checksums; weights_only"
    return True, f"{path}: ok ({len(files)} files, {size / 1e6:.1f} MB, {what}, {time.perf_counter() - t0:.2f} s)"


def consolidate_one(target: Path, out: Path) -> int:
    from safetensors.torch import save_file

    from condmoe.train.consolidate import plain_weights, step_dir

    try:
        path = step_dir(target)
        weights = plain_weights(path, master=True)
    except (ValueError, FileNotFoundError) as exc:
        print(f"condmoe-ckpt consolidate: error: {exc}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out))
    size = sum(v.numel() for v in weights.values())
    print(f"{out}: {len(weights)} tensors, {size / 1e6:.2f} M values from {path} "
          f"(dtypes: {', '.join(sorted({str(v.dtype).removeprefix('torch.') for v in weights.values()}))})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="condmoe-ckpt", description="Checks and converts condmoe checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every file of every checkpoint (sizes, sha256, unpickling)")
    verify.add_argument("target", type=Path, help="a run folder, its checkpoints folder, or one step_N checkpoint")
    fp32 = commands.add_parser("consolidate", help="the fp32 master weights of a checkpoint as one safetensors file")
    fp32.add_argument("target", type=Path, help="a step_N checkpoint, or a checkpoints folder (its latest)")
    fp32.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    if args.command == "consolidate":
        return consolidate_one(args.target, args.out)
    target = args.target
    found = checkpoints_of(target) if target.is_dir() else []
    if not found:
        print(f"condmoe-ckpt: error: {target}: no checkpoint there", file=sys.stderr)
        return 2
    failed = 0
    for path in found:
        ok, line = verify_one(path)
        failed += not ok
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
