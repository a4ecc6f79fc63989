"""Which shards a task stream reads and how many samples they hold, and how many workers it gets.

A task reads its dataset folder under ``data.root`` (``data_prep.schema``'s layout, counted by ``sizes.json``), or,
when ``tasks[].train_data`` / ``val_data`` is set, an open_clip-style spec (``--train-data``): ``::``-separated parts,
each a brace pattern (``/data/cc3m/{00000..00331}.tar``, expanded with ``braceexpand`` as open_clip's
``expand_urls`` does), a local ``.tar`` path, a local folder (its ``*.tar`` in name order) or a ``pipe:`` command
(``pipe:aws s3 cp s3://b/{0..9}.tar -``). A spec's sample count is ``train_num_samples`` or, for local shards,
open_clip's ``sizes.json`` beside them (``{"<shard file name>": count}``); an epoch needs one.

img2dataset / video2dataset shards train as they are: ``spec_members`` maps their member names to the schema's.
"""

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlparse

import braceexpand

from condmoe.data_prep import schema
from condmoe.models.tasks import task_spec

log = logging.getLogger(__name__)

SPEC_IMAGES = ("jpg", "jpeg", "png", "webp")  # img2dataset's output formats, the first present is the image


def is_local(url: str) -> bool:
    """A path, not a url with a scheme (``pipe:``, ``http:``, ``file:``...), as webdataset's ``gopen`` tells them."""
    return urlparse(url).scheme == ""


def spec_parts(spec: str, field: str) -> list[str]:
    """The urls of ``spec`` before folders are listed: each ``::`` part brace-expanded, in order (no file access).

    Raises:
        ValueError: An empty part or unbalanced braces, naming ``field`` (``tasks[x].train_data``).
    """
    urls = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            raise ValueError(f"{field}={spec!r}: empty part between '::' separators")
        try:
            urls.extend(braceexpand.braceexpand(part))
        except braceexpand.UnbalancedBracesError as exc:
            raise ValueError(f"{field}={spec!r}: {exc}") from None
    return urls


def check_spec_fields(task) -> None:
    """A task config's ``train_data`` / ``val_data`` (``spec_parts``, no file access) and their sample counts.

    Raises:
        ValueError: One line naming the field (``tasks[x].train_num_samples`` ...).
    """
    for split in ("train", "val"):
        spec, count = getattr(task, f"{split}_data"), getattr(task, f"{split}_num_samples")
        if count < 0 or (count and not spec):
            raise ValueError(f"tasks[{task.name}].{split}_num_samples={count} must be >= 0 and counts {split}_data "
                             "(a dataset folder is counted by sizes.json)")
        if spec:
            spec_parts(spec, f"tasks[{task.name}].{split}_data")


def expand_spec(spec: str, field: str) -> list[str]:
    """The shard urls of ``spec``: ``spec_parts``, a local folder replaced by its ``*.tar`` in name order; ``field``
    (``tasks[x].train_data``) names the spec in errors.

    Raises:
        ValueError: A bad spec (``spec_parts``) or a folder without ``.tar`` files.
        FileNotFoundError: A local shard that does not exist.
    """
    urls = []
    for url in spec_parts(spec, field):
        if is_local(url) and Path(url).is_dir():
            found = sorted(str(p) for p in Path(url).glob("*.tar"))
            if not found:
                raise ValueError(f"{field}: no .tar files in folder {url}")
            urls.extend(found)
        else:
            urls.append(url)
    missing = [u for u in urls if is_local(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{field}: {len(missing)} of {len(urls)} shards not found, first {missing[0]}")
    return urls


def sizes_beside(urls: Sequence[str]) -> int | None:
    """The samples of ``urls`` per open_clip's ``sizes.json`` beside the first shard (``{"<file name>": count}``);
    ``None`` when a url is not local, there is no such file, or it lacks one of the shards."""
    if not urls or not all(is_local(u) for u in urls):
        return None
    path = Path(urls[0]).parent / schema.SIZES
    try:
        sizes = json.loads(path.read_text())
        return sum(int(sizes[os.path.basename(u)]) for u in urls)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def train_shards(root: str | Path, task) -> tuple[list[str], int]:
    """``(urls, samples)`` of a task's training data: its ``train_data`` spec, counted by ``train_num_samples`` or
    a ``sizes.json`` beside the shards; else ``<root>/<dataset>/train``, counted by ``ROOT/sizes.json``.

    Raises:
        ValueError: A spec whose samples nothing counts (one line naming the field to set), or a bad spec.
    """
    if not task.train_data:
        return schema.shard_urls(root, task.dataset, "train"), schema.num_samples(root, task.dataset, "train")
    field = f"tasks[{task.name}].train_data"
    urls = expand_spec(task.train_data, field)
    samples = task.train_num_samples or sizes_beside(urls)
    if not samples:
        raise ValueError(f"{field}: cannot count the samples of its {len(urls)} shards (no {schema.SIZES} beside "
                         f"them lists each one); set tasks[{task.name}].train_num_samples, the samples of one epoch")
    return urls, samples


def val_shards(root: str | Path, dataset: str, split: str, spec: str = "") -> list[str]:
    """The shards evaluation reads: ``spec`` (a task's ``val_data``) when given, else ``<root>/<dataset>/<split>``."""
    return expand_spec(spec, "val_data") if spec else schema.shard_urls(root, dataset, split)


def split_by_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's shards: every ``world_size``-th one, so ranks read disjoint data, when there are enough shards.

    With fewer shards than ranks every rank resamples from all of them (its own seed still gives it its own order):
    an exact split would leave ranks without data, and a rank without data hangs the others in the next collective.
    """
    if len(urls) < world_size:
        log.warning("%d shards for %d ranks: every rank samples from all shards", len(urls), world_size)
        return urls
    return urls[rank::world_size]


def checked_count(batches: Iterable[dict], spec: str, num_samples: int) -> Iterator[dict]:
    """Passes val batches on; at the end, warns when ``num_samples`` (a spec's ``val_num_samples``; 0: no check)
    differs from the samples read, skipped ones included."""
    seen = 0
    for batch in batches:
        seen += int(batch["num_skipped"]) + len(batch.get("images", batch.get("videos", batch.get("text_ids", []))))
        yield batch
    if num_samples and seen != num_samples:
        log.warning("val_data %s: read %d samples (skipped ones included), val_num_samples is %d", spec, seen,
                    num_samples)


def spec_members(sample: dict, task_type: str) -> dict:
    """Pipeline stage for a spec's decoded samples: img2dataset / video2dataset member names -> the schema's.

    The first of ``jpg``, ``jpeg``, ``png``, ``webp`` becomes ``jpg``; tasks that do not read classes get label -1
    when there is no ``cls`` (their losses never read it); a sample without the image (image tasks) or without a
    non-empty ``txt`` (tasks that read captions, MLM) raises ``ValueError``: skipped and counted in ``bad_samples``.
    Videos (video2dataset's ``mp4``) are read by ``train/video.py`` as they are.
    """
    spec = task_spec(task_type)
    sample = dict(sample)
    if spec.inputs == "image" and schema.IMAGE not in sample:
        image = next((m for m in SPEC_IMAGES if m in sample), None)
        if image is None:
            raise ValueError(f"sample {sample.get('__key__')}: no image member ({', '.join(SPEC_IMAGES)}); has "
                             f"{sorted(k for k in sample if not k.startswith('__'))}")
        sample[schema.IMAGE] = sample[image]
    if (spec.reads_caption or spec.inputs == "text") and not str(sample.get(schema.TEXT, "")).strip():
        raise ValueError(f"sample {sample.get('__key__')}: no caption ({schema.TEXT} missing or empty)")
    if spec.targets != "classes":
        sample.setdefault(schema.LABEL, -1)
    return sample


def worker_shares(weights: Sequence[float], budget: int) -> list[int]:
    """DataLoader workers per stream out of one rank's ``budget``, in proportion to the streams' sampling weights.

    Largest remainder: stream i gets ``floor(budget * w_i / sum(w))``, and the workers left go one each to the largest
    remainders (ties: the earlier stream). Then, when ``budget >= len(weights)``, every stream left with 0 takes one
    from the stream with the most (ties: the earlier); with fewer workers than streams some get 0 and load their
    batches in the main process. The shares always sum to ``budget``.
    """
    if budget < 0 or not weights or any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise ValueError(f"worker_shares: need budget >= 0 and positive weights, got {budget}, {list(weights)}")
    total = sum(Fraction(w) for w in weights)
    quotas = [Fraction(budget) * Fraction(w) / total for w in weights]
    shares = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in by_remainder[:budget - sum(shares)]:
        shares[i] += 1
    if budget >= len(weights):
        for i in range(len(shares)):
            if shares[i] == 0:
                donor = max(range(len(shares)), key=lambda j: (shares[j], -j))
                shares[donor] -= 1
                shares[i] = 1
    return shares


def stream_workers(data, weights: Sequence[float]) -> list[int]:
    """Workers of each stream: ``worker_shares(weights, data.worker_budget)``, or ``data.num_workers`` each when
    there is no budget (0)."""
    if data.worker_budget:
        return worker_shares(weights, data.worker_budget)
    return [data.num_workers] * len(weights)
