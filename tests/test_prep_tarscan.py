"""The tar scanner (data_prep/tarscan.py): samples from headers, and every way an archive can be damaged."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from condmoe.data_prep.shard_writer import write_shards
from condmoe.data_prep.tarscan import read_member, scan_tar
from condmoe.data_prep.verify import MAX_TAIL


def _members(n: int) -> list[tuple[str, bytes]]:
    return [(f"{i:03d}.{ext}", f"{ext} of {i}".encode() * (30 if ext == "jpg" else 1))
            for i in range(n) for ext in ("cls", "jpg", "txt")]


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _offset(blob: bytes, name: str, data: bool = False) -> int:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        member = tf.getmember(name)
    return member.offset_data if data else member.offset


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_sound_archive_groups_members_and_reads_them_back(fmt: int) -> None:
    long = [("some/dir/" + "d" * 120 + ".jpg", b"long name")] if fmt != tarfile.USTAR_FORMAT else []
    members = [*_members(2), *long]
    blob = _tar(members, fmt)
    scan = scan_tar(io.BytesIO(blob), max_tail=MAX_TAIL)
    assert scan.damage is None and scan.num_complete == 2 + len(long)
    assert [(s.key, [m.ext for m in s.members]) for s in scan.samples] == [
        ("000", ["cls", "jpg", "txt"]), ("001", ["cls", "jpg", "txt"]),
        *[("some/dir/" + "d" * 120, ["jpg"])] * len(long)]
    f = io.BytesIO(blob)
    assert [(m.name, read_member(f, m)) for s in scan.samples for m in s.members] == members
    first = scan.samples[0]
    assert first.start == 0 and first.end == scan.samples[1].start  # byte ranges tile the archive


def test_our_own_shards_are_sound_under_the_strict_rule(tmp_path: Path) -> None:
    samples = [{"__key__": f"{i:06d}", "txt": b"x", "cls": b"1"} for i in range(5)]
    (info,) = write_shards(samples, tmp_path, shard_size=10, progress=False)
    scan = scan_tar(tmp_path / info.name, max_tail=MAX_TAIL)
    assert scan.damage is None and [s.key for s in scan.samples] == [s["__key__"] for s in samples]


def test_truncated_inside_a_member_keeps_what_came_before() -> None:
    blob = _tar(_members(3))
    cut = blob[:_offset(blob, "001.jpg", data=True) + 100]
    for max_tail in (None, MAX_TAIL):
        scan = scan_tar(io.BytesIO(cut), max_tail=max_tail)
        assert scan.damage == "truncated inside 001.jpg"
        assert [(s.key, s.complete, [m.ext for m in s.members]) for s in scan.samples] == [
            ("000", True, ["cls", "jpg", "txt"]), ("001", False, ["cls"])]


def test_missing_end_block_is_damage_under_both_rules() -> None:
    blob = _tar(_members(2))
    cut = blob[:_offset(blob, "001.cls")]  # a cut exactly at a header boundary: tarfile stops quietly
    scan = scan_tar(io.BytesIO(cut))
    assert scan.damage == "no end-of-archive marker (truncated?) after 1 samples"
    assert [s.complete for s in scan.samples] == [False]  # cut at a member boundary: it may lack members
    strict = scan_tar(io.BytesIO(cut), max_tail=MAX_TAIL)
    assert strict.damage == f"no end-of-archive marker at byte {len(cut)} after 1 samples"


def test_truncated_tail_rules_differ() -> None:
    blob = _tar(_members(2))
    end = _offset(blob, "001.txt", data=True) + 512
    short_tail = blob[:end + 1024]  # the end-of-archive marker, but not the record padding
    assert scan_tar(io.BytesIO(short_tail)).damage is None
    assert scan_tar(io.BytesIO(short_tail), max_tail=MAX_TAIL).damage is None
    long_tail = blob + bytes(MAX_TAIL)  # zeros, but far more than a record's padding
    assert scan_tar(io.BytesIO(long_tail)).damage is None
    assert scan_tar(io.BytesIO(long_tail), max_tail=MAX_TAIL).damage.startswith("no end-of-archive marker at byte")


def test_garbage_where_the_end_should_be() -> None:
    blob = bytearray(_tar(_members(2)))
    header = _offset(bytes(blob), "001.cls")
    blob[header:header + 512] = b"\x07" * 512  # a garbled header: tarfile takes it for the end
    lenient = scan_tar(io.BytesIO(bytes(blob)))
    assert lenient.damage is None and len(lenient.samples) == 1  # only the end marker room is checked
    strict = scan_tar(io.BytesIO(bytes(blob)), max_tail=MAX_TAIL)
    assert strict.damage == f"unreadable header at byte {header} after 1 samples"
    assert [s.complete for s in strict.samples] == [False]


def test_corrupt_first_header_and_unreadable_files(tmp_path: Path) -> None:
    blob = bytearray(_tar(_members(1)))
    blob[100:108] = b"garbage!"  # the mode field: bad checksum
    scan = scan_tar(io.BytesIO(bytes(blob)))
    assert scan.samples == [] and scan.damage.startswith("not a readable tar:")
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert scan_tar(empty).damage == "not a readable tar: empty file"
    assert scan_tar(tmp_path / "missing.tar").damage.startswith("not a readable tar: [Errno 2]")


def test_corrupt_later_header_is_damage_after_the_samples_before_it() -> None:
    name = "x" * 200 + ".txt"
    blob = bytearray(_tar([*_members(1), (name, b"t"), *_members(3)[3:]], tarfile.GNU_FORMAT))
    header = _offset(bytes(blob), name) + 1024  # after the GNU long-name header and its one data block
    blob[header:header + 512] = b"\x07" * 512  # tarfile raises for a bad header that follows a long name
    scan = scan_tar(io.BytesIO(bytes(blob)))
    assert scan.damage is not None and scan.damage.startswith("damaged after 1 samples")
    assert [s.key for s in scan.samples] == ["000"] and not scan.samples[-1].complete


def test_scattered_key_is_two_samples_and_odd_members_are_skipped() -> None:
    blob = _tar([("000.jpg", b"a"), ("001.jpg", b"b"), ("000.txt", b"c"), ("README", b"no key")])
    scan = scan_tar(io.BytesIO(blob))
    assert [s.key for s in scan.samples] == ["000", "001", "000"] and scan.damage is None


def test_read_member_of_a_changed_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    path.write_bytes(_tar(_members(1)))
    scan = scan_tar(path)
    with open(path, "r+b") as f:
        f.truncate(scan.samples[0].members[1].data_offset + 3)
        with pytest.raises(OSError, match="short read of 000.jpg"):
            read_member(f, scan.samples[0].members[1])
