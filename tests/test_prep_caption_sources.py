"""Tests of the caption benchmark sources (``karpathy``, ``msrvtt``, ``msvd``) on tiny hand-made layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_prep_sources import _TINY, _errors, _jpeg_bytes, _prep, _samples, _user_error, _verify_ok, _write_mp4

from condmoe.data_prep.sources.video_captions import clip_order_key

_CLIP = ["--num-frames", "2", "--video-size", "16", "--no-progress"]


def _metas(out: Path, name: str) -> list[dict]:
    return [json.loads(s["json"]) for s in _samples(out, name)]


def _captions(out: Path, name: str) -> dict[str, list[str]]:
    """Sample ``.txt`` lines by image or clip id."""
    found = {}
    for s in _samples(out, name):
        meta = json.loads(s["json"])
        found[str(meta.get("image_id", meta.get("clip_id")))] = s["txt"].decode().split("\n")
    return found


# ---------------------------------------------------------------------------------------------------------------------
# karpathy
# ---------------------------------------------------------------------------------------------------------------------


def _sentences(*raws: str) -> list[dict]:
    return [{"raw": r, "tokens": r.lower().split()} for r in raws]


def test_karpathy_coco_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "coco"
    for folder in ("train2014", "val2014"):
        (images / folder).mkdir(parents=True)
    rows = [
        (30, "train2014", "train", _sentences("A dog runs. ", "a brown\ndog", "the dog")),
        (10, "val2014", "restval", _sentences("two cats", "cats on a bed")),
        (20, "val2014", "val", _sentences("a red bus")),
        (40, "val2014", "test", _sentences("a boat", "the sea")),
        (50, "train2014", "train", _sentences("never written")),  # no image file
        (60, "train2014", "train", []),  # no sentence
        (70, "train2014", "train", [{"tokens": ["no", "raw"]}, *_sentences("a kite")]),
    ]
    entries = []
    for i, (cocoid, folder, split, sentences) in enumerate(rows):
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        if cocoid != 50:
            (images / folder / name).write_bytes(_jpeg_bytes(cocoid, (40, 30)))
        entries.append({"filepath": folder, "filename": name, "imgid": i, "split": split, "sentences": sentences,
                        "cocoid": cocoid})
    entries.append({**entries[0], "imgid": 99})  # duplicate cocoid
    entries.append({**entries[2], "split": "holdout"})
    split_json = tmp_path / "dataset_coco.json"
    split_json.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    out = tmp_path / "out"
    args = ["karpathy", "--split-json", str(split_json), "--images", str(images), "--out", str(out), "--dataset",
            "coco", *_TINY]

    printed = _prep(args, capsys)
    assert "coco/train: 3 samples" in printed
    assert "skipped 5: bad_json_row 3, missing_file 1, no_captions 1" in printed
    assert "coco train+restval: 5 images, 7 captions" in printed
    metas = _metas(out, "coco/train")
    assert [m["image_id"] for m in metas] == [10, 30, 70]  # by cocoid, restval included
    assert [m["karpathy_split"] for m in metas] == ["restval", "train", "train"]
    assert metas[1]["file_name"] == "train2014/COCO_train2014_000000000030.jpg" and metas[1]["imgid"] == 0
    assert metas[1]["captions"] == ["A dog runs. ", "a brown\ndog", "the dog"]  # as written
    assert _captions(out, "coco/train") == {"10": ["two cats", "cats on a bed"],
                                            "30": ["A dog runs.", "a brown dog", "the dog"], "70": ["a kite"]}
    errors = {(e["item"], e["reason"]) for e in _errors(out, "coco/train")}
    assert errors == {("images[7]", "bad_json_row"), ("images[8]", "bad_json_row"),  # the duplicate, the holdout
                      ("images[6].sentences[0]", "bad_json_row"),
                      ("train2014/COCO_train2014_000000000050.jpg", "missing_file"),
                      ("train2014/COCO_train2014_000000000060.jpg", "no_captions")}

    for split, ids in (("val", {"20": ["a red bus"]}), ("test", {"40": ["a boat", "the sea"]})):
        printed = _prep([*args, "--split", split], capsys)
        assert f"coco/{split}: 1 samples" in printed and "skipped 1: bad_json_row 1" in printed  # the holdout row
        assert _captions(out, f"coco/{split}") == ids
    _prep([*args, "--dataset", "coco_norestval", "--no-restval"], capsys)
    assert [m["image_id"] for m in _metas(out, "coco_norestval/train")] == [30, 70]
    assert json.loads((out / "sizes.json").read_text()) == {"coco/train": 3, "coco/val": 1, "coco/test": 1,
                                                           "coco_norestval/train": 2}
    _verify_ok(out, capsys)

    assert "train, val and test" in _user_error([*args, "--split", "restval"], capsys)
    split_json.write_text('{"images": [')
    assert "cannot read JSON" in _user_error([*args, "--dataset", "c2"], capsys)
    split_json.write_text('{"dataset": "coco"}')
    assert "'images' list" in _user_error([*args, "--dataset", "c2"], capsys)


def test_karpathy_flickr30k(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    entries = []
    for imgid, split in ((3, "train"), (1, "train"), (2, "val"), (0, "test")):
        name = f"{1000 + imgid}.jpg"
        (images / name).write_bytes(_jpeg_bytes(imgid))
        entries.append({"filename": name, "imgid": imgid, "split": split,
                        "sentences": _sentences(*(f"caption {k} of {name}" for k in range(5)))})
    split_json = tmp_path / "dataset_flickr30k.json"
    split_json.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    out = tmp_path / "out"
    for split, ids in (("train", [1, 3]), ("val", [2]), ("test", [0])):
        printed = _prep(["karpathy", "--split-json", str(split_json), "--images", str(images), "--out", str(out),
                         "--dataset", "f30k", "--split", split, *_TINY], capsys)
        assert "skipped 0" in printed
        metas = _metas(out, f"f30k/{split}")
        assert [m["image_id"] for m in metas] == ids and all("cocoid" not in m for m in metas)
        assert [m["file_name"] for m in metas] == [f"{1000 + i}.jpg" for i in ids]
        assert all(len(lines) == 5 for lines in _captions(out, f"f30k/{split}").values())
    _verify_ok(out, capsys)


# ---------------------------------------------------------------------------------------------------------------------
# msrvtt
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(name="msrvtt")
def msrvtt_fixture(tmp_path: Path) -> dict[str, Path]:
    """Clips video0-4 and video10 (video5 listed without a file); the official split in two files; a 1k-A CSV."""
    videos = tmp_path / "msrvtt" / "videos"
    videos.mkdir(parents=True)
    for clip in ("video0", "video1", "video2", "video3", "video4", "video10"):
        _write_mp4(videos / f"{clip}.mp4", num_frames=4)
    train_val = {
        "videos": [{"video_id": v, "split": s, "id": i} for i, (v, s) in
                   enumerate([("video10", "train"), ("video0", "train"), ("video1", "train"), ("video2", "validate")])],
        "sentences": [{"video_id": v, "caption": c, "sen_id": i} for i, (v, c) in enumerate([
            ("video0", "a man sings"), ("video10", "a cat jumps"), ("video0", "someone is singing"),
            ("video1", ""), ("video1", "a car drives"), ("video2", "people dance"), ("video3", "a dog barks"),
            ("video42", "no such clip")])],
    }
    test = {
        "videos": [{"video_id": v, "split": "test"} for v in ("video3", "video4", "video5")],
        "sentences": [{"video_id": v, "caption": c} for v, c in [
            ("video3", "a dog is barking"), ("video4", "a woman cooks"), ("video4", "cooking"),
            ("video5", "unseen")]],
    }
    (tmp_path / "msrvtt" / "train_val_videodatainfo.json").write_text(json.dumps(train_val))
    (tmp_path / "msrvtt" / "test_videodatainfo.json").write_text(json.dumps(test))
    (tmp_path / "msrvtt" / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n"
        "ret0,msr4,video4,a woman is cooking in a kitchen\n"
        "ret1,msr3,video3,a dog barks at the door\n"
        "ret2,msr1,video1,\n"
        "ret3,msr3,video3,a duplicate row\n"
    )
    return {"root": tmp_path / "msrvtt", "videos": videos}


def _annotations(root: Path) -> list[str]:
    return [str(root / "train_val_videodatainfo.json"), str(root / "test_videodatainfo.json")]


def test_msrvtt_official_split(msrvtt: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = msrvtt["root"]
    out = tmp_path / "out"
    args = ["msrvtt", "--annotations", *_annotations(root),
            "--videos", str(msrvtt["videos"]), "--out", str(out), "--dataset", "msrvtt", *_CLIP]
    printed = _prep(args, capsys)
    assert "msrvtt/train: 3 samples" in printed and "skipped 2: bad_json_row 2" in printed
    assert "msrvtt train (official): 3 clips, 4 captions" in printed
    assert [m["clip_id"] for m in _metas(out, "msrvtt/train")] == ["video0", "video1", "video10"]
    assert _captions(out, "msrvtt/train") == {"video0": ["a man sings", "someone is singing"],
                                              "video1": ["a car drives"], "video10": ["a cat jumps"]}
    assert {e["item"] for e in _errors(out, "msrvtt/train")} == {"train_val_videodatainfo.json:sentences[3]",
                                                                  "train_val_videodatainfo.json:sentences[7]"}
    (sample, *_) = _samples(out, "msrvtt/train")
    assert {"f00.jpg", "f01.jpg", "txt", "json"} <= set(sample) and json.loads(sample["json"])["num_frames"] == 2

    printed = _prep([*args, "--split", "val"], capsys)
    assert "msrvtt/val: 1 samples" in printed and "skipped 1: bad_json_row 1" in printed  # video42 only
    printed = _prep([*args, "--split", "test"], capsys)
    assert "msrvtt/test: 2 samples" in printed and "missing_file 1" in printed
    assert _captions(out, "msrvtt/test") == {"video3": ["a dog barks", "a dog is barking"],  # both files' captions
                                             "video4": ["a woman cooks", "cooking"]}
    _verify_ok(out, capsys)

    (root / "bad.json").write_text('{"videos": []')
    assert "cannot read JSON" in _user_error([*args[:2], str(root / "bad.json"), *args[4:]], capsys)
    (root / "bad.json").write_text('{"videos": []}')
    assert "'sentences' lists" in _user_error([*args[:2], str(root / "bad.json"), *args[4:]], capsys)


def test_msrvtt_1k_a(msrvtt: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = msrvtt["root"]
    out = tmp_path / "out"
    args = ["msrvtt", "--annotations", *_annotations(root),
            "--test-csv", str(root / "MSRVTT_JSFUSION_test.csv"), "--videos", str(msrvtt["videos"]), "--out", str(out),
            "--dataset", "msrvtt1ka", *_CLIP]
    printed = _prep([*args, "--split", "test"], capsys)
    assert "msrvtt1ka/test: 2 samples" in printed and "skipped 2: bad_csv_row 2" in printed
    metas = _metas(out, "msrvtt1ka/test")
    assert [(m["clip_id"], m["key"]) for m in metas] == [("video4", "ret0"), ("video3", "ret1")]  # CSV order
    assert _captions(out, "msrvtt1ka/test") == {"video4": ["a woman is cooking in a kitchen"],
                                                "video3": ["a dog barks at the door"]}  # the CSV's one sentence

    printed = _prep(args, capsys)  # train: every annotated clip but the test ones (the 9k set)
    assert "1k-A: 2 test clips left out of train" in printed and "missing_file 1" in printed
    metas = _metas(out, "msrvtt1ka/train")
    assert [m["clip_id"] for m in metas] == ["video0", "video1", "video2", "video10"]
    assert metas[2]["msrvtt_split"] == "validate"
    _prep([*args, "--dataset", "msrvtt7k", "--train-7k"], capsys)
    assert [m["clip_id"] for m in _metas(out, "msrvtt7k/train")] == ["video0", "video1", "video2", "video10"]
    _verify_ok(out, capsys)
    assert "no val split" in _user_error([*args, "--split", "val"], capsys)
    assert "--train-7k needs --test-csv" in _user_error([*args[:4], *args[6:], "--train-7k"], capsys)


def test_msrvtt_7k_and_9k_differ(msrvtt: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A 1k-A test of one official test clip: the 9k train keeps the other test clips, the 7k train does not.
    root = msrvtt["root"]
    (root / "one.csv").write_text("key,vid_key,video_id,sentence\nret0,msr3,video3,a dog\n")
    out = tmp_path / "out"
    args = ["msrvtt", "--annotations", *_annotations(root),
            "--test-csv", str(root / "one.csv"), "--videos", str(msrvtt["videos"]), "--out", str(out), *_CLIP]
    _prep([*args, "--dataset", "nine"], capsys)
    _prep([*args, "--dataset", "seven", "--train-7k"], capsys)
    assert [m["clip_id"] for m in _metas(out, "nine/train")] == ["video0", "video1", "video2", "video4", "video10"]
    assert [m["clip_id"] for m in _metas(out, "seven/train")] == ["video0", "video1", "video2", "video10"]


def test_clip_order_key() -> None:
    ids = ["video10", "video9", "video100", "video0", "clip2b", "clip2a"]
    assert sorted(ids, key=clip_order_key) == ["clip2a", "clip2b", "video0", "video9", "video10", "video100"]


# ---------------------------------------------------------------------------------------------------------------------
# msvd
# ---------------------------------------------------------------------------------------------------------------------


def test_msvd_split_by_sorted_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    videos = tmp_path / "YouTubeClips"
    videos.mkdir()
    # Code-point order: '-' < 'B' < '_' < 'a' < 'z'; aaa_1_2 has no file.
    for clip in ("zzz_9_9", "-abc_1_2", "_x_5_6", "Bcd_3_4"):
        _write_mp4(videos / f"{clip}.avi", num_frames=4)
    descriptions = tmp_path / "AllVideoDescriptions.txt"
    descriptions.write_bytes(
        b"# MSVD descriptions\n# VideoID Description\n\n"
        b"zzz_9_9 a man is slicing a tomato\n"
        b"-abc_1_2 a cat plays piano\n"
        b"Bcd_3_4\n"  # no caption
        b"Bcd_3_4 a girl rides a horse\n"
        b"-abc_1_2   a kitten is playing the piano  \n"
        b"_x_5_6 people are dancing\n"
        b"aaa_1_2 \xff\xfe broken bytes\n"
        b"aaa_1_2 a plane lands\n"
        b"zzz_9_9 someone cuts a tomato\n"
    )
    out = tmp_path / "out"
    args = ["msvd", "--descriptions", str(descriptions), "--videos", str(videos), "--out", str(out), "--dataset",
            "msvd", *_CLIP]
    err = _user_error(args, capsys)  # 5 clips, fewer than the standard 1200 + 100 + 670
    assert "5 clips" in err and "--train-clips 1200" in err
    sizes = ["--train-clips", "2", "--val-clips", "1", "--test-clips", "1"]
    printed = _prep([*args, *sizes], capsys)
    assert "msvd/train: 2 samples" in printed and "skipped 2: bad_line 2" in printed  # Bcd's empty, the bad bytes
    assert "warning: 1 clip(s) between val and test are in no split" in printed
    assert _captions(out, "msvd/train") == {"-abc_1_2": ["a cat plays piano", "a kitten is playing the piano"],
                                            "Bcd_3_4": ["a girl rides a horse"]}
    assert [m["msvd_index"] for m in _metas(out, "msvd/train")] == [0, 1]
    assert {e["item"] for e in _errors(out, "msvd/train")} == {"AllVideoDescriptions.txt:6",
                                                               "AllVideoDescriptions.txt:10"}
    printed = _prep([*args, *sizes, "--split", "val"], capsys)
    assert _captions(out, "msvd/val") == {"_x_5_6": ["people are dancing"]} and "skipped 1: bad_line 1" in printed
    _prep([*args, *sizes, "--split", "test"], capsys)
    assert _captions(out, "msvd/test") == {"zzz_9_9": ["a man is slicing a tomato", "someone cuts a tomato"]}
    _verify_ok(out, capsys)

    # A missing clip file is skipped and counted, and does not move the split.
    printed = _prep([*args, "--dataset", "msvd2", "--train-clips", "2", "--val-clips", "2", "--test-clips", "1",
                     "--split", "val"], capsys)
    assert "msvd2/val: 1 samples" in printed and "skipped 2: bad_line 1, missing_file 1" in printed
    assert [m["clip_id"] for m in _metas(out, "msvd2/val")] == ["_x_5_6"]
    assert {(e["item"], e["reason"]) for e in _errors(out, "msvd2/val")} == {
        ("aaa_1_2.avi", "missing_file"), ("AllVideoDescriptions.txt:10", "bad_line")}
