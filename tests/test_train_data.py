"""Tests of train.data: task streams (layout, determinism, exact resume), the task sampler, val reading, bad shards."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module", name="root")
def root_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train_data") / "synthetic"
    sizes = write_synthetic_dataset(out, seed=0, **SMALL)
    assert sizes["image/train"] == NUM_TRAIN and sizes["image/val"] == NUM_VAL
    assert len(shard_urls(out, "image", "train")) == 4 and len(shard_urls(out, "image", "val")) == 2
    return out


@pytest.fixture(scope="module", name="tokenizer")
def tokenizer_fixture(root: Path) -> TextTokenizer:
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
