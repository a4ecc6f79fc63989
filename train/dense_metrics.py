"""Dense prediction metrics as meters: ``update`` per batch, ``compute()`` once per dataset -> ``{name: float}``.

Meters take the head's raw output ``[B, C, H, W]`` (logits for ``index``/``binary``, unnormalised vectors for
``normal``, values for ``scalar``) and the decoded label at the same resolution (see ``models/dense.py``), and do the
reference's post-processing themselves (argmax, sigmoid, L2 normalisation).

Every accumulator is a sum, kept as a float64 CPU tensor in ``meter.totals``: over several ranks, all-reduce (SUM)
each tensor of ``totals`` (moved to the collective's device and back) before ``compute()``, or ``merge`` meters.

Scales follow the papers' tables: mIoU, pixel accuracy, maxF, odsF and the ``within_*``/``delta_*`` shares in percent;
angles in degrees; depth errors in the label's unit (metres).

The multi-task delta (Maninis et al. 2019, Vandenhende et al. 2021) is ``delta_m``; ``LOWER_IS_BETTER`` says which
way each metric improves:

==============================================================  ==========================
lower is better                                                 higher is better
==============================================================  ==========================
mErr, medErr, rmsErr (normals); rmse, abs_rel, log_rmse (depth)  mIoU, pixel_acc, maxF, odsF,
l1, mse (Taskonomy's regressions and curvature)                 within_*, delta_1.25, top1,
                                                                top5 (soft classification)
==============================================================  ==========================
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from condmoe.train.mtl_delta import LOWER_IS_BETTER, delta_m  # noqa: F401  (re-exported)

IGNORE_INDEX = 255
SALIENCY_THRESHOLDS = tuple(round(0.2 + 0.05 * i, 2) for i in range(15))  # np.linspace(0.2, 0.9, 15), MTL-PyTorch
EDGE_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(1, 100))  # 0.01..0.99, MTL-PyTorch's SEISM parameters
EDGE_MAX_DIST = 0.0075  # BSDS/SEISM default match distance, a fraction of the image diagonal
ANGLE_BIN = 0.01  # degrees per bin of the angular-error histogram (the median's resolution)


class _SumMeter:
    """Accumulators that are all sums (``totals``), so meters of several ranks or shards add up."""

    def __init__(self):
        self.totals: dict[str, torch.Tensor] = {}
        self.reset()

    SCALARS: tuple[str, ...] = ()  # the scalar sums of a meter whose totals are all scalars

    def _zeros(self) -> dict[str, torch.Tensor]:
        return {k: torch.zeros((), dtype=torch.float64) for k in self.SCALARS}

    def reset(self) -> None:
        self.totals = self._zeros()

    def merge(self, other: "_SumMeter") -> None:
        """Add the totals of a meter of the same kind and settings (another rank's, another shard's)."""
        if type(other) is not type(self) or self.totals.keys() != other.totals.keys() or any(
                self.totals[k].shape != other.totals[k].shape for k in self.totals):
            raise ValueError(f"cannot merge a {type(other).__name__} into a {type(self).__name__} of other settings")
        for key, value in other.totals.items():
            self.totals[key] += value

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.totals[key] += value.detach().to(device="cpu", dtype=torch.float64)


def _valid_mask(valid: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor:
    if valid is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if valid.shape != shape:
        raise ValueError(f"valid mask {list(valid.shape)} does not match the target {list(shape)}")
    return valid.to(device=device, dtype=torch.bool)


def _probabilities(pred: torch.Tensor, target_BHW: torch.Tensor, from_logits: bool) -> torch.Tensor:
    if pred.dim() == 4 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if pred.shape != target_BHW.shape:
        raise ValueError(f"prediction {list(pred.shape)} (expected [B, 1, H, W] or [B, H, W]) does not match the "
                         f"target {list(target_BHW.shape)}")
    pred = pred.float()
    return torch.sigmoid(pred) if from_logits else pred


def _count_at_or_above(values: torch.Tensor, thresholds: torch.Tensor, strict: bool,
                       groups: torch.Tensor | None = None, num_groups: int = 1) -> torch.Tensor:
    """``[G, T]``: per group, how many ``values`` are ``> t`` (``strict``) or ``>= t`` for each sorted threshold t,
    through one bucketing pass instead of T comparisons."""
    num = thresholds.numel()
    # right=False: idx = #(t < v), so v > t_k iff idx > k; right=True: idx = #(t <= v), v >= t_k iff idx > k
    idx = torch.searchsorted(thresholds, values.contiguous(), right=not strict)
    if groups is not None:
        idx = idx + groups * (num + 1)
    counts = torch.bincount(idx, minlength=num_groups * (num + 1)).view(num_groups, num + 1)
    return counts.flip(1).cumsum(1).flip(1)[:, 1:]


class ConfusionMeter(_SumMeter):
    """Semantic segmentation / human parts: a ``K x K`` confusion matrix over the dataset (labelled pixels only:
    target != ``ignore_index``), then per-class ``IoU = tp / (tp + fp + fn)``.

    ``compute()``: ``mIoU`` (percent), the mean IoU over the classes present in the ground truth or the prediction;
    classes absent from both have no IoU and are left out (torchmetrics/mmseg's nan-mean). Multi-Task-Learning-PyTorch's
    ``SemsegMeter`` counts them as 0 instead; over a full validation set, where every class occurs, both agree.
    ``pixel_acc`` (percent): correct labelled pixels over labelled pixels.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        super().__init__()

    def _zeros(self) -> dict[str, torch.Tensor]:
        return {"confusion": torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)}

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target_BHW: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """``pred``: logits ``[B, K, H, W]`` (argmax taken) or class indices ``[B, H, W]``."""
        if pred.dim() == 4:
            pred = pred.argmax(dim=1)
        if pred.shape != target_BHW.shape:
            raise ValueError(f"prediction {list(pred.shape)} does not match the target {list(target_BHW.shape)}")
        target = target_BHW.long()
        mask = (target != self.ignore_index) & _valid_mask(valid, target.shape, target.device)
        t, p = target[mask], pred.long()[mask]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
            raise ValueError(f"target classes outside [0, {self.num_classes}) besides ignore {self.ignore_index}: "
                             f"{sorted(set(t.unique().tolist()) - set(range(self.num_classes)))[:5]}")
        k = self.num_classes
        self._add("confusion", torch.bincount(t * k + p, minlength=k * k).view(k, k))  # rows: target, cols: pred

    def class_iou(self) -> list[float]:
        """IoU per class (fraction), NaN for a class absent from both the ground truth and the prediction."""
        cm = self.totals["confusion"]
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan)).tolist()

    def compute(self) -> dict[str, float]:
        cm = self.totals["confusion"]
        iou = torch.tensor(self.class_iou(), dtype=torch.float64)
        present = ~iou.isnan()
        total = cm.sum()
        return {"mIoU": 100.0 * float(iou[present].mean()) if present.any() else math.nan,
                "pixel_acc": 100.0 * float(cm.diag().sum() / total) if total > 0 else math.nan}


class SaliencyMeter(_SumMeter):
    """Saliency: maxF, the best F-measure over binarisation thresholds, Multi-Task-Learning-PyTorch's protocol.

    At each threshold t (a pixel is salient when its probability is ``> t``; default ``np.linspace(0.2, 0.9, 15)``,
    the reference's), precision and recall are computed per image and averaged over the images, and
    ``F = (1 + b2) P R / (b2 P + R)`` of the averages; ``maxF`` is the maximum over t. ``beta_squared`` defaults to
    0.3, the saliency literature's weighting (Achanta et al. 2009; the ASTMT-derived ``SaliencyMeterWithBeta``).
    Multi-Task-Learning-PyTorch's ``SaliencyMeter`` computes ``2PR / (P + R)`` (``beta_squared=1.0``) under the same
    name. An image without positives has recall 0, one without predicted positives precision 0 (the reference's
    ``1e-12`` guards).

    ``compute()``: ``maxF`` (percent), ``threshold`` (where it is reached), ``mIoU`` (percent: the best over
    thresholds of the mean per-image IoU, an image with neither salient pixels nor predicted ones scoring 1, as the
    reference).
    """

    def __init__(self, thresholds: tuple[float, ...] = SALIENCY_THRESHOLDS, beta_squared: float = 0.3,
                 from_logits: bool = True):
        if not thresholds or list(thresholds) != sorted(thresholds):
            raise ValueError(f"thresholds must be a non-empty increasing sequence, got {thresholds}")
        self.threshold_values = tuple(float(t) for t in thresholds)
        self.thresholds = torch.tensor(thresholds, dtype=torch.float32)
        self.beta_squared, self.from_logits = beta_squared, from_logits
        super().__init__()

    def _zeros(self) -> dict[str, torch.Tensor]:
        num = len(self.thresholds)
        return {"precision": torch.zeros(num, dtype=torch.float64), "recall": torch.zeros(num, dtype=torch.float64),
                "iou": torch.zeros(num, dtype=torch.float64), "images": torch.zeros((), dtype=torch.float64)}

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target_BHW: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """``pred``: logits (or probabilities with ``from_logits=False``) ``[B, 1, H, W]``; target 0/1."""
        prob = _probabilities(pred, target_BHW, self.from_logits)
        mask = _valid_mask(valid, target_BHW.shape, target_BHW.device)
        positive = (target_BHW >= 0.5) & mask
        batch = prob.shape[0]
        image = torch.arange(batch, device=prob.device).view(batch, 1, 1).expand_as(prob)
        thresholds = self.thresholds.to(prob.device)
        predicted = _count_at_or_above(prob[mask], thresholds, True, image[mask], batch).double()  # [B, T]
        tp = _count_at_or_above(prob[positive], thresholds, True, image[positive], batch).double()
        actual = positive.flatten(1).sum(1, keepdim=True).double()  # [B, 1]
        union = predicted + actual - tp
        self._add("precision", (tp / (predicted + 1e-12)).sum(0))
        self._add("recall", (tp / (actual + 1e-12)).sum(0))
        self._add("iou", torch.where(union > 0, tp / union.clamp(min=1), torch.ones_like(tp)).sum(0))
        self._add("images", torch.tensor(float(batch)))

    def compute(self) -> dict[str, float]:
        images = float(self.totals["images"])
        if images == 0:
            return {"maxF": math.nan, "threshold": math.nan, "mIoU": math.nan}
        precision, recall = self.totals["precision"] / images, self.totals["recall"] / images
        b2 = self.beta_squared
        f = (1 + b2) * precision * recall / (b2 * precision + recall).clamp(min=1e-12)
        best = int(f.argmax())
        return {"maxF": 100.0 * float(f[best]), "threshold": self.threshold_values[best],
                "mIoU": 100.0 * float((self.totals["iou"] / images).max())}


class NormalsMeter(_SumMeter):
    """Surface normals: the angle between the L2-normalised prediction and the (normalised) target, in degrees, over
    labelled pixels (target non-zero, and ``valid``), pooled over all pixels of the dataset as
    Multi-Task-Learning-PyTorch's ``NormalsMeter``.

    ``compute()``: ``mErr`` (mean), ``medErr`` (median, from a histogram of ``ANGLE_BIN`` = 0.01 degree bins, so
    that it stays a sum; interpolated within the bin), ``rmsErr`` (root mean square; the reference's ``rmse`` key
    repeats the mean by a slip), ``within_11.25``, ``within_22.5``, ``within_30`` (percent of pixels with an error
    strictly below the bound).
    """

    BOUNDS = (11.25, 22.5, 30.0)

    def __init__(self):
        self.num_bins = round(180.0 / ANGLE_BIN)
        super().__init__()

    def _zeros(self) -> dict[str, torch.Tensor]:
        z = {k: torch.zeros((), dtype=torch.float64) for k in ("pixels", "sum", "sum_sq")}
        z["within"] = torch.zeros(len(self.BOUNDS), dtype=torch.float64)
        z["histogram"] = torch.zeros(self.num_bins, dtype=torch.float64)
        return z

    @torch.no_grad()
    def update(self, pred_B3HW: torch.Tensor, target_B3HW: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        if pred_B3HW.dim() != 4 or pred_B3HW.shape[1] != 3 or pred_B3HW.shape != target_B3HW.shape:
            raise ValueError(f"prediction {list(pred_B3HW.shape)} and target {list(target_B3HW.shape)} must both be "
                             "[B, 3, H, W]")
        target = target_B3HW.double()
        mask = (target.norm(dim=1) > 0) & _valid_mask(valid, target.shape[:1] + target.shape[2:], target.device)
        p = pred_B3HW.double().movedim(1, -1)[mask]  # [M, 3]
        t = target.movedim(1, -1)[mask]
        # atan2(|p x t|, p . t) is accurate at every angle (acos of the dot loses precision near 0 and 180 degrees)
        # and needs no normalisation: both terms scale with |p| |t|.
        angle = torch.rad2deg(torch.atan2(torch.linalg.cross(p, t).norm(dim=-1), (p * t).sum(-1)))
        self._add("pixels", torch.tensor(float(angle.numel())))
        self._add("sum", angle.sum())
        self._add("sum_sq", (angle * angle).sum())
        self._add("within", torch.stack([(angle < b).sum() for b in self.BOUNDS]))
        bins = (angle / ANGLE_BIN).long().clamp(max=self.num_bins - 1)
        self._add("histogram", torch.bincount(bins, minlength=self.num_bins))

    def compute(self) -> dict[str, float]:
        n = float(self.totals["pixels"])
        if n == 0:
            return dict.fromkeys(("mErr", "medErr", "rmsErr", *(f"within_{b:g}" for b in self.BOUNDS)), math.nan)
        cumulative = self.totals["histogram"].cumsum(0)
        k = int(torch.searchsorted(cumulative, torch.tensor(n / 2, dtype=torch.float64)))
        below = float(cumulative[k - 1]) if k else 0.0
        median = (k + (n / 2 - below) / float(self.totals["histogram"][k])) * ANGLE_BIN
        out = {"mErr": float(self.totals["sum"]) / n, "medErr": median,
               "rmsErr": math.sqrt(float(self.totals["sum_sq"]) / n)}
        out.update({f"within_{b:g}": 100.0 * float(w) / n for b, w in zip(self.BOUNDS, self.totals["within"])})
        return out


class EdgeMeter(_SumMeter):
    """Edges: an approximation of the optimal-dataset-scale F-measure (odsF), computed in torch.

    This is not the BSDS benchmark (Martin et al. 2004) that Multi-Task-Learning-PyTorch and M3ViT report through
    the external MATLAB SEISM package: there, predictions are thinned to one-pixel edges and matched one-to-one to
    ground-truth edge pixels (bipartite matching) within ``maxDist`` = 0.0075 of the image diagonal. Here, at each
    threshold t (an edge where the probability is ``>= t``; default 0.01..0.99, SEISM's 99 thresholds):

    - a predicted edge pixel is correct when a ground-truth edge pixel lies within ``tolerance`` pixels (Chebyshev
      distance: a ``(2r + 1)^2`` window, a max-pool dilation of the ground truth);
    - a ground-truth edge pixel is recalled when a predicted edge pixel lies within ``tolerance`` pixels;

    with no thinning and no one-to-one matching, so thick predictions along a true edge are not penalised and the
    numbers run higher than SEISM's. Counts are pooled over the dataset per threshold (ODS: one threshold for the
    whole dataset); ``F = 2PR / (P + R)`` and ``odsF`` is its maximum. ``tolerance`` None takes
    ``round(0.0075 * diagonal)`` pixels of each batch's maps (5 px at 512 x 512), SEISM's default distance.
    Invalid pixels are neither predictions nor ground truth.

    ``compute()``: ``odsF`` (percent), and the ``precision``, ``recall`` (percent) and ``threshold`` where it is
    reached.
    """

    def __init__(self, thresholds: tuple[float, ...] = EDGE_THRESHOLDS, tolerance: int | None = None,
                 from_logits: bool = True):
        if not thresholds or list(thresholds) != sorted(thresholds):
            raise ValueError(f"thresholds must be a non-empty increasing sequence, got {thresholds}")
        if tolerance is not None and tolerance < 0:
            raise ValueError(f"tolerance must be a non-negative number of pixels, got {tolerance}")
        self.threshold_values = tuple(float(t) for t in thresholds)
        self.thresholds = torch.tensor(thresholds, dtype=torch.float32)
        self.tolerance, self.from_logits = tolerance, from_logits
        super().__init__()

    def _zeros(self) -> dict[str, torch.Tensor]:
        return {k: torch.zeros(len(self.thresholds), dtype=torch.float64)
                for k in ("matched_pred", "pred", "matched_gt", "gt")}

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target_BHW: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """``pred``: logits (or probabilities with ``from_logits=False``) ``[B, 1, H, W]``; target 0/1."""
        prob = _probabilities(pred, target_BHW, self.from_logits)
        mask = _valid_mask(valid, target_BHW.shape, target_BHW.device)
        edge = (target_BHW >= 0.5) & mask
        height, width = prob.shape[-2:]
        r = self.tolerance if self.tolerance is not None else round(EDGE_MAX_DIST * math.hypot(height, width))
        r = int(r)

        def window_max(x_BHW: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(x_BHW[:, None], 2 * r + 1, stride=1, padding=r)[:, 0] if r else x_BHW

        near_edge = window_max(edge.float()) > 0
        # A ground-truth pixel is recalled at t when some valid prediction within r reaches t: the window maximum of
        # the valid probabilities (-1 elsewhere) does, so one pooling serves every threshold.
        best_near = window_max(torch.where(mask, prob, torch.full_like(prob, -1.0)))
        thresholds = self.thresholds.to(prob.device)
        self._add("pred", _count_at_or_above(prob[mask], thresholds, False)[0])
        self._add("matched_pred", _count_at_or_above(prob[mask & near_edge], thresholds, False)[0])
        self._add("gt", torch.full((thresholds.numel(),), float(edge.sum())))
        self._add("matched_gt", _count_at_or_above(best_near[edge], thresholds, False)[0])

    def compute(self) -> dict[str, float]:
        tot = self.totals
        precision = tot["matched_pred"] / tot["pred"].clamp(min=1)
        recall = tot["matched_gt"] / tot["gt"].clamp(min=1)
        f = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        best = int(f.argmax())
        return {"odsF": 100.0 * float(f[best]), "precision": 100.0 * float(precision[best]),
                "recall": 100.0 * float(recall[best]), "threshold": self.threshold_values[best]}


class DepthMeter(_SumMeter):
    """Depth (or another positive scalar): errors over valid pixels (``valid``, a finite and positive target),
    pooled over all pixels of the dataset, as Multi-Task-Learning-PyTorch's ``DepthMeter``.

    ``compute()``: ``rmse`` (``sqrt(mean((p - t)^2))``), ``abs_rel`` (``mean(|p - t| / t)``), ``log_rmse``
    (``sqrt(mean((log p - log t)^2))`` with the prediction clamped to ``>= 1e-9`` as the reference), ``delta_1.25``
    (percent of pixels with ``max(p / t, t / p) < 1.25``, the prediction clamped likewise).
    """

    SCALARS = ("pixels", "sq", "abs_rel", "log_sq", "delta")

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target_BHW: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        p = _probabilities(pred, target_BHW, from_logits=False).double()
        t = target_BHW.double()
        mask = torch.isfinite(t) & (t > 0) & _valid_mask(valid, t.shape, t.device)
        p, t = p[mask], t[mask]
        clamped = p.clamp(min=1e-9)
        self._add("pixels", torch.tensor(float(t.numel())))
        self._add("sq", ((p - t) ** 2).sum())
        self._add("abs_rel", ((p - t).abs() / t).sum())
        self._add("log_sq", ((clamped.log() - t.log()) ** 2).sum())
        self._add("delta", (torch.maximum(clamped / t, t / clamped) < 1.25).sum())

    def compute(self) -> dict[str, float]:
        n = float(self.totals["pixels"])
        if n == 0:
            return dict.fromkeys(("rmse", "abs_rel", "log_rmse", "delta_1.25"), math.nan)
        tot = {k: float(v) for k, v in self.totals.items()}
        return {"rmse": math.sqrt(tot["sq"] / n), "abs_rel": tot["abs_rel"] / n,
                "log_rmse": math.sqrt(tot["log_sq"] / n), "delta_1.25": 100.0 * tot["delta"] / n}


class ErrorMeter(_SumMeter):
    """Taskonomy's regressions (keypoints, 16-bit edges, reshading, unsupervised segmentation, curvature): errors over
    the valid entries (finite target, ``valid``), pooled over the dataset, any number of stacked channels.
    Mod-Squad logs ``l1`` for its L1 tasks and ``mse`` for curvature (``engine_mt.get_metric``), each batch's mean
    averaged; pooling counts every pixel once whatever the batch.

    ``compute()``: ``l1`` (``mean |p - t|``), ``mse`` (``mean (p - t)^2``), ``rmse`` (its square root).
    """

    SCALARS = ("entries", "abs", "sq")

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        p = _probabilities(pred, target, from_logits=False) if target.dim() == 3 else pred.float()
        if p.shape != target.shape:
            raise ValueError(f"prediction {list(pred.shape)} does not match the target {list(target.shape)}")
        t = target.double()
        mask = torch.isfinite(t) & _valid_mask(valid, t.shape, t.device)
        err = p.double()[mask] - t[mask]
        self._add("entries", torch.tensor(float(err.numel())))
        self._add("abs", err.abs().sum())
        self._add("sq", (err ** 2).sum())

    def compute(self) -> dict[str, float]:
        n = float(self.totals["entries"])
        if n == 0:
            return dict.fromkeys(("l1", "mse", "rmse"), math.nan)
        mse = float(self.totals["sq"]) / n
        return {"l1": float(self.totals["abs"]) / n, "mse": mse, "rmse": math.sqrt(mse)}


class SoftTopMeter(_SumMeter):
    """Soft-label classification (Taskonomy's class_object, class_scene): Mod-Squad's top-1, the share of images whose
    predicted argmax is the target distribution's argmax, and top-5 (the target's argmax among the 5 highest
    outputs); images without a target (a NaN row) are left out. Target ties go to the lowest class index."""

    SCALARS = ("images", "top1", "top5")

    @torch.no_grad()
    def update(self, pred_BK: torch.Tensor, target_BK: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        if pred_BK.shape != target_BK.shape or pred_BK.dim() != 2:
            raise ValueError(f"prediction {list(pred_BK.shape)} and target {list(target_BK.shape)} must both be "
                             "[B, K]")
        keep = torch.isfinite(target_BK).all(dim=1)
        pred, truth = pred_BK[keep].float(), target_BK[keep].float().argmax(dim=1)
        top = pred.topk(min(5, pred.shape[1]), dim=1).indices
        self._add("images", torch.tensor(float(truth.numel())))
        self._add("top1", (top[:, 0] == truth).sum())
        self._add("top5", (top == truth[:, None]).any(dim=1).sum())

    def compute(self) -> dict[str, float]:
        n = float(self.totals["images"])
        if n == 0:
            return {"top1": math.nan, "top5": math.nan}
        return {"top1": 100.0 * float(self.totals["top1"]) / n, "top5": 100.0 * float(self.totals["top5"]) / n}


@dataclass(frozen=True)
class DenseMetric:
    """How a dense label is evaluated: its meter (``meter(num_classes=..., ignore_index=...)`` for ``index``
    labels, ``meter()`` otherwise) and the headline metric that ``delta_m`` compares."""

    meter: Callable[..., _SumMeter]
    headline: str

    @property
    def lower_is_better(self) -> bool:
        return LOWER_IS_BETTER[self.headline]


# By family or label name first (edge, Taskonomy's regressions), then by encoding (data_prep/schema.py
# DENSE_ENCODINGS): see dense_metric
DENSE_METRICS: dict[str, DenseMetric] = {
    "edge": DenseMetric(EdgeMeter, "odsF"),
    "regression": DenseMetric(ErrorMeter, "l1"),
    "curvature": DenseMetric(ErrorMeter, "mse"),
    "soft": DenseMetric(SoftTopMeter, "top1"),
    "index": DenseMetric(ConfusionMeter, "mIoU"),
    "binary": DenseMetric(SaliencyMeter, "maxF"),
    "normal": DenseMetric(NormalsMeter, "mErr"),
    "scalar": DenseMetric(DepthMeter, "rmse"),
}


_BY_NAME = ("edge", "regression", "curvature")


def dense_metric(label: str, encoding: str) -> DenseMetric:
    """The evaluation of a dense task: by its family or label name first (``edge``: ``EdgeMeter``; Taskonomy's
    ``regression`` and ``curvature``: ``ErrorMeter``), else by its label's encoding."""
    if label in DENSE_METRICS:
        return DENSE_METRICS[label]
    if encoding not in DENSE_METRICS or encoding in _BY_NAME:
        raise ValueError(f"label {label!r}: encoding {encoding!r} has no metric (known: index, binary, normal, scalar, "
                         "soft)")
    return DENSE_METRICS[encoding]


def create_meter(label: str, spec: Mapping) -> _SumMeter:
    """A fresh meter for a label entry of ``dense.json`` (``{"member", "encoding", ...}``)."""
    metric = dense_metric(label, spec["encoding"])
    if metric.meter is ConfusionMeter:
        return ConfusionMeter(spec["num_classes"], spec.get("ignore", IGNORE_INDEX))
    return metric.meter()
