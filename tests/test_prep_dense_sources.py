"""Tests of the dense-label prep sources (pascal_mt, nyud, taskonomy) on small layouts written by each test: exact
members and dense.json, missing maps counted, bad label files skipping the sample, verify."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from condmoe.data_prep import cli
from condmoe.data_prep.schema import read_dense, read_manifest


def _read_split(root: Path, name: str) -> list[dict[str, bytes]]:
    """Every sample of a split as ``{ext: bytes}`` (``__key__`` included), in shard and key order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in read_manifest(root)["datasets"][name]["shards"]:
        with tarfile.open(root / name / shard["name"]) as tf:
            for member in tf:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key.encode()})[ext] = tf.extractfile(member).read()
    return list(samples.values())


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _prep(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(args) == 0
    return capsys.readouterr().out


def _verify_ok(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["verify", str(out)]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.startswith("OK:")


def _errors(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name / "errors.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------------
# Real layouts, written here
# ---------------------------------------------------------------------------------------------------------------------

W, H = 20, 16  # image size of the hand-made layouts


def _save(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, array)
        return
    image = Image.fromarray(array)
    if palette:  # VOC labels are palette PNGs: the pixel values are the indices
        image = image.convert("P")
        image.putpalette([c for i in range(256) for c in (i, 255 - i, i // 2)])
        image.frombytes(array.tobytes())
    image.save(path)


def _rng_map(seed: int, high: int, shape: tuple[int, ...] = (H, W), dtype: type = np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def _samples(out: Path, name: str) -> dict[str, dict[str, bytes]]:
    return {json.loads(s["json"])["id"]: s for s in _read_split(out, name)}


@pytest.fixture
def pascal(tmp_path: Path) -> Path:
    """PASCAL_MT with 4 listed train ids: a (every label), b (semseg in pascal-context, parts only as .mat),
    c (no image) and d (no edge); e in val."""
    root = tmp_path / "PASCAL_MT"
    for i, image_id in enumerate("abde"):
        _save(root / "JPEGImages" / f"{image_id}.jpg", _rng_map(i, 255, (H, W, 3)))
        semseg = _rng_map(10 + i, 21)
        semseg[0, :4] = 255
        folder = "pascal-context" if image_id == "b" else "VOC12"
        _save(root / "semseg" / folder / f"{image_id}.png", semseg, palette=True)
        if image_id != "b":
            _save(root / "human_parts" / f"{image_id}.png", _rng_map(20 + i, 7))
        _save(root / "sal_distill" / f"{image_id}.png", _rng_map(30 + i, 256))
        _save(root / "normals_distill" / f"{image_id}.png", _rng_map(40 + i, 256, (H, W, 3)))
        if image_id != "d":
            _save(root / "edge" / f"{image_id}.png", _rng_map(50 + i, 2))
    (root / "human_parts" / "b.mat").write_bytes(b"MATLAB 5.0 MAT-file")
    (root / "ImageSets" / "Context").mkdir(parents=True)
    (root / "ImageSets" / "Context" / "train.txt").write_text("a\nb\nc\n\nd\n")
    (root / "ImageSets" / "Context" / "val.txt").write_text("e\n")
    return root


def test_pascal_mt(pascal: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["pascal_mt", "--root", str(pascal), "--out", str(out), "--dataset", "pascal", "--shard-size", "2",
            "--no-progress"]
    printed = _prep(args, capsys)
    assert "pascal/train: 3 samples in 2 shard(s)" in printed and "skipped 1: missing_file 1" in printed
    assert "warning: human_parts: 1 of 3 images have no label file (human_parts/{id}.png)" in printed
    assert "1 of them have only human_parts/{id}.mat (PASCAL-Part .mat)" in printed
    assert "warning: edge: 1 of 3 images have no label file" in printed
    assert [e["item"] for e in _errors(out, "pascal/train")] == ["c"]
    notes = read_manifest(out)["datasets"]["pascal/train"]["notes"]
    assert notes["missing_labels"] == {"semseg": 0, "human_parts": 1, "saliency": 0, "normals": 0, "edge": 1}
    assert notes["unreadable_labels"] == {"human_parts": 1, "edge": 0}

    dense = read_dense(out)["pascal"]
    assert {k: (v["member"], v["encoding"], v.get("num_classes")) for k, v in dense.items()} == {
        "semseg": ("semseg.png", "index", 21), "human_parts": ("parts.png", "index", 7),
        "saliency": ("sal.png", "binary", None), "normals": ("normals.png", "normal", None),
        "edge": ("edge.png", "binary", None)}
    assert dense["semseg"]["names"][15] == "person" and dense["semseg"]["ignore"] == 255

    samples = _samples(out, "pascal/train")
    assert list(samples) == ["a", "b", "d"]
    a = samples["a"]
    assert np.array_equal(_png(a["semseg.png"]), np.asarray(Image.open(pascal / "semseg/VOC12/a.png")))
    assert _png(a["semseg.png"])[0, 0] == 255
    assert np.array_equal(_png(a["parts.png"]), _rng_map(20, 7))
    assert np.array_equal(_png(a["sal.png"]), np.where(_rng_map(30, 256) >= 128, 255, 0))
    assert np.array_equal(_png(a["normals.png"]), _rng_map(40, 256, (H, W, 3)))
    assert np.array_equal(_png(a["edge.png"]), _rng_map(50, 2) * 255)
    assert Image.open(io.BytesIO(a["jpg"])).size == (W, H)  # --image-size defaults to 0: full size
    assert "parts.png" not in samples["b"] and json.loads(samples["b"]["json"])["missing"] == ["human_parts"]
    assert json.loads(samples["b"]["json"])["labels"]["semseg"] == "semseg/pascal-context/b.png"
    assert "edge.png" not in samples["d"] and "parts.png" in samples["d"]
    _verify_ok(out, capsys)
    assert "already complete" in _prep(args, capsys)

    # val (its own split list), two labels only, shrunk: the maps follow the image's size by nearest neighbour.
    _prep([*args[:-3], "--split", "val", "--labels", "semseg,edge", "--image-size", "8", "--no-progress"], capsys)
    e = _samples(out, "pascal/val")["e"]
    assert set(e) == {"__key__", "jpg", "json", "semseg.png", "edge.png"}
    small = Image.open(io.BytesIO(e["jpg"])).size
    assert small == (10, 8) and _png(e["semseg.png"]).shape == (8, 10)
    assert set(np.unique(_png(e["semseg.png"]))) <= set(np.unique(_rng_map(13, 21))) | {255}
    assert read_dense(out)["pascal"] == dense  # val's two labels are train's: the entry keeps all five

    # Another split with other label options would contradict the entry: refused, unless --overwrite.
    other = [*args[:-3], "--split", "val", "--semseg-classes", "60", "--no-progress"]
    with pytest.raises(SystemExit):
        cli.main(other)
    assert "pascal/semseg is {" in capsys.readouterr().err and read_dense(out)["pascal"] == dense
    _prep([*other, "--overwrite"], capsys)
    assert read_dense(out)["pascal"]["semseg"]["num_classes"] == 60


def test_bad_label_files_skip_the_sample(pascal: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _rng_map(10, 21)
    bad[3, 3] = 40  # neither a class of 21 nor 255
    _save(pascal / "semseg" / "VOC12" / "a.png", bad)
    _save(pascal / "sal_distill" / "b.png", _rng_map(0, 256, (H + 1, W)))
    (pascal / "normals_distill" / "d.png").write_bytes(b"not a png")
    (pascal / "ImageSets" / "Context" / "train.txt").write_text("a\nb\nc\nd\ne\n")
    out = tmp_path / "out"
    _prep(["pascal_mt", "--root", str(pascal), "--out", str(out), "--dataset", "pascal", "--no-progress"], capsys)
    reasons = {e["item"]: (e["reason"], e["detail"]) for e in _errors(out, "pascal/train")}
    assert reasons["a"][0] == "bad_label" and "values [40]" in reasons["a"][1]
    assert reasons["b"] == ("label_size_mismatch", "sal_distill/b.png: 20x17 px, the image JPEGImages/b.jpg is 20x16")
    assert reasons["d"][0] == "bad_label" and "not a readable image" in reasons["d"][1]
    assert reasons["c"][0] == "missing_file" and list(_samples(out, "pascal/train")) == ["e"]


@pytest.mark.parametrize("args, message", [
    (["--labels", "semseg,depth"], "--labels 'semseg,depth': expected a comma-separated subset of"),
    (["--ids", "{root}/none.txt"], "--ids {root}/none.txt: no such file"),
    (["--semseg-classes", "300"], "--semseg-classes 300: expected 2..255"),
])
def test_pascal_mt_user_errors(pascal: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                               message: str) -> None:
    args = [a.format(root=pascal) for a in args]
    with pytest.raises(SystemExit) as info:
        cli.main(["pascal_mt", "--root", str(pascal), "--out", str(tmp_path / "o"), "--dataset", "p", *args])
    assert info.value.code == 2 and message.format(root=pascal) in capsys.readouterr().err


def test_nyud(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "NYUD_MT"
    semseg = _rng_map(1, 41)
    depth_m = np.random.default_rng(2).uniform(0.5, 9.0, (H, W)).astype(np.float32)
    depth_m[0, 0], depth_m[0, 1], depth_m[0, 2] = 0.0, np.nan, 70.0
    normals = np.random.default_rng(3).normal(size=(H, W, 3))
    normals /= np.linalg.norm(normals, axis=2, keepdims=True)
    normals[1, 1] = 0.0
    edge = _rng_map(4, 2).astype(np.float32)
    for image_id in ("n1", "n2", "n3"):
        ext = ".png" if image_id == "n2" else ".jpg"
        _save(root / "images" / f"{image_id}{ext}", _rng_map(5, 255, (H, W, 3)))
        _save(root / "segmentation" / f"{image_id}.png", semseg)
        if image_id == "n2":  # depth as a millimetre PNG, normals as RGB, no edge file
            _save(root / "depth" / "n2.png", np.full((H, W), 1234, np.uint16))
            _save(root / "normals" / "n2.png", _rng_map(6, 256, (H, W, 3)))
        else:
            _save(root / "depth" / f"{image_id}.npy", depth_m)
            _save(root / "normals" / f"{image_id}.npy", normals)
            _save(root / "edge" / f"{image_id}.npy", edge)
    (root / "gt_sets").mkdir()
    (root / "gt_sets" / "train.txt").write_text("n1\nn2\nmissing\nn1\n")
    out = tmp_path / "out"
    printed = _prep(["nyud", "--root", str(root), "--out", str(out), "--dataset", "nyud", "--no-progress"], capsys)
    assert "nyud/train: 2 samples" in printed and "skipped 2: bad_id 1, missing_file 1" in printed
    assert "warning: edge: 1 of 2 images have no label file (edge/{id}.npy or edge/{id}.png)" in printed

    dense = read_dense(out)["nyud"]
    assert dense["semseg"]["num_classes"] == 40 and dense["semseg"]["names"][0] == "wall"
    assert dense["depth"] == {"member": "depth.png", "encoding": "scalar", "scale": 0.001, "invalid": 0}
    samples = _samples(out, "nyud/train")
    n1, n2 = samples["n1"], samples["n2"]
    assert np.array_equal(_png(n1["semseg.png"]), np.where(semseg == 0, 255, semseg.astype(np.int64) - 1))
    depth = _png(n1["depth.png"])
    assert depth.dtype == np.uint16 and list(depth[0, :3]) == [0, 0, 0]
    assert np.array_equal(depth[1:], np.rint(depth_m[1:] * 1000).astype(np.uint16))
    facts = json.loads(n1["json"])["label_facts"]
    assert facts == {"depth": {"invalid_pixels": 3, "beyond_range_pixels": 1}, "normals": {"unlabelled_pixels": 1}}
    decoded = 2.0 * _png(n1["normals.png"]) / 255.0 - 1.0
    assert list(_png(n1["normals.png"])[1, 1]) == [0, 0, 0]
    valid = np.ones((H, W), bool)
    valid[1, 1] = False
    assert np.abs(decoded[valid] - normals[valid]).max() <= 1 / 255 + 1e-6
    assert np.array_equal(_png(n1["edge.png"]), edge.astype(np.uint8) * 255)
    assert (_png(n2["depth.png"]) == 1234).all() and "edge.png" not in n2
    assert json.loads(n2["json"])["image"] == "images/n2.png"
    _verify_ok(out, capsys)


def test_taskonomy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "taskonomy"
    depth = _rng_map(1, 65536, dtype=np.uint16)
    depth[0, 0] = 65535
    curvature = _rng_map(2, 256, (H, W, 3))

    def put(domain: str, building: str, view: str, array: np.ndarray) -> None:
        _save(root / domain / "taskonomy" / building / f"{view}_domain_{domain}.png", array)

    for building, views in (("adairsville", ["point_2_view_0", "point_10_view_1"]), ("woodbine", ["point_0_view_0"])):
        for view in views:
            put("rgb", building, view, _rng_map(3, 255, (H, W, 3)))
            put("depth_zbuffer", building, view, depth)
            put("principal_curvature", building, view, curvature)
            if view != "point_10_view_1":
                put("reshading", building, view, _rng_map(4, 256))
    (root / "rgb" / "taskonomy" / "adairsville" / "notes.txt").write_text("x")
    (root / "splits.csv").write_text("id,train,val,test\nadairsville,1,0,0\nwoodbine,0,1,0\ncosta,0,1,0\n")
    out = tmp_path / "out"
    args = ["taskonomy", "--root", str(root), "--layout", "{domain}/taskonomy/{building}", "--labels",
            "depth_zbuffer,principal_curvature,reshading", "--splits-csv", str(root / "splits.csv"), "--out", str(out),
            "--dataset", "taskonomy", "--no-progress"]
    printed = _prep([*args, "--csv-splits", "train,val"], capsys)
    assert "taskonomy/train: 3 samples" in printed and "skipped 1: bad_name 1" in printed
    assert "warning: 1 of 3 buildings have no rgb folder" in printed and "costa" in printed
    assert "warning: reshading: 1 of 3 images have no label file" in printed
    samples = _samples(out, "taskonomy/train")
    assert list(samples) == ["adairsville/point_2_view_0", "adairsville/point_10_view_1", "woodbine/point_0_view_0"]
    s = samples["adairsville/point_2_view_0"]
    assert np.array_equal(_png(s["depth_zbuffer.png"]), depth)
    assert np.array_equal(_png(s["principal_curvature_1.png"]), curvature[:, :, 0])
    assert np.array_equal(_png(s["principal_curvature_2.png"]), curvature[:, :, 1])
    assert np.array_equal(_png(s["reshading.png"]), _rng_map(4, 256))
    assert "reshading.png" not in samples["adairsville/point_10_view_1"]
    dense = read_dense(out)["taskonomy"]
    assert dense["depth_zbuffer"] == {"member": "depth_zbuffer.png", "encoding": "scalar", "scale": 1 / 512,
                                      "invalid": 65535}
    assert dense["reshading"]["scale"] == 1 / 255 and dense["reshading"]["invalid"] is None
    _verify_ok(out, capsys)

    # The job's --split names the CSV column by default: only woodbine (and the absent costa) are val buildings.
    printed = _prep([*args, "--split", "val"], capsys)
    assert "taskonomy/val: 1 samples" in printed


def test_dense_source_in_parts_then_merge(pascal: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["pascal_mt", "--root", str(pascal), "--out", str(out), "--dataset", "pascal", "--shard-size", "1",
            "--num-parts", "2", "--no-progress"]
    for part in ("0", "1"):
        assert "when every part is done" in _prep([*args, "--part-index", part], capsys)
    assert read_dense(out)["pascal"]["semseg"]["num_classes"] == 21  # written by the parts, before the merge
    printed = _prep(["merge", str(out)], capsys)
    assert "pascal/train: 3 samples in 3 shard(s)" in printed
    one = tmp_path / "one"
    _prep(["pascal_mt", "--root", str(pascal), "--out", str(one), "--dataset", "pascal", "--shard-size", "1",
           "--no-progress"], capsys)
    shards = [s["sha256"] for s in read_manifest(one)["datasets"]["pascal/train"]["shards"]]
    assert [s["sha256"] for s in read_manifest(out)["datasets"]["pascal/train"]["shards"]] == shards
    _verify_ok(out, capsys)
