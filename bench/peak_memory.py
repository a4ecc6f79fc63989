"""Peak memory of a training step of Uni-Perceiver-MoE-B under ZeRO-1 and ZeRO-2, and the largest batch that fits.

Per ZeRO stage (``--stages``; the DeepSpeed JSON ``--ds-config`` with only its stage changed): the trainer's model and
engine (``train.engine.build_model`` and ``create_engine``: MoE-B, 8 experts top-2, token routing, MoE in every other
block; torch's fused AdamW; the JSON's precision) on the image_classification task, with a batch like that of
``bench/train_step.py`` (images, and the class names, ``--classes`` x 8 tokens, encoded every step), and the
trainer's step (``MicroSteps``: loss + MoE aux loss, one ordered gradient reduction). Per batch size: ``--steps``
steps and the peak of ``torch.cuda.max_memory_allocated`` over them (weights, gradients and optimizer states
included). Batch sizes: doubling from ``--start-batch`` (the benchmarks' 128 on GPU) until a step runs out of memory
or ``--max-batch`` is reached, then bisection to a multiple of ``--resolution``, within ``--seconds`` per stage. One
engine serves the batch sizes of a stage until a step runs out of memory; the next batch size gets a fresh engine.

    python bench/peak_memory.py                     # GPU: MoE-B at 224 px, bf16 (ds_configs/zero2_bf16.json)
    python bench/peak_memory.py --device cpu --size debug --img-size 32 --classes 10 --start-batch 1 --max-batch 4 \\
        --steps 1                                   # CPU (ds_configs/zero2_cpu.json): no memory figure, a smoke run

Prints a table per stage and writes JSON (``--json``, rewritten after every batch size). Not a test: numbers depend on
the machine.
"""

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# `python bench/x.py` from anywhere: the repository root on the path, models._compat before timm.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import condmoe.models._compat  # noqa: F401  (before timm)
import torch
from condmoe.models import SIZES

REPO = Path(__file__).resolve().parent.parent


def largest_batch(fits: Callable[[int], bool], start: int, cap: int, resolution: int,
                  stop: Callable[[], bool] = lambda: False) -> dict:
    """The largest batch size for which ``fits`` holds, assuming that it holds for every smaller one.

    Doubling from ``start`` (the last try is ``cap`` itself) until ``fits`` fails, then bisection between the largest
    size that fits (0 if none did) and the smallest that fails, at multiples of ``resolution``, until the two are
    ``resolution`` apart. ``stop`` (asked before each try) ends the search early. Returns ``largest`` (None: no size
    tried fits), ``smallest_failing`` (None: none failed), ``capped`` (``cap`` fits; larger sizes were not tried),
    ``stopped`` and ``tried`` (``[size, fits]`` in order).
    """
    if not 0 < start <= cap or resolution < 1:
        raise ValueError(f"need 0 < start={start} <= cap={cap} and resolution={resolution} >= 1")
    tried, good, bad, stopped = [], None, None, False

    def attempt(size: int) -> bool | None:
        nonlocal stopped
        stopped = stop()
        if stopped:
            return None
        tried.append([size, fits(size)])
        return tried[-1][1]

    size = start
    while (ok := attempt(size)) is not None:
        if not ok:
            bad = size
            break
        good = size
        if size == cap:
            break
        size = min(2 * size, cap)
    while bad is not None and not stopped and bad - (good or 0) > resolution:
        size = ((good or 0) + bad) // 2 // resolution * resolution
        if size <= (good or 0) or (ok := attempt(size)) is None:
            break
        good, bad = (size, bad) if ok else (good, size)
    return {"largest": good, "smallest_failing": bad, "capped": good == cap, "stopped": stopped, "tried": tried}


def synthetic_batch(batch_size: int, args, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Images, labels, and the class names as the tokenizer writes them (<|spe|>, 2..7 name tokens, padding), made
    on the device: a large batch's images take seconds to draw on the CPU."""
    g = torch.Generator(device=device).manual_seed(0)
    draw = dict(generator=g, device=device)
    target_ids = torch.randint(5, args.vocab_size - 1, (args.classes, 8), **draw)
    target_ids[:, 0] = args.vocab_size - 1
    lengths = torch.randint(3, 9, (args.classes, 1), **draw)
    return {"images": torch.randn(batch_size, 3, args.img_size, args.img_size, dtype=dtype, **draw),
            "labels": torch.randint(0, args.classes, (batch_size,), **draw), "target_ids": target_ids,
            "target_mask": torch.arange(8, device=device)[None, :] < lengths}


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Stage:
    """One ZeRO stage: an engine (rebuilt after an out-of-memory step) and one trial per batch size."""

    def __init__(self, args, stage: int, config_dir: Path):
        ds_config = json.loads(Path(args.ds_config).read_text())
        ds_config["zero_optimization"] = {**ds_config.get("zero_optimization", {}), "stage": stage}
        self.ds_path = config_dir / f"zero{stage}.json"
        self.ds_path.write_text(json.dumps(ds_config, indent=2))
        self.args, self.stage, self.engine = args, stage, None

    def config(self, batch_size: int):
        from condmoe.train.config import Config
        from condmoe.train.yaml_config import build_dataclass

        a = self.args
        return build_dataclass(Config, {
            "model": {"size": a.size, "img_size": a.img_size},
            "moe": {"num_experts": a.experts, "top_k": 2, "routing": "token", "every": 2, "ep_size": 1},
            "deepspeed_config": str(self.ds_path),
            "tasks": [{"name": "classification", "type": "image_classification", "dataset": "image",
                       "batch_size": batch_size}]}, "")

    def build(self, batch_size: int) -> None:
        from condmoe.train.engine import build_model, create_engine

        cfg = self.config(batch_size)
        self.engine = create_engine(cfg, build_model(cfg, self.args.vocab_size, self.args.vocab_size - 1))
        self.engine.train()
        assert self.engine.zero_optimization_stage() == self.stage, self.engine.zero_optimization_stage()

    def release(self) -> None:
        from condmoe.train.engine import destroy_engine

        if self.engine is not None:
            destroy_engine(self.engine)
            self.engine = None
        gc.collect()
        if self.args.device == "cuda":
            torch.cuda.empty_cache()

    def trial(self, batch_size: int) -> dict:
        """``--steps`` training steps at ``batch_size``: whether they fit, peak memory, median ms per step."""
        row = {"batch_size": batch_size, "fits": False}
        try:
            if self.engine is None:
                self.build(batch_size)
            row.update(self._steps(batch_size), fits=True)
        except Exception as exc:  # out of memory: a fresh engine for the next size; anything else is a failure
            if not is_out_of_memory(exc):
                raise
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        if not row["fits"]:  # here, not in the except block: its traceback holds the step's tensors
            self.release()
        return row

    def _steps(self, batch_size: int) -> dict:
        from condmoe.models import pop_moe_stats
        from condmoe.train.engine import MicroSteps

        a, cuda, row = self.args, self.args.device == "cuda", {}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row["memory_before_gib"] = torch.cuda.memory_allocated() / 2**30
        dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        batch = synthetic_batch(batch_size, a, self.engine.device, dtype)
        times = []
        for _ in range(a.steps):
            start = time.perf_counter()
            steps = MicroSteps(self.engine, 1)
            with steps:
                out = self.engine("image_classification", batch, task_id=0)
                stats = pop_moe_stats(self.engine.module)
                steps.backward(out.loss + stats.aux_loss if stats is not None else out.loss)
            steps.step()
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        row.update(ms=sorted(times)[len(times) // 2], times_ms=times)
        if cuda:
            row.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                       peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
        return row

    def run(self, result: dict, on_trial: Callable[[], None]) -> None:
        """The search, recorded in ``result`` as it goes (``on_trial`` after every batch size)."""
        result.update(zero_stage=self.stage, ds_config=self.ds_path.name, trials=[])
        deadline = time.monotonic() + self.args.seconds

        def fits(batch_size: int) -> bool:
            result["trials"].append(self.trial(batch_size))
            print(format_row(self.stage, result["trials"][-1]), flush=True)
            on_trial()
            return result["trials"][-1]["fits"]

        try:
            search = largest_batch(fits, self.args.start_batch, self.args.max_batch, self.args.resolution,
                                   stop=lambda: time.monotonic() > deadline)
            result.update({k: v for k, v in search.items() if k != "tried"})
        finally:
            self.release()


def format_row(stage: int, row: dict) -> str:
    peak = f"{row['peak_gib']:.1f} GiB" if "peak_gib" in row else "-"
    ms = f"{row['ms']:.1f}" if "ms" in row else "-"
    return f"| ZeRO-{stage} | {row['batch_size']:6d} | {'yes' if row['fits'] else 'no':>4} | {peak:>10} | {ms:>8} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--ds-config", default=None,
                        help="DeepSpeed JSON whose stage is replaced (default: zero2_bf16.json on CUDA, "
                        "zero2_cpu.json on CPU)")
    parser.add_argument("--size", default="base", choices=list(SIZES))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000, help="class names encoded per step")
    parser.add_argument("--vocab-size", type=int, default=49409)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--start-batch", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=8192)
    parser.add_argument("--resolution", type=int, default=16, help="batch sizes of the bisection: multiples of this")
    parser.add_argument("--steps", type=int, default=2, help="steps per batch size")
    parser.add_argument("--seconds", type=float, default=30.0, help="time for one stage's search")
    parser.add_argument("--json", default="bench/peak_memory.json")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    args.ds_config = args.ds_config or str(REPO / "ds_configs" / ("zero2_bf16.json" if cuda else "zero2_cpu.json"))
    if cuda:
        torch.cuda.set_device(0)
    from condmoe.train.dist import init_distributed

    init_distributed()  # DeepSpeed's engine needs a (one-rank) process group
    env = {"device": torch.cuda.get_device_name() if cuda else "CPU", "torch": torch.__version__,
           "size": args.size, "img_size": args.img_size, "classes": args.classes, "experts": args.experts,
           "steps": args.steps, "ds_config": args.ds_config}
    results = []

    def write() -> None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"env": env, "stages": results}, indent=2) + "\n")

    print(f"# Peak memory per training step, MoE-{args.size} ({args.experts} experts top-2, token routing), "
          f"{args.img_size} px, {args.classes} class names, {env['device']}, {Path(args.ds_config).name} by stage")
    print("| stage  |  batch | fits |       peak |  ms/step |")
    print("|--------|--------|------|------------|----------|")
    with tempfile.TemporaryDirectory() as config_dir:
        for stage in args.stages:
            results.append({"zero_stage": stage})
            try:
                Stage(args, stage, Path(config_dir)).run(results[-1], write)
            except Exception as exc:  # a failure that is not out of memory: reported, the next stage still runs
                results[-1]["error"] = f"{type(exc).__name__}: {exc}"[:300]
                print(f"ZeRO-{stage}: {results[-1]['error']}", flush=True)
            write()
    for r in results:
        print(f"ZeRO-{r['zero_stage']}: largest batch that fits {r.get('largest')}"
              + (" (the cap)" if r.get("capped") else "") + (" (stopped by the time limit)" if r.get("stopped") else "")
              + (f", smallest that does not {r['smallest_failing']}" if r.get("smallest_failing") else ""))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    from condmoe.train.dist import shutdown_distributed

    status = main()
    shutdown_distributed()  # the process group this benchmark made: destroyed before the interpreter's exit
    sys.exit(status)
