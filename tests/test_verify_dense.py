"""Tests of ``condmoe-prep verify`` on dense labels: the synthetic ``dense`` dataset (plus a ``soft`` label added
here) verifies clean, and a shard rewritten with one bad label map or soft vector gives exactly one problem line."""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from condmoe.data_prep import cli, schema
from condmoe.data_prep.dense_scenes import DENSE_LABELS
from condmoe.data_prep.shard_writer import sha256_file
from condmoe.data_prep.synthetic import write_synthetic_dataset
from condmoe.data_prep.verify import check_label, verify_dataset

SPLIT = "dense/train"
SOFT = {"member": "scene.npy", "encoding": "soft", "num_classes": 5}
NUM_CLASSES = DENSE_LABELS["semseg"]["num_classes"]

Members = dict[str, bytes]


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buf, format="PNG")
    return buf.getvalue()


def _npy(vector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, vector, allow_pickle=False)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _rewrite(root: Path, edit: Callable[[str, Members], Members], shard: int = 0) -> Path:
    """Rewrite one shard of SPLIT with ``edit(key, members)`` applied to every sample (members of a sample stay
    adjacent, in order) and record the new size and hash in the manifest; the shard's path."""
    manifest = schema.read_manifest(root)
    entry = manifest["datasets"][SPLIT]["shards"][shard]
    path = root / SPLIT / entry["name"]
    samples: dict[str, Members] = {}
    with tarfile.open(path) as tf:
        for info in tf:
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(info).read()
    with tarfile.open(path, "w") as tf:
        for key, members in samples.items():
            for ext, data in edit(key, dict(members)).items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    entry.update(num_bytes=path.stat().st_size, sha256=sha256_file(path))
    schema.write_json(root / schema.MANIFEST, manifest)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic root; dense.json also has a soft label, which only dense/train's first shard carries."""
    root = tmp_path_factory.mktemp("verify_dense") / "data"
    write_synthetic_dataset(root, num_train_images=2, num_val_images=1, num_train_videos=1, num_val_videos=1,
                            num_train_dense=8, num_val_dense=2, video_shard_size=4, tokenizer=False)
    schema.write_dense(root, "dense", {**DENSE_LABELS, "scene": SOFT})
    rng = np.random.default_rng(0)
    _rewrite(root, lambda key, m: {**m, SOFT["member"]: _npy(rng.dirichlet(np.ones(5)).astype(np.float32))})
    return root


@pytest.fixture
def root(prepared: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "data"))


def test_clean_dataset_verifies(prepared: Path, capsys: pytest.CaptureFixture[str]) -> None:
    problems, num_shards, num_samples = verify_dataset(prepared, workers=2)
    assert problems == [] and num_samples == 2 + 1 + 1 + 1 + 8 + 2 and num_shards == 7
    assert cli.main(["verify", str(prepared)]) == 0 and capsys.readouterr().out.startswith("OK:")


def _semseg_out_of_range(m: Members) -> Members:
    semseg = _decode(m["semseg.png"]).copy()
    semseg[0, :3] = NUM_CLASSES  # neither a class nor ignore (255, which stays fine)
    semseg[1, 0] = 255
    return {**m, "semseg.png": _png(semseg)}


def _parts_wrong_size(m: Members) -> Members:
    parts = _decode(m["parts.png"])
    return {**m, "parts.png": _png(parts[:-1])}


def _soft(vector: np.ndarray) -> Callable[[Members], Members]:
    return lambda m: {**m, "scene.npy": _npy(vector)}


@pytest.mark.parametrize(("edit", "member", "says"), [
    (_semseg_out_of_range, "semseg.png", f"class {NUM_CLASSES} outside [0, {NUM_CLASSES}) and not ignore 255 "
                                         "(3 pixels)"),
    (_parts_wrong_size, "parts.png", "64x63, the image is 64x64"),
    (_soft(np.array([0.5, np.nan, 0.1, 0.2, 0.2])), "scene.npy", "score nan is not finite and >= 0 (1 such)"),
    (_soft(np.full(4, 0.25, np.float32)), "scene.npy", "scores of shape (4,), expected (5,)"),
    (lambda m: {k: v for k, v in m.items() if k != "sal.png"}, None, None),  # a missing label is fine
    (lambda m: {**m, "sal.png": _png(_decode(m["sal.png"]), "RGB")}, None, None),  # grey as RGB: fine
])
def test_one_bad_label_is_one_problem(root: Path, edit: Callable[[Members], Members], member: str | None,
                                      says: str | None) -> None:
    keys: list[str] = []

    def first_only(key: str, m: Members) -> Members:
        keys.append(key)
        return edit(m) if len(keys) == 1 else m

    path = _rewrite(root, first_only)
    problems, _, _ = verify_dataset(root)
    assert problems == ([] if member is None else [f"{path}: sample {keys[0]}: {member}: {says}"])


def test_many_bad_labels_are_capped_per_shard(root: Path) -> None:
    path = _rewrite(root, lambda key, m: _semseg_out_of_range(_soft(np.ones(3))(_parts_wrong_size(m))))
    problems, _, _ = verify_dataset(root)
    assert len(problems) == 11 and problems[-1] == f"{path}: ... 2 more sample problems"  # 4 samples x 3
    assert all(p.startswith(f"{path}: sample ") for p in problems[:-1])


def test_damaged_dense_json_is_a_problem(root: Path) -> None:
    (root / schema.DENSE).write_text('{"dense": {"semseg": {"member": "semseg.png", "encoding": "rgb"}}}')
    problems, _, _ = verify_dataset(root, decode=False)
    assert len(problems) == 1 and "dense/semseg: encoding 'rgb'" in problems[0]


GREY = np.array([[0, 1], [255, 2]], np.uint8)
INDEX = {"encoding": "index", "num_classes": 3, "ignore": 255}


@pytest.mark.parametrize(("spec", "data", "says"), [
    (INDEX, _png(GREY), None),
    (INDEX, _png(GREY, "P"), None),
    (INDEX, _png(GREY.astype(np.uint16)), None),
    (INDEX, _png(np.stack([GREY] * 3, axis=2)), None),
    (INDEX, _png(np.dstack([GREY, GREY, GREY + 1])), "RGB with unequal channels, expected a single-channel map"),
    (INDEX, _png(GREY, "LA"), "mode LA, expected a single-channel map (L, P, I;16, I)"),
    (INDEX, _png(GREY, "L")[:40], "UnidentifiedImageError: cannot identify image file"),
    ({"encoding": "binary"}, _png(GREY), None),
    ({"encoding": "scalar", "scale": 0.001, "invalid": 0}, _png(GREY.astype(np.uint16) * 300), None),
    ({"encoding": "normal"}, _png(np.zeros((2, 2, 3), np.uint8)), None),
    ({"encoding": "normal"}, _png(GREY), "mode L, expected RGB"),
    (SOFT, _npy(np.zeros((5, 1))), "scores of shape (5, 1), expected (5,)"),
    (SOFT, _npy(np.array([0, 0, -1, 1, np.inf])), "score -1.0 is not finite and >= 0 (2 such)"),
    (SOFT, b"not an npy", "ValueError"),
])
def test_check_label(spec: dict, data: bytes, says: str | None) -> None:
    problem = check_label(spec, data, (2, 2))
    assert problem is None if says is None else problem.startswith(says)
