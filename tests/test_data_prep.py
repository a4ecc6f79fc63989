"""Tests of data_prep: synthetic generation, the manifest, the BPE tokenizer and the CLI (the shard writer:
tests/test_prep_writer.py)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from condmoe.data_prep import cli
from condmoe.data_prep.bpe import SPECIAL_TOKENS, build_bpe, train_bpe
from condmoe.data_prep.schema import read_manifest
from condmoe.data_prep.shard_writer import list_shards, sha256_file
from condmoe.data_prep.synthetic import (
    COLORS,
    IMAGE_CLASSES,
    POSITIONS,
    SIZES,
    VIDEO_CLASSES,
    render_image,
    write_synthetic_dataset,
)

# Small enough to keep the whole module at a few seconds on 2 cores, large enough for several shards per split, an
# exact-multiple split (videos: 8 clips, 4 per shard) and every image class in train (4 blocks of 10).
SMALL = dict(
    image_size=64,
    video_size=32,
    num_frames=8,
    num_train_images=40,
    num_val_images=10,
    num_train_videos=8,
    num_val_videos=4,
    num_train_dense=8,
    num_val_dense=4,
    shard_size=16,
    video_shard_size=4,
    vocab_size=400,
)
EXPECTED_SIZES = {"image/train": 40, "image/val": 10, "video/train": 8, "video/val": 4, "dense/train": 8,
                  "dense/val": 4}
FRAME_EXTS = [f"f{t:02d}.jpg" for t in range(8)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    sizes = write_synthetic_dataset(out, seed=0, **SMALL)
    assert sizes == EXPECTED_SIZES
    return out


def _shard_urls(root: Path, name: str) -> list[str]:
    return [str(p) for p in list_shards(root / name)]


def _load(root: Path, name: str) -> list[dict]:
    ds = wds.WebDataset(_shard_urls(root, name), shardshuffle=False, nodesplitter=None).decode("pil")
    return list(ds)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------------------------
# Layout, index and tar members
# --------------------------------------------------------------------------------------------------------------------


def test_layout_sizes_and_manifest_match_tars(dataset: Path) -> None:
    assert json.loads((dataset / "classes.json").read_text()) == {
        "image": list(IMAGE_CLASSES),
        "video": list(VIDEO_CLASSES),
    }
    assert len(IMAGE_CLASSES) == 10 and len(set(IMAGE_CLASSES)) == 10
    assert json.loads((dataset / "sizes.json").read_text()) == EXPECTED_SIZES

    manifest = read_manifest(dataset)
    assert manifest is not None
    assert manifest["version"] == 1 and manifest["seed"] == 0
    assert set(manifest["datasets"]) == set(EXPECTED_SIZES)
    for name, entry in manifest["datasets"].items():
        assert entry["num_samples"] == EXPECTED_SIZES[name]
        listed = [s["name"] for s in entry["shards"]]
        # Nothing else (no temp files, no empty or stale shards) in the split directory.
        assert sorted(p.name for p in (dataset / name).iterdir()) == listed
        assert listed == [f"shard-{i:06d}.tar" for i in range(len(listed))]
        for shard in entry["shards"]:
            path = dataset / name / shard["name"]
            assert shard["num_samples"] > 0
            assert path.stat().st_size == shard["num_bytes"]
            assert sha256_file(path) == shard["sha256"]
            with tarfile.open(path) as tar:
                keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
            assert len(keys) == shard["num_samples"]
        assert len(_load(dataset, name)) == EXPECTED_SIZES[name]
    # 40 images at 16 per shard -> 16, 16, 8; 8 clips at 4 per shard -> exactly 2 shards (no trailing empty tar).
    assert [s["num_samples"] for s in manifest["datasets"]["image/train"]["shards"]] == [16, 16, 8]
    assert [s["num_samples"] for s in manifest["datasets"]["video/train"]["shards"]] == [4, 4]


@pytest.mark.parametrize("name", ["image/train", "video/val"])
def test_member_naming(dataset: Path, name: str) -> None:
    exts = ["cls", "jpg", "json", "txt"] if name.startswith("image") else ["cls", *FRAME_EXTS, "json", "txt"]
    names: list[str] = []
    for url in _shard_urls(dataset, name):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                assert member.isfile() and member.mtime == 0 and member.uid == 0
                names.append(member.name)
    # Keys are consecutive zero-padded global indices and each sample's members are adjacent.
    expected = [f"{i:06d}.{ext}" for i in range(EXPECTED_SIZES[name]) for ext in exts]
    assert names == expected


def test_image_content(dataset: Path) -> None:
    samples = _load(dataset, "image/train")
    labels = set()
    for sample in samples:
        meta = sample["json"]
        label = int(sample["cls"])
        assert 0 <= label < len(IMAGE_CLASSES) and label == meta["label"]
        assert meta["class_name"] == IMAGE_CLASSES[label]
        assert sample["txt"] == meta["caption"]
        caption = meta["caption"]
        for attr in (meta["class_name"], meta["color"], meta["size"], meta["position"]):
            assert attr in caption, (attr, caption)
        assert meta["color"] in COLORS and meta["size"] in SIZES and meta["position"] in POSITIONS
        assert sample["jpg"].mode == "RGB" and sample["jpg"].size == (64, 64)
        labels.add(label)
    assert labels == set(range(len(IMAGE_CLASSES)))


def test_video_content(dataset: Path) -> None:
    samples = _load(dataset, "video/train")
    assert {int(s["cls"]) for s in samples} == set(range(len(VIDEO_CLASSES)))
    for sample in samples:
        meta = sample["json"]
        label = int(sample["cls"])
        assert meta["label"] == label and meta["class_name"] == VIDEO_CLASSES[label]
        assert meta["num_frames"] == 8
        assert meta["class_name"] in sample["txt"] and meta["shape"] in sample["txt"]
        frames = [np.asarray(sample[ext], dtype=np.float32) for ext in FRAME_EXTS]
        assert all(f.shape == (32, 32, 3) for f in frames)
        # The shape moves: first and last frame differ clearly, beyond JPEG and sensor noise.
        assert np.abs(frames[0] - frames[-1]).mean() > 2.0


# --------------------------------------------------------------------------------------------------------------------
# Determinism and idempotency
# --------------------------------------------------------------------------------------------------------------------


def test_same_seed_is_byte_identical_and_seeds_differ(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_synthetic_dataset(again, seed=0, **SMALL)
    assert _tree_digest(again) == _tree_digest(dataset)  # shards, index and tokenizer alike

    other = tmp_path / "other"
    write_synthetic_dataset(other, seed=1, **SMALL, tokenizer=False)
    for name in EXPECTED_SIZES:
        a = [s["sha256"] for s in read_manifest(dataset)["datasets"][name]["shards"]]
        b = [s["sha256"] for s in read_manifest(other)["datasets"][name]["shards"]]
        assert set(a).isdisjoint(b)


def test_train_and_val_streams_differ() -> None:
    for index in range(5):
        train_img, train_meta = render_image(0, "train", index)
        val_img, val_meta = render_image(0, "val", index)
        assert train_img.tobytes() != val_img.tobytes()
        again, again_meta = render_image(0, "train", index)
        assert again.tobytes() == train_img.tobytes() and again_meta == train_meta


def test_complete_dataset_is_skipped_unless_params_change(tmp_path: Path) -> None:
    params = dict(SMALL, num_train_images=10, num_val_images=2, num_train_videos=2, num_val_videos=1)
    out = tmp_path / "d"
    sizes = write_synthetic_dataset(out, tokenizer=False, **params)
    shard = out / "image" / "train" / "shard-000000.tar"
    stamp = shard.stat().st_mtime_ns
    assert write_synthetic_dataset(out, tokenizer=False, **params) == sizes
    assert shard.stat().st_mtime_ns == stamp  # not rewritten

    # A missing shard makes the dataset incomplete, so it is regenerated.
    shard.unlink()
    write_synthetic_dataset(out, tokenizer=False, **params)
    assert shard.is_file()

    smaller = dict(params, num_train_images=5)
    assert write_synthetic_dataset(out, tokenizer=False, **smaller)["image/train"] == 5
    assert [p.name for p in list_shards(out / "image" / "train")] == ["shard-000000.tar"]


def test_interrupted_run_resumes_to_the_same_bytes(dataset: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from condmoe.data_prep.synthetic import SyntheticSource

    real = SyntheticSource.make_sample
    calls = []

    def dies_in_image_val(self, item):
        if (self.dataset, self.split, item) == ("image", "val", 7):
            raise KeyboardInterrupt  # a kill in the middle of the second split's first slice
        calls.append((self.dataset, self.split))
        return real(self, item)

    out = tmp_path / "again"
    monkeypatch.setattr(SyntheticSource, "make_sample", dies_in_image_val)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(out, seed=0, **SMALL)
    assert not (out / "manifest.json").exists() and (out / "image" / "train" / "_progress").is_dir()
    assert not list((out / "image" / "val").glob("*.tar*"))  # the cut slice left no file behind

    calls.clear()
    monkeypatch.setattr(SyntheticSource, "make_sample", lambda self, item: calls.append(self.split) or real(self, item))
    write_synthetic_dataset(out, seed=0, **SMALL)
    assert "train" not in calls[:10] and calls.count("val") == 10 + 4 + 4  # image/train was resumed, not redone
    assert _tree_digest(out) == _tree_digest(dataset)  # no progress files left, the same bytes as one clean run
    assert cli.main(["verify", str(out)]) == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"num_train_images": 0}, {"num_val_videos": -1}, {"image_size": 8}, {"num_frames": 1}, {"vocab_size": 100}],
)
def test_invalid_parameters_raise(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path / "bad", **{**SMALL, **kwargs})


# --------------------------------------------------------------------------------------------------------------------
# BPE tokenizer
# --------------------------------------------------------------------------------------------------------------------


def test_bpe_special_tokens_and_roundtrip(dataset: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(dataset / "tokenizer" / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert SPECIAL_TOKENS == ("<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|mask|>", "<|spe|>", "<|unk|>")
    caption = "A Large red circle in the top left corner"
    ids = tok.encode(caption).ids
    assert tok.decode(ids) == caption.lower()
    assert len(ids) < len(caption) // 2  # merges were learnt from the captions
    assert tok.token_to_id("<|unk|>") not in tok.encode("unseen wörds ✓").ids  # byte-level: no unknowns


def test_bpe_loads_with_transformers(dataset: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dataset / "tokenizer"), local_files_only=True)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id, tok.unk_token_id) == (
        0,
        1,
        2,
        3,
        5,
    )
    assert tok.convert_tokens_to_ids("<|spe|>") == 4
    assert "<|spe|>" in tok.all_special_tokens
    ids = tok("a small blue star near the center")["input_ids"]
    assert tok.decode(ids) == "a small blue star near the center"
    assert tok.convert_ids_to_tokens(tok("<|mask|> star")["input_ids"])[0] == "<|mask|>"


def test_bpe_is_deterministic(tmp_path: Path) -> None:
    texts = [render_image(0, "train", i)[1]["caption"] for i in range(50)]
    a = train_bpe(texts, tmp_path / "a", vocab_size=300)
    b = train_bpe(texts, tmp_path / "b", vocab_size=300)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    with pytest.raises(ValueError):
        build_bpe(texts, vocab_size=10)


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------

_CLI_SMALL = [
    "--num-train-images",
    "12",
    "--num-val-images",
    "3",
    "--num-train-videos",
    "4",
    "--num-val-videos",
    "2",
    "--num-train-dense",
    "0",
    "--num-val-dense",
    "0",
    "--shard-size",
    "5",
    "--no-tokenizer",
    "--no-progress",
]


def test_cli_runs_and_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert cli.main(["synthetic", "--out", str(out), "--seed", "3", *_CLI_SMALL]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == list(EXPECTED_SIZES)[:4]  # no dense split asked for
    assert lines[0].startswith("image/train: 12 samples in 3 shard(s)")
    assert lines[-1].startswith("total: 21 samples")
    assert json.loads((out / "sizes.json").read_text()) == {
        "image/train": 12,
        "image/val": 3,
        "video/train": 4,
        "video/val": 2,
    }
    assert read_manifest(out)["seed"] == 3

    assert cli.main(["synthetic", "--out", str(out), "--seed", "3", *_CLI_SMALL]) == 0
    assert "skipping" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ["synthetic", "--out", "{tmp}/x", "--num-train-images", "0"],
        ["synthetic", "--out", "{tmp}/x", "--num-val-videos", "-3"],
        ["synthetic", "--out", "{tmp}/x", "--shard-size", "many"],
        ["synthetic", "--out", "{tmp}/x", "--image-size", "8"],
        ["synthetic", "--out", "{tmp}/file/x", *_CLI_SMALL],  # parent is a regular file: cannot be created
        ["synthetic"],
        [],
    ],
)
def test_cli_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SystemExit) as excinfo:
        cli.main([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err
