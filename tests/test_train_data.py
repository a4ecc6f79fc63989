"""Tests of train.data: task streams (layout, determinism, exact resume), the task sampler, val reading, bad shards."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from condmoe.data_prep.schema import shard_urls
from condmoe.data_prep.synthetic import IMAGE_CLASSES, write_synthetic_dataset
from condmoe.models.text_tokenizer import TextTokenizer
from condmoe.train.config import DataConfig, TaskConfig
from condmoe.train.data import TaskSampler, TaskStream, image_to_tensor, val_batches

# 120 train images in 4 shards of 30, 40 val images in shards of 30 + 10. With batch size 40 on one rank an epoch is
# 3 batches, so a handful of batches spans several epochs.
SMALL = dict(
    num_train_images=120,
    num_val_images=40,
    num_train_videos=8,
    num_val_videos=4,
    shard_size=30,
    video_shard_size=4,
    vocab_size=400,
)
NUM_TRAIN, NUM_VAL = 120, 40
IMG = 32  # the shards hold 64 px images; streams resize them
TEXT_LEN = 24
EPOCH_BATCH = 40  # batch size giving batches_per_epoch == 3
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train_data") / "synthetic"
    sizes = write_synthetic_dataset(out, seed=0, **SMALL)
    assert sizes["image/train"] == NUM_TRAIN and sizes["image/val"] == NUM_VAL
    assert len(shard_urls(out, "image", "train")) == 4 and len(shard_urls(out, "image", "val")) == 2
    return out


@pytest.fixture(scope="module")
def tokenizer(root: Path) -> TextTokenizer:
    return TextTokenizer(root / "tokenizer", max_length=TEXT_LEN)


def make_stream(root: Path, tokenizer: TextTokenizer, *, task_type: str = "image_classification",
                batch_size: int = EPOCH_BATCH, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                task_index: int = 0, seed: int = 0, dataset: str = "image", shuffle_buffer: int = 20,
                name: str = "t") -> TaskStream:
    data = DataConfig(root=str(root), num_workers=num_workers, shuffle_buffer=shuffle_buffer, max_text_len=TEXT_LEN)
    task = TaskConfig(name=name, type=task_type, dataset=dataset, batch_size=batch_size)
    return TaskStream(task, task_index, data, tokenizer, IMG, rank=rank, world_size=world_size, seed=seed)


def take(stream: TaskStream, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(stream) for _ in range(n)]


def same_batch(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_batches(got: list[dict], want: list[dict], first: int = 0) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert same_batch(a, b), f"batch {first + i} differs"


def run_with_timeout(fn: Callable[[], Any], timeout: float = TIMEOUT_S) -> Any:
    """Runs ``fn`` in a daemon thread; fails (instead of hanging the session) if it does not finish in time."""
    result: dict[str, Any] = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the test thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"did not finish within {timeout} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def read_val_samples(root: Path, dataset: str = "image") -> list[dict]:
    urls = shard_urls(root, dataset, "val")
    return list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None))


# --------------------------------------------------------------------------------------------------------------------
# Batch layout
# --------------------------------------------------------------------------------------------------------------------


def _check_images_and_labels(batch: dict[str, torch.Tensor], batch_size: int) -> None:
    images, labels = batch["images"], batch["labels"]
    assert images.shape == (batch_size, 3, IMG, IMG) and images.dtype == torch.float32
    assert torch.isfinite(images).all()
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.std() > 0.05  # real pictures, not a constant
    assert labels.shape == (batch_size,) and labels.dtype == torch.long
    assert ((labels >= 0) & (labels < len(IMAGE_CLASSES))).all()


def test_classification_batch_layout(root, tokenizer):
    stream = make_stream(root, tokenizer, batch_size=8)
    for batch in take(stream, 3):
        assert set(batch) == {"images", "labels", "num_skipped"} and batch["num_skipped"].item() == 0
        _check_images_and_labels(batch, 8)
    assert stream.position == 3


def test_retrieval_batch_layout(root, tokenizer):
    stream = make_stream(root, tokenizer, task_type="image_text_retrieval", batch_size=8)
    for batch in take(stream, 3):
        assert set(batch) == {"images", "labels", "text_ids", "text_mask", "num_skipped"}
        _check_images_and_labels(batch, 8)
        ids, mask = batch["text_ids"], batch["text_mask"]
        assert ids.shape == (8, TEXT_LEN) and ids.dtype == torch.long
        assert mask.shape == (8, TEXT_LEN) and mask.dtype == torch.bool
        assert (ids[:, 0] == tokenizer.spe_id).all() and mask[:, 0].all()
        lengths = mask.sum(dim=1)
        assert (lengths >= 3).all()  # spe, at least one word, eos
        for row_ids, row_mask, n in zip(ids, mask, lengths.tolist()):
            assert row_mask[:n].all() and not row_mask[n:].any()  # real tokens form a prefix
            assert row_ids[n - 1] == tokenizer.eos_id
            assert (row_ids[n:] == tokenizer.pad_id).all()
            assert tokenizer.decode(row_ids[:n]).strip()  # decodes to a caption


def test_batches_per_epoch(root, tokenizer):
    assert make_stream(root, tokenizer).batches_per_epoch == 3  # 120 // 40
    assert make_stream(root, tokenizer, world_size=2).batches_per_epoch == 1  # 120 // 80
    assert make_stream(root, tokenizer, world_size=4).batches_per_epoch == 1  # never 0
    # 120 // 7 = 17 batches, split over 2 workers: 9 each, 18 per epoch.
    stream = make_stream(root, tokenizer, batch_size=7, num_workers=2)
    assert (stream.batches_per_worker, stream.batches_per_epoch) == (9, 18)


def test_missing_data_raises(root, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        make_stream(root, tokenizer, dataset="nothing")
    (tmp_path / "image" / "train").mkdir(parents=True)
    shutil.copy(shard_urls(root, "image", "train")[0], tmp_path / "image" / "train")
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        make_stream(tmp_path, tokenizer)


# --------------------------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 1])
def test_same_seed_rank_task_gives_same_batches(root, tokenizer, num_workers):
    kwargs = dict(task_type="image_text_retrieval", num_workers=num_workers, rank=1, task_index=2, seed=5)
    a = take(make_stream(root, tokenizer, **kwargs), 4)  # crosses the epoch boundary after batch 3
    b = take(make_stream(root, tokenizer, **kwargs), 4)
    assert_same_batches(a, b)


@pytest.mark.parametrize("change", [dict(rank=1), dict(task_index=1), dict(seed=1)])
def test_different_rank_task_or_seed_gives_different_batches(root, tokenizer, change):
    base = take(make_stream(root, tokenizer), 2)
    other = take(make_stream(root, tokenizer, **change), 2)
    for a, b in zip(base, other):
        assert not torch.equal(a["images"], b["images"])


def test_epochs_differ(root, tokenizer):
    stream = make_stream(root, tokenizer)
    batches = take(stream, 6)
    assert stream.batches_per_epoch == 3
    for i in range(3):
        assert not torch.equal(batches[i]["images"], batches[i + 3]["images"])


# --------------------------------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------------------------------

TOTAL = 8  # positions 0..7 span epochs 0, 1 and 2 (3 batches each)


@pytest.fixture(scope="module", params=[0, 1], ids=["workers0", "workers1"])
def reference(request, root, tokenizer) -> tuple[int, list[dict]]:
    """An uninterrupted stream's first TOTAL batches, per worker count."""
    stream = make_stream(root, tokenizer, task_type="image_text_retrieval", num_workers=request.param)
    assert stream.batches_per_epoch == 3
    return request.param, take(stream, TOTAL)


@pytest.mark.parametrize("how", ["seek", "position"])
@pytest.mark.parametrize("start", [1, 3, 4, 7])
def test_resume_continues_the_exact_stream(root, tokenizer, reference, how, start):
    num_workers, want = reference
    stream = make_stream(root, tokenizer, task_type="image_text_retrieval", num_workers=num_workers)
    if how == "seek":
        stream.seek(start)
    else:
        stream.position = start  # what the trainer does: the stream seeks lazily on its first batch
    assert stream.position == start
    got = take(stream, TOTAL - start)
    assert_same_batches(got, want[start:], first=start)
    assert stream.position == TOTAL


def test_seek_moves_a_running_stream(root, tokenizer, reference):
    num_workers, want = reference
    stream = make_stream(root, tokenizer, task_type="image_text_retrieval", num_workers=num_workers)
    take(stream, 2)
    stream.seek(5)
    assert_same_batches(take(stream, 2), want[5:7], first=5)
    stream.seek(0)  # backwards too
    assert_same_batches(take(stream, 1), want[:1])


def test_trainer_style_resume_with_sampler(root, tokenizer):
    """Replays what train.trainer does: draw a task per micro-step, then restore streams from counts_until."""
    tasks = [TaskConfig(name="cls", batch_size=EPOCH_BATCH, weight=2.0),
             TaskConfig(name="ret", type="image_text_retrieval", batch_size=EPOCH_BATCH)]
    steps, micro, resume_at = 8, 2, 5

    def streams() -> list[TaskStream]:
        return [make_stream(root, tokenizer, task_type=t.type, task_index=i, rank=1, seed=3, name=t.name)
                for i, t in enumerate(tasks)]

    sampler = TaskSampler(tasks, seed=3, rank=1)
    full = streams()
    uninterrupted = [next(full[sampler(s, m)]) for s in range(steps) for m in range(micro)]
    counts = sampler.counts_until(resume_at, micro)
    assert sum(counts) == resume_at * micro and min(counts) > 0

    resumed = streams()
    for stream, position in zip(resumed, counts):
        stream.position = position
    replayed = [next(resumed[sampler(s, m)]) for s in range(resume_at, steps) for m in range(micro)]
    assert_same_batches(replayed, uninterrupted[resume_at * micro:], first=resume_at * micro)


# --------------------------------------------------------------------------------------------------------------------
# TaskSampler
# --------------------------------------------------------------------------------------------------------------------


def _tasks(*weights: float) -> list[TaskConfig]:
    return [TaskConfig(name=f"t{i}", weight=w) for i, w in enumerate(weights)]


def test_sampler_is_deterministic_and_in_range():
    a, b = TaskSampler(_tasks(1, 2, 3), seed=4, rank=2), TaskSampler(_tasks(1, 2, 3), seed=4, rank=2)
    draws = [a(s, m) for s in range(300) for m in range(2)]
    assert draws == [b(s, m) for s in range(300) for m in range(2)]
    assert all(type(d) is int and 0 <= d < 3 for d in draws)
    assert set(draws) == {0, 1, 2}
    assert a(17) == a(17, 0)  # micro_step defaults to 0, and repeated calls agree


def test_sampler_respects_weights():
    sampler = TaskSampler(_tasks(3, 1), seed=0, rank=0)
    draws = np.array([sampler(s) for s in range(4000)])
    assert abs((draws == 0).mean() - 0.75) < 0.03
    probs = TaskSampler(_tasks(1, 1, 2), seed=0, rank=0).probs
    np.testing.assert_allclose(probs, [0.25, 0.25, 0.5])


def test_sampler_single_task():
    sampler = TaskSampler(_tasks(0.3), seed=1, rank=0)
    assert {sampler(s, m) for s in range(50) for m in range(3)} == {0}


@pytest.mark.parametrize("change", [dict(rank=1), dict(seed=1)])
def test_sampler_differs_across_ranks_and_seeds(change):
    args = dict(seed=0, rank=0)
    a = TaskSampler(_tasks(1, 1), **args)
    b = TaskSampler(_tasks(1, 1), **{**args, **change})
    assert [a(s) for s in range(200)] != [b(s) for s in range(200)]


def test_sampler_micro_steps_draw_independently():
    sampler = TaskSampler(_tasks(1, 1), seed=0, rank=0)
    assert [sampler(s, 0) for s in range(200)] != [sampler(s, 1) for s in range(200)]


@pytest.mark.parametrize("step, micro_steps", [(0, 1), (1, 1), (37, 1), (25, 3), (10, 4)])
def test_counts_until_matches_counting_by_hand(step, micro_steps):
    sampler = TaskSampler(_tasks(2, 1, 1), seed=9, rank=3)
    by_hand = [0, 0, 0]
    for s in range(step):
        for m in range(micro_steps):
            by_hand[sampler(s, m)] += 1
    counts = sampler.counts_until(step, micro_steps)
    assert counts == by_hand
    assert sum(counts) == step * micro_steps


# --------------------------------------------------------------------------------------------------------------------
# Validation reader
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size, sizes", [(16, [16, 16, 8]), (40, [40]), (64, [40]), (30, [30, 10])])
def test_val_batches_yield_every_sample_once(root, tokenizer, batch_size, sizes):
    batches = list(val_batches(root, "image", IMG, batch_size, tokenizer))
    assert [b["images"].shape[0] for b in batches] == sizes
    assert sum(sizes) == json.loads((root / "sizes.json").read_text())["image/val"]
    samples = read_val_samples(root)
    # In shard order: labels and captions line up with the shards' members, so each sample appears exactly once.
    assert torch.cat([b["labels"] for b in batches]).tolist() == [int(s["cls"]) for s in samples]
    captions = [tokenizer.decode(ids[mask]) for b in batches for ids, mask in zip(b["text_ids"], b["text_mask"])]
    assert captions == [s["txt"].decode() for s in samples]
    for b in batches:
        n = b["images"].shape[0]
        assert b["images"].shape == (n, 3, IMG, IMG) and b["text_ids"].shape == (n, TEXT_LEN)
        assert (b["text_ids"][:, 0] == tokenizer.spe_id).all()


def test_val_batches_match_image_to_tensor(root, tokenizer):
    first = next(val_batches(root, "image", IMG, 4, tokenizer))
    from condmoe.train.data import decode_sample

    raw = list(wds.WebDataset(shard_urls(root, "image", "val")[:1], shardshuffle=False, nodesplitter=None))[:4]
    expected = torch.stack([image_to_tensor(decode_sample(s, min_side=IMG)["jpg"], IMG) for s in raw])
    assert torch.equal(first["images"], expected)
    # draft (reduced-scale) JPEG decoding stays close to a full decode followed by the resize
    full = torch.stack([image_to_tensor(decode_sample(s)["jpg"], IMG) for s in raw])
    assert (first["images"] - full).abs().mean() < 0.05


def test_val_batches_missing_split(root, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="val"):
        list(val_batches(tmp_path, "image", IMG, 8, tokenizer))


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


# --------------------------------------------------------------------------------------------------------------------
# image_to_tensor
# --------------------------------------------------------------------------------------------------------------------


def test_image_to_tensor_solid_colour_resized():
    out = image_to_tensor(Image.new("RGB", (20, 10), (255, 0, 128)), 8)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out[0], torch.ones(8, 8))
    torch.testing.assert_close(out[1], -torch.ones(8, 8))
    torch.testing.assert_close(out[2], torch.full((8, 8), 128 / 255 * 2 - 1))


def test_image_to_tensor_exact_values_without_resize():
    pixels = np.random.default_rng(1).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    out = image_to_tensor(Image.fromarray(pixels, mode="RGB"), 6)
    expected = torch.from_numpy((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(out, expected)
    assert out[:, 2, 4].tolist() == pytest.approx(((pixels[2, 4] / 255.0 - 0.5) / 0.5).tolist())  # [C, H, W]


def test_image_to_tensor_range_and_modes():
    pixels = np.random.default_rng(2).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    out = image_to_tensor(Image.fromarray(pixels, mode="RGB"), 12)
    assert out.shape == (3, 12, 12) and out.min() >= -1.0 and out.max() <= 1.0
    gray = image_to_tensor(Image.new("L", (5, 5), 0), 5)
    assert gray.shape == (3, 5, 5) and (gray == -1.0).all()
    rgba = image_to_tensor(Image.new("RGBA", (4, 4), (255, 255, 255, 0)), 4)
    assert rgba.shape == (3, 4, 4) and (rgba == 1.0).all()  # alpha dropped, not blended


def test_stream_without_usable_samples_raises_instead_of_hanging(tiny_data):
    """An image task pointed at the video dataset (no .jpg members) can never yield a batch: a named error."""
    import threading

    from condmoe.train.config import DataConfig, TaskConfig
    from condmoe.train.data import TaskStream

    tokenizer = TextTokenizer(tiny_data / "tokenizer", 16)
    task = TaskConfig(name="wrong", type="image_classification", dataset="video", batch_size=2)
    stream = TaskStream(task, 0, DataConfig(root=str(tiny_data), num_workers=0, shuffle_buffer=4), tokenizer, 32,
                        rank=0, world_size=1, seed=0)
    outcome = {}

    def pull():
        try:
            next(stream)
        except ValueError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=pull, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "stream hung"
    assert "unusable samples in a row" in outcome["error"] and "video" in outcome["error"]


def test_split_by_rank_gives_disjoint_shards_or_all_when_too_few():
    from condmoe.train.data import split_by_rank

    urls = [f"s{i}.tar" for i in range(5)]
    parts = [split_by_rank(urls, r, 2) for r in range(2)]
    assert parts == [["s0.tar", "s2.tar", "s4.tar"], ["s1.tar", "s3.tar"]]
    assert split_by_rank(urls[:1], 1, 2) == ["s0.tar"]


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
