"""``condmoe-ckpt verify RUN_DIR_OR_CHECKPOINT``: checks every checkpoint of a run folder (or one checkpoint) as a
resume would (``checkpoint.verify``: sizes, sha256, ``weights_only=True`` unpickling) and prints one line per
checkpoint. Exit code 0 if all verify, 1 if any fails, 2 if there is no checkpoint there."""

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="condmoe-ckpt", description="Checks condmoe checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every file of every checkpoint (sizes, sha256, unpickling)")
    verify.add_argument("target", type=Path, help="a run folder, its checkpoints folder, or one step_N checkpoint")
    args = parser.parse_args(argv)
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
