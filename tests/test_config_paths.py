"""Tests of Config.validate_paths: the data layout, sizes.json against the manifest, the DeepSpeed config file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_config import DEMO

from condmoe.train.config import (
    REPO_ROOT,
    load_config,
    resolve_path,
)

# --------------------------------------------------------------------------------------------------------------------
# validate_paths
# --------------------------------------------------------------------------------------------------------------------


def _fake_data_root(root: Path, datasets: tuple[str, ...] = ("image",)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sizes.json").write_text(json.dumps({f"{d}/train": 1 for d in datasets}))
    for d in datasets:
        (root / d / "train").mkdir(parents=True)
        (root / d / "train" / "shard-000000.tar").write_bytes(b"")
    return root


def test_validate_paths_passes_on_complete_layout(tmp_path, monkeypatch):
    root = _fake_data_root(tmp_path / "data")
    cfg = load_config(DEMO, [f"data.root={root}"])
    monkeypatch.chdir(tmp_path)  # the relative deepspeed_config falls back to the repository root
    assert resolve_path(cfg.deepspeed_config) == REPO_ROOT / "ds_configs" / "zero2_cpu.json"
    cfg.validate_paths()


def test_validate_paths_without_sizes_json(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    cfg = load_config(DEMO, [f"data.root={root}"])
    with pytest.raises(FileNotFoundError, match="sizes.json") as info:
        cfg.validate_paths()
    assert str(root) in str(info.value)


def test_validate_paths_missing_shards_names_the_task(tmp_path):
    root = _fake_data_root(tmp_path / "data")
    cfg = load_config(DEMO, [f"data.root={root}", "tasks.1.dataset=video"])
    with pytest.raises(FileNotFoundError) as info:
        cfg.validate_paths()
    message = str(info.value)
    assert "tasks[shapes_caption_retrieval].dataset" in message and str(root / "video" / "train") in message


def test_validate_paths_empty_shard_folder(tmp_path):
    root = _fake_data_root(tmp_path / "data")
    (root / "image" / "train" / "shard-000000.tar").unlink()
    (root / "image" / "train" / "notes.txt").write_text("not a shard")
    cfg = load_config(DEMO, [f"data.root={root}"])
    with pytest.raises(FileNotFoundError, match=r"tasks\[shapes_classification\]\.dataset"):
        cfg.validate_paths()


def test_validate_paths_missing_deepspeed_config(tmp_path):
    root = _fake_data_root(tmp_path / "data")
    missing = tmp_path / "ds" / "nope.json"
    cfg = load_config(DEMO, [f"data.root={root}", f"deepspeed_config={missing}"])
    with pytest.raises(FileNotFoundError, match="deepspeed_config") as info:
        cfg.validate_paths()
    assert str(missing) in str(info.value)


def test_validate_paths_missing_relative_deepspeed_config(tmp_path, monkeypatch):
    root = _fake_data_root(tmp_path / "data")
    cfg = load_config(DEMO, [f"data.root={root}", "deepspeed_config=ds_configs/zero9.json"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="ds_configs/zero9.json"):
        cfg.validate_paths()


# --------------------------------------------------------------------------------------------------------------------
# validate_paths: sizes.json against the manifest
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def prepared(tiny_data, tmp_path) -> Path:
    """A copy of the tiny synthetic root (shards, sizes.json, manifest.json written by condmoe-prep)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    return root


def _set_size(root: Path, key: str, value) -> None:
    sizes = json.loads((root / "sizes.json").read_text())
    if value is _MISSING:
        del sizes[key]
    else:
        sizes[key] = value
    (root / "sizes.json").write_text(json.dumps(sizes))


_MISSING = object()


def test_validate_paths_accepts_sizes_that_match_the_manifest(prepared, caplog):
    caplog.set_level("WARNING", logger="condmoe.train.config")
    load_config(DEMO, [f"data.root={prepared}"]).validate_paths()
    assert not caplog.records


@pytest.mark.parametrize("value, why", [
    (0, "is 0, expected a positive integer"),
    (-5, "is -5, expected a positive integer"),
    ("240", "is '240', expected a positive integer"),
    (240.0, "is 240.0, expected a positive integer"),
    (True, "is True, expected a positive integer"),
    (None, "is None, expected a positive integer"),
    (10, "is 10, but"),  # too small: every epoch would be one batch
    (1000, "is 1000, but"),
    (_MISSING, "no entry 'image/train'"),
])
def test_validate_paths_refuses_a_bad_sizes_count_in_one_line_naming_file_and_key(prepared, value, why):
    _set_size(prepared, "image/train", value)
    with pytest.raises(ValueError) as info:
        load_config(DEMO, [f"data.root={prepared}"]).validate_paths()
    message = str(info.value)
    assert why in message and str(prepared / "sizes.json") in message and "image/train" in message
    assert "\n" not in message
    if value in (10, 1000):
        assert f"{prepared / 'manifest.json'} lists 240 samples" in message


def test_validate_paths_names_a_malformed_sizes_json(prepared):
    (prepared / "sizes.json").write_text('{"image/train": 240,')
    with pytest.raises(ValueError, match="sizes.json: not valid JSON") as info:
        load_config(DEMO, [f"data.root={prepared}"]).validate_paths()
    assert str(prepared / "sizes.json") in str(info.value)


def test_validate_paths_refuses_a_manifest_entry_whose_shards_disagree(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["datasets"]["image/train"]["shards"][0]["num_samples"] -= 1
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="entry 'image/train' says 240 samples but its shards hold 239"):
        load_config(DEMO, [f"data.root={prepared}"]).validate_paths()


@pytest.mark.parametrize("damage, why", [("delete", "no manifest.json"), ("garble", "manifest.json unreadable"),
                                         ("drop_entry", "no entry 'image/train' in manifest.json")])
def test_validate_paths_without_a_manifest_entry_warns_once_what_it_checked(prepared, caplog, damage, why):
    manifest_path = prepared / "manifest.json"
    if damage == "delete":
        manifest_path.unlink()
    elif damage == "garble":
        manifest_path.write_text("{")
    else:
        manifest = json.loads(manifest_path.read_text())
        del manifest["datasets"]["image/train"]
        manifest_path.write_text(json.dumps(manifest))
    _set_size(prepared, "image/train", 10)  # not checkable: training goes on
    caplog.set_level("WARNING", logger="condmoe.train.config")
    load_config(DEMO, [f"data.root={prepared}"]).validate_paths()  # two tasks read image/train: one warning
    (message,) = [r.getMessage() for r in caplog.records]
    assert "'image/train' = 10 checked as a positive integer only, not against the shards" in message
    assert why in message and str(prepared / "sizes.json") in message


def test_train_cli_prints_a_bad_sizes_count_as_one_error_line(prepared, capsys):
    from condmoe.train.cli import train_main

    _set_size(prepared, "image/train", 0)
    assert train_main(["--config", str(DEMO), f"data.root={prepared}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"condmoe-train: error: {prepared / 'sizes.json'}: 'image/train' is 0, expected a positive "
                   "integer sample count")
