"""The shard writer (data_prep/shard_writer.py): slicing, byte rollover, and atomic publication of every file."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from condmoe.data_prep import shard_writer
from condmoe.data_prep.shard_writer import SliceWriter, list_shards, sha256_file, write_shards


def _toy_samples(n: int) -> list[dict]:
    return [{"__key__": f"{i:06d}", "txt": f"sample {i}".encode(), "cls": b"0"} for i in range(n)]


def test_write_shards_exact_multiple_and_empty(tmp_path: Path) -> None:
    shards = write_shards(_toy_samples(6), tmp_path / "a", shard_size=3, progress=False)
    assert [(s.name, s.num_samples) for s in shards] == [("shard-000000.tar", 3), ("shard-000001.tar", 3)]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]

    assert write_shards([], tmp_path / "empty", shard_size=3, progress=False) == []
    assert list((tmp_path / "empty").iterdir()) == []


def test_write_shards_interrupted_leaves_no_partial_shard(tmp_path: Path) -> None:
    out = tmp_path / "s"
    out.mkdir()
    (out / "shard-000009.tar").write_bytes(b"stale")  # from an earlier, larger run

    def failing():
        yield from _toy_samples(4)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(failing(), out, shard_size=3, progress=False)
    # The first, full shard was finished and renamed; the partial second one is gone, as are stale shards.
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]


def test_write_shards_handles_percent_in_path(tmp_path: Path) -> None:
    shards = write_shards(_toy_samples(2), tmp_path / "100%d", shard_size=5, progress=False)
    assert (tmp_path / "100%d" / shards[0].name).is_file()


def test_write_shards_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shard_size"):
        write_shards(_toy_samples(1), tmp_path, shard_size=0)


def test_shard_info_matches_the_file_and_tarfile_reads_it(tmp_path: Path) -> None:
    (info,) = write_shards(_toy_samples(3), tmp_path, shard_size=10, progress=False)
    path = tmp_path / info.name
    assert (info.num_samples, info.num_bytes, info.sha256) == (3, path.stat().st_size, sha256_file(path))
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    assert [m.name for m in members][:2] == ["000000.cls", "000000.txt"]  # TarWriter sorts a sample's members
    assert {(m.mtime, m.uname, m.gname, m.mode) for m in members} == {(0, "condmoe", "condmoe", 0o444)}


def test_same_samples_give_identical_bytes(tmp_path: Path) -> None:
    a = write_shards(_toy_samples(5), tmp_path / "a", shard_size=2, progress=False)
    b = write_shards(_toy_samples(5), tmp_path / "b", shard_size=2, progress=False)
    assert a == b


def test_byte_limit_continues_the_slice_in_order(tmp_path: Path) -> None:
    big = [{"__key__": f"{i:06d}", "bin": bytes(3000)} for i in range(5)]
    shards = write_shards(big, tmp_path, shard_size=4, shard_bytes=7200, progress=False)  # 3584 bytes a sample
    assert [(s.name, s.num_samples) for s in shards] == [
        ("shard-000000.tar", 2), ("shard-000000_01.tar", 2), ("shard-000001.tar", 1)]
    assert [p.name for p in list_shards(tmp_path)] == [s.name for s in shards]


def test_a_shard_appears_under_its_final_name_only_when_complete(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        # At the moment of publication the temporary file is a complete, readable tar and the final name is free.
        with tarfile.open(src) as tf:
            seen.append((Path(dst).name, len(tf.getmembers()), Path(dst).exists()))
        real_replace(src, dst)

    monkeypatch.setattr(shard_writer.os, "replace", spy)
    writer = SliceWriter(tmp_path, 7, max_bytes=10**6)
    for sample in _toy_samples(2):
        writer.write(sample)
        assert list_shards(tmp_path) == []  # being written: only a temporary name (<name>.<pid>.tmp) exists
        assert [p.name for p in tmp_path.iterdir()] == [f"shard-000007.tar.{os.getpid()}.tmp"]
    assert [s.name for s in writer.close()] == ["shard-000007.tar"]
    assert seen == [("shard-000007.tar", 4, False)]
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000007.tar"]


def test_abort_drops_the_open_file_and_keeps_finished_ones(tmp_path: Path) -> None:
    writer = SliceWriter(tmp_path, 0, max_bytes=2000)
    for sample in _toy_samples(3):  # 1536 bytes of members per sample: one sample per file
        writer.write(sample)
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar", "shard-000000_01.tar"]


def test_remove_shard_files_touches_only_our_names(tmp_path: Path) -> None:
    for name in ("shard-000001.tar", "shard-000001_01.tar", "shard-000001.tar.123.tmp", "shard-000002.tar",
                 "mine.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    shard_writer.remove_shard_files(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.tar", "notes.txt", "shard-000002.tar"]
    shard_writer.remove_shard_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.tar", "notes.txt"]
