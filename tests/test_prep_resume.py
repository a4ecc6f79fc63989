"""Resume-exactness of ``condmoe-prep``: SIGKILL mid-run then rerun, multi-part jobs and merge, byte-limited shards.

A kill has to land at a known point without sleeps or timing luck, so one input image is a named pipe: a run blocks
when it opens it, after every earlier slice is recorded, and is SIGKILLed there. The pipe is then replaced by a
regular image (the item list, and so the plan, stays the same) and the rerun must produce exactly what a clean run
produces: same manifest, same shard bytes, same errors, no leftovers.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from condmoe.data_prep import cli

REPO = Path(__file__).resolve().parent.parent
_CLASSES = ("ant", "bee", "cow", "doe")
_PER_CLASS = 6


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _image_folder(root: Path, fifo: str | None = None) -> Path:
    """4 classes x 6 JPEGs plus one corrupt file; ``fifo`` (e.g. ``"ant/5.jpg"``) is made a named pipe instead."""
    for c, name in enumerate(_CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(_PER_CLASS):
            (root / name / f"{i}.jpg").write_bytes(_jpeg(10 * c + i))
    (root / "cow" / "broken.jpg").write_bytes(b"not an image")
    if fifo is not None:
        (root / fifo).unlink()
        os.mkfifo(root / fifo)
    return root


def _restore(root: Path, fifo: str) -> None:
    c, i = _CLASSES.index(fifo.split("/")[0]), int(Path(fifo).stem)
    (root / fifo).unlink()
    (root / fifo).write_bytes(_jpeg(10 * c + i))


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["imagefolder", "--input", str(root), "--out", str(out), "--dataset", "img", "--shard-size", "4",
            "--image-size", "8", "--no-progress", *extra]


def _subprocess(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "condmoe.data_prep.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _progress_lines(out: Path) -> int:
    path = out / "img" / "train" / "_progress" / "part-00000-of-00001.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _wait_for_slices(proc: subprocess.Popen, out: Path, records: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _progress_lines(out) < 1 + records:
        if proc.poll() is not None:
            pytest.fail(f"prep exited early ({proc.returncode}): {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no progress recorded in time")
        time.sleep(0.02)


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a prepared directory except the progress records and the lock (paths relative to ``out``)."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and "_progress" not in rel and rel != ".prep.lock":
            files[rel] = p.read_bytes()
    return files


def _clean_run(root: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, bytes]:
    assert cli.main(_args(root, out, *extra)) == 0
    capsys.readouterr()
    return _snapshot(out)


def _rerun(args: list[str]) -> str:
    proc = _subprocess(args)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    return stdout


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_sigkill_after_first_shard_then_rerun_equals_clean_run(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # Sorted items: ant/0..ant/5, bee/0, ... With 4 items per shard, ant/5.jpg is in slice 1: the run writes shard 0,
    # records it, writes ant/4 into slice 1 and blocks opening the pipe.
    root = _image_folder(tmp_path / "in", fifo="ant/5.jpg")
    out = tmp_path / "out"
    proc = _subprocess(_args(root, out))
    _wait_for_slices(proc, out, records=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    split = out / "img" / "train"
    assert (split / "shard-000000.tar").is_file() and not (split / "shard-000001.tar").exists()
    assert not (out / "manifest.json").exists()
    # A kill in the middle of an append leaves a torn last line; the rerun must ignore and cut it.
    with open(split / "_progress" / "part-00000-of-00001.jsonl", "ab") as f:
        f.write(b'{"kind": "slice", "slice": 1, "num_it')

    _restore(root, "ant/5.jpg")
    printed = _rerun(_args(root, out))
    assert "processed 21 items" in printed  # 25 items, the 4 of shard 0 were not redone
    assert "img/train: 24 samples in 7 shard(s)" in printed and "skipped 1: bad_image 1" in printed
    assert not list(split.glob("*.tmp"))

    clean = _clean_run(root, tmp_path / "clean", capsys)
    assert _snapshot(out) == clean  # manifest, sizes, classes, errors.jsonl and every shard, byte for byte
    assert cli.main(["verify", str(out)]) == 0
    # Finished: a third run changes nothing; a shard deleted afterwards is rewritten by the next run.
    assert "already complete" in _rerun(_args(root, out))
    (split / "shard-000003.tar").unlink()
    assert cli.main(_args(root, out)) == 0
    assert "processed 4 items" in capsys.readouterr().out
    assert _snapshot(out) == clean


@pytest.mark.skipif(not (hasattr(os, "mkfifo") and sys.platform.startswith("linux")), reason="needs Linux")
def test_sigkill_with_worker_pool_leaves_no_orphans_and_resumes(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = _image_folder(tmp_path / "in", fifo="ant/5.jpg")
    out = tmp_path / "out"
    proc = _subprocess(_args(root, out, "--workers", "2"))
    # The worker holding slice 1 blocks on the pipe while the other one writes later slices.
    _wait_for_slices(proc, out, records=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while (orphans := _processes_mentioning(str(out))) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in orphans:  # only if the test is about to fail: do not leave them blocked on the pipe
        os.kill(pid, signal.SIGKILL)
    assert not orphans, "workers outlived their SIGKILLed parent"

    _restore(root, "ant/5.jpg")
    printed = _rerun(_args(root, out, "--workers", "2"))
    assert "img/train: 24 samples in 7 shard(s)" in printed
    assert _snapshot(out) == _clean_run(root, tmp_path / "clean", capsys)


def test_parts_merge_equals_single_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = _image_folder(tmp_path / "in")
    clean = _clean_run(root, tmp_path / "clean", capsys)
    out = tmp_path / "out"
    assert cli.main(_args(root, out, "--num-parts", "3", "--part-index", "0")) == 0
    assert "when every part is done: condmoe-prep merge" in capsys.readouterr().out
    assert cli.main(_args(root, out, "--num-parts", "3", "--part-index", "1", "--workers", "2")) == 0
    capsys.readouterr()
    assert cli.main(["merge", str(out)]) == 1
    assert "img/train: part 2 of 3 missing" in capsys.readouterr().err

    # Part 2 as a SLURM array task (--array=1-3: the task id is taken relative to the minimum).
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    assert cli.main(_args(root, out)) == 0
    assert "part 2 of 3" in capsys.readouterr().out

    # A part whose last slice record is lost is incomplete: merge names it, rerunning the part repairs it.
    part1 = out / "img" / "train" / "_progress" / "part-00001-of-00003.jsonl"
    lines = part1.read_bytes().splitlines(keepends=True)
    part1.write_bytes(b"".join(lines[:-1]))
    assert cli.main(["merge", str(out)]) == 1
    assert "img/train: part 1 of 3 incomplete (1 of 2 shards missing)" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert cli.main(_args(root, out)) == 0
    assert cli.main(["merge", str(out)]) == 0
    assert "img/train: 24 samples in 7 shard(s)" in capsys.readouterr().out
    assert _snapshot(out) == clean


def test_other_run_needs_overwrite_and_stale_shards_go(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _image_folder(tmp_path / "in")
    out = tmp_path / "out"
    assert cli.main(_args(root, out, "--num-parts", "2", "--part-index", "0")) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:  # other options over unmerged progress: refuse, one line
        cli.main([*_args(root, out), "--shard-size", "10"])
    assert excinfo.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert cli.main([*_args(root, out), "--shard-size", "10", "--overwrite"]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in (out / "img" / "train").glob("*.tar"))
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]  # 4-item shards 3.. are gone
    assert _snapshot(out) == _clean_run(root, tmp_path / "clean", capsys, "--shard-size", "10")


def test_byte_limit_splits_a_slice_in_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _image_folder(tmp_path / "in")
    out = tmp_path / "out"
    assert cli.main([*_args(root, out), "--shard-size", "10", "--shard-bytes", "5k"]) == 0
    assert "img/train: 24 samples in" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())["datasets"]["img/train"]
    names = [s["name"] for s in manifest["shards"]]
    assert names[:2] == ["shard-000000.tar", "shard-000000_01.tar"] and names == sorted(names)
    assert all(s["num_bytes"] <= 5000 + 10240 for s in manifest["shards"])
    urls = [str(out / "img" / "train" / n) for n in names]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None)]
    assert keys == sorted(keys) and len(keys) == 24
    assert cli.main(["verify", str(out)]) == 0
