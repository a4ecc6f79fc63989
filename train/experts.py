"""``condmoe-experts``: expert usage, task similarity, pictures and single-task extraction from a checkpoint.

    condmoe-experts usage   --config CFG [--checkpoint DIR]            # exact counts over each task's val split
    condmoe-experts plot    --usage runs/x/experts/expert_usage.json   # PNG heatmaps
    condmoe-experts extract --config CFG --task NAME --threshold 3     # standalone single-task model (+ metrics)
    condmoe-experts interference --config CFG [--tasks a,b]            # task gradient cosines on shared weights

All of it runs in one process on the plain model (DeepSpeed checkpoints are read with ``load_plain_state_dict``).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from condmoe.models.extract import (
    collect_usage,
    estimate_flops_per_token,
    experts_to_keep,
    extract_task_model,
    save_extracted,
    task_similarity,
    track_usage,
)
from condmoe.models.text_tokenizer import TextTokenizer
from condmoe.train.cli import help_text, load_run_model
from condmoe.train.config import Config
from condmoe.train.data import dense_targets, val_batches
from condmoe.train.evaluate import dense_headline, evaluate_task, task_inputs

log = logging.getLogger("condmoe.experts")


@torch.no_grad()
def measure_usage(model, cfg: Config, tokenizer: TextTokenizer, batch_size: int = 128, split: str = "val",
                  max_samples: int = 0) -> dict:
    """Exact per-task expert usage: each task's encoder passes (two, one for a dense task) over ``split`` of its
    dataset (the first ``max_samples`` samples in shard order, 0: all), with its task id."""
    track_usage(model)
    img_size = model.image_embed.patch_embed.img_size[0]
    seen = {}
    for task_id, task in enumerate(cfg.tasks):
        targets, options = task_inputs(cfg, tokenizer, task)
        count = 0
        for batch in val_batches(cfg.data.root, task.dataset, img_size, batch_size, tokenizer, task_type=task.type,
                                 num_frames=cfg.data.num_frames, split=split,
                                 dense=dense_targets(cfg.data.root, [task]) if options else None):
            batch.pop("num_skipped", None)
            if max_samples:
                keep = max_samples - count
                batch = {k: v[:keep] if k not in targets else v for k, v in batch.items()}
            model(task.type, {**batch, **targets}, task_id=task_id, **options)
            count += len(batch.get("images", batch.get("videos", batch.get("text_ids"))))
            if max_samples and count >= max_samples:
                break
        seen[task.name] = count
    usage = collect_usage(model)
    track_usage(model, False)
    return {"tasks": [t.name for t in cfg.tasks], "split": split, "samples": seen, "layers": usage}


def task_metric(model, cfg: Config, tokenizer: TextTokenizer, task_index: int, model_task_id: int) -> float:
    """The task's headline val metric: top-1, mean of both R@1, BLEU-4 or masked-token accuracy in percent; a dense
    task's headline metric as its meter reports it (``train/dense_metrics.py``: mIoU, maxF, odsF in percent, mean
    angular error in degrees, depth RMSE)."""
    metrics = evaluate_task(model, cfg, task_index, tokenizer, model_task_id)
    if "headline" in metrics:
        return metrics[metrics["headline"]]
    if "top1" in metrics:
        return 100 * metrics["top1"]
    if "i2t_r1" in metrics:
        return 50 * (metrics["i2t_r1"] + metrics["t2i_r1"])
    if "bleu4" in metrics:
        return 100 * metrics["bleu4"]
    return 100 * metrics["accuracy"]


def plot(usage: dict, similarity: dict, out_dir: Path) -> list[Path]:
    """Task x expert usage heatmaps (one panel per routed layer) and the task similarity matrices, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, layers = usage["tasks"], usage["layers"]
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.6 * len(tasks) * rows + 1.8 * rows), squeeze=False)
    for ax, (name, stats) in zip(axes.flat, layers.items()):
        counts = torch.tensor(stats["counts"])
        share = (counts / counts.sum(1, keepdim=True).clamp_min(1)).numpy()
        image = ax.imshow(share, cmap="viridis", vmin=0, vmax=max(share.max(), 1e-6), aspect="auto")
        ax.set_title(f"{name} ({stats['kind']}, top-{stats['top_k']})", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        fig.colorbar(image, ax=ax, label="share of selections")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle("Expert usage per task (val split)")
    fig.tight_layout()
    usage_png = out_dir / "expert_usage.png"
    fig.savefig(usage_png, dpi=120)
    plt.close(fig)

    side = 3.5 + 0.6 * len(tasks)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 2, side + 1), constrained_layout=True)
    for ax, key, title in ((axes[0], "cosine", "cosine of usage vectors"), (axes[1], "overlap", "kept-set overlap")):
        matrix = torch.tensor(similarity[key]).numpy()
        image = ax.imshow(matrix, cmap="magma", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="grey", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("Task similarity from expert usage (mean over layers)")
    similarity_png = out_dir / "task_similarity.png"
    fig.savefig(similarity_png, dpi=120)
    plt.close(fig)
    return [usage_png, similarity_png]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's config (its config.yaml, or the YAML it trained "
                                                         "with: run.output_dir names the run)")
    parser.add_argument("--checkpoint", default="", help="checkpoint dir; default: the latest in run.output_dir")
    parser.add_argument("--out", default="", help="output folder; default: <run.output_dir>/experts, or "
                                                  "experts.<overrides> when overrides change the evaluation")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="condmoe-experts", description=help_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("usage", help="measure per-task expert usage and task similarity"))
    p_plot = sub.add_parser("plot", help="PNG heatmaps from a usage file")
    p_plot.add_argument("--usage", required=True, help="expert_usage.json written by `usage`")
    p_plot.add_argument("--out", default="", help="folder for the PNGs; default: next to the usage file")
    p_extract = sub.add_parser("extract", help="standalone single-task model")
    _common(p_extract)
    p_extract.add_argument("--task", required=True, help="task name from the config")
    p_extract.add_argument("--threshold", type=float, default=3.0,
                           help="keep experts with usage share > threshold / k percent (0: every expert used)")
    p_extract.add_argument("--no-eval", action="store_true", help="skip the val metric of full vs extracted")
    p_extract.add_argument("--select-split", default="train",
                           help="split whose expert usage chooses the experts (default train; the metric is val's)")
    p_extract.add_argument("--select-samples", type=int, default=2000,
                           help="samples of --select-split per task that measure the usage (0: all)")
    p_extract.add_argument("--sweep", default="",
                           help="comma-separated thresholds: the performance-vs-parameters curve of --task "
                                "(extract_<task>_sweep.json and .png), instead of one extracted model")
    p_int = sub.add_parser("interference", help="cosine similarity of the tasks' gradients on the shared parameters")
    _common(p_int)
    p_int.add_argument("--tasks", default="", help="comma-separated task names (default: every task)")
    p_int.add_argument("--batches", type=int, default=4, help="batches per task whose mean gradient is compared")
    p_int.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    p_int.add_argument("--split", default="train", help="split the batches come from (default train)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"condmoe-experts {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "plot":
        path = Path(args.usage)
        if not path.is_file():
            raise FileNotFoundError(f"--usage {path}: no such file (run `condmoe-experts usage` first)")
        usage = json.loads(path.read_text())
        similarity = json.loads((path.parent / "task_similarity.json").read_text())
        for png in plot(usage, similarity, Path(args.out) if args.out else path.parent):
            print(png)
        return 0

    run, model, tokenizer = load_run_model(f"condmoe-experts {args.command}", args.config, args.overrides,
                                           args.checkpoint)
    cfg = run.cfg
    # the run's own experts/, or experts.<overrides>/ when overrides change the evaluation (never over the run's own)
    out_dir = Path(args.out) if args.out else run.result_path("experts")
    print(f"condmoe-experts {args.command}: writing to {out_dir}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.command == "usage":
        usage = measure_usage(model, cfg, tokenizer)
        similarity = task_similarity(usage["layers"])
        (out_dir / "expert_usage.json").write_text(json.dumps(usage, indent=1))
        (out_dir / "task_similarity.json").write_text(json.dumps({"tasks": usage["tasks"], **similarity}, indent=1))
        print(json.dumps({"usage": str(out_dir / "expert_usage.json"), "similarity": similarity}))
        return 0

    if args.command == "interference":
        from condmoe.train.interference import interference, plot_interference

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or None
        report = interference(model, cfg, tokenizer, tasks, args.batches, args.batch_size, args.split)
        (out_dir / "interference.json").write_text(json.dumps(report, indent=1))
        plot_interference(report, out_dir / "interference.png")
        print(json.dumps({"interference": str(out_dir / "interference.json"), "mean_cosine": report["mean_cosine"],
                          "conflict": {g: report["conflict"][g] for g in ("overall", "attention")}}))
        return 0

    names = [t.name for t in cfg.tasks]
    if args.task not in names:
        raise ValueError(f"--task {args.task!r} is not a task of the config ({', '.join(names)})")
    task_index = names.index(args.task)
    # Experts are chosen on --select-split (train by default) and judged on val: choosing and judging on the same
    # samples would flatter the extracted model.
    usage = measure_usage(model, cfg, tokenizer, split=args.select_split, max_samples=args.select_samples)
    (out_dir / f"expert_usage_{args.select_split}.json").write_text(json.dumps(usage, indent=1))
    if args.sweep:
        thresholds = sorted({float(t) for t in args.sweep.split(",") if t.strip()})
        curve = sweep(model, cfg, tokenizer, usage, task_index, thresholds)
        stem = out_dir / f"extract_{args.task}_sweep"
        stem.with_suffix(".json").write_text(json.dumps(curve, indent=2))
        plot_sweep(curve, stem.with_suffix(".png"))
        print(json.dumps(curve))
        return 0
    keep = experts_to_keep(usage["layers"], task_index, args.threshold)
    small = extract_task_model(model, task_index, keep, args.task).eval()
    report = {
        "task": args.task, "threshold": args.threshold, "selected_on": {args.select_split: usage["samples"]},
        "kept": keep,
        "params": {"full": model.num_params(), "extracted": small.num_params()},
        "flops_per_token": {"full": estimate_flops_per_token(model), "extracted": estimate_flops_per_token(small)},
    }
    if not args.no_eval:
        report["metric"] = {"full": task_metric(model, cfg, tokenizer, task_index, task_index),
                            "extracted": task_metric(small, cfg, tokenizer, task_index, 0)}
    target = save_extracted(small, out_dir / f"extracted_{args.task}", {"report": report,
                                                                        "tokenizer": str(cfg.tokenizer_dir)})
    (target / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


def sweep(model, cfg: Config, tokenizer: TextTokenizer, usage: dict, task_index: int,
          thresholds: list[float]) -> dict:
    """The performance-vs-parameters curve of one task: for each threshold, the extracted model's parameters and its
    val metric (experts chosen from ``usage``), beside the full model's."""
    task = cfg.tasks[task_index]
    points = []
    for threshold in thresholds:
        keep = experts_to_keep(usage["layers"], task_index, threshold)
        small = extract_task_model(model, task_index, keep, task.name).eval()
        points.append({"threshold": threshold, "params": small.num_params(),
                       "experts_kept": sum(len(v) for v in keep.values()),
                       "metric": task_metric(small, cfg, tokenizer, task_index, 0)})
    return {"task": task.name, "selected_on": {usage["split"]: usage["samples"][task.name]},
            "metric_name": _metric_name(model, cfg, tokenizer, task_index),
            "full": {"params": model.num_params(), "metric": task_metric(model, cfg, tokenizer, task_index,
                                                                         task_index)},
            "points": points}


def _metric_name(model, cfg: Config, tokenizer: TextTokenizer, task_index: int) -> str:
    spec = cfg.tasks[task_index].spec
    if spec.targets == "pixels":
        return dense_headline(spec)
    return {"topk": "top-1 (%)", "recall": "mean R@1 (%)", "caption": "BLEU-4 (%)",
            "token_accuracy": "accuracy (%)"}[spec.metric]


def plot_sweep(curve: dict, path: Path) -> Path:
    """The sweep's curve: the extracted models' metric against their parameters, the full model as a reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve["points"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([p["params"] / 1e6 for p in points], [p["metric"] for p in points], "o-", label="extracted")
    for p in points:
        ax.annotate(f"t={p['threshold']:g}", (p["params"] / 1e6, p["metric"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    ax.scatter([curve["full"]["params"] / 1e6], [curve["full"]["metric"]], marker="*", s=120, color="C3",
               label="full model")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(curve["metric_name"])
    ax.set_title(f"{curve['task']}: metric vs parameters (experts chosen on {next(iter(curve['selected_on']))})",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
