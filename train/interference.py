"""Task interference: how much the tasks' gradients on the shared parameters agree (Uni-Perceiver-MoE's motivating
measurement). For each task, the gradient of its loss, averaged over a few batches of one split, on every parameter
that all tasks update; then the cosine similarity of every pair of tasks' gradients, overall, on the attention
weights alone, and per block. A negative cosine means the two tasks pull the shared weights in opposite directions.

Shared parameters are those outside routed layers (MoE MLPs, linear MoE layers, MoA: each task reaches only its
routed experts there) and outside task-specific parts (dense heads, task embeddings, prompts, temperatures). In a
dense model every block's FFN is shared; in an MoE model the routed FFNs are not, so ``overall`` covers different
sets in the two, while ``attention`` (the attention weights of blocks whose attention is not routed) is the same set
in a dense model and its token-MoE twin: compare models on it.
"""

import re
from collections.abc import Iterable

import torch
from torch import nn

from condmoe.models import pop_moe_stats
from condmoe.models.moe import RoutedLayer
from condmoe.models.text_tokenizer import TextTokenizer
from condmoe.train.config import Config
from condmoe.train.data import dense_targets, val_batches
from condmoe.train.evaluate import task_inputs

TASK_SPECIFIC = ("dense_heads.", "task_embed", "prompts", "logit_scale", "class_head.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def shared_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters every task's loss reaches: outside routed layers and task-specific parts (module docstring)."""
    routed = {id(p) for m in model.modules() if isinstance(m, RoutedLayer) for p in m.parameters()}
    return {name: p for name, p in model.named_parameters()
            if p.requires_grad and id(p) not in routed and not name.startswith(TASK_SPECIFIC)}


def parameter_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """``overall`` (every name), ``attention`` (``blocks.<i>.attn.*``) and ``block_<i>`` (``blocks.<i>.*``)."""
    names = list(names)
    groups = {"overall": names, "attention": [n for n in names if re.match(r"^blocks\.\d+\.attn\.", n)]}
    for name in names:
        match = _BLOCK.match(name)
        if match:
            groups.setdefault(f"block_{int(match[1])}", []).append(name)
    return {k: v for k, v in groups.items() if v}


def gradient_cosines(grads: dict[str, dict[str, torch.Tensor]], groups: dict[str, list[str]]) -> dict[str, list]:
    """Per group, the ``T x T`` cosine similarity of the tasks' gradients (``grads[task][param]``) concatenated over
    the group's parameters; a task without gradient there (all zeros) has cosine 0 with every task, 1 with itself."""
    tasks = list(grads)
    out = {}
    for group, names in groups.items():
        flat = torch.stack([torch.cat([grads[t][n].double().reshape(-1) for n in names]) for t in tasks])
        norms = flat.norm(dim=1)
        cos = (flat @ flat.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
        cos.fill_diagonal_(1.0)
        out[group] = cos.tolist()
    return out


def mean_off_diagonal(matrix: list[list[float]]) -> float:
    """The mean cosine over task pairs (NaN for one task)."""
    m = torch.tensor(matrix, dtype=torch.float64)
    t = m.shape[0]
    return float((m.sum() - m.diagonal().sum()) / (t * (t - 1))) if t > 1 else float("nan")


def conflict(matrix: list[list[float]]) -> dict[str, float]:
    """How much the task pairs pull against each other: the pairs with a negative cosine (``negative_pairs`` of
    ``pairs``), the most negative cosine (``min``) and the mean of ``max(0, -cos)`` over pairs (``mean_conflict``)."""
    m = torch.tensor(matrix, dtype=torch.float64)
    rows, cols = torch.triu_indices(m.shape[0], m.shape[0], offset=1)
    pairs = m[rows, cols]
    if not len(pairs):
        return {"pairs": 0, "negative_pairs": 0, "min": float("nan"), "mean_conflict": float("nan")}
    return {"pairs": len(pairs), "negative_pairs": int((pairs < 0).sum()), "min": float(pairs.min()),
            "mean_conflict": float((-pairs).clamp_min(0).mean())}


def task_gradients(model, cfg: Config, tokenizer: TextTokenizer, task_ids: list[int], num_batches: int,
                   batch_size: int, split: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """Each task's unweighted loss gradient on the shared parameters, averaged over its first ``num_batches``
    batches of ``split`` (the model in eval mode: no drop-path noise; routing statistics are discarded)."""
    shared = shared_parameters(model)
    img_size = model.image_embed.patch_embed.img_size[0]
    grads, batches_seen = {}, {}
    for task_id in task_ids:
        task = cfg.tasks[task_id]
        targets, options = task_inputs(cfg, tokenizer, task)
        total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in shared.items()}
        seen = 0
        for batch in val_batches(cfg.data.root, task.dataset, img_size, batch_size, tokenizer, task_type=task.type,
                                 num_frames=cfg.data.num_frames, split=split,
                                 dense=dense_targets(cfg.data.root, [task]) if options else None):
            batch.pop("num_skipped", None)
            model.zero_grad(set_to_none=True)
            out = model(task.type, {**batch, **targets}, task_id=task_id, **options)
            pop_moe_stats(model)  # the balance/MI terms are not the task's loss
            out.loss.backward()
            for name, p in shared.items():
                if p.grad is not None:
                    total[name] += p.grad.double()
            seen += 1
            if seen >= num_batches:
                break
        if not seen:
            raise ValueError(f"task {task.name}: no batch in {task.dataset}/{split}")
        grads[task.name] = {name: g / seen for name, g in total.items()}
        batches_seen[task.name] = seen
    model.zero_grad(set_to_none=True)
    return grads, batches_seen


def interference(model, cfg: Config, tokenizer: TextTokenizer, task_names: list[str] | None = None,
                 num_batches: int = 4, batch_size: int = 32, split: str = "train") -> dict:
    """The report ``condmoe-experts interference`` writes: per group, the task x task cosines, their mean and how
    much the pairs conflict (``conflict``)."""
    names = [t.name for t in cfg.tasks]
    chosen = task_names or names
    unknown = [n for n in chosen if n not in names]
    if unknown or len(chosen) < 2:
        raise ValueError(f"--tasks: need two or more of {', '.join(names)}, got {', '.join(chosen)}")
    grads, seen = task_gradients(model.eval(), cfg, tokenizer, [names.index(n) for n in chosen], num_batches,
                                 batch_size, split)
    groups = parameter_groups(next(iter(grads.values())))
    cosines = gradient_cosines(grads, groups)
    return {"tasks": chosen, "split": split, "batches": seen, "batch_size": batch_size,
            "parameters": {g: sum(grads[chosen[0]][n].numel() for n in v) for g, v in groups.items()},
            "cosine": cosines, "mean_cosine": {g: mean_off_diagonal(m) for g, m in cosines.items()},
            "conflict": {g: conflict(m) for g, m in cosines.items()}}


def plot_interference(report: dict, path) -> None:
    """Heatmaps of the overall and attention cosines, and the mean cosine per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    blocks = sorted((k for k in report["cosine"] if k.startswith("block_")), key=lambda k: int(k.split("_")[1]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), constrained_layout=True)
    for ax, group in zip(axes[:2], ("overall", "attention")):
        if group not in report["cosine"]:
            ax.axis("off")
            continue
        image = ax.imshow(report["cosine"][group], cmap="coolwarm", vmin=-1, vmax=1)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_title(f"{group}: gradient cosine\nmean {report['mean_cosine'][group]:+.3f}, "
                     f"min {report['conflict'][group]['min']:+.3f}", fontsize=9)
        fig.colorbar(image, ax=ax)
    axes[2].bar(range(len(blocks)), [report["mean_cosine"][b] for b in blocks])
    axes[2].axhline(0, color="k", lw=0.5)
    axes[2].set_xticks(range(len(blocks)), [b.split("_")[1] for b in blocks])
    axes[2].set_xlabel("block")
    axes[2].set_ylabel("mean cosine over task pairs")
    fig.savefig(path, dpi=120)
    plt.close(fig)
