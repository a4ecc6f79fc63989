"""train/dense_metrics.py on hand-computed cases: mIoU with ignore pixels, maxF at a known threshold, angular errors,
the edge F-measure at tolerance 0 and 1, depth errors, and the signs of the multi-task delta."""

import math

import pytest
import torch
import torch.nn.functional as F

from condmoe.train.dense_metrics import (
    DENSE_METRICS,
    LOWER_IS_BETTER,
    ConfusionMeter,
    DepthMeter,
    EdgeMeter,
    ErrorMeter,
    NormalsMeter,
    SaliencyMeter,
    SoftTopMeter,
    create_meter,
    delta_m,
    dense_metric,
)

# Segmentation


def _segmentation_case() -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.tensor([[[0, 0, 1, 1, 2, 255]]], dtype=torch.uint8)
    pred = torch.tensor([[[0, 1, 1, 1, 0, 2]]])
    return pred, target


def test_miou_over_labelled_pixels():
    # labelled (target, pred): (0,0) (0,1) (1,1) (1,1) (2,0); the ignored pixel's prediction 2 does not count.
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: fn 1 -> 0.
    pred, target = _segmentation_case()
    meter = ConfusionMeter(3)
    meter.update(pred, target)
    out = meter.compute()
    assert out["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0) / 3)
    assert out["pixel_acc"] == pytest.approx(100 * 3 / 5)
    assert meter.class_iou() == pytest.approx([1 / 3, 2 / 3, 0.0])


def test_miou_leaves_out_classes_absent_from_prediction_and_ground_truth():
    pred, target = _segmentation_case()
    meter = ConfusionMeter(4)  # class 3 occurs nowhere: no IoU (MTL-PyTorch's SemsegMeter would average in a 0)
    meter.update(pred, target)
    assert meter.compute()["mIoU"] == pytest.approx(100 / 3)
    assert math.isnan(meter.class_iou()[3])


def test_confusion_accumulates_over_batches_takes_logits_and_merges():
    pred, target = _segmentation_case()
    whole = ConfusionMeter(3)
    whole.update(F.one_hot(pred, 3).permute(0, 3, 1, 2).float(), target)  # logits [B, K, H, W]
    halves = ConfusionMeter(3)
    halves.update(pred[..., :3], target[..., :3])
    other = ConfusionMeter(3)
    other.update(pred[..., 3:], target[..., 3:])
    halves.merge(other)
    assert halves.compute() == pytest.approx(whole.compute())
    assert whole.compute()["mIoU"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="merge"):
        halves.merge(ConfusionMeter(4))


def test_confusion_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="outside"):
        ConfusionMeter(3).update(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[1, 7]]]))


# Saliency


def test_saliency_maxf_at_the_known_best_threshold():
    # Image A: gt 1 1 0 0, p .9 .6 .4 .1 -> (P, R) at .3/.5/.7: (2/3, 1) (1, 1) (1, 1/2)
    # Image B: gt 1 0 0 0, p .8 .65 .2 .1 -> (1/2, 1) (1/2, 1) (1, 1)
    # Means: (7/12, 1) (3/4, 1) (1, 3/4); F_0.3 = 1.3 P R / (0.3 P + R): .6454, .7959, .9286 -> best at 0.7.
    # (Pooled counts would give P 1, R 2/3 at 0.7 and F .8966: the per-image mean is what is measured.)
    gt = torch.tensor([[[1.0, 1, 0, 0]], [[1.0, 0, 0, 0]]])
    prob = torch.tensor([[[0.9, 0.6, 0.4, 0.1]], [[0.8, 0.65, 0.2, 0.1]]])
    meter = SaliencyMeter(thresholds=(0.3, 0.5, 0.7), from_logits=False)
    meter.update(prob[:, None], gt)
    out = meter.compute()
    assert out["maxF"] == pytest.approx(100 * 1.3 * 0.75 / (0.3 + 0.75))
    assert out["threshold"] == 0.7
    # per-image IoU at .3/.5/.7: (2/3 + 1/2)/2, (1 + 1/2)/2, (1/2 + 1)/2 -> best .75
    assert out["mIoU"] == pytest.approx(75.0)
    logits = SaliencyMeter(thresholds=(0.3, 0.5, 0.7))
    logits.update(torch.logit(prob.double()).float()[:, None], gt)
    assert logits.compute() == pytest.approx(out)
    f1 = SaliencyMeter(thresholds=(0.3, 0.5, 0.7), beta_squared=1.0, from_logits=False)
    f1.update(prob, gt)
    assert f1.compute()["maxF"] == pytest.approx(100 * 2 * 0.75 / 1.75)


# Normals


def _plane_normals(angles_deg: list[float]) -> torch.Tensor:
    """[1, 3, 1, n] unit normals in the y-z plane at the given angles from +z."""
    a = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    return torch.stack([torch.zeros_like(a), a.sin(), a.cos()])[None, :, None, :].float()


def test_normals_rotated_by_30_degrees_score_30():
    base = torch.linspace(-60, 80, 50).tolist()
    target = _plane_normals(base)
    pred = 2.5 * _plane_normals([b + 30 for b in base])  # length does not matter
    meter = NormalsMeter()
    meter.update(pred, target)
    out = meter.compute()
    assert out["mErr"] == pytest.approx(30.0, abs=1e-4)
    assert out["medErr"] == pytest.approx(30.0, abs=0.01)
    assert out["rmsErr"] == pytest.approx(30.0, abs=1e-4)
    assert out["within_22.5"] == 0.0


def test_normals_mean_median_and_shares_over_labelled_pixels():
    target = torch.cat([_plane_normals([0.0, 20.0, 40.0]), torch.zeros(1, 3, 1, 1)], dim=-1)  # last: unlabelled
    pred = torch.cat([_plane_normals([10.0, 30.0, 70.0]), torch.ones(1, 3, 1, 1)], dim=-1)
    meter = NormalsMeter()
    meter.update(pred, target)
    out = meter.compute()  # errors 10, 10, 30
    assert out["mErr"] == pytest.approx(50 / 3, abs=1e-4)
    assert out["medErr"] == pytest.approx(10.0, abs=0.01)
    assert out["rmsErr"] == pytest.approx(math.sqrt(1100 / 3), abs=1e-4)
    assert out["within_11.25"] == pytest.approx(200 / 3)
    assert out["within_22.5"] == pytest.approx(200 / 3)


# Edges


def _edge_case() -> tuple[torch.Tensor, torch.Tensor]:
    """5x5: ground truth is column 2; predicted 0.9 on column 2 rows 0-2 and column 3 rows 3-4 (one pixel off), and a
    stray 0.6 at (0, 0), two columns away."""
    gt = torch.zeros(1, 5, 5)
    gt[0, :, 2] = 1
    prob = torch.zeros(1, 1, 5, 5)
    prob[0, 0, 0:3, 2] = 0.9
    prob[0, 0, 3:5, 3] = 0.9
    prob[0, 0, 0, 0] = 0.6
    return prob, gt


def test_edge_f_measure_with_tolerance_0():
    # t=.8: 5 predictions, 3 on the edge; 3 of 5 edge pixels hit: P = R = .6, F = .6
    # t=.5: 6 predictions, 3 on the edge: P = .5, R = .6, F = 6/11
    prob, gt = _edge_case()
    meter = EdgeMeter(thresholds=(0.5, 0.8), tolerance=0, from_logits=False)
    meter.update(prob, gt)
    out = meter.compute()
    assert out["odsF"] == pytest.approx(60.0)
    assert (out["precision"], out["recall"], out["threshold"]) == (pytest.approx(60.0), pytest.approx(60.0), 0.8)
    assert meter.totals["pred"].tolist() == [6, 5] and meter.totals["matched_pred"].tolist() == [3, 3]
    default = EdgeMeter(thresholds=(0.5, 0.8), from_logits=False)  # round(0.0075 * 7.07) = 0 px on 5x5 maps
    default.update(prob, gt)
    assert default.compute() == pytest.approx(out)


def test_edge_f_measure_with_tolerance_1():
    # t=.8: the shifted pixels are within 1 px of the edge and recall rows 3-4: P = R = 1
    # t=.5: the stray pixel is 2 px away: P = 5/6, R = 1
    prob, gt = _edge_case()
    meter = EdgeMeter(thresholds=(0.5, 0.8), tolerance=1, from_logits=False)
    meter.update(prob, gt)
    out = meter.compute()
    assert out["odsF"] == pytest.approx(100.0)
    assert out["threshold"] == 0.8
    f_half = 2 * (5 / 6) / (5 / 6 + 1)
    assert meter.totals["matched_pred"].tolist() == [5, 5] and meter.totals["pred"].tolist() == [6, 5]
    assert f_half < 1.0


def test_edge_invalid_predictions_neither_count_nor_recall():
    # The shifted pixels (3,3) and (4,3) invalid: at t=.8 predictions are rows 0-2 of column 2 (P = 1); edge row 3
    # is recalled by (2,2) within 1 px, row 4 by nothing valid: R = 4/5, F = 8/9.
    prob, gt = _edge_case()
    valid = torch.ones(1, 5, 5, dtype=torch.bool)
    valid[0, 3:5, 3] = False
    meter = EdgeMeter(thresholds=(0.8,), tolerance=1, from_logits=False)
    meter.update(prob, gt, valid)
    out = meter.compute()
    assert (out["precision"], out["recall"]) == (pytest.approx(100.0), pytest.approx(80.0))
    assert out["odsF"] == pytest.approx(100 * 8 / 9)


# Depth


def test_depth_errors_over_valid_pixels():
    pred = torch.tensor([[[[2.0, 3.0, 5.0, 9.0, 7.0]]]])
    target = torch.tensor([[[1.0, 4.0, 5.0, 0.0, float("nan")]]])  # 0 and NaN: invalid
    meter = DepthMeter()
    meter.update(pred, target)
    out = meter.compute()
    assert out["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert out["abs_rel"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert out["log_rmse"] == pytest.approx(math.sqrt((math.log(2) ** 2 + math.log(0.75) ** 2) / 3))
    assert out["delta_1.25"] == pytest.approx(100 / 3)
    masked = DepthMeter()
    masked.update(pred, target.nan_to_num(3.0), torch.tensor([[[True, True, True, True, False]]]))
    assert masked.compute() == pytest.approx(out)


def test_empty_meters_report_nan_not_errors():
    assert math.isnan(DepthMeter().compute()["rmse"])
    assert math.isnan(NormalsMeter().compute()["mErr"])
    assert math.isnan(SaliencyMeter().compute()["maxF"])


# Multi-task delta


def test_delta_m_signs():
    single = {"semseg": 50.0, "depth": 0.5}
    # semseg +20 % (higher is better: a gain), depth rmse +10 % (lower is better: a loss) -> (20 - 10) / 2
    assert delta_m({"semseg": 60.0, "depth": 0.55}, single, {"depth"}) == pytest.approx(5.0)
    assert delta_m({"semseg": 60.0, "depth": 0.55}, single, {"semseg": False, "depth": True}) == pytest.approx(5.0)
    # a lower rmse is a gain
    assert delta_m({"semseg": 50.0, "depth": 0.4}, single, {"depth"}) == pytest.approx(10.0)
    assert delta_m(single, single, {"depth"}) == 0.0
    with pytest.raises(ValueError, match="tasks"):
        delta_m({"semseg": 60.0}, single, {"depth"})
    with pytest.raises(ValueError, match="says nothing"):
        delta_m(single, single, {"semseg": False})


def test_lower_is_better_table_and_metric_registry():
    assert all(LOWER_IS_BETTER[m] for m in ("mErr", "rmse", "abs_rel"))
    assert not any(LOWER_IS_BETTER[m] for m in ("mIoU", "maxF", "odsF"))
    assert {k: (v.meter, v.headline) for k, v in DENSE_METRICS.items()} == {
        "edge": (EdgeMeter, "odsF"), "index": (ConfusionMeter, "mIoU"), "binary": (SaliencyMeter, "maxF"),
        "normal": (NormalsMeter, "mErr"), "scalar": (DepthMeter, "rmse"), "regression": (ErrorMeter, "l1"),
        "curvature": (ErrorMeter, "mse"), "soft": (SoftTopMeter, "top1")}
    assert isinstance(create_meter("regression", {"member": "reshading.png", "encoding": "scalar", "scale": 1,
                                                  "invalid": None}), ErrorMeter)
    assert dense_metric("normals", "normal").lower_is_better
    assert isinstance(create_meter("edge", {"member": "edge.png", "encoding": "binary"}), EdgeMeter)
    assert isinstance(create_meter("saliency", {"member": "sal.png", "encoding": "binary"}), SaliencyMeter)
    seg = create_meter("semseg", {"member": "semseg.png", "encoding": "index", "num_classes": 21, "ignore": 255})
    assert isinstance(seg, ConfusionMeter) and seg.num_classes == 21
    with pytest.raises(ValueError, match="no metric"):
        dense_metric("x", "rgb")


def test_threshold_ties_follow_the_references():
    """Saliency counts a pixel salient above t (MTL-PyTorch ``pred > thres``); edges at or above t (BSDS
    ``pb >= thresh``)."""
    gt = torch.tensor([[[1.0, 0.0]]])
    prob = torch.tensor([[[0.5, 0.25]]])
    sal = SaliencyMeter(thresholds=(0.5,), from_logits=False)
    sal.update(prob, gt)
    assert sal.compute()["maxF"] == 0.0  # 0.5 is not > 0.5: nothing predicted
    edge = EdgeMeter(thresholds=(0.5,), tolerance=0, from_logits=False)
    edge.update(prob, gt)
    assert edge.compute()["odsF"] == pytest.approx(100.0)  # 0.5 >= 0.5: the edge pixel found
