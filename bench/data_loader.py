"""Data pipeline benchmark: condmoe's webdataset ``TaskStream`` vs torchvision ``ImageFolder`` + ``DataLoader``.

Both sides read the same JPEGs and produce the same batches (``[64, 3, S, S]`` normalised float images + labels):

  * condmoe: ``train.data.TaskStream`` for an ``image_classification`` task, exactly as training builds it
    (resampled shards -> tar reader -> shuffle buffer -> decode of the members the task reads -> ``Collate``:
    resize per image, normalise per batch), with ``DataConfig``/``TaskConfig`` defaults: shuffle buffer 1,000, no
    augmentation, hence JPEGs decoded at the model's input size (DCT scaling);
  * ImageFolder: the shards' JPEGs exported once to ``<tmp>/imagefolder/<cls label>/<key>.jpg``, read by
    ``torchvision.datasets.ImageFolder`` (its default loader: PIL open, full decode, ``convert("RGB")``) with the
    usual per-image transform written in PIL + numpy (``reference_transform``: bicubic resize, to float, normalise;
    the same resize and constants as ours; torchvision's C-op transforms cannot load next to CPU torch) and
    ``DataLoader(shuffle=True, drop_last=True)`` with the default collate. This is the baseline of the ratio columns;
  * ImageFolder, draft decode / simplejpeg decode (controls): the same with a loader that decodes JPEGs at the
    smallest DCT scale that keeps the input size, as ours does when images are not augmented: PIL's draft mode, and
    libjpeg-turbo through simplejpeg (condmoe's decoder when installed; row shown when it is). Ours against the
    simplejpeg row is what the reader and pipeline gain, with the same decoding (``--no-control`` drops them).

For each worker count the stream is opened, a few warm-up batches are drawn (worker start, the shuffle buffer's first
100 samples), then a fixed number of images is timed; repeated, interleaved, and the median reported. Until the
shuffle buffer holds 1,000 samples it reads two samples per sample it emits, and ``TaskStream`` re-opens its pipeline
(empty buffer) every epoch: the default run (2,000 images, 3 warm-up batches) measures that epoch-start regime, which
is the steady state of training on a dataset this small. ``--num-images 6000 --warmup 30`` measures a full buffer.
Columns:

  * images/s: images delivered to the consumer per wall-clock second;
  * images/s per core: images/s divided by the processes doing the work, max(1, num_workers) (0 workers: the main
    process does everything and counts as one core);
  * images per CPU-s: images per CPU-second actually spent (main process + workers, user + system, from psutil,
    summed over the repeats: the kernel counts in 10 ms ticks); it also charges the main process's share of
    receiving batches from workers;
  * vs ImageFolder: our images/s per core over ImageFolder's at the same worker count (and the same for images
    per CPU-s, the figure to trust when other processes share the cores).

    python bench/data_loader.py                         # synthetic 2,000 x 64 px images in a temp dir, ~40 s
    python bench/data_loader.py --num-images 6000 --warmup 30       # full shuffle buffers (steady state)
    python bench/data_loader.py --data data/synthetic --dataset image --workers 0 2
    python bench/data_loader.py --profile               # also cProfile each pipeline single-process

Prints a table and writes JSON (``--json``). Not a test: numbers depend on the machine.
"""

import argparse
import cProfile
import importlib.util
import io
import json
import math
import os
import platform
import pstats
import sys
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

# `python bench/x.py` from anywhere: the repository root on the path, models._compat before torchvision.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import condmoe.models._compat  # noqa: F401  (before torchvision)
import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from condmoe.data_prep.synthetic import write_synthetic_dataset
from condmoe.train.config import DataConfig, TaskConfig
from condmoe.train.data import MEAN, STD, TaskStream, shard_urls


BASELINE, CONTROL, OURS = "ImageFolder + DataLoader", "ImageFolder, draft decode", "condmoe TaskStream"
CONTROL_SJ = "ImageFolder, simplejpeg decode"


def export_image_folder(root: Path, dataset: str, out: Path) -> int:
    """Writes every ``jpg`` of ``<root>/<dataset>/train/*.tar`` to ``out/<cls>/<key>.jpg``; returns the count."""
    count = 0
    for url in shard_urls(root, dataset, "train"):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(url) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[2].partition(".")  # webdataset: key up to the first dot
                samples.setdefault(f"{Path(url).stem}-{key}", {})[ext] = tar.extractfile(member).read()
        for key, sample in samples.items():
            if "jpg" not in sample or "cls" not in sample:
                continue
            label = sample["cls"].decode().strip()
            (out / label).mkdir(parents=True, exist_ok=True)
            (out / label / f"{key}.jpg").write_bytes(sample["jpg"])
            count += 1
    return count


def condmoe_stream(root: Path, dataset: str, workers: int, batch_size: int, img_size: int, seed: int):
    task = TaskConfig(name="bench", type="image_classification", dataset=dataset, batch_size=batch_size)
    data = DataConfig(root=str(root), num_workers=workers)
    # image_classification never tokenises captions: no tokenizer needed.
    return TaskStream(task, 0, data, tokenizer=None, img_size=img_size, rank=0, world_size=1, seed=seed)


def draft_loader(path: str, size: int) -> Image.Image:
    """torchvision's ``pil_loader`` with JPEG draft decoding (smallest DCT scale keeping both sides >= ``size``)."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.draft("RGB", (size, size))
        return image.convert("RGB")


def simplejpeg_loader(path: str, size: int) -> Image.Image:
    """libjpeg-turbo DCT-scaled decoding through simplejpeg, as condmoe's stream decodes when it is installed."""
    import simplejpeg

    with open(path, "rb") as f:
        data = f.read()
    return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size))


def image_folder_stream(folder: Path, workers: int, batch_size: int, img_size: int, seed: int, loader=None):
    """Endless batches from ImageFolder + DataLoader; a new epoch re-opens the loader, like ``TaskStream``."""
    kwargs = {"loader": partial(loader, size=img_size)} if loader else {}
    dataset = ImageFolder(str(folder), transform=partial(reference_transform, size=img_size), **kwargs)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


def first_batch_images(batch) -> int:
    return len(batch["images"] if isinstance(batch, dict) else batch[0])


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(stream, warmup: int, num_images: int) -> dict:
    """Draws ``warmup`` batches, then times batches until ``num_images`` images have been delivered."""
    for _ in range(warmup):
        next(stream)
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]  # the DataLoader workers, alive after warm-up
    cpu_start, start, images = cpu_seconds(procs), time.perf_counter(), 0
    while images < num_images:
        images += first_batch_images(next(stream))
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(procs) - cpu_start
    return {"images": images, "seconds": elapsed, "cpu_seconds": cpu, "images_per_s": images / elapsed}


# Where the time goes: inclusive (cumulative) time of these functions, as (stage, file suffix, function name);
# stages nest (collate includes the per-image transform for condmoe, which transforms in Collate).
STAGES = (
    ("read + group tar members", "webdataset/tariterators.py", "group_by_keys"),
    ("decode (open, JPEG decode, convert)", "train/data.py", "decode_sample"),
    ("decode (open, JPEG decode, convert)", "torchvision/datasets/folder.py", "pil_loader"),
    ("decode (open, JPEG decode, convert)", "bench/data_loader.py", "draft_loader"),
    ("decode (open, JPEG decode, convert)", "bench/data_loader.py", "simplejpeg_loader"),
    ("per-image transform", "train/data.py", "image_pixels"),
    ("per-image transform", "bench/data_loader.py", "reference_transform"),
    ("  of which PIL bicubic resize", "PIL/Image.py", "resize"),
    ("normalise (condmoe: per batch)", "train/data.py", "normalise"),
    ("collate", "train/data.py", "__call__"),
    ("collate", "torch/utils/data/_utils/collate.py", "default_collate"),
)


def reference_transform(image: Image.Image, size: int) -> torch.Tensor:
    """The usual per-image transform, in PIL + numpy (torchvision's ``Resize``, ``ToTensor``, ``Normalize``): RGB,
    bicubic resize to ``size`` x ``size``, [0, 1], normalised with condmoe's mean/std -> ``[3, size, size]``."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def profile(name: str, stream, warmup: int, num_images: int, top: int) -> None:
    """cProfile of the timed part of a single-process stream: time per stage, then the functions with most own time."""
    for _ in range(warmup):
        next(stream)
    profiler, images = cProfile.Profile(), 0
    profiler.enable()
    while images < num_images:
        images += first_batch_images(next(stream))
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
    inclusive: dict[str, float] = {}
    for (path, _, function), (_, _, _, cum, _) in stats.stats.items():
        for stage, suffix, wanted in STAGES:
            if function == wanted and path.replace("\\", "/").endswith(suffix):
                inclusive[stage] = max(inclusive.get(stage, 0.0), cum)  # data.py __call__: Collate, not the handler
    print(f"\n## cProfile, {name}, 0 workers, {images} images, {stats.total_tt:.2f} s under the profiler "
          f"(which inflates Python-level work); inclusive time of the stages")
    for stage in dict.fromkeys(s for s, _, _ in STAGES):  # in order, once each
        if stage in inclusive:
            print(f"  {stage:<38} {inclusive[stage] / images * 1e6:6.1f} us/image  "
                  f"{inclusive[stage] / stats.total_tt:5.1%}")
    stats.print_stats(top)
    lines = text.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("\n".join(line.replace(str(Path(torch.__file__).parent.parent), "<site>") for line in lines[start:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="a condmoe-prep output directory (default: synthetic, in a tmp dir)")
    parser.add_argument("--dataset", default="image", help="dataset folder under --data")
    parser.add_argument("--num-images", type=int, default=2000, help="synthetic train images (without --data)")
    parser.add_argument("--image-size", type=int, default=64, help="synthetic JPEG side (without --data)")
    parser.add_argument("--img-size", type=int, default=32, help="model input side (debug model: 32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=1500, help="images timed per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="batches drawn before timing")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per row (the median is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-control", action="store_true", help="skip the ImageFolder rows with faster decoding")
    parser.add_argument("--profile", action="store_true", help="also cProfile each pipeline with 0 workers")
    parser.add_argument("--json", default="bench/data_loader.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory(prefix="condmoe-bench-data-") as tmp:
        tmp = Path(tmp)
        root = Path(args.data) if args.data else tmp / "shards"
        if not args.data:
            write_synthetic_dataset(root, seed=args.seed, image_size=args.image_size,
                                    num_train_images=args.num_images, num_val_images=1, num_train_videos=1,
                                    num_val_videos=1, tokenizer=False)
        folder = tmp / "imagefolder"
        exported = export_image_folder(root, args.dataset, folder)

        def make(pipeline: str, workers: int):
            if pipeline == OURS:
                return condmoe_stream(root, args.dataset, workers, args.batch_size, args.img_size, args.seed)
            loader = {CONTROL: draft_loader, CONTROL_SJ: simplejpeg_loader}.get(pipeline)
            return image_folder_stream(folder, workers, args.batch_size, args.img_size, args.seed, loader)

        controls = [] if args.no_control else [CONTROL, CONTROL_SJ][:2 if importlib.util.find_spec("simplejpeg") else 1]
        pipelines = (BASELINE, *controls, OURS)
        load_before = os.getloadavg()[0]
        runs: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.repeats):  # interleaved, so both pipelines see the same background load
            for workers in args.workers:
                for pipeline in pipelines:
                    stream = make(pipeline, workers)
                    runs.setdefault((pipeline, workers), []).append(measure(stream, args.warmup, args.images))
                    del stream  # shuts the workers down; wait for them before the next measurement
                    psutil.wait_procs(psutil.Process().children(recursive=True), timeout=10)
        results = []
        for (pipeline, workers), repeats in runs.items():
            median = sorted(repeats, key=lambda r: r["images_per_s"])[len(repeats) // 2]
            cpu = sum(r["cpu_seconds"] for r in repeats)
            results.append({"pipeline": pipeline, "workers": workers, "cores": max(1, workers),
                            "images_per_s": median["images_per_s"],
                            "images_per_s_per_core": median["images_per_s"] / max(1, workers),
                            "images_per_cpu_s": sum(r["images"] for r in repeats) / cpu if cpu > 0 else math.nan,
                            "repeats": repeats})
        if args.profile:
            for pipeline in pipelines:
                profile(pipeline, make(pipeline, 0), args.warmup, args.images, top=12)

    for row in results:
        base = next(r for r in results if r["workers"] == row["workers"] and r["pipeline"] == BASELINE)
        row["vs_image_folder"] = row["images_per_s_per_core"] / base["images_per_s_per_core"]
        row["vs_image_folder_cpu"] = row["images_per_cpu_s"] / base["images_per_cpu_s"]

    env = {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
           "torch": torch.__version__, "python": platform.python_version(), "data": args.data or "synthetic",
           "jpegs": exported, "jpeg_side": None if args.data else args.image_size, "img_size": args.img_size,
           "batch_size": args.batch_size, "images_timed": args.images, "warmup_batches": args.warmup,
           "repeats": args.repeats, "load_average_1min_before": round(load_before, 2),
           "load_average_1min_after": round(os.getloadavg()[0], 2)}
    print(f"\n# Data pipeline, {env['device']}, {exported} JPEGs"
          f"{'' if args.data else f' of {args.image_size} px'} -> {args.img_size} px, batch {args.batch_size}, "
          f"{args.images} images timed after {args.warmup} warm-up batches, median of {args.repeats}, 1-min load "
          f"{env['load_average_1min_before']} before, {env['load_average_1min_after']} after")
    print(f"| {'pipeline':<30} | workers | images/s | images/s per core | vs ImageFolder | images per CPU-s "
          f"| vs ImageFolder (CPU-s) |")
    print(f"|{'-' * 32}|---------|----------|-------------------|----------------|------------------|"
          f"------------------------|")
    for row in results:
        print(f"| {row['pipeline']:<30} | {row['workers']:7d} | {row['images_per_s']:8.0f} | "
              f"{row['images_per_s_per_core']:17.0f} | {row['vs_image_folder']:13.2f}x | "
              f"{row['images_per_cpu_s']:16.0f} | {row['vs_image_folder_cpu']:21.2f}x |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
