"""Taskonomy's tasks as Mod-Squad trains them: the regression, curvature and soft-label classification task types,
their losses and meters on hand-computed cases, their targets (stacked labels, ``.npy`` class vectors), the prep
source's class vectors, and (slow) a 2-rank run of configs/taskonomy_modsquad.yaml on a layout written here."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run, torchrun
from test_prep_dense_sources import _errors, _prep, _samples, _save, _verify_ok

from condmoe.data_prep.dense import encode_npy
from condmoe.models.dense import PooledClassHead, dense_family_loss, l1_loss, mse_loss, soft_label_mse
from condmoe.models.tasks import DENSE_TYPES, task_spec
from condmoe.train.config import TaskConfig, dense_label_specs
from condmoe.train.dense_data import BadLabel, DenseTarget, StackedTarget, dense_targets
from condmoe.train.dense_metrics import ErrorMeter, SoftTopMeter, dense_metric

TASKONOMY = ("class_object", "class_scene", "keypoints2d", "keypoints3d", "edge_occlusion", "edge_texture",
             "reshading", "segment_unsup2d", "segment_unsup25d", "curvature")


def test_task_table_has_mod_squads_taskonomy_tasks():
    assert set(TASKONOMY) <= set(DENSE_TYPES)
    families = {name: task_spec(name).dense for name in TASKONOMY}
    assert families["class_object"] == families["class_scene"] == "soft_classification"
    assert families["curvature"] == "curvature"
    assert {families[n] for n in TASKONOMY[2:-1]} == {"regression"}
    assert {dense_metric(task_spec(n).dense, task_spec(n).encoding).headline for n in TASKONOMY} == \
        {"top1", "l1", "mse"}
    curvature = TaskConfig(name="curv", type="curvature", dataset="taskonomy")
    assert curvature.dense_labels == ("principal_curvature_1", "principal_curvature_2")


def test_stacked_labels_are_scalar_only_and_must_exist():
    dense = {"t": {"a": {"member": "a.png", "encoding": "scalar", "scale": 1.0, "invalid": None},
                   "seg": {"member": "seg.png", "encoding": "index", "num_classes": 3, "ignore": 255}}}
    stacked = TaskConfig(name="x", type="reshading", dataset="t", label="a, a")
    assert [s["member"] for s in dense_label_specs(dense, "root", stacked)] == ["a.png", "a.png"]
    with pytest.raises(ValueError, match="only scalar labels stack"):
        dense_label_specs(dense, "root", TaskConfig(name="s", type="semseg", dataset="t", label="seg,seg"))
    with pytest.raises(ValueError, match="has no label 'b'"):
        dense_label_specs(dense, "root", TaskConfig(name="x", type="reshading", dataset="t", label="a,b"))


def test_regression_and_curvature_losses_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # [1, 2, 2, 2]
    target = torch.tensor([[[[0.0, 2.0], [1.0, math.nan]], [[1.0, -1.0], [0.5, 0.0]]]])
    # valid entries: channel 0 errors 1, 0, 2 (the NaN is left out); channel 1 errors 1, 1, 0.5, 0
    assert mse_loss(pred, target).item() == pytest.approx((1 + 0 + 4 + 1 + 1 + 0.25 + 0) / 7)
    assert l1_loss(pred, target).item() == pytest.approx((1 + 0 + 2 + 1 + 1 + 0.5 + 0) / 7)
    assert dense_family_loss("curvature", pred, target).item() == pytest.approx(7.25 / 7)
    assert dense_family_loss("regression", pred[:, :1], target[:, 0]).item() == pytest.approx(1.0)
    pred.requires_grad_(True)
    mse_loss(pred, target).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[0, 0, 1, 1] == 0  # the NaN target gets no gradient
    with pytest.raises(ValueError, match="does not match"):
        mse_loss(pred[:, :1], target)


def test_soft_label_loss_skips_images_without_a_distribution():
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    target = torch.tensor([[0.5, 0.5, 0.0], [math.nan] * 3, [0.0, 0.0, 1.0]])
    expected = (0.25 + 0.25 + 0 + 0.25 + 0.25 + 0.25) / 6  # the NaN row is out
    assert soft_label_mse(logits, target).item() == pytest.approx(expected)
    assert dense_family_loss("soft_classification", logits, target).item() == pytest.approx(expected)
    assert soft_label_mse(logits[1:2], target[1:2]).item() == 0.0


def test_pooled_class_head_is_layernorm_and_linear_of_the_mean_token():
    torch.manual_seed(0)
    head = PooledClassHead(8, 5)
    x = torch.randn(3, 4, 8)
    expected = head.proj(torch.nn.functional.layer_norm(x.mean(1), (8,), head.norm.weight, head.norm.bias, 1e-6))
    assert torch.allclose(head(x, (2, 2)), expected)
    assert head(x, (2, 2)).shape == (3, 5)


def test_error_meter_pools_entries_over_batches():
    meter = ErrorMeter()
    meter.update(torch.tensor([[[[1.0, 3.0]]]]), torch.tensor([[[0.0, math.nan]]]))  # one entry, error 1
    meter.update(torch.tensor([[[[2.0, 2.0]], [[0.0, 0.0]]]]), torch.tensor([[[[0.0, 2.0]], [[3.0, 0.0]]]]))
    out = meter.compute()  # errors 1 | 2, 0, 3, 0
    assert out["l1"] == pytest.approx(6 / 5) and out["mse"] == pytest.approx(14 / 5)
    assert out["rmse"] == pytest.approx(math.sqrt(14 / 5))
    assert math.isnan(ErrorMeter().compute()["l1"])


def test_soft_top_meter_counts_argmax_agreement():
    meter = SoftTopMeter()
    target = torch.zeros(4, 6)
    target[0, 2], target[1, 5], target[3, 0] = 0.9, 0.6, 0.7
    target[2] = math.nan  # no distribution: not counted
    pred = torch.tensor([[0, 0, 9, 0, 0, 0], [6, 5, 4, 3, 2, 1], [1, 0, 0, 0, 0, 0], [5, 6, 4, 3, 2, 1.0]])
    meter.update(pred, target)
    # row 0: top-1 hit; row 1: class 5 is the lowest score, outside the top 5; row 3: class 0 second, in the top 5
    assert meter.compute() == {"top1": pytest.approx(100 / 3), "top5": pytest.approx(200 / 3)}


def test_soft_targets_decode_and_refuse_bad_vectors():
    target = DenseTarget("class_scene.npy", "soft_classification", {"encoding": "soft", "num_classes": 4})
    vector = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    assert np.array_equal(target.decode(encode_npy(vector), (8, 8)), vector)
    assert np.isnan(target.decode(None, (8, 8))).all() and target.decode(None, (8, 8)).shape == (4,)
    for bad in (np.ones(3), np.array([0.1, -0.2, 0.3, 0.4]), np.array([0.1, np.nan, 0.3, 0.4])):
        with pytest.raises(BadLabel, match="class_scene.npy"):
            target.decode(encode_npy(bad), (8, 8))
    with pytest.raises(BadLabel, match="not a .npy"):
        target.decode(b"garbage", (8, 8))


def test_stacked_target_reads_each_member_as_a_channel():
    spec = {"encoding": "scalar", "scale": 0.5, "invalid": None}
    stacked = StackedTarget((DenseTarget("k1.png", "curvature", {**spec, "member": "k1.png"}),
                             DenseTarget("k2.png", "curvature", {**spec, "member": "k2.png"})))
    from condmoe.data_prep.dense import encode_png
    a, b = np.full((2, 3), 2, np.uint8), np.full((2, 3), 4, np.uint8)
    out = stacked.read({"k1.png": encode_png(a), "k2.png": encode_png(b)}, (3, 2))
    assert out.shape == (2, 3, 2) and (out[..., 0] == 1).all() and (out[..., 1] == 2).all()
    assert stacked.members == ("k1.png", "k2.png") and stacked.family == "curvature"


# ---------------------------------------------------------------------------------------------------------------------
# The prep source's class vectors, and a run on a written layout
# ---------------------------------------------------------------------------------------------------------------------

DOMAINS_16 = ("depth_euclidean", "depth_zbuffer", "edge_occlusion", "edge_texture", "keypoints2d", "keypoints3d")
DOMAINS_8 = ("reshading", "segment_unsup2d", "segment_unsup25d")


def write_taskonomy(root: Path, buildings: dict[str, int], size: int = 32, bad_class_view: str = "") -> None:
    """Every domain Mod-Squad trains on, for ``views`` views per building, random but valid."""
    rng = np.random.default_rng(0)
    for building, views in buildings.items():
        for v in range(views):
            view = f"{building}/point_{v}_view_0"
            arrays = {"rgb": rng.integers(0, 256, (size, size, 3)).astype(np.uint8),
                      **{d: rng.integers(0, 60000, (size, size)).astype(np.uint16) for d in DOMAINS_16},
                      **{d: rng.integers(0, 256, (size, size)).astype(np.uint8) for d in DOMAINS_8},
                      "normal": rng.integers(1, 256, (size, size, 3)).astype(np.uint8),
                      "principal_curvature": rng.integers(0, 256, (size, size, 3)).astype(np.uint8)}
            for domain, classes in (("class_object", 1000), ("class_scene", 365)):
                scores = rng.dirichlet(np.ones(classes)).astype(np.float32)
                arrays[domain] = scores[:-1] if view == bad_class_view else scores
            for domain, array in arrays.items():
                ext = "npy" if domain.startswith("class_") else "png"
                _save(root / domain / f"{view}_domain_{domain}.{ext}", array)


def test_taskonomy_prep_stores_class_vectors(tmp_path, capsys):
    root, out = tmp_path / "taskonomy", tmp_path / "out"
    write_taskonomy(root, {"allensville": 3}, size=16, bad_class_view="allensville/point_1_view_0")
    printed = _prep(["taskonomy", "--root", str(root), "--labels", "class_object,class_scene,reshading", "--out",
                     str(out), "--dataset", "taskonomy", "--no-progress"], capsys)
    assert "taskonomy/train: 2 samples" in printed and "bad_label 1" in printed
    assert "1000 class scores" in _errors(out, "taskonomy/train")[0]["detail"]
    sample = _samples(out, "taskonomy/train")["allensville/point_0_view_0"]
    stored = np.load(root / "class_scene" / "allensville" / "point_0_view_0_domain_class_scene.npy")
    assert np.array_equal(np.load(__import__("io").BytesIO(sample["class_scene.npy"])), stored)
    dense = json.loads((out / "dense.json").read_text())["taskonomy"]
    assert dense["class_object"] == {"member": "class_object.npy", "encoding": "soft", "num_classes": 1000}
    task = TaskConfig(name="scene", type="class_scene", dataset="taskonomy")
    assert dense_targets(out, [task])["scene"].decode(sample["class_scene.npy"], (16, 16)).shape == (365,)
    _verify_ok(out, capsys)


CONFIG = REPO / "configs" / "taskonomy_modsquad.yaml"
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_taskonomy_modsquad_config_trains_on_two_ranks_and_evaluates(tiny_data, tmp_path, capsys):
    root, data, out = tmp_path / "taskonomy", tmp_path / "data", tmp_path / "run"
    write_taskonomy(root, {"allensville": 4, "woodbine": 2})
    for split, building in (("train", "allensville"), ("val", "woodbine")):
        _prep(["taskonomy", "--root", str(root), "--buildings", building, "--split", split, "--out", str(data),
               "--dataset", "taskonomy", "--no-progress"], capsys)
    overrides = [f"data.root={data}", f"data.tokenizer={tiny_data / 'tokenizer'}", f"run.output_dir={out}",
                 "run.max_steps=2", "run.log_every=1", "run.save_every=2", "data.num_workers=1",
                 "data.shuffle_buffer=4", "model.size=debug", "model.img_size=32", "model.patch_size=8",
                 "moe.num_experts=4", "moe.top_k=2", "moe.ep_size=2", "moa.num_experts=4", "moa.num_heads=2",
                 "moa.head_dim=16", "optim.warmup_steps=1", "deepspeed_config=ds_configs/zero2_cpu.json",
                 *(f"tasks.{i}.batch_size=2" for i in range(13))]
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(CONFIG), *overrides], timeout=600)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics[-1]["task_loss"]) == 13 and all(v > 0 for v in metrics[-1]["task_loss"].values())
    run([str(BIN / "condmoe-eval"), "--config", str(out / "config.yaml"), "--out", str(tmp_path / "eval.json")])
    results = json.loads((tmp_path / "eval.json").read_text())
    headlines = {name: results[name]["headline"] for name in results if isinstance(results[name], dict)}
    assert headlines["class_scene"] == "top1" and headlines["principal_curvature"] == "mse"
    assert headlines["keypoints2d"] == "l1" and headlines["depth_euclidean"] == "rmse"
    assert all(results[name]["num_samples"] == 2 for name in headlines)
