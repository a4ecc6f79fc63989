"""``condmoe-prep subset``: per-class ceil(fraction) selection, determinism, a valid output root, bad inputs, corrupt
source samples, and that training's TaskStream reads the result."""

from __future__ import annotations

import json
import math
import shutil
import tarfile
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from condmoe.data_prep import cli
from condmoe.data_prep.argtypes import fraction as parse_fraction
from condmoe.data_prep.schema import read_manifest
from condmoe.data_prep.shard_writer import sha256_file
from condmoe.data_prep.subset import make_subset, quota, rank
from condmoe.data_prep.synthetic import IMAGE_CLASSES, write_synthetic_dataset

# 245 train images: the synthetic labels are balanced in blocks of 10, so five classes have 25 samples and five 24;
# at a quarter that is 7 and 6 per class (65 in all), while a quarter of the whole split would be ceil(61.25) = 62.
SMALL = dict(num_train_images=245, num_val_images=30, num_train_videos=8, num_val_videos=4, vocab_size=400)
NUM_TRAIN = 245


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("subset_src") / "root"
    write_synthetic_dataset(out, seed=0, shard_size=100, progress=False, **SMALL)
    return out


@pytest.fixture(scope="module")
def src_resharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same samples as ``src`` (same seed), cut into 7 shards of 37 instead of 3 of 100."""
    out = tmp_path_factory.mktemp("subset_src37") / "root"
    write_synthetic_dataset(out, seed=0, shard_size=37, progress=False, **SMALL)
    return out


def read_split(root: Path, name: str) -> dict[str, dict[str, bytes]]:
    """``key -> {ext: bytes}`` of every sample of a split, from the shards its manifest lists (in order)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in read_manifest(root)["datasets"][name]["shards"]:
        with tarfile.open(root / name / shard["name"]) as tf:
            for member in tf:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(member).read()
    return samples


def labels(samples: dict[str, dict[str, bytes]]) -> dict[str, int]:
    return {key: int(members["cls"]) for key, members in samples.items()}


def run_subset(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Runs ``condmoe-prep subset`` in-process; returns its stdout (asserting success and a one-line summary)."""
    assert cli.main(["subset", "--no-progress", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_per_class_counts_are_ceil_fraction(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "quarter"
    line = run_subset(capsys, "--src", str(src), "--out", str(out), "--dataset", "image", "--fraction", "0.25")

    source = read_split(src, "image/train")
    per_class = Counter(labels(source).values())
    assert sorted(set(per_class.values())) == [24, 25]  # else the test could not tell per-class from overall
    want = {c: math.ceil(n / 4) for c, n in per_class.items()}
    assert sum(want.values()) == 65 != math.ceil(NUM_TRAIN / 4)

    kept = read_split(out, "image/train")
    assert dict(Counter(labels(kept).values())) == want
    for key, members in kept.items():
        assert members == source[key]  # every member byte-identical, key kept
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"image/train": 65, "image/val": 30}
    assert read_manifest(out)["datasets"]["image/train"]["num_samples"] == 65
    assert line.startswith(f"image/train: kept 65 of {NUM_TRAIN} samples (fraction 0.25 per class over 10 classes, "
                           "min 6 max 7 kept, seed 0)")
    assert "skipped 0" in line and "copied image/val" in line


def test_unlabelled_split_keeps_ceil_fraction_overall(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "docs.txt"
    text.write_text("".join(f"document {i} about something\n" for i in range(203)))
    root, out = tmp_path / "root", tmp_path / "sub"
    assert cli.main(["text", "--input", str(text), "--out", str(root), "--dataset", "wiki", "--shard-size", "50",
                     "--no-progress"]) == 0
    capsys.readouterr()
    line = run_subset(capsys, "--src", str(root), "--out", str(out), "--dataset", "wiki", "--fraction", "0.07")
    kept = read_split(out, "wiki/train")
    assert len(kept) == math.ceil(203 * 7 / 100) == 15
    source = read_split(root, "wiki/train")
    assert set(kept) == set(sorted(source, key=lambda k: (rank(k, 0), k))[:15])  # the 15 smallest seeded ranks
    assert json.loads((out / "sizes.json").read_text()) == {"wiki/train": 15}
    assert "kept 15 of 203 samples (fraction 0.07 overall, no labels" in line


def test_quota_is_exact() -> None:
    # 0.07 * 100 is 7.000000000000001 in floats; its ceiling would wrongly be 8.
    assert quota(parse_fraction("0.07"), 100) == 7
    assert quota(parse_fraction("1/100"), 1300) == 13 and quota(parse_fraction("1e-2"), 1301) == 14
    assert quota(Fraction(1), 5) == 5


def test_selection_is_deterministic_and_independent_of_sharding(src: Path, src_resharded: Path,
                                                                tmp_path: Path) -> None:
    a = make_subset(src, tmp_path / "a", "image", "0.25", seed=5, progress=False)
    b = make_subset(src_resharded, tmp_path / "b", "image", "0.25", seed=5, progress=False)
    c = make_subset(src, tmp_path / "c", "image", "0.25", seed=6, progress=False)
    assert len(read_manifest(src_resharded)["datasets"]["image/train"]["shards"]) == 7
    keys = {name: sorted(read_split(tmp_path / name, "image/train")) for name in "abc"}
    assert keys["a"] == keys["b"]
    # Same samples in the same order with the same output shard size: byte-identical shards.
    assert [sha256_file(p) for p in sorted((tmp_path / "a/image/train").glob("*.tar"))] == \
        [sha256_file(p) for p in sorted((tmp_path / "b/image/train").glob("*.tar"))]
    assert keys["a"] != keys["c"] and a.per_class == c.per_class == b.per_class
    # The kept samples of each class are the ones with the smallest seeded rank.
    source = labels(read_split(src, "image/train"))
    for label in range(len(IMAGE_CLASSES)):
        members = sorted((k for k, v in source.items() if v == label), key=lambda k: (rank(k, 5), k))
        chosen = {k for k in keys["a"] if source[k] == label}
        assert chosen == set(members[:quota(Fraction(1, 4), len(members))])


def test_output_verifies_and_copies_val_unchanged(src: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub"
    out.mkdir()  # an existing empty directory is fine
    run_subset(capsys, "--src", str(src), "--out", str(out), "--dataset", "image", "--fraction", "1/10", "--seed", "1",
               "--shard-size", "7")
    assert cli.main(["verify", str(out)]) == 0
    # 3 of every class (ceil of 2.4 and 2.5) = 30 train samples in 5 shards of at most 7, plus the val shard of 30.
    assert capsys.readouterr().out.startswith("OK: 6 shard(s), 60 samples")
    manifest, src_manifest = read_manifest(out), read_manifest(src)
    assert set(manifest["datasets"]) == {"image/train", "image/val"}  # video is not copied
    assert not (out / "video").exists()
    assert manifest["datasets"]["image/val"] == src_manifest["datasets"]["image/val"]
    val = sorted(p.name for p in (src / "image/val").glob("*.tar"))
    assert val and sorted(p.name for p in (out / "image/val").glob("*.tar")) == val
    for name in val:
        assert (out / "image/val" / name).read_bytes() == (src / "image/val" / name).read_bytes()
    assert json.loads((out / "classes.json").read_text()) == {"image": list(IMAGE_CLASSES)}
    assert manifest["classes"] == {"image": list(IMAGE_CLASSES)}
    assert manifest["tokenizer"] == src_manifest["tokenizer"]
    for f in (src / "tokenizer").iterdir():
        assert (out / "tokenizer" / f.name).read_bytes() == f.read_bytes()
    # The temporary build directory (inside an existing OUT) is gone.
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "image", "manifest.json", "sizes.json",
                                                     "tokenizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


@pytest.mark.parametrize(
    "args",
    [
        ["--dataset", "image", "--fraction", "0"],
        ["--dataset", "image", "--fraction", "1.5"],
        ["--dataset", "image", "--fraction", "a lot"],
        ["--fraction", "0.1"],  # no --dataset
        ["--dataset", "nope", "--fraction", "0.1"],  # not in SRC
        ["--dataset", "image", "--split", "test", "--fraction", "0.1"],
        ["--dataset", "image", "--fraction", "0.1", "NONEMPTY"],
        ["--dataset", "image", "--fraction", "0.1", "NOSRC"],
    ],
)
def test_bad_inputs_exit_2_with_one_line(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         args: list[str]) -> None:
    out = tmp_path / "out"
    if "NONEMPTY" in args:
        out.mkdir()
        (out / "something").write_text("x")
    source = tmp_path / "missing" if "NOSRC" in args else src
    args = [a for a in args if a not in ("NONEMPTY", "NOSRC")]
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["subset", "--src", str(source), "--out", str(out), "--no-progress", *args])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("condmoe-prep subset: error: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if out.exists() else [])
    if out.exists():
        assert [p.name for p in out.iterdir()] == ["something"]


def _corrupt_member(shard: Path, member_name: str) -> None:
    """Overwrites a member's data in place (same size: the tar stays well-formed, the member does not decode)."""
    with tarfile.open(shard) as tf:
        info = tf.getmember(member_name)
    with open(shard, "r+b") as f:
        f.seek(info.offset_data)
        f.write(b"\xff" * info.size)


def test_corrupt_samples_are_skipped_counted_and_replaced(src: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    clean = make_subset(src, tmp_path / "clean", "image", "0.25", progress=False)
    source = read_split(src, "image/train")
    clean_keys = set(read_split(tmp_path / "clean", "image/train"))
    # A selected sample of shard 0 whose image no longer decodes, one with a label outside classes.json, and the
    # last shard (45 samples) cut in the middle of a member.
    victim = sorted(k for k in clean_keys if int(k) < 100)[0]
    _corrupt_member(bad / "image/train/shard-000000.tar", f"{victim}.jpg")
    last = bad / "image/train/shard-000002.tar"
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size // 2)
    with tarfile.open(bad / "image/train/shard-000001.tar") as tf:
        info = tf.getmember("000151.cls")
    with open(bad / "image/train/shard-000001.tar", "r+b") as f:
        f.seek(info.offset_data)
        f.write(b"x")

    out = tmp_path / "out"
    line = run_subset(capsys, "--src", str(bad), "--out", str(out), "--dataset", "image", "--fraction", "0.25")
    kept = read_split(out, "image/train")
    assert victim not in kept and "000151" not in kept
    entry = read_manifest(out)["datasets"]["image/train"]
    skipped = entry["skipped"]
    assert skipped["bad_image"] == 1 and skipped["bad_label"] == 1 and skipped["truncated_tar"] > 10
    # Nothing silently lost: every source sample is usable (kept or not selected) or counted as skipped.
    usable = entry["notes"]["usable"]
    assert usable + sum(skipped.values()) == NUM_TRAIN == entry["num_items"]
    # Every class still gets ceil(F * usable in that class); the undecodable pick was replaced by the next rank.
    per_class = entry["notes"]["per_class"]
    assert all(v["kept"] == math.ceil(v["usable"] / 4) for v in per_class.values())
    assert dict(Counter(labels(kept).values())) == {int(c): v["kept"] for c, v in per_class.items()}
    victim_class = per_class[source[victim]["cls"].decode()]
    # The victim's class keeps its quota without it (so a replacement pick was needed and made).
    assert math.ceil((victim_class["usable"] + 1) / 4) == victim_class["kept"], "pick another victim"
    errors = [json.loads(x) for x in (out / "image/train/errors.jsonl").read_text().splitlines()]
    assert {e["reason"] for e in errors} == {"bad_image", "bad_label", "truncated_tar"}
    assert {e["item"] for e in errors if e["reason"] != "truncated_tar"} == {f"shard-000000.tar:{victim}",
                                                                            "shard-000001.tar:000151"}
    assert " at 0x" not in json.dumps(errors)  # no memory addresses: equal runs write equal files
    assert sum(e.get("samples", 1) for e in errors) == sum(skipped.values())
    assert f"skipped {sum(skipped.values())}: bad_image 1, bad_label 1, truncated_tar " in line
    assert cli.main(["verify", str(out)]) == 0
    assert clean.skipped == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "clean", "out"]  # no temporary directory left


def test_task_stream_reads_the_subset(src: Path, tmp_path: Path) -> None:
    from condmoe.models.text_tokenizer import TextTokenizer
    from condmoe.train.config import DataConfig, TaskConfig
    from condmoe.train.data import TaskStream

    out = tmp_path / "sub"
    make_subset(src, out, "image", Fraction(1, 5), progress=False)
    tokenizer = TextTokenizer(out / "tokenizer", max_length=24)
    data = DataConfig(root=str(out), num_workers=0, shuffle_buffer=10, max_text_len=24)
    task = TaskConfig(name="t", type="image_classification", dataset="image", batch_size=8)
    stream = TaskStream(task, 0, data, tokenizer, 32, rank=0, world_size=1, seed=0)
    try:
        batch = next(stream)
    finally:
        stream.close()
    assert batch["images"].shape == (8, 3, 32, 32) and torch.isfinite(batch["images"]).all()
    assert ((batch["labels"] >= 0) & (batch["labels"] < len(IMAGE_CLASSES))).all()
    assert batch["num_skipped"].item() == 0
    assert stream.batches_per_epoch == 50 // 8  # sizes.json of the subset: 5 of 24/25 per class


def test_damaged_split_to_copy_fails_cleanly(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "image/val/shard-000000.tar").unlink()
    assert cli.main(["subset", "--src", str(bad), "--out", str(tmp_path / "out"), "--dataset", "image",
                     "--fraction", "0.5", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("condmoe-prep subset: error: ")
    assert "image/val/shard-000000.tar: missing" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no OUT, no temporary directory
