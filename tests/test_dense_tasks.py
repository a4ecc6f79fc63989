"""Dense tasks on the training side: the config's task groups, the label-map decoding of train/data.py and the
joint augmentation of train/transforms.py (the same crop and flip for an image and its maps, normals' x negated)."""

import io
import random

import numpy as np
import pytest
from PIL import Image

from condmoe.train.config import REPO_ROOT, load_config
from condmoe.train.dense_data import DENSE_IGNORE, BadLabel, DenseTarget
from condmoe.train.transforms import Augment, augment_dense, resize_nearest

MODSQUAD = REPO_ROOT / "configs" / "demo_dense_modsquad.yaml"


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode=mode).save(out, format="PNG")
    return out.getvalue()


# --- config: groups ---------------------------------------------------------------------------------------------


def test_a_group_is_one_unit_of_the_step_and_ungrouped_tasks_are_their_own():
    cfg = load_config(MODSQUAD)
    assert cfg.units() == [[0, 1, 2, 3, 4, 5]]
    mixed = load_config(REPO_ROOT / "configs" / "demo.yaml", [
        "tasks=[{name: a, type: semseg, dataset: dense, group: g}, {name: c, type: image_classification},"
        " {name: b, type: depth, dataset: dense, group: g}]", "moe.ep_size=1"])
    assert mixed.units() == [[0, 2], [1]]


@pytest.mark.parametrize("override, named", [
    ("tasks.1.batch_size=4", "batch_size"),
    ("tasks.2.dataset=image", "dataset"),
    ("tasks.3.weight=2.0", "weight"),
    ("tasks.0.augment.hflip=0.0", "augment"),
])
def test_group_members_that_could_not_share_a_batch_are_refused_naming_the_field(override, named):
    with pytest.raises(ValueError, match=named):
        load_config(MODSQUAD, [override])


def test_units_with_different_encoder_passes_under_expert_parallelism_need_synchronized_sampling():
    tasks = "tasks=[{name: s, type: semseg, dataset: dense}, {name: c, type: image_classification}]"
    with pytest.raises(ValueError, match="synchronized"):
        load_config(REPO_ROOT / "configs" / "demo.yaml", [tasks])  # ep_size 2: 1 pass vs 2
    load_config(REPO_ROOT / "configs" / "demo.yaml", [tasks, "run.task_sampling=synchronized"])
    load_config(REPO_ROOT / "configs" / "demo.yaml", [tasks, "moe.ep_size=1"])


def test_dense_task_options_that_do_not_apply_are_refused():
    base = REPO_ROOT / "configs" / "demo.yaml"
    with pytest.raises(ValueError, match="rand_augment"):
        load_config(base, ["tasks=[{name: s, type: semseg, augment: {rand_augment: rand-m9}}]"])
    with pytest.raises(ValueError, match="label_smoothing"):
        load_config(base, ["tasks=[{name: s, type: semseg, label_smoothing: 0.1}]"])
    with pytest.raises(ValueError, match="label"):
        load_config(base, ["tasks=[{name: c, type: image_classification, label: semseg}]"])
    cfg = load_config(base, ["tasks=[{name: d, type: depth, label: depth_zbuffer}, {name: s, type: semseg}]",
                             "moe.ep_size=1"])
    assert [t.dense_label for t in cfg.tasks] == ["depth_zbuffer", "semseg"]


# --- decoding label maps ----------------------------------------------------------------------------------------


def test_index_maps_keep_classes_map_the_ignore_value_and_refuse_classes_outside():
    target = DenseTarget("semseg.png", "segmentation", {"encoding": "index", "num_classes": 3, "ignore": 7})
    labels = target.decode(_png(np.array([[0, 1], [2, 7]], np.uint8)), (2, 2))
    assert labels.dtype == np.int64 and labels.tolist() == [[0, 1], [2, DENSE_IGNORE]]
    with pytest.raises(BadLabel, match="class 5"):
        target.decode(_png(np.array([[0, 5], [2, 7]], np.uint8)), (2, 2))
    missing = target.decode(None, (3, 2))  # (width, height)
    assert missing.shape == (2, 3) and (missing == DENSE_IGNORE).all()


def test_binary_normal_and_scalar_maps_decode_to_the_losses_conventions():
    binary = DenseTarget("edge.png", "edge", {"encoding": "binary"})
    assert binary.decode(_png(np.array([[0, 127], [128, 255]], np.uint8)), (2, 2)).tolist() == [[0, 0], [1, 1]]
    assert np.isnan(binary.decode(None, (2, 2))).all()
    normal = DenseTarget("normals.png", "normals", {"encoding": "normal"})
    rgb = np.array([[[255, 128, 128], [0, 0, 0]]], np.uint8)
    decoded = normal.decode(_png(rgb), (2, 1))
    assert decoded.shape == (1, 2, 3)
    assert np.allclose(decoded[0, 0], [1.0, 2 * 128 / 255 - 1, 2 * 128 / 255 - 1], atol=1e-6)
    assert (decoded[0, 1] == 0).all()
    depth = DenseTarget("depth.png", "depth", {"encoding": "scalar", "scale": 0.001, "invalid": 0})
    values = depth.decode(_png(np.array([[0, 1500]], np.uint16)), (2, 1))
    assert np.isnan(values[0, 0]) and values[0, 1] == pytest.approx(1.5)
    keypoints = DenseTarget("keypoints2d.png", "depth", {"encoding": "scalar", "scale": 1 / 65535, "invalid": None})
    assert np.isfinite(keypoints.decode(_png(np.array([[0, 65535]], np.uint16)), (2, 1))).all()  # null: all labels


def test_a_label_map_of_another_size_than_its_image_is_refused():
    target = DenseTarget("sal.png", "saliency", {"encoding": "binary"})
    with pytest.raises(ValueError, match="sal.png is 2x2"):
        target.decode(_png(np.zeros((2, 2), np.uint8)), (4, 4))


# --- joint augmentation -----------------------------------------------------------------------------------------


def test_nearest_resize_keeps_values_exact():
    labels = np.arange(16).reshape(4, 4)
    assert resize_nearest(labels, 2).tolist() == [[5, 7], [13, 15]]  # pixel centres, as PIL's NEAREST
    assert resize_nearest(labels, 8)[::2, ::2].tolist() == labels.tolist()


def test_crop_and_flip_move_the_image_and_its_maps_together_and_a_flip_negates_normals_x():
    size = 16
    # the image encodes each pixel's column in red and row in green; the maps do the same: after any crop and flip
    # the maps must still agree with the image pixel by pixel
    rows, cols = np.mgrid[0:size, 0:size]
    image = Image.fromarray(np.stack([cols * 16, rows * 16, np.zeros_like(rows)], -1).astype(np.uint8))
    normals = np.zeros((size, size, 3), np.float32)
    normals[..., 0], normals[..., 2] = 0.6, 0.8
    maps = {"cols": cols.copy(), "normals": normals}
    augment = Augment(random_resized_crop=True, crop_scale_min=0.3, hflip=1.0)
    out_image, out = augment_dense(image, maps, size, augment, random.Random(3), frozenset({"normals"}))
    red = np.asarray(out_image)[..., 0].astype(int)
    assert out["cols"].shape == (size, size)
    # bicubic blurs the image a little: the map's column, nearest-resized, matches the image's to within a column
    assert np.abs(red // 16 - out["cols"]).max() <= 1
    assert out["cols"][:, 0].mean() > out["cols"][:, -1].mean()  # flipped: columns now decrease left to right
    assert np.allclose(out["normals"][..., 0], -0.6) and np.allclose(out["normals"][..., 2], 0.8)
    same_image, same = augment_dense(image, maps, size, Augment(), None, frozenset({"normals"}))
    assert (same["cols"] == cols).all() and np.allclose(same["normals"][..., 0], 0.6)


# --- the synthetic dense dataset --------------------------------------------------------------------------------


def test_synthetic_dense_scenes_are_exact_by_construction():
    from condmoe.data_prep.dense_scenes import DENSE_LABELS, boundary, render_dense
    from condmoe.data_prep.schema import check_dense_spec

    for label, spec in DENSE_LABELS.items():
        check_dense_spec("dense.json", "dense", label, spec)
    image, maps, meta = render_dense(0, "train", 5, 64)
    shape = maps["saliency"] == 255
    assert image.size == (64, 64) and 0 < shape.mean() < 0.5
    assert ((maps["semseg"] > 0) == shape).all() and set(np.unique(maps["semseg"])) == {0, 1 + meta["label"]}
    assert ((maps["human_parts"] > 0) == shape).all() and set(np.unique(maps["human_parts"])) == {0, 1, 2}
    edge = maps["edge"] == 255
    assert (edge == boundary(shape)).all() and edge.sum() < shape.sum() and not (edge & ~shape).any()
    d0, a, b = meta["plane"]
    depth = maps["depth"].astype(np.float64) / 1000
    assert np.allclose(depth[shape], meta["plate_depth"], atol=6e-4)
    coords = (np.arange(64) + 0.5) / 64 * 2 - 1
    u, v = np.meshgrid(coords, -coords)
    assert np.allclose(depth[~shape], (d0 + a * u + b * v)[~shape], atol=6e-4)
    assert depth[shape].max() < depth[~shape].min()  # the plate is nearer than the whole plane
    normals = maps["normals"].astype(np.float64) / 127.5 - 1
    assert np.allclose(np.linalg.norm(normals, axis=-1), 1, atol=0.02)
    expected = np.array([a, b, 1.0]) / np.sqrt(a * a + b * b + 1)
    assert np.allclose(normals[~shape], expected, atol=0.01) and np.allclose(normals[shape], [0, 0, 1], atol=0.01)
    again = render_dense(0, "train", 5, 64)
    assert all((again[1][k] == maps[k]).all() for k in maps) and again[2] == meta  # deterministic in the seed


def test_multi_task_delta_reads_single_task_eval_files_by_task_name(tmp_path):
    import json

    from condmoe.train.evaluate import multi_task_delta

    metrics = {"semseg": {"mIoU": 60.0, "headline": "mIoU"}, "normals": {"mErr": 18.0, "headline": "mErr"},
               "cls": {"top1": 0.5}}
    (tmp_path / "seg.json").write_text(json.dumps({"semseg": {"mIoU": 50.0, "headline": "mIoU"}}))
    (tmp_path / "nrm.json").write_text(json.dumps({"normals": {"mErr": 20.0, "headline": "mErr"}}))
    out = multi_task_delta(metrics, [str(tmp_path / "seg.json"), str(tmp_path / "nrm.json")])
    # semseg +20 % (higher is better), normals +10 % (lower error is better): mean +15 %
    assert out["value"] == pytest.approx(15.0) and out["metrics"] == {"semseg": "mIoU", "normals": "mErr"}
    (tmp_path / "other.json").write_text(json.dumps({"depth": {"rmse": 1.0}}))
    with pytest.raises(ValueError, match="other.json: none of this run's dense tasks"):
        multi_task_delta(metrics, [str(tmp_path / "other.json")])
