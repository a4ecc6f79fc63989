"""The multi-task delta (Maninis et al. 2019; Vandenhende et al. 2021) and the direction each dense metric improves
in: the summary that compares a multi-task model with its single-task baselines."""

import math
from collections.abc import Collection, Mapping

LOWER_IS_BETTER = {
    "mErr": True, "medErr": True, "rmsErr": True, "rmse": True, "abs_rel": True, "log_rmse": True,
    "mIoU": False, "pixel_acc": False, "maxF": False, "odsF": False, "within_11.25": False, "within_22.5": False,
    "within_30": False, "delta_1.25": False, "l1": True, "mse": True, "top1": False, "top5": False,
}


def delta_m(metrics: Mapping[str, float], single_task: Mapping[str, float],
            lower_is_better: Mapping[str, bool] | Collection[str]) -> float:
    """The multi-task delta in percent: ``100 / T * sum_t (-1)^l_t (M_t - M_st) / M_st`` (Maninis et al. 2019;
    Vandenhende et al. 2021, MTL-PyTorch's ``calculate_multi_task_performance``), positive when the multi-task model
    is better on average.

    Args:
        metrics: The multi-task model's headline metric per task (``{"semseg": mIoU, "normals": mErr, ...}``).
        single_task: The single-task baselines' values of the same metrics, same keys.
        lower_is_better: Per task, whether lower is better (``l_t = 1``): a mapping to bools, or the collection of
            such tasks. ``LOWER_IS_BETTER`` gives it per metric name (``DENSE_METRICS`` per label).
    """
    if set(metrics) != set(single_task) or not metrics:
        raise ValueError(f"metrics has tasks {sorted(metrics)} but single_task has {sorted(single_task)}")
    if isinstance(lower_is_better, Mapping):
        missing = set(metrics) - set(lower_is_better)
        if missing:
            raise ValueError(f"lower_is_better says nothing of {sorted(missing)}")
        lower = {t for t in metrics if lower_is_better[t]}
    else:
        lower = set(lower_is_better)
        if lower - set(metrics):
            raise ValueError(f"lower_is_better names tasks without metrics: {sorted(lower - set(metrics))}")
    total = 0.0
    for task, value in metrics.items():
        base = single_task[task]
        if base == 0 or not math.isfinite(base) or not math.isfinite(value):
            raise ValueError(f"task {task!r}: cannot compare {value} with the single-task value {base}")
        sign = -1.0 if task in lower else 1.0
        total += sign * (value - base) / base
    return 100.0 * total / len(metrics)
