"""Routing levels, cost vs generalization (Uni-Perceiver-MoE's trade-off), side by side in one run.

For each routing level (``dense``, ``token``, ``context``, ``modality``, ``task``, ``attribute``) the same debug-size
model of ``configs/demo_multitask.yaml`` (MoE every other block, 4 experts top-2; ``--expert-type linear``: Uni-
Perceiver-MoE's linear experts on attention and FFN) is trained from the same seed on the embedded data's image and
text tasks only (shape classification, image-caption retrieval, MLM) with torch AdamW in one process (no DeepSpeed:
the figures are the model's, the engine is the same for every level). Then, per level:

  * ``train ms/step``: forward + backward + AdamW time of a training step on one kept batch of each trained task
    (data loading excluded), and ``infer ms/sample``: the time to encode one val batch of images, per image (no
    gradients); both timed after training, every level once per round (``--rounds``), medians over rounds;
  * ``active params``: the parameters a token meets at inference (``num_params(active_only=True)``);
  * ``image top-1`` / ``image R@1``: the trained tasks on their val split (R@1 the mean of both directions);
  * ``video R@1 (held out)``: zero-shot video-text retrieval on the embedded videos (a task the model never trained,
    with its own task id, so task routing meets an untrained task row and modality routing an untrained modality).

    python bench/routing_levels.py                        # 600 steps per level (about 10 minutes on 2 cores)
    python bench/routing_levels.py --small                # a few steps on a small dataset: the code path, no figures

Prints a table and writes JSON (``--json``). Not a test: the numbers depend on the machine and on one seed.
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import condmoe.models._compat  # noqa: F401  (before timm)
import torch
from condmoe.models import pop_moe_stats
from condmoe.models.text_tokenizer import TextTokenizer
from condmoe.train.config import load_config
from condmoe.train.data import TaskSampler, TaskStream, val_batches
from condmoe.train.engine import build_model, param_groups
from condmoe.train.evaluate import evaluate_task, task_inputs

REPO = Path(__file__).resolve().parent.parent
LEVELS = ("dense", "token", "context", "modality", "task", "attribute")
TRAINED = ("shapes_classification", "shapes_caption_retrieval", "caption_mlm")
HELD_OUT = "motion_caption_retrieval"


def level_config(data_root: str, level: str, expert_type: str, batch_size: int):
    """demo_multitask.yaml at ``level`` with the trained tasks and the held-out one (last, never sampled)."""
    overrides = [f"data.root={data_root}", "data.num_workers=0", "data.shuffle_buffer=200", "moe.ep_size=1"]
    if level == "dense":
        overrides.append("moe.num_experts=0")
    else:
        overrides += [f"moe.routing={level}", f"moe.expert_type={expert_type}"]
    if expert_type == "linear" and level != "dense":
        overrides += ["moe.targets=[attn, ffn]", "moe.balance_loss_weight=0.0"]
    cfg = load_config(str(REPO / "configs" / "demo_multitask.yaml"), overrides)
    names = [t.name for t in cfg.tasks]
    cfg.tasks = [cfg.tasks[names.index(n)] for n in (*TRAINED, HELD_OUT)]
    for task in cfg.tasks:
        task.batch_size = batch_size
    return cfg


def train_level(level: str, args, tokenizer: TextTokenizer) -> dict:
    """Trains one level's model ``args.steps`` steps, evaluates it; returns its row and what the timing phase needs."""
    cfg = level_config(args.data, level, args.expert_type, args.batch_size)
    model = build_model(cfg, tokenizer.vocab_size, tokenizer.spe_id).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    img_size = model.image_embed.patch_embed.img_size[0]
    trained = list(range(len(TRAINED)))
    streams = [TaskStream(cfg.tasks[i], i, cfg.data, tokenizer, img_size, 0, 1, cfg.run.seed) for i in trained]
    sampler = TaskSampler([cfg.tasks[i] for i in trained], cfg.run.seed, 0)
    inputs = [task_inputs(cfg, tokenizer, cfg.tasks[i]) for i in trained]

    def step(i: int, batch: dict) -> float:
        task, (targets, options) = cfg.tasks[i], inputs[i]
        out = model(task.type, {**batch, **targets}, task_id=i, label_smoothing=task.label_smoothing, **options)
        stats = pop_moe_stats(model)
        loss = task.loss_weight * out.loss + (stats.aux_loss if stats is not None else 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    fixed = {}  # one batch per task, kept for the timing phase
    for n in range(args.steps):
        i = sampler(n)
        batch = next(streams[i])
        batch.pop("num_skipped", None)
        fixed.setdefault(i, batch)
        loss = step(i, batch)
    for stream in streams:
        stream.close()
    model.eval()
    metrics = {t.name: evaluate_task(model, cfg, i, tokenizer, batch_size=64) for i, t in enumerate(cfg.tasks)}
    pop_moe_stats(model)

    def r1(name):
        return 50 * (metrics[name]["i2t_r1"] + metrics[name]["t2i_r1"])

    row = {"level": level, "params": model.num_params(), "active_params": model.num_params(active_only=True),
           "final_loss": loss, "image_top1": 100 * metrics["shapes_classification"]["top1"],
           "image_r1": r1("shapes_caption_retrieval"), "video_r1_held_out": r1(HELD_OUT), "metrics": metrics}
    return {"row": row, "model": model, "step": step, "batches": fixed}


def time_levels(trained: list[dict], images: torch.Tensor, rounds: int) -> None:
    """Step and inference times of every level, interleaved round by round (a load change hits every level alike):
    the median over rounds of one training step on each task's kept batch, and of encoding ``images``."""
    steps = {id(t): [] for t in trained}
    infer = {id(t): [] for t in trained}
    for r in range(rounds + 1):  # round 0 warms up
        for t in trained:
            t["model"].train()
            for i, batch in sorted(t["batches"].items()):
                start = time.perf_counter()
                t["step"](i, batch)
                if r:
                    steps[id(t)].append((time.perf_counter() - start) * 1e3)
            t["model"].eval()
            with torch.no_grad():
                start = time.perf_counter()
                t["model"].encode_images(images, 0)
                pop_moe_stats(t["model"])
                if r:
                    infer[id(t)].append((time.perf_counter() - start) * 1e3 / len(images))
    for t in trained:
        t["row"]["train_ms_per_step"] = statistics.median(steps[id(t)])
        t["row"]["infer_ms_per_sample"] = statistics.median(infer[id(t)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="condmoe-prep synthetic output (default: data/synthetic, "
                                                   "written if missing; --small: a small set in a tmp dir)")
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    parser.add_argument("--expert-type", default="mlp", choices=("mlp", "linear"))
    parser.add_argument("--steps", type=int, default=600, help="training steps per level")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--infer-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10, help="timing rounds (every level once per round)")
    parser.add_argument("--small", action="store_true", help="a few steps on a small dataset (tests)")
    parser.add_argument("--json", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from condmoe.data_prep.synthetic import write_synthetic_dataset

    tmp = None
    if args.small:
        args.steps, args.rounds, args.infer_batch, args.batch_size = min(args.steps, 4), 2, 8, 8
        if not args.data:
            tmp = tempfile.TemporaryDirectory()
            args.data = str(Path(tmp.name) / "synthetic")
            write_synthetic_dataset(Path(args.data), seed=0, num_train_images=64, num_val_images=16,
                                    num_train_videos=8, num_val_videos=4, num_train_dense=0, num_val_dense=0)
    elif not args.data:
        args.data = str(REPO / "data" / "synthetic")
        if not (Path(args.data) / "manifest.json").is_file():
            write_synthetic_dataset(Path(args.data), seed=0)
    tokenizer = TextTokenizer(Path(args.data) / "tokenizer", load_config(
        str(REPO / "configs" / "demo_multitask.yaml")).data.max_text_len)
    trained = []
    for level in args.levels:
        trained.append(train_level(level, args, tokenizer))
        print(f"{level}: trained", file=sys.stderr)
    img_size = trained[0]["model"].image_embed.patch_embed.img_size[0]
    images = next(val_batches(args.data, "image", img_size, args.infer_batch, tokenizer))["images"]
    time_levels(trained, images, args.rounds)
    rows = [t["row"] for t in trained]
    dense = next((r for r in rows if r["level"] == "dense"), rows[0])
    lines = ["| level | train ms/step | vs dense | infer ms/sample | active params | image top-1 | image R@1 |"
             " video R@1 (held out) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['level']} | {r['train_ms_per_step']:.1f} | "
                     f"{r['train_ms_per_step'] / dense['train_ms_per_step']:.2f}x | {r['infer_ms_per_sample']:.3f} | "
                     f"{r['active_params'] / 1e6:.3f}M | {r['image_top1']:.1f} | {r['image_r1']:.1f} | "
                     f"{r['video_r1_held_out']:.1f} |")
    print("\n".join(lines))
    meta = {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "steps": args.steps, "batch_size": args.batch_size, "expert_type": args.expert_type, "data": args.data}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
