"""Webdataset pipelines: one endless, seeded stream of batches per task and rank, plus the in-order val reader.

The layout read here (written by ``condmoe-prep``) and the member keys are ``data_prep.schema``'s, the only module of
data_prep/ that train/ imports.

Shards are split by rank (disjoint subsets when there are at least as many shards as ranks) and each DataLoader
worker resamples its own seeded sequence from its rank's subset.

Reproducibility: shard choice, sample order and task choice are pure functions of (seed, rank, task, epoch/step), so
a resumed run continues the exact stream: the sampler replays which task each past step drew, each task stream
re-opens at its epoch and skips the batches already consumed in it.
"""

import io
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes everything, a little slower
    simplejpeg = None
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from condmoe.data_prep import schema
from condmoe.models.tasks import task_spec
from condmoe.models.text_tokenizer import TextTokenizer
from condmoe.train.config import DataConfig, TaskConfig
from condmoe.train.data_specs import checked_count, spec_members, split_by_rank, train_shards, val_shards
from condmoe.train.dense_data import BadLabel, DenseTarget, dense_targets
from condmoe.train.masking import IGNORE, mask_whole_words, word_starts
from condmoe.train.tarstream import tar_samples
from condmoe.train.transforms import Augment, augment_dense, augment_image, stable_seed
from condmoe.train.video import three_crops, video_frames, view_frame_indices

log = logging.getLogger(__name__)

# Pixel normalisation of the synthetic data and of the demo; real datasets usually want ImageNet's.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


BAD_LABEL = "first_bad_label"  # batch entry (a str) from a worker to its stream; never reaches the trainer


class SkipBadSamples:
    """Webdataset handler: a bad sample or shard is logged and skipped (no sleep, unlike ``warn_and_continue``).

    ``limit`` bad samples in a row with no good one between them means the stream can never produce a batch (all
    shards corrupt, or a dataset whose samples lack what the task needs): raise instead of resampling for ever.
    Good samples call ``reset`` (a pass-through stage placed after the last stage that can fail).
    """

    def __init__(self, source: str, limit: int = 200):
        self.source = source
        self.limit = limit
        self.in_a_row = 0
        self.unreported = 0  # skipped since the last batch left this worker
        self.first_bad_label: str | None = None  # this pipeline's first BadLabel, until a batch carries it
        self.bad_label_seen = False

    def __call__(self, exn: Exception) -> bool:
        self.in_a_row += 1
        self.unreported += 1
        if isinstance(exn, BadLabel):  # one warning per stream, by the stream (see TaskStream.__next__)
            if not self.bad_label_seen:
                self.first_bad_label, self.bad_label_seen = str(exn), True
        else:
            log.warning("%s: skipping bad sample: %s: %s", self.source, type(exn).__name__, exn)
        if self.in_a_row >= self.limit:
            raise ValueError(f"{self.source}: {self.limit} unusable samples in a row (last: {type(exn).__name__}: "
                             f"{exn}); are the shards readable and does the task type match the dataset?")
        return True

    def reset(self, sample):
        self.in_a_row = 0
        return sample

    def attach(self, batches: Iterator[dict]) -> Iterator[dict]:
        """Pipeline stage (a generator, not ``wds.map``, which would add a ``__key__`` entry to the batch)."""
        for batch in batches:
            batch["num_skipped"] = torch.tensor(self.unreported)
            self.unreported = 0
            if self.first_bad_label is not None:
                batch[BAD_LABEL] = self.first_bad_label  # popped by the stream, which warns once
                self.first_bad_label = None
            yield batch


def check_label(sample: dict, num_classes: int) -> dict:
    """Pipeline stage: refuses a decoded sample whose label is not in ``[0, num_classes)`` (``classes.json``'s)."""
    label = sample.get(schema.LABEL)
    if isinstance(label, int) and not 0 <= label < num_classes:
        raise BadLabel(f"{sample.get('__url__', '?')}: sample {sample.get('__key__')}: label {label} outside "
                       f"[0, {num_classes}) ({num_classes} classes in {schema.CLASSES})")
    return sample


def task_num_classes(root: str | Path, task_type: str, dataset: str) -> int | None:
    """The class count that labels are checked against: ``classes.json``'s for tasks whose targets are the classes,
    ``None`` (no check) for the others. Errors name the file and the dataset."""
    if task_spec(task_type).targets != "classes":
        return None
    classes = schema.read_classes(root)
    if dataset not in classes:
        raise ValueError(f"{Path(root) / schema.CLASSES}: no entry {dataset!r} (has {sorted(classes)})")
    return len(classes[dataset])


def label_stages(num_classes: int | None, handler) -> list:
    return [] if num_classes is None else [wds.map(partial(check_label, num_classes=num_classes), handler=handler)]


def pop_bad_label(batch: dict, source: str, warned: bool) -> bool:
    """Removes a worker's bad-label note from ``batch``; warns about the first one (``warned``: already did)."""
    note = batch.pop(BAD_LABEL, None)
    if note is not None and not warned:
        log.warning("%s: skipping samples with a label outside the classes (counted in bad_samples); first: %s",
                    source, note)
        return True
    return warned


def image_pixels(image: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 ``[size, size, 3]``, resized (bicubic) when needed."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image)


def normalise(pixels_NHWC: np.ndarray) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float ``[..., 3, H, W]``, scaled to [0, 1] and normalised (one op per batch)."""
    x = torch.from_numpy(np.require(pixels_NHWC, requirements=["C", "W"])).float() / 255.0
    x = (x - torch.tensor(MEAN)) / torch.tensor(STD)
    return x.movedim(-1, -3).contiguous()


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB, resized to ``size`` x ``size`` (bicubic), scaled to [0, 1] and normalised -> ``[3, size, size]``."""
    return normalise(image_pixels(image, size))


class Collate:
    """Turns decoded samples into the model's batch dict, in the workers: images and video frames augmented (seeded
    per sample from ``seed`` and the sample key) and normalised, captions tokenised, MLM inputs masked.
    ``all_captions`` (evaluation) adds ``captions``: per sample, the list of all its captions as stored; ``views``
    (evaluation, ``(clips, crops)``) gives each video ``[clips x crops, T, 3, H, W]`` views."""

    def __init__(self, task_type: str, img_size: int, tokenizer: TextTokenizer, augment: Augment | None = None,
                 seed: int = 0, random_caption: bool = True, num_frames: int = 4,
                 dense: dict[str, "DenseTarget"] | None = None, all_captions: bool = False,
                 views: tuple[int, int] = (1, 1)):
        self.task_type = task_type
        self.all_captions = all_captions
        self.views = views
        self.dense = dense or {}
        self.num_frames = num_frames
        self.img_size = img_size
        self.tokenizer = tokenizer
        self.augment = augment or Augment()
        self.seed = seed
        self.random_caption = random_caption

    def image(self, key: str, image: Image.Image) -> np.ndarray:
        if self.augment.active:
            image = augment_image(image, self.img_size, self.augment, random.Random(stable_seed(self.seed, key)))
        return image_pixels(image, self.img_size)

    def __call__(self, samples: Sequence[tuple]) -> dict[str, torch.Tensor]:
        spec = task_spec(self.task_type)
        if spec.inputs == "text":
            return self.mlm(samples)
        if spec.targets == "pixels":
            return self.dense_batch(samples)
        keys, visuals, labels, captions = zip(*samples)
        if spec.inputs == "video" and self.views != (1, 1):
            batch = {"videos": normalise(np.stack([self.video_views(frames) for frames in visuals]))}
        elif spec.inputs == "video":
            batch = {"videos": normalise(np.stack([self.video(k, frames) for k, frames in zip(keys, visuals)]))}
        else:
            batch = {"images": normalise(np.stack([self.image(k, img) for k, img in zip(keys, visuals)]))}
        batch["labels"] = torch.tensor([int(label) for label in labels], dtype=torch.long)
        if spec.reads_caption:
            # Several captions per image (one per line, e.g. COCO): the sample's seed picks one.
            texts = [_pick_caption(str(c), self.seed, k, self.random_caption) for k, c in zip(keys, captions)]
            batch["text_ids"], batch["text_mask"] = self.tokenizer(texts)
            if self.all_captions:
                batch["captions"] = [_caption_lines(str(c)) for c in captions]
        return batch

    def dense_batch(self, samples: Sequence[tuple]) -> dict[str, torch.Tensor]:
        """Images and, per dense task, its target ``target.<task>`` (``DenseTarget.decode``), all through the same
        crop and flip per sample."""
        images, targets = [], {name: [] for name in self.dense}
        normals = frozenset(name for name, target in self.dense.items() if target.family == "normals")
        for key, image, arrays in samples:
            rng = random.Random(stable_seed(self.seed, key)) if self.augment.active else None
            maps = {name: a for name, a in arrays.items() if a.ndim > 1}  # per-image vectors (soft labels) stay
            image, maps = augment_dense(image, maps, self.img_size, self.augment, rng, normals)
            images.append(np.asarray(image))
            for name, array in {**arrays, **maps}.items():
                targets[name].append(array)
        batch = {"images": normalise(np.stack(images))}
        for name, arrays in targets.items():
            target = torch.from_numpy(np.stack(arrays))
            batch[f"target.{name}"] = target.movedim(-1, 1).contiguous() if target.dim() == 4 else target
        return batch

    def video(self, key: str, frames: list[Image.Image]) -> np.ndarray:
        """``num_frames`` frames at uniform positions; every frame gets the same augmentation (same seed)."""
        picks = schema.uniform_frame_indices(len(frames), self.num_frames)
        return np.stack([self.image(key, frames[i]) for i in picks])

    def video_views(self, frames: list[Image.Image]) -> np.ndarray:
        """``[clips x crops, T, H, W, 3]``, clip-major (``train/video.py``; evaluation: no augmentation)."""
        clips, crops = self.views
        crop = partial(three_crops, size=self.img_size) if crops == 3 else lambda f: [image_pixels(f, self.img_size)]
        per_clip = [[crop(frames[i]) for i in view_frame_indices(len(frames), self.num_frames, clip, clips)]
                    for clip in range(clips)]
        return np.stack([np.stack([crops_[c] for crops_ in clip]) for clip in per_clip for c in range(crops)])

    def mlm(self, samples: Sequence[tuple]) -> dict[str, torch.Tensor]:
        keys, texts = zip(*samples)
        ids, mask = self.tokenizer([_pick_caption(str(t), self.seed, k, self.random_caption)
                                    for k, t in zip(keys, texts)])
        special = set(self.tokenizer.tokenizer.all_special_ids)
        random_ids = [i for i in range(self.tokenizer.vocab_size) if i not in special]
        inputs, labels = ids.clone(), torch.full_like(ids, IGNORE)
        for row, key in enumerate(keys):
            length = int(mask[row].sum())
            row_ids = ids[row, :length].tolist()
            tokens = self.tokenizer.tokenizer.convert_ids_to_tokens(row_ids)
            maskable = [i not in special for i in row_ids]
            masked, row_labels = mask_whole_words(row_ids, word_starts(tokens), maskable,
                                                  random.Random(stable_seed(self.seed, key, "mlm")),
                                                  self.tokenizer.mask_id, random_ids)
            inputs[row, :length] = torch.tensor(masked)
            labels[row, :length] = torch.tensor(row_labels)
        return {"text_ids": inputs, "text_mask": mask, "mlm_labels": labels}


def _caption_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _pick_caption(text: str, seed: int, key: str, randomly: bool) -> str:
    lines = _caption_lines(text)
    if len(lines) <= 1 or not randomly:
        return lines[0] if lines else ""
    return lines[random.Random(stable_seed(seed, key, "caption")).randrange(len(lines))]


def _decode_image(data: bytes, min_side: int) -> Image.Image:
    if min_side and simplejpeg is not None and simplejpeg.is_jpeg(data):
        try:  # libjpeg-turbo with DCT scaling, no Python marker parsing: about 3x faster than PIL's draft mode
            return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_side,
                                                          min_width=min_side))
        except ValueError:  # exotic JPEGs (CMYK, arithmetic coding): PIL below
            pass
    image = Image.open(io.BytesIO(data))
    if min_side and image.format == "JPEG":
        image.draft("RGB", (min_side, min_side))
    return image.convert("RGB")


def decode_sample(sample: dict, min_side: int = 0, raw: frozenset[str] = frozenset()) -> dict:
    """Decodes what the tasks read: images (``.jpg``, frames ``f00.jpg``...) to PIL, ``.cls`` to int, ``.txt`` to
    str; other members (``.json``, ``.mp4``) stay bytes until needed.

    With ``min_side``, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least
    ``min_side`` pixels (simplejpeg, else PIL's draft mode): a 64 px JPEG for a 32 px input costs a quarter of the IDCT.
    Members named in ``raw`` (dense label maps, which need their exact pixel values) stay bytes.
    """
    out = {}
    for key, value in sample.items():
        if key.startswith("__") or not isinstance(value, bytes) or key in raw:
            out[key] = value
            continue
        extension = key.rsplit(".", 1)[-1].lower()
        if extension in schema.IMAGE_EXTENSIONS:
            out[key] = _decode_image(value, min_side)
        elif extension == schema.LABEL:
            out[key] = int(value)
        elif extension == schema.TEXT:
            out[key] = value.decode("utf-8")
        else:
            out[key] = value
    return out


def _ignore_stop_signals(_worker: int) -> None:
    """Data workers ignore SIGTERM/SIGUSR1: the trainer handles them (checkpoint, then exit), and a worker killed by
    a signal forwarded to the whole process group would crash the trainer instead."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _worker_id() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def sample_fields(task_type: str, handler, dense: dict[str, DenseTarget] | None = None) -> list:
    """Pipeline stages picking what a task type reads from a decoded sample."""
    if task_spec(task_type).targets == "pixels":
        dense = dense or {}

        def pick_dense(sample):  # decoded here, where a bad label map is skipped and counted
            image = sample[schema.IMAGE]
            return sample["__key__"], image, {name: target.read(sample, image.size) for name, target in dense.items()}
        return [wds.map(pick_dense, handler=handler)]
    spec = task_spec(task_type)
    if spec.inputs == "text":
        return [wds.to_tuple("__key__", schema.TEXT, handler=handler)]

    def label(sample):  # caption datasets (coco, karpathy, msrvtt) have no class: only class targets need one
        return sample[schema.LABEL] if spec.targets == "classes" else sample.get(schema.LABEL, -1)

    if spec.inputs == "video":
        def pick(sample):
            return sample["__key__"], video_frames(sample), label(sample), sample.get(schema.TEXT, "")
        return [wds.map(pick, handler=handler)]
    return [wds.map(lambda s: (s["__key__"], s[schema.IMAGE], label(s), s[schema.TEXT]), handler=handler)]


def _raw_members(dense: dict[str, DenseTarget]) -> frozenset[str]:
    return frozenset(member for target in dense.values() for member in target.members)


def build_pipeline(urls: list[str], collate: Collate, batch_size: int, shuffle_buffer: int, seed: int,
                   batches_per_worker: int, num_classes: int | None = None,
                   members: Callable[[dict], dict] | None = None) -> wds.DataPipeline:
    """Resampled shards -> samples -> shuffle -> decode -> (``members``: a spec's member names, ``spec_members``) ->
    label check -> batches; deterministic in ``seed`` (and worker id).

    Each batch carries ``num_skipped``: the bad samples its worker skipped since its previous batch (labels outside
    ``[0, num_classes)`` included, when ``num_classes`` is given).
    """
    skip = SkipBadSamples(str(Path(urls[0]).parent))
    return wds.DataPipeline(
        # deterministic=True: the shard sequence depends only on (worker id, seed), never on pid or time.
        wds.ResampledShards(urls, seed=seed, worker_seed=_worker_id, deterministic=True),
        partial(tar_samples, handler=skip),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed)),
        # Random crops need the pixels: draft decoding only when the images are not augmented.
        wds.map(partial(decode_sample, min_side=0 if collate.augment.active or collate.dense else collate.img_size,
                        raw=_raw_members(collate.dense)), handler=skip),
        *([wds.map(members, handler=skip)] if members else []),
        *label_stages(num_classes, skip),
        *sample_fields(collate.task_type, skip, collate.dense),
        wds.map(skip.reset),
        wds.batched(batch_size, collation_fn=collate, partial=False),
        skip.attach,
    ).with_epoch(batches_per_worker)


class TaskStream:
    """Endless batches of one task on one rank; ``position`` counts the batches handed out so far.

    Epoch ``e`` is a fresh pipeline seeded with (seed, rank, task index, e); a stream restored to position p opens
    epoch ``p // batches_per_epoch`` and skips ``p % batches_per_epoch`` batches. ``num_workers``: the stream's share
    of ``data.worker_budget`` (None: ``data.num_workers``).
    """

    def __init__(self, task: TaskConfig, task_index: int, data: DataConfig, tokenizer: TextTokenizer, img_size: int,
                 rank: int, world_size: int, seed: int, group: Sequence[TaskConfig] = (),
                 num_workers: int | None = None):
        self.task = task  # a group's stream is its first task's, and its batches carry every member's target
        urls, num_samples = train_shards(data.root, task)  # the dataset folder, or the task's train_data spec
        self.urls = split_by_rank(urls, rank, world_size)
        self.members = partial(spec_members, task_type=task.type) if task.train_data else None
        self.num_classes = task_num_classes(data.root, task.type, task.dataset)
        self._warned_bad_label = False
        self.num_workers = data.num_workers if num_workers is None else num_workers
        # An epoch is about one pass of the dataset over all ranks; with_epoch counts per worker.
        batches = max(1, num_samples // (task.batch_size * world_size))
        self.batches_per_worker = -(-batches // max(1, self.num_workers))
        self.batches_per_epoch = self.batches_per_worker * max(1, self.num_workers)
        augment = Augment(task.augment.random_resized_crop, task.augment.crop_scale_min, task.augment.hflip,
                          task.augment.rand_augment)
        dense = dense_targets(data.root, group or [task]) if task.spec.targets == "pixels" else None
        self.collate = Collate(task.type, img_size, tokenizer, augment, num_frames=data.num_frames, dense=dense)
        self.shuffle_buffer = data.shuffle_buffer
        self.seed_parts = (seed, rank, task_index)
        self.position = 0
        self._iterator: Iterator | None = None
        self._remaining = 0  # batches left in the open epoch

    def _open(self, epoch: int) -> Iterator:
        seed = stable_seed(*self.seed_parts, epoch)
        self.collate.seed = seed
        pipeline = build_pipeline(self.urls, self.collate, self.task.batch_size, self.shuffle_buffer, seed,
                                  self.batches_per_worker, self.num_classes, self.members)
        if self.num_workers == 0:
            return iter(pipeline)
        loader = DataLoader(pipeline, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                            worker_init_fn=_ignore_stop_signals)
        return iter(loader)

    def seek(self, position: int) -> None:
        """Positions the stream so that the next batch is batch number ``position`` of the uninterrupted stream."""
        epoch, offset = divmod(position, self.batches_per_epoch)
        self._iterator = self._open(epoch)
        for _ in range(offset):
            next(self._iterator)
        self._remaining = self.batches_per_epoch - offset
        self.position = position

    def close(self) -> None:
        """Stops the loader's workers now. They ignore SIGTERM (see ``_ignore_stop_signals``), so the interpreter's
        exit, which terminates and joins child processes, would wait for them forever after an exception."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None or self._remaining == 0:
            self.seek(self.position)
        batch = next(self._iterator)
        self._warned_bad_label = pop_bad_label(batch, f"task {self.task.name}", self._warned_bad_label)
        self._remaining -= 1
        self.position += 1
        return batch


class TaskSampler:
    """Which task each rank runs at each micro-step: a pure function of (seed, rank, step), weighted by config.

    Every rank can compute every rank's schedule. ``synchronized=True`` drops the rank: all ranks run the same task.
    """

    def __init__(self, tasks: Sequence[TaskConfig], seed: int, rank: int, synchronized: bool = False):
        weights = np.asarray([t.weight for t in tasks], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.seed = seed
        self.rank = 0 if synchronized else rank

    def __call__(self, step: int, micro_step: int = 0) -> int:
        rng = np.random.default_rng([self.seed, self.rank, step, micro_step])
        return int(rng.choice(len(self.probs), p=self.probs))

    def counts_until(self, step: int, micro_steps: int = 1) -> list[int]:
        """Batches each task consumed during steps ``[0, step)``: what a resumed stream must skip."""
        counts = [0] * len(self.probs)
        for s in range(step):
            for m in range(micro_steps):
                counts[self(s, m)] += 1
        return counts


def val_batches(root: str | Path, dataset: str, img_size: int, batch_size: int, tokenizer: TextTokenizer,
                rank: int = 0, world_size: int = 1, task_type: str = "image_text_retrieval",
                num_frames: int = 4, dense: dict[str, DenseTarget] | None = None,
                split: str = "val", views: tuple[int, int] = (1, 1), spec: str = "",
                num_samples: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Every val sample exactly once, in shard order, collated for ``task_type`` (``text_ids`` from the first caption
    of each sample, ``captions`` all of them; MLM masks seeded by the sample key; dense tasks' ``target.<task>`` for
    the tasks in ``dense``). ``split`` reads another split the same way (expert selection reads train); ``views``
    ``(clips, crops)`` makes each video ``[clips x crops, T, 3, H, W]`` (``Collate.video_views``). ``spec`` (a task's
    ``val_data``) reads those shards instead; its ``num_samples``, when given, is checked on one rank (a warning).

    With ``world_size > 1`` each rank reads every ``world_size``-th shard (an exact split: evaluation must see each
    sample once; ranks may get different batch counts, so gather results rather than step in lock-step).
    """
    collate = Collate(task_type, img_size, tokenizer, random_caption=False, num_frames=num_frames, dense=dense,
                      all_captions=True, views=views)
    urls = val_shards(root, dataset, split, spec)[rank::world_size]
    if not urls:
        return
    skip = SkipBadSamples(str(Path(urls[0]).parent))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        partial(tar_samples, handler=skip),
        wds.map(partial(decode_sample, min_side=0 if dense else img_size, raw=_raw_members(collate.dense)),
                handler=skip),
        *([wds.map(partial(spec_members, task_type=task_type), handler=skip)] if spec else []),
        *label_stages(task_num_classes(root, task_type, dataset), skip),
        *sample_fields(task_type, skip, collate.dense),
        wds.map(skip.reset),
        wds.batched(batch_size, collation_fn=collate, partial=True),
        skip.attach,
    )
    warned = False
    for batch in checked_count(pipeline, spec, num_samples if world_size == 1 else 0):
        warned = pop_bad_label(batch, f"{dataset}/{split}", warned)
        yield batch
