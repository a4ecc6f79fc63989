"""Bad input in the training data: junk and truncated shards, bad samples, labels outside the classes (skipped and
counted, never a crash)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from test_train_data import (  # *_fixture: the fixtures `root` and `tokenizer`
    IMG,
    NUM_VAL,
    _check_images_and_labels,
    make_stream,
    read_val_samples,
    root_fixture,  # noqa: F401
    run_with_timeout,
    take,
    tokenizer_fixture,  # noqa: F401
)

from condmoe.data_prep.synthetic import IMAGE_CLASSES
from condmoe.train.data import val_batches

# --------------------------------------------------------------------------------------------------------------------
# Corrupt shards and samples
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def data_copy(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    return copy


def _junk_shard(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "condmoe.train.data" and r.levelno == logging.WARNING]


def test_val_skips_a_junk_shard(data_copy, tokenizer, caplog):
    caplog.set_level(logging.WARNING, logger="condmoe.train.data")
    _junk_shard(data_copy / "image" / "val" / "shard-999999.tar")
    batches = run_with_timeout(lambda: list(val_batches(data_copy, "image", IMG, 16, tokenizer)))
    assert [b["images"].shape[0] for b in batches] == [16, 16, 8]  # every good sample, once
    assert any("shard-999999.tar" in m for m in _warnings(caplog))


def test_val_survives_a_truncated_shard(data_copy, tokenizer, caplog):
    caplog.set_level(logging.WARNING, logger="condmoe.train.data")
    good = [int(s["cls"]) for s in read_val_samples(data_copy)]
    first = data_copy / "image" / "val" / "shard-000000.tar"
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    batches = run_with_timeout(lambda: list(val_batches(data_copy, "image", IMG, 16, tokenizer)))
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert 10 < len(labels) < NUM_VAL  # part of the truncated shard survives ...
    assert labels == good[: len(labels) - 10] + good[30:]  # ... as a prefix, and the intact shard is read in full
    assert any("shard-000000.tar" in m for m in _warnings(caplog))


def test_val_skips_bad_samples_inside_a_shard(data_copy, tokenizer, caplog):
    caplog.set_level(logging.WARNING, logger="condmoe.train.data")
    path = data_copy / "image" / "val" / "shard-000001.tar"
    samples = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
               for s in wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None)]
    samples[1]["jpg"] = samples[1]["jpg"][: len(samples[1]["jpg"]) // 2]  # truncated JPEG
    samples[2]["jpg"] = b"not an image"
    samples[3]["cls"] = b"abc"
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    batches = run_with_timeout(lambda: list(val_batches(data_copy, "image", IMG, 16, tokenizer)))
    assert sum(b["images"].shape[0] for b in batches) == NUM_VAL - 3
    assert len(_warnings(caplog)) == 3


def test_train_stream_skips_a_junk_shard(data_copy, tokenizer, caplog):
    caplog.set_level(logging.WARNING, logger="condmoe.train.data")
    # A dataset of one good shard and one junk shard: resampling picks the junk one about every other time.
    mixed = data_copy / "mixed" / "train"
    mixed.mkdir(parents=True)
    shutil.copy(data_copy / "image" / "train" / "shard-000000.tar", mixed)
    _junk_shard(mixed / "shard-999999.tar")
    sizes = json.loads((data_copy / "sizes.json").read_text())
    (data_copy / "sizes.json").write_text(json.dumps({**sizes, "mixed/train": 30}))
    classes = json.loads((data_copy / "classes.json").read_text())
    (data_copy / "classes.json").write_text(json.dumps({**classes, "mixed": classes["image"]}))
    stream = make_stream(data_copy, tokenizer, dataset="mixed", batch_size=8)
    batches = run_with_timeout(lambda: take(stream, 20))
    for batch in batches:
        _check_images_and_labels(batch, 8)
    assert stream.position == 20
    assert any("shard-999999.tar" in m for m in _warnings(caplog))


# --------------------------------------------------------------------------------------------------------------------
# Labels outside the classes: skipped and counted, one warning per stream
# --------------------------------------------------------------------------------------------------------------------


def relabel_shard(shard: Path, labels: dict[int, bytes]) -> list[str]:
    """Rewrites ``shard`` through the project's shard writer with sample ``i``'s ``.cls`` set to ``labels[i]``;
    returns the changed samples' keys."""
    from condmoe.data_prep.shard_writer import SliceWriter

    samples = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
               for s in wds.WebDataset(str(shard), shardshuffle=False, nodesplitter=None)]
    writer = SliceWriter(shard.parent, int(shard.stem.split("-")[1]), max_bytes=1 << 30)
    for i, sample in enumerate(samples):
        writer.write({**sample, "cls": labels.get(i, sample["cls"])})
    assert [s.name for s in writer.close()] == [shard.name]
    return [samples[i]["__key__"] for i in sorted(labels)]


def test_out_of_range_labels_are_skipped_and_counted_exactly_in_val(data_copy, tokenizer, caplog):
    caplog.set_level(logging.WARNING, logger="condmoe.train.data")
    keys = relabel_shard(data_copy / "image" / "val" / "shard-000000.tar", {3: b"99", 7: b"-1", 8: b"10"})
    batches = run_with_timeout(lambda: list(val_batches(data_copy, "image", IMG, 16, tokenizer,
                                                        task_type="image_classification")))
    labels = torch.cat([b["labels"] for b in batches])
    assert len(labels) == NUM_VAL - 3 and ((labels >= 0) & (labels < len(IMAGE_CLASSES))).all()
    assert sum(int(b["num_skipped"]) for b in batches) == 3
    assert all("first_bad_label" not in b for b in batches)
    (warning,) = _warnings(caplog)
    assert f"shard-000000.tar: sample {keys[0]}: label 99 outside [0, 10)" in warning and "classes.json" in warning


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_stream_skips_labels_beyond_a_short_classes_json(data_copy, tokenizer, caplog, num_workers):
    """classes.json with 5 of the 10 names: labels 5..9 are outside the classes, skipped, counted, warned once."""
    caplog.set_level(logging.WARNING, logger="condmoe.train.data")
    classes = json.loads((data_copy / "classes.json").read_text())
    (data_copy / "classes.json").write_text(json.dumps({**classes, "image": classes["image"][:5]}))
    stream = make_stream(data_copy, tokenizer, batch_size=8, num_workers=num_workers)
    batches = run_with_timeout(lambda: take(stream, 12))  # several epochs (15 batches per epoch of 120 samples)
    labels = torch.cat([b["labels"] for b in batches])
    assert ((labels >= 0) & (labels < 5)).all()
    assert sum(int(b["num_skipped"]) for b in batches) > 10  # about as many skipped as kept
    (warning,) = _warnings(caplog)
    assert warning.startswith("task t: skipping samples with a label outside the classes (counted in bad_samples)")
    assert "outside [0, 5) (5 classes in classes.json)" in warning and "image/train/shard-" in warning
    stream.close()


def test_train_stream_skips_out_of_range_labels_on_real_shards(data_copy, tokenizer, caplog):
    caplog.set_level(logging.WARNING, logger="condmoe.train.data")
    for shard in sorted((data_copy / "image" / "train").glob("*.tar")):
        relabel_shard(shard, {i: b"99" if i % 2 else b"-1" for i in range(0, 30, 3)})  # 10 of 30 per shard
    stream = make_stream(data_copy, tokenizer, batch_size=8)
    batches = run_with_timeout(lambda: take(stream, 10))
    labels = torch.cat([b["labels"] for b in batches])
    assert ((labels >= 0) & (labels < len(IMAGE_CLASSES))).all()
    assert sum(int(b["num_skipped"]) for b in batches) > 0
    assert len(_warnings(caplog)) == 1


def test_retrieval_ignores_the_labels(data_copy, tokenizer):
    relabel_shard(data_copy / "image" / "val" / "shard-000000.tar", {0: b"99"})
    batches = list(val_batches(data_copy, "image", IMG, 16, tokenizer, task_type="image_text_retrieval"))
    assert sum(len(b["labels"]) for b in batches) == NUM_VAL and sum(int(b["num_skipped"]) for b in batches) == 0


def test_no_valid_label_at_all_is_an_error_not_a_hang(data_copy, tokenizer):
    classes = json.loads((data_copy / "classes.json").read_text())
    (data_copy / "classes.json").write_text(json.dumps({**classes, "image": []}))
    stream = make_stream(data_copy, tokenizer, batch_size=8)
    with pytest.raises(ValueError, match="unusable samples in a row .*label .* outside \\[0, 0\\)"):
        run_with_timeout(lambda: next(stream))


def test_a_dataset_missing_from_classes_json_is_named(data_copy, tokenizer):
    classes = json.loads((data_copy / "classes.json").read_text())
    (data_copy / "classes.json").write_text(json.dumps({k: v for k, v in classes.items() if k != "image"}))
    with pytest.raises(ValueError, match="classes.json: no entry 'image'"):
        make_stream(data_copy, tokenizer)


def test_stream_refuses_a_non_positive_sizes_count(data_copy, tokenizer):
    sizes = json.loads((data_copy / "sizes.json").read_text())
    (data_copy / "sizes.json").write_text(json.dumps({**sizes, "image/train": 0}))
    with pytest.raises(ValueError, match="sizes.json: 'image/train' is 0, expected a positive integer"):
        make_stream(data_copy, tokenizer)


@pytest.mark.slow
def test_two_rank_run_skips_one_ranks_bad_labels_and_counts_them(tiny_data, tmp_path):
    """Rank 1 reads image/train's shard 1 (of 3), where every other label is 99 or -1: both ranks finish (rc 0),
    metrics.jsonl counts the skipped samples, and rank 1 warns once."""
    import yaml
    from conftest import REPO, run, torchrun

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    keys = relabel_shard(root / "image" / "train" / "shard-000001.tar",
                         {i: b"99" if i % 4 else b"-1" for i in range(0, 100, 2)})
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["data"].update(root=str(root), shuffle_buffer=20, num_workers=1)
    cfg["run"].update(output_dir=str(tmp_path / "run"), log_every=2, save_every=100, max_steps=4, tensorboard=False)
    cfg["tasks"] = [{**cfg["tasks"][0], "batch_size": 8}]  # classification only: every step reads labels
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run([*torchrun(2), "-m", "condmoe.train", "--config", str(path)], timeout=240)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    assert sum(m["bad_samples"] for m in metrics) >= 8  # rank 1 skips about one sample per good one
    warnings = [line for line in proc.stderr.splitlines() if "skipping samples with a label outside" in line]
    assert len(warnings) == 1 and "image/train/shard-000001.tar: sample " in warnings[0]
    assert any(f"sample {key}: label" in warnings[0] for key in keys)
