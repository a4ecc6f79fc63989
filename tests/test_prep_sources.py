"""Tests of the ``condmoe-prep`` sources on tiny hand-made inputs, of ``verify`` and of the one-line user errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from condmoe.data_prep import cli
from condmoe.data_prep.commands import parts_from_env
from condmoe.data_prep.errors import UserError
from condmoe.data_prep.video import VideoOptions, sample_indices

_TINY = ["--no-progress", "--image-size", "16", "--jpeg-quality", "80"]


# ---------------------------------------------------------------------------------------------------------------------
# Input makers and readers
# ---------------------------------------------------------------------------------------------------------------------


def _jpeg_bytes(seed: int, size: tuple[int, int] = (24, 20), fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _write_mp4(path: Path, num_frames: int = 16, size: tuple[int, int] = (32, 24)) -> None:
    """A real H.264 (or MPEG-4) clip whose frame k is a flat grey of level 8 + 15 k, so samples can be identified."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for k in range(num_frames):
            frame = np.full((size[1], size[0], 3), 8 + 15 * k, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _prep(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(args) == 0
    return capsys.readouterr().out


def _samples(out: Path, name: str) -> list[dict]:
    urls = sorted(str(p) for p in (out / name).glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False))


def _errors(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name / "errors.jsonl").read_text().splitlines()]


def _verify_ok(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["verify", str(out)]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.startswith("OK:")


def _user_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(args)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err, err
    return err


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes x 3 images (JPEG and PNG, one with alpha), a corrupt JPEG, a truncated JPEG, a non-image file."""
    root = tmp_path / "folders"
    for c, name in enumerate(["dog", "cat", "zebra"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            fmt = "PNG" if i == 2 else "JPEG"
            (root / name / f"{i}.{fmt.lower()}").write_bytes(_jpeg_bytes(10 * c + i, (40 + i, 30), fmt))
    Image.new("RGBA", (30, 30), (255, 0, 0, 0)).save(root / "cat" / "alpha.png")
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
    (root / "dog" / "truncated.jpg").write_bytes(_jpeg_bytes(99, (64, 64))[:300])
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "README").write_text("files directly under the root are ignored")
    return root


# ---------------------------------------------------------------------------------------------------------------------
# imagefolder
# ---------------------------------------------------------------------------------------------------------------------


def test_imagefolder(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    printed = _prep(["imagefolder", "--input", str(image_folder), "--out", str(out), "--dataset", "animals",
                     "--shard-size", "4", *_TINY], capsys)
    assert "animals/train: 10 samples in 4 shard(s)" in printed
    assert "skipped 3: bad_image 2, not_an_image 1" in printed
    assert json.loads((out / "classes.json").read_text()) == {"animals": ["cat", "dog", "zebra"]}
    assert json.loads((out / "sizes.json").read_text()) == {"animals/train": 10}
    samples = _samples(out, "animals/train")
    assert len(samples) == 10 and len({s["__key__"] for s in samples}) == 10
    for s in samples:
        meta = json.loads(s["json"])
        assert s["txt"].decode() == meta["class_name"] == ["cat", "dog", "zebra"][int(s["cls"])]
        assert meta["path"].startswith(meta["class_name"] + "/")
        image = Image.open(io.BytesIO(s["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB" and min(image.size) == 16
        assert (meta["width"], meta["height"]) == image.size
    alpha = next(s for s in samples if json.loads(s["json"])["path"] == "cat/alpha.png")
    assert np.asarray(Image.open(io.BytesIO(alpha["jpg"]))).mean() > 240  # transparent -> white, not black
    errors = {e["item"]: e["reason"] for e in _errors(out, "animals/train")}
    assert errors == {"cat/corrupt.jpg": "bad_image", "dog/truncated.jpg": "bad_image", "dog/notes.txt": "not_an_image"}
    _verify_ok(out, capsys)

    # A val split with a subset of the classes keeps the train labels; an unknown class is a user error.
    val = tmp_path / "val"
    (val / "zebra").mkdir(parents=True)
    (val / "zebra" / "z.jpg").write_bytes(_jpeg_bytes(1))
    _prep(["imagefolder", "--input", str(val), "--out", str(out), "--dataset", "animals", "--split", "val", *_TINY],
          capsys)
    assert [int(s["cls"]) for s in _samples(out, "animals/val")] == [2]
    (val / "horse").mkdir()
    (val / "horse" / "h.jpg").write_bytes(_jpeg_bytes(2))
    err = _user_error(["imagefolder", "--input", str(val), "--out", str(out), "--dataset", "animals", "--split",
                       "val", *_TINY], capsys)
    assert "horse" in err and "--classes" in err


# ---------------------------------------------------------------------------------------------------------------------
# coco
# ---------------------------------------------------------------------------------------------------------------------


def test_coco(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in (1, 2, 3):
        (images / f"{i:03d}.jpg").write_bytes(_jpeg_bytes(i, (50, 30)))
    data = {
        "images": [
            {"id": 3, "file_name": "003.jpg"},
            {"id": 1, "file_name": "001.jpg"},
            {"id": 2, "file_name": "002.jpg"},
            {"id": 4, "file_name": "missing.jpg"},
            {"id": 5, "file_name": "001.jpg"},  # no caption
            {"file_name": "no-id.jpg"},
        ],
        "annotations": [
            {"image_id": 1, "caption": "A dog on a sofa. "},
            {"image_id": 3, "caption": "a red\nbus"},
            {"image_id": 1, "caption": "the dog sleeps"},
            {"image_id": 2, "caption": "two cats"},
            {"image_id": 4, "caption": "never seen"},
            {"image_id": 9, "caption": "unknown image"},
            {"image_id": 2},
        ],
    }
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "out"
    printed = _prep(["coco", "--annotations", str(ann), "--images", str(images), "--out", str(out), "--dataset",
                     "coco", *_TINY], capsys)
    assert "coco/train: 3 samples" in printed
    assert "skipped 5: bad_json_row 3, missing_file 1, no_captions 1" in printed
    samples = _samples(out, "coco/train")
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["image_id"] for m in metas] == [1, 2, 3]  # ordered by id
    assert samples[0]["txt"].decode() == "A dog on a sofa.\nthe dog sleeps"
    assert metas[0]["captions"] == ["A dog on a sofa. ", "the dog sleeps"]  # kept as written
    assert samples[2]["txt"].decode() == "a red bus"
    assert not (out / "classes.json").exists()
    _verify_ok(out, capsys)

    ann.write_text("{not json")
    _user_error(["coco", "--annotations", str(ann), "--images", str(images), "--out", str(out), "--dataset", "c2"],
                capsys)


# ---------------------------------------------------------------------------------------------------------------------
# video_csv
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(name="videos")
def videos_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "videos"
    root.mkdir()
    _write_mp4(root / "a.mp4")
    _write_mp4(root / "b.mp4", num_frames=6)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    return root


def _grey_levels(sample: dict) -> list[int]:
    frames = sorted(k for k in sample if k.startswith("f") and k.endswith(".jpg"))
    return [round((float(np.asarray(Image.open(io.BytesIO(sample[k]))).mean()) - 8) / 15) for k in frames]


def test_video_csv_classification_frames(videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "clips.csv"
    table.write_text(
        "path,label\n"
        f"{videos / 'a.mp4'},jumping\n"  # absolute path
        "b.mp4,running\n"
        "broken.mp4,running\n"
        "gone.mp4,jumping\n"
        "a.mp4,\n"  # empty label
        "a.mp4\n"  # missing field
    )
    out = tmp_path / "out"
    printed = _prep(["video_csv", "--csv", str(table), "--video-root", str(videos), "--out", str(out), "--dataset",
                     "actions", "--num-frames", "4", "--video-size", "0", "--no-progress"], capsys)
    assert "actions/train: 2 samples" in printed
    assert "skipped 4: bad_csv_row 2, bad_video 1, missing_file 1" in printed
    assert json.loads((out / "classes.json").read_text()) == {"actions": ["jumping", "running"]}
    a, b = _samples(out, "actions/train")
    assert sorted(k for k in a if "." in k or k in ("cls", "txt", "json")) == [
        "cls", "f00.jpg", "f01.jpg", "f02.jpg", "f03.jpg", "json", "txt"]
    assert (a["cls"], a["txt"]) == (b"0", b"jumping") and (b["cls"], b["txt"]) == (b"1", b"running")
    assert json.loads(a["json"])["frame_indices"] == [2, 6, 10, 14]  # centres of 4 equal segments of 16 frames
    assert _grey_levels(a) == [2, 6, 10, 14]
    assert json.loads(b["json"])["orig_num_frames"] == 6
    _verify_ok(out, capsys)


def test_video_csv_captions_stride_mp4(videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "clips.tsv"
    # Paths relative to the CSV's directory (no --video-root); the first row has a stray extra field.
    table.write_text("video\tcaption\nvideos/a.mp4\ta person jumps\tover a fence\nvideos/a.mp4\ta person, jumping\n")
    args = ["video-csv", "--csv", str(table), "--path-column", "video", "--num-frames", "4", "--frame-sampling",
            "stride", "--frame-stride", "3", "--video-format", "mp4", "--video-size", "16", "--dataset", "clips",
            "--no-progress"]
    out = tmp_path / "out"
    printed = _prep([*args, "--out", str(out)], capsys)
    assert "clips/train: 1 samples" in printed and "bad_csv_row 1" in printed  # the extra tab field
    (sample,) = _samples(out, "clips/train")
    assert sample["txt"] == b"a person, jumping" and "cls" not in sample
    meta = json.loads(sample["json"])
    assert meta["frame_indices"] == [3, 6, 9, 12]  # a 10-frame window centred in 16 frames
    with av.open(io.BytesIO(sample["mp4"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 4 and min(frames[0].shape[:2]) == 16
    assert [round((f.mean() - 8) / 15) for f in frames] == [3, 6, 9, 12]
    # Re-encoding is deterministic, which resume-exactness relies on.
    again = tmp_path / "again"
    _prep([*args, "--out", str(again)], capsys)
    assert _samples(again, "clips/train")[0]["mp4"] == sample["mp4"]


def test_sample_indices() -> None:
    assert sample_indices(16, VideoOptions(num_frames=4)) == [2, 6, 10, 14]
    assert sample_indices(3, VideoOptions(num_frames=4)) == [0, 1, 1, 2]
    assert sample_indices(5, VideoOptions(num_frames=3, sampling="stride", stride=4)) == [0, 4, 4]
    assert sample_indices(100, VideoOptions(num_frames=2, sampling="stride", stride=10)) == [44, 54]


# ---------------------------------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------------------------------


def test_text_lines_paragraphs_and_bpe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_bytes(b"first document\n\n  \nsecond document\r\nthird \xff broken\nlast line no newline")
    (corpus / "sub" / "b.txt").write_text("para one line one\npara one line two\n\n\npara two\n")
    (corpus / "skip.md").write_text("not matched by --glob")
    out = tmp_path / "out"
    printed = _prep(["text", "--input", str(corpus / "a.txt"), "--out", str(out), "--dataset", "mlm", "--shard-size",
                     "2", "--no-progress"], capsys)
    assert "mlm/train: 3 samples in 2 shard(s)" in printed and "skipped 1: bad_text 1" in printed
    assert [s["txt"] for s in _samples(out, "mlm/train")] == [b"first document", b"second document",
                                                               b"last line no newline"]
    assert _errors(out, "mlm/train")[0]["item"].endswith("a.txt:5")

    printed = _prep(["text", "--input", str(corpus / "sub"), "--unit", "paragraph", "--out", str(out), "--dataset",
                     "mlm", "--split", "val", "--train-bpe", "--vocab-size", "300", "--no-progress"], capsys)
    assert [s["txt"] for s in _samples(out, "mlm/val")] == [b"para one line one\npara one line two", b"para two"]
    assert "tokenizer" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["path"] == "tokenizer" and (out / "tokenizer" / "tokenizer.json").is_file()
    assert set(manifest["datasets"]) == {"mlm/train", "mlm/val"}
    assert json.loads((out / "sizes.json").read_text()) == {"mlm/train": 3, "mlm/val": 2}
    _verify_ok(out, capsys)


# ---------------------------------------------------------------------------------------------------------------------
# verify, user errors, SLURM defaults
# ---------------------------------------------------------------------------------------------------------------------


def test_verify_catches_modified_missing_and_stray_shards(image_folder: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _prep(["imagefolder", "--input", str(image_folder), "--out", str(out), "--dataset", "d", "--shard-size", "4",
           *_TINY], capsys)
    shards = sorted((out / "d" / "train").glob("*.tar"))
    with tarfile.open(shards[0]) as tf:
        offset = next(m for m in tf.getmembers() if m.name == "000000000.jpg").offset_data
    data = bytearray(shards[0].read_bytes())
    data[offset : offset + 50] = b"\x00" * 50  # same size, other hash, undecodable image
    shards[0].write_bytes(bytes(data))
    shards[1].unlink()
    (out / "d" / "train" / "extra.tar").write_bytes(shards[2].read_bytes())
    assert cli.main(["verify", str(out), "--workers", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"{shards[0]}: sha256 differs") for line in lines)
    assert any(line.startswith(f"{shards[0]}: sample 000000000: jpg:") for line in lines)
    assert f"{shards[1]}: missing" in lines
    assert f"{out / 'd' / 'train' / 'extra.tar'}: not in the manifest" in lines
    assert cli.main(["verify", str(out), "--no-decode"]) == 1
    assert not any(": jpg:" in line for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize(
    "args",
    [
        ["imagefolder", "--input", "{tmp}/nope", "--out", "{tmp}/o", "--dataset", "d"],
        ["imagefolder", "--input", "{tmp}", "--out", "{tmp}/o", "--dataset", "d", "--jpeg-quality", "101"],
        ["imagefolder", "--input", "{tmp}", "--out", "{tmp}/o", "--dataset", "a/b"],
        ["imagefolder", "--input", "{tmp}", "--out", "{tmp}/o", "--dataset", "d", "--num-parts", "2",
         "--part-index", "2"],
        ["imagefolder", "--input", "{tmp}", "--out", "{tmp}/o", "--dataset", "d", "--shard-bytes", "lots"],
        ["imagefolder", "--input", "{tmp}", "--out", "{tmp}/o", "--dataset", "d", "--workers", "0"],
        ["imagefolder", "--input", "{tmp}/empty", "--out", "{tmp}/o", "--dataset", "d"],
        ["coco", "--annotations", "{tmp}/none.json", "--images", "{tmp}", "--out", "{tmp}/o", "--dataset", "d"],
        ["video_csv", "--csv", "{tmp}/t.csv", "--out", "{tmp}/o", "--dataset", "d"],
        ["video_csv", "--csv", "{tmp}/t.csv", "--out", "{tmp}/o", "--dataset", "d", "--label-column", "nope"],
        ["video_csv", "--csv", "{tmp}/t.csv", "--out", "{tmp}/o", "--dataset", "d", "--num-frames", "101"],
        ["text", "--input", "{tmp}/missing.txt", "--out", "{tmp}/o", "--dataset", "d"],
        ["wds_reindex", "--input", "{tmp}/empty", "--out", "{tmp}/o", "--dataset", "d"],
        ["merge", "{tmp}/empty"],
        ["verify", "{tmp}/nope"],
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "t.csv").write_text("path,comment\na.mp4,hello\n")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "x.jpg").write_bytes(_jpeg_bytes(0))
    _user_error([a.replace("{tmp}", str(tmp_path)) for a in args], capsys)


def test_parts_from_env() -> None:
    assert parts_from_env(None, None, {}) == (1, 0)
    env = {"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert parts_from_env(None, None, env) == (8, 3)
    assert parts_from_env(2, 1, env) == (2, 1)
    with pytest.raises(UserError):
        parts_from_env(None, None, {"SLURM_ARRAY_TASK_COUNT": "x"})
