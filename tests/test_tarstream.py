"""Tier 1: the fast tar reader gives what Python's tarfile gives, for every header format shard writers use."""

import io
import tarfile

import pytest

from condmoe.train.tarstream import TruncatedShard, tar_members, tar_samples


def make_tar(fmt: int, members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        directory = tarfile.TarInfo("some/dir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
    return buffer.getvalue()


LONG = "d" * 120 + "/000001.jpg"  # beyond the 100-byte name field
MEMBERS = [("000000.jpg", b"\xff\xd8jpeg"), ("000000.cls", b"3"), ("000000.txt", "naïve café".encode()),
           (LONG, b"x" * 1000), ("000002.json", b"{}")]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile(fmt):
    members = [m for m in MEMBERS if fmt != tarfile.USTAR_FORMAT or len(m[0]) < 256]
    blob = make_tar(fmt, members)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    assert list(tar_members(io.BytesIO(blob))) == expected == members


def test_truncated_tar_raises():
    blob = make_tar(tarfile.PAX_FORMAT, MEMBERS)
    with pytest.raises(TruncatedShard):
        list(tar_members(io.BytesIO(blob[:1500])))


def test_samples_group_by_key_and_keep_what_preceded_an_error(tmp_path):
    good = tmp_path / "good.tar"
    good.write_bytes(make_tar(tarfile.PAX_FORMAT, MEMBERS[:3] + [("000001.jpg", b"j"), ("000001.cls", b"1")]))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[:2560])  # the first sample's members, then a cut
    errors = []
    samples = list(tar_samples([{"url": str(good)}, {"url": str(cut)}], handler=lambda e: errors.append(e) or True))
    assert [s["__key__"] for s in samples][:2] == ["000000", "000001"]
    assert samples[0]["cls"] == b"3" and samples[0]["txt"] == "naïve café".encode()
    assert errors and str(cut) in errors[0].args
