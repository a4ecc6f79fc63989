"""Tests of train/data_specs.py: open_clip-style data specs (brace patterns, ``::`` lists, folders, ``pipe:``),
img2dataset shards read as they are, sample counts, and the per-rank worker budget."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import REPO, run, torchrun
from PIL import Image

from condmoe.data_prep import schema
from condmoe.models.text_tokenizer import TextTokenizer
from condmoe.train.config import DataConfig, TaskConfig, load_config
from condmoe.train.data import TaskStream, val_batches
from condmoe.train.data_specs import (
    expand_spec,
    sizes_beside,
    spec_members,
    spec_parts,
    stream_workers,
    train_shards,
    worker_shares,
)

IMG = 32
CAPTIONS = ("a red circle on the left", "a small blue square", "a big green triangle at the top")


def _image(i: int, fmt: str = "JPEG") -> bytes:
    pixels = np.full((64, 64, 3), (37 * i) % 256, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def write_img2dataset(folder: Path, num_shards: int, per_shard: int, bad: bool = True) -> list[Path]:
    """img2dataset's output: ``NNNNN.tar`` with samples ``<shard><index>`` (9 digits) of ``jpg``, ``txt``, ``json``
    (the last good one of each shard a ``png``) and no sizes.json; with ``bad``, each shard starts with a sample
    without its caption and one without its image."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        path = folder / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            if bad:
                writer.write({"__key__": f"{s:05d}0000", "jpg": _image(0), "json": b'{"status": "success"}'})
                writer.write({"__key__": f"{s:05d}0001", "txt": b"no image here", "json": b"{}"})
            for i in range(per_shard):
                key, caption = f"{s:05d}{i + 2:04d}", CAPTIONS[i % len(CAPTIONS)]
                image = {"png": _image(i, "PNG")} if i == per_shard - 1 else {"jpg": _image(i)}
                meta = {"key": key, "caption": caption, "status": "success", "width": 64, "height": 64}
                writer.write({"__key__": key, **image, "txt": caption.encode(), "json": json.dumps(meta).encode()})
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tokenizer(tiny_data) -> TextTokenizer:
    return TextTokenizer(tiny_data / "tokenizer", 16)


def spec_stream(tiny_data, tokenizer, train_data: str, num_samples: int = 0, task_type: str = "image_text_retrieval",
                **data) -> TaskStream:
    task = TaskConfig(name="cc", type=task_type, dataset="image", batch_size=4, train_data=train_data,
                      train_num_samples=num_samples)
    config = DataConfig(root=str(tiny_data), **{"num_workers": 0, "shuffle_buffer": 1, **data})
    return TaskStream(task, 0, config, tokenizer, IMG, rank=0, world_size=1, seed=0)


# --------------------------------------------------------------------------------------------------------------------
# Specs: brace patterns, "::" lists, folders, pipe:
# --------------------------------------------------------------------------------------------------------------------


def test_spec_parts_expands_braces_and_double_colon_lists_in_order():
    assert spec_parts("/d/{000..002}.tar", "f") == ["/d/000.tar", "/d/001.tar", "/d/002.tar"]
    assert spec_parts("/a/{0..1}.tar::/b/x.tar:: /c/{y,z}.tar", "f") == [
        "/a/0.tar", "/a/1.tar", "/b/x.tar", "/c/y.tar", "/c/z.tar"]
    assert spec_parts("pipe:cat /d/{8..10}.tar", "f") == ["pipe:cat /d/8.tar", "pipe:cat /d/9.tar",
                                                          "pipe:cat /d/10.tar"]
    assert spec_parts("/d/plain.tar", "f") == ["/d/plain.tar"]


@pytest.mark.parametrize("spec, why", [("/d/{0..2.tar", "Unbalanced braces"), ("/a.tar::", "empty part"),
                                       ("::/a.tar", "empty part")])
def test_spec_parts_refuses_bad_specs_naming_the_field(spec, why):
    with pytest.raises(ValueError, match=rf"^tasks\[cc\]\.train_data=.*{why}") as exc:
        spec_parts(spec, "tasks[cc].train_data")
    assert "\n" not in str(exc.value)


def test_expand_spec_lists_folders_checks_local_shards_and_passes_pipes(tmp_path):
    write_img2dataset(tmp_path / "a", 3, 2)
    (tmp_path / "a" / "00000_stats.json").write_text("{}")  # img2dataset's other files are not shards
    assert expand_spec(str(tmp_path / "a"), "f") == [str(tmp_path / "a" / f"{i:05d}.tar") for i in range(3)]
    assert expand_spec(f"{tmp_path}/a/{{00001..00002}}.tar::pipe:cat x.tar", "f") == [
        str(tmp_path / "a" / "00001.tar"), str(tmp_path / "a" / "00002.tar"), "pipe:cat x.tar"]
    with pytest.raises(FileNotFoundError, match=r"^f: 1 of 4 shards not found, first .*00003\.tar$"):
        expand_spec(f"{tmp_path}/a/{{00000..00003}}.tar", "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar files in folder"):
        expand_spec(str(tmp_path / "empty"), "f")


def test_sizes_beside_reads_open_clip_sizes_json(tmp_path):
    urls = [str(p) for p in write_img2dataset(tmp_path, 3, 2)]
    assert sizes_beside(urls) is None  # img2dataset writes none
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 4, "00001.tar": 4, "00002.tar": 3}))
    assert sizes_beside(urls) == 11 and sizes_beside(urls[1:]) == 7
    assert sizes_beside([*urls, str(tmp_path / "00009.tar")]) is None  # a shard it does not list
    assert sizes_beside(["pipe:cat " + urls[0]]) is None


def test_a_spec_without_a_sample_count_is_a_one_line_error(tmp_path, tiny_data):
    write_img2dataset(tmp_path, 2, 3)
    task = TaskConfig(name="cc", type="image_text_retrieval", train_data=f"{tmp_path}/{{00000..00001}}.tar")
    with pytest.raises(ValueError, match=r"^tasks\[cc\]\.train_data: cannot count the samples of its 2 shards .*"
                                         r"set tasks\[cc\]\.train_num_samples") as exc:
        train_shards(tiny_data, task)
    assert "\n" not in str(exc.value)
    task.train_num_samples = 10
    assert train_shards(tiny_data, task) == ([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")], 10)


def test_without_a_spec_the_dataset_folder_and_sizes_json_are_read(tiny_data):
    task = TaskConfig(name="t", type="image_classification", dataset="image")
    assert train_shards(tiny_data, task) == (schema.shard_urls(tiny_data, "image", "train"),
                                             schema.num_samples(tiny_data, "image", "train"))


@pytest.mark.parametrize("fields, message", [
    ({"train_num_samples": 5}, r"train_num_samples=5 must be >= 0 and counts train_data"),
    ({"train_data": "/d/x.tar", "train_num_samples": -1}, r"train_num_samples=-1"),
    ({"val_num_samples": 3}, r"val_num_samples=3"),
    ({"train_data": "/d/{0..1.tar"}, r"train_data='/d/\{0\.\.1\.tar': Unbalanced"),
    ({"val_data": "/d/a.tar::::/d/b.tar"}, r"val_data=.*empty part"),
])
def test_task_config_checks_the_spec_fields(fields, message):
    with pytest.raises(ValueError, match=rf"^tasks\[cc\]\.{message}"):
        TaskConfig(name="cc", type="image_text_retrieval", **fields)


def test_config_file_takes_specs_and_a_worker_budget(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml", ["tasks.1.train_data=/d/{00000..00331}.tar",
                                                       "tasks.1.train_num_samples=2905954", "data.worker_budget=6"])
    assert cfg.tasks[1].train_data == "/d/{00000..00331}.tar" and cfg.tasks[1].train_num_samples == 2905954
    assert cfg.tasks[0].train_data == "" and cfg.data.worker_budget == 6
    with pytest.raises(ValueError, match=r"^data.num_workers=1, data.worker_budget=-1: need >= 0$"):
        DataConfig(worker_budget=-1)


# --------------------------------------------------------------------------------------------------------------------
# img2dataset members
# --------------------------------------------------------------------------------------------------------------------


def test_spec_members_maps_img2dataset_names_and_refuses_incomplete_samples():
    out = spec_members({"__key__": "k", "png": "IMG", "txt": "a cat", "json": b"{}"}, "image_text_retrieval")
    assert out["jpg"] == "IMG" and out["cls"] == -1 and out["png"] == "IMG"
    assert spec_members({"__key__": "k", "jpg": "J", "webp": "W", "txt": "t"}, "captioning")["jpg"] == "J"
    assert "cls" not in spec_members({"__key__": "k", "jpg": "J", "txt": ""}, "image_classification")
    assert spec_members({"__key__": "k", "jpg": "J", "cls": 3}, "image_classification")["cls"] == 3
    assert spec_members({"__key__": "k", "txt": "some text"}, "mlm") == {"__key__": "k", "txt": "some text",
                                                                        "cls": -1}
    with pytest.raises(ValueError, match=r"sample k: no image member \(jpg, jpeg, png, webp\); has \['json', 'txt'\]"):
        spec_members({"__key__": "k", "txt": "a", "json": b"{}"}, "image_text_retrieval")
    for caption in ({}, {"txt": "  \n"}):
        with pytest.raises(ValueError, match="sample k: no caption"):
            spec_members({"__key__": "k", "jpg": "J", **caption}, "captioning")
    assert spec_members({"__key__": "k", "mp4": b"V", "txt": "a"}, "video_text_retrieval")["mp4"] == b"V"


def test_img2dataset_shards_train_and_bad_samples_are_counted(tmp_path, tiny_data, tokenizer, caplog):
    caplog.set_level(logging.WARNING, logger="condmoe.train.data")
    write_img2dataset(tmp_path, 1, 6)  # 2 bad samples, then 6 good ones (the last a png)
    stream = spec_stream(tiny_data, tokenizer, f"{tmp_path}/{{00000..00000}}.tar", num_samples=24)
    batches = [next(stream) for _ in range(4)]
    assert [b["images"].shape for b in batches] == [(4, 3, IMG, IMG)] * 4
    assert all(b["text_ids"].shape[0] == 4 for b in batches)
    # shuffle_buffer 1 keeps the shard order (2 bad, 6 good per pass). A batch leaves when the next good sample
    # arrives, so the skips before that sample count with it: passes 1, 2 and 3 start before batches 1, 2 and 3 leave.
    assert [int(b["num_skipped"]) for b in batches] == [2, 2, 2, 0]
    warnings = [r.getMessage() for r in caplog.records]
    assert any("no caption" in w for w in warnings) and any("no image member" in w for w in warnings)


def test_pipe_specs_are_read(tmp_path, tiny_data, tokenizer):
    paths = write_img2dataset(tmp_path, 2, 3, bad=False)
    spec = f"pipe:cat {tmp_path}/{{00000..00001}}.tar"
    stream = spec_stream(tiny_data, tokenizer, spec, num_samples=6, task_type="captioning")
    assert stream.urls == [f"pipe:cat {p}" for p in paths]
    assert next(stream)["images"].shape == (4, 3, IMG, IMG)
    batches = list(val_batches(tiny_data, "image", IMG, 4, tokenizer, spec=spec))
    assert [len(c) for b in batches for c in b["captions"]] == [1] * 6  # every sample once, with its caption
    assert sum(int(b["num_skipped"]) for b in batches) == 0


def test_val_data_reads_the_spec_and_checks_its_count(tmp_path, tiny_data, tokenizer, caplog):
    write_img2dataset(tmp_path, 2, 3)
    batches = list(val_batches(tiny_data, "image", IMG, 4, tokenizer, spec=str(tmp_path), num_samples=10))
    assert sum(len(b["images"]) for b in batches) == 6 and sum(int(b["num_skipped"]) for b in batches) == 4
    assert not [r for r in caplog.records if "val_num_samples" in r.getMessage()]
    list(val_batches(tiny_data, "image", IMG, 4, tokenizer, spec=str(tmp_path), num_samples=12))
    assert [r.getMessage() for r in caplog.records if "val_num_samples" in r.getMessage()] == [
        f"val_data {tmp_path}: read 10 samples (skipped ones included), val_num_samples is 12"]


# --------------------------------------------------------------------------------------------------------------------
# Worker budget
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights, budget, shares", [
    ([1, 1, 1], 6, [2, 2, 2]),
    ([1, 1, 1], 7, [3, 2, 2]),  # the remainders tie: the earlier stream
    ([8, 1, 1], 10, [8, 1, 1]),
    ([2, 1], 4, [3, 1]),  # quotas 2.67, 1.33
    ([100, 1, 1], 10, [8, 1, 1]),  # largest remainder gives [10, 0, 0]; each stream then takes one from the largest
    ([0.1, 0.2, 0.7], 10, [1, 2, 7]),  # binary fractions do not lose a worker
    ([1, 1, 1], 2, [1, 1, 0]),  # fewer workers than streams: the last loads in the main process
    ([1, 2], 1, [0, 1]),
    ([3, 1], 0, [0, 0]),
    ([6] + [1] * 15, 96, [27] + [5] * 9 + [4] * 6),  # 16 tasks: quotas 27.43 and 4.57
])
def test_worker_shares_hand_cases(weights, budget, shares):
    assert worker_shares(weights, budget) == shares
    assert sum(shares) == budget


@pytest.mark.parametrize("weights, budget", [([1, 0], 4), ([1, float("nan")], 4), ([], 4), ([1], -1)])
def test_worker_shares_refuses_bad_input(weights, budget):
    with pytest.raises(ValueError, match="worker_shares"):
        worker_shares(weights, budget)


def test_stream_workers_keeps_num_workers_without_a_budget():
    assert stream_workers(DataConfig(num_workers=3), [1, 5]) == [3, 3]
    assert stream_workers(DataConfig(num_workers=3, worker_budget=4), [1, 3]) == [1, 3]


def test_a_stream_takes_its_worker_count(tiny_data, tokenizer, tmp_path):
    write_img2dataset(tmp_path, 2, 8, bad=False)
    stream = spec_stream(tiny_data, tokenizer, str(tmp_path), num_samples=16, num_workers=5)
    assert stream.num_workers == 5
    task = TaskConfig(name="cc", type="image_text_retrieval", batch_size=4, train_data=str(tmp_path),
                      train_num_samples=16)
    two = TaskStream(task, 0, DataConfig(root=str(tiny_data), num_workers=5, shuffle_buffer=1), tokenizer, IMG,
                     rank=0, world_size=1, seed=0, num_workers=2)
    assert (two.num_workers, two.batches_per_worker, two.batches_per_epoch) == (2, 2, 4)
    assert next(two)["images"].shape == (4, 3, IMG, IMG)
    two.close()


# --------------------------------------------------------------------------------------------------------------------
# End to end: the demo's caption-retrieval task on img2dataset shards, 2 ranks
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_trains_its_retrieval_task_from_a_brace_spec_on_two_ranks(tiny_data, tmp_path):
    write_img2dataset(tmp_path / "cc", 4, 12)
    out = tmp_path / "run"
    overrides = [f"data.root={tiny_data}", f"run.output_dir={out}", "run.max_steps=4", "run.log_every=1",
                 "run.save_every=4", "run.tensorboard=false", "data.shuffle_buffer=1", "data.worker_budget=1",
                 "tasks.0.batch_size=8", "tasks.1.batch_size=8",
                 f"tasks.1.train_data={tmp_path}/cc/{{00000..00003}}.tar", "tasks.1.train_num_samples=48"]
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(REPO / "configs" / "demo.yaml"), *overrides],
        timeout=400)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert sum(m["task_steps"].get("shapes_caption_retrieval", 0) for m in metrics) > 0
    assert all(v > 0 for m in metrics for v in m["task_loss"].values())
    # shuffle_buffer 1 reads shards in order, and every shard starts with two incomplete samples
    assert sum(m["bad_samples"] for m in metrics) >= 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_4"
