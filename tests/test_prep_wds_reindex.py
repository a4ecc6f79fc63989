"""condmoe-prep wds_reindex: re-indexing img2dataset / video2dataset shards, their stats and parquet cross-checks,
and the downloaders own failures counted per reason."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from test_prep_sources import (
    _TINY,
    _errors,
    _grey_levels,
    _jpeg_bytes,
    _prep,
    _samples,
    _verify_ok,
    videos_fixture,  # noqa: F401  (the fixture `videos`)
)

# ---------------------------------------------------------------------------------------------------------------------
# wds_reindex
# ---------------------------------------------------------------------------------------------------------------------


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _img2dataset_shard(path: Path, samples: list[dict[str, bytes]], successes: int) -> None:
    with tarfile.open(path, "w") as tf:
        for sample in samples:
            for ext, data in sample.items():
                if ext != "key":
                    _add(tf, f"{sample['key'].decode()}.{ext}", data)
    stats = {"count": successes + 1, "successes": successes, "failed_to_download": 1, "failed_to_resize": 0}
    path.with_name(f"{path.stem}_stats.json").write_text(json.dumps(stats))


def _pair(key: str, caption: str, jpg: bytes | None = None) -> dict[str, bytes]:
    sample = {"key": key.encode(), "txt": caption.encode(), "json": json.dumps({"key": key, "url": "x"}).encode()}
    if jpg is not None:
        sample["jpg"] = jpg
    return sample


@pytest.fixture
def img2dataset_dir(tmp_path: Path) -> Path:
    """Shard 00000: 3 good pairs + 1 without its jpg; shard 00001: a good pair, a corrupt jpg, then cut off."""
    root = tmp_path / "img2dataset"
    root.mkdir()
    first = [_pair(f"00000000{i}", f"caption {i}", _jpeg_bytes(i, (48, 32))) for i in range(3)]
    _img2dataset_shard(root / "00000.tar", [*first, _pair("000000003", "no image")], successes=4)
    second = [
        _pair("000010000", "good one", _jpeg_bytes(7)),
        _pair("000010001", "corrupt", b"\xff\xd8 garbage"),
        _pair("000010002", "cut here", _jpeg_bytes(8, (64, 64))),
        _pair("000010003", "never written", _jpeg_bytes(9)),
    ]
    _img2dataset_shard(root / "00001.tar", second, successes=4)
    with tarfile.open(root / "00001.tar") as tf:
        cut = next(m for m in tf.getmembers() if m.name == "000010002.jpg").offset_data + 100
    with open(root / "00001.tar", "r+b") as f:
        f.truncate(cut)
    return root


def test_wds_reindex_stats_truncation_missing_key(img2dataset_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    printed = _prep(["wds_reindex", "--input", str(img2dataset_dir), "--out", str(out), "--dataset", "laion",
                     *_TINY], capsys)
    assert "laion/train: 4 samples" in printed
    assert "skipped 3: bad_image 1, missing_key 1, truncated_tar 1" in printed
    assert "stats cross-check: 8 successes in the stats files, 6 samples found in 2 tar(s)" in printed
    assert "stats mismatch: 00001.tar: _stats.json says 4 successes, found 2" in printed
    assert json.loads((out / "sizes.json").read_text()) == {"laion/train": 4}
    samples = _samples(out, "laion/train")
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002", "000000004"]  # item numbers
    meta = json.loads(samples[3]["json"])
    assert (meta["source_shard"], meta["source_key"], meta["url"]) == ("00001.tar", "000010000", "x")
    assert samples[3]["txt"] == b"good one" and min(Image.open(io.BytesIO(samples[3]["jpg"])).size) == 16
    notes = json.loads((out / "manifest.json").read_text())["datasets"]["laion/train"]["notes"]
    assert notes["stats_successes"] == 8 and notes["samples_found"] == 6
    assert notes["stats_mismatches"] == [{"shard": "00001.tar", "stats_successes": 4, "found": 2}]
    reasons = {e["item"]: e["reason"] for e in _errors(out, "laion/train")}
    assert reasons == {"00000.tar:000000003": "missing_key", "00001.tar:000010001": "bad_image",
                       "00001.tar:000010002": "truncated_tar"}
    _verify_ok(out, capsys)


def test_wds_reindex_parquet_cross_check(img2dataset_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    for stem, statuses in (("00000", ["success"] * 4 + ["failed_to_download"]), ("00001", ["success"] * 2)):
        pq.write_table(pa.table({"status": statuses}), img2dataset_dir / f"{stem}.parquet")
    out = tmp_path / "out"
    printed = _prep(["wds_reindex", "--input", str(img2dataset_dir), "--out", str(out), "--dataset", "laion",
                     *_TINY], capsys)
    assert "parquet mismatch" not in printed
    notes = json.loads((out / "manifest.json").read_text())["datasets"]["laion/train"]["notes"]
    assert notes["parquet_checked"] and notes["parquet_successes"] == 6


def test_wds_reindex_video_without_pyarrow_needed(videos: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "video2dataset"
    root.mkdir()
    clip = (videos / "a.mp4").read_bytes()
    samples = [{"key": b"000000000", "mp4": clip, "txt": b"a clip", "json": b"{}"},
               {"key": b"000000001", "mp4": b"not a video", "txt": b"broken", "json": b"{}"},
               {"key": b"000000002", "mp4": clip, "txt": b"bad meta", "json": b"[1, 2"}]
    _img2dataset_shard(root / "00000.tar", samples, successes=3)
    out = tmp_path / "out"
    printed = _prep(["wds_reindex", "--input", str(root), "--out", str(out), "--dataset", "webvid", "--num-frames",
                     "2", "--video-size", "0", "--no-progress"], capsys)
    assert "webvid/train: 1 samples" in printed and "skipped 2: bad_json 1, bad_video 1" in printed
    (sample,) = _samples(out, "webvid/train")
    assert {"f00.jpg", "f01.jpg", "txt", "json"} <= set(sample) and _grey_levels(sample) == [4, 12]
    _verify_ok(out, capsys)


def _stats_file(tar: Path, status: dict[str, int], **categories: int) -> None:
    """``NNNNN_stats.json`` as img2dataset / video2dataset write it (logger.write_stats)."""
    successes = status.get("success", 0)
    stats = {"count": sum(status.values()), "successes": successes, **categories, "duration": 1.5,
             "start_time": 1700000000.0, "end_time": 1700000001.5, "status_dict": status}
    tar.with_name(f"{tar.stem}_stats.json").write_text(json.dumps(stats, indent=4))


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for sample in samples:
            for ext, data in sample.items():
                if ext != "key":
                    _add(tf, f"{sample['key'].decode()}.{ext}", data)


def _meta(key: str, status: str, error: str | None = None) -> bytes:
    return json.dumps({"url": f"http://x/{key}", "key": key, "status": status, "error_message": error}).encode()


def test_wds_reindex_counts_img2dataset_failures_per_reason(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """img2dataset writes only successes to the tar; a decoding error and an HTTP 404 live in _stats.json only."""
    root = tmp_path / "img2dataset"
    root.mkdir()
    samples = [{"key": f"00000000{i}".encode(), "jpg": _jpeg_bytes(i, (48, 32)), "txt": f"caption {i}".encode(),
                "json": _meta(f"00000000{i}", "success")} for i in (0, 2)]
    _write_tar(root / "00000.tar", samples)
    _stats_file(root / "00000.tar", {"success": 2, "Image decoding error": 1, "HTTP Error 404: Not Found": 1},
                failed_to_download=1, failed_to_resize=1)
    out = tmp_path / "out"
    printed = _prep(["wds_reindex", "--input", str(root), "--out", str(out), "--dataset", "laion", *_TINY], capsys)
    assert "laion/train: 2 samples" in printed and "skipped 0" in printed
    assert "upstream failures 2 (not in the input tars): failed_to_download 1, failed_to_resize 1" in printed
    assert "upstream errors: HTTP Error 404: Not Found 1, Image decoding error 1" in printed
    assert "stats mismatch" not in printed
    entry = json.loads((out / "manifest.json").read_text())["datasets"]["laion/train"]
    assert entry["notes"]["upstream_failures"] == {"failed_to_download": 1, "failed_to_resize": 1}
    assert entry["notes"]["upstream_errors"] == {"HTTP Error 404: Not Found": 1, "Image decoding error": 1}
    assert entry["skipped"] == {} and entry["num_samples"] == 2
    _verify_ok(out, capsys)


def test_wds_reindex_counts_video2dataset_failed_samples(videos: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """video2dataset writes a failed sample as .txt + .json with its status: an upstream failure, not missing_key;
    shard 00000 has its stats file, shard 00001 none (the samples' statuses are counted then)."""
    root = tmp_path / "video2dataset"
    root.mkdir()
    clip = (videos / "a.mp4").read_bytes()
    _write_tar(root / "00000.tar", [
        {"key": b"000000000", "mp4": clip, "txt": b"a clip", "json": _meta("000000000", "success")},
        {"key": b"000000001", "txt": b"gone", "json": _meta("000000001", "failed_to_download", "Video unavailable")},
    ])
    _stats_file(root / "00000.tar", {"success": 1, "Video unavailable": 1}, failed_to_download=1,
                failed_to_subsample=0)
    _write_tar(root / "00001.tar", [
        {"key": b"000010000", "txt": b"cut", "json": _meta("000010000", "failed_to_subsample", "corrupted sample")},
        {"key": b"000010001", "mp4": clip, "txt": b"kept", "json": _meta("000010001", "success")},
        {"key": b"000010002", "txt": b"no video, no status", "json": b"{}"},
    ])
    out = tmp_path / "out"
    printed = _prep(["wds_reindex", "--input", str(root), "--out", str(out), "--dataset", "webvid", "--num-frames",
                     "2", "--video-size", "0", "--no-progress"], capsys)
    assert "webvid/train: 2 samples" in printed and "skipped 1: missing_key 1" in printed
    assert "upstream failures 2 (not in the input tars): failed_to_download 1, failed_to_subsample 1" in printed
    assert "upstream errors: Video unavailable 1, corrupted sample 1" in printed
    assert "stats cross-check: 1 successes in the stats files, 3 samples found in 2 tar(s)" in printed
    assert "stats mismatch" not in printed  # the failed sample of 00000.tar is not a found one
    notes = json.loads((out / "manifest.json").read_text())["datasets"]["webvid/train"]["notes"]
    assert notes["upstream_failures"] == {"failed_to_download": 1, "failed_to_subsample": 1}
    assert notes["missing_stats"] == ["00001.tar"]
    assert [e["item"] for e in _errors(out, "webvid/train")] == ["00001.tar:000010002"]


