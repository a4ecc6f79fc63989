"""Mod-Squad's dense system end to end on the embedded dense data: a 2-rank run (ep_size 2, ZeRO-2) of the dense
Mod-Squad config resumes exactly, its checkpoint evaluates with the dense metrics, and a dense task's extraction
chooses experts on train, scores them on val, sweeps thresholds and exports a standalone model."""

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, run, torchrun
from test_distributed import losses

pytestmark = pytest.mark.slow

CONFIG = REPO / "configs" / "demo_dense_modsquad.yaml"
BIN = Path(sys.executable).parent


def _overrides(data, out, steps: int) -> list[str]:
    return [f"data.root={data}", f"run.output_dir={out}", f"run.max_steps={steps}", "run.log_every=1",
            "run.save_every=2", "data.shuffle_buffer=20", "model.img_size=32", "optim.warmup_steps=2",
            *(f"tasks.{i}.batch_size=4" for i in range(6))]


@pytest.fixture(scope="module")
def dense_runs(tiny_data, tmp_path_factory):
    """The same 4 steps twice: uninterrupted, and 2 steps then a resume (2 ranks, ep_size 2, ZeRO-2)."""
    tmp = tmp_path_factory.mktemp("dense")
    full, split = tmp / "full", tmp / "split"
    train = [*torchrun(2), "-m", "condmoe.train", "--config", str(CONFIG)]
    run([*train, *_overrides(tiny_data, full, 4)], timeout=600)
    run([*train, *_overrides(tiny_data, split, 2)], timeout=600)
    run([*train, *_overrides(tiny_data, split, 4)], timeout=600)
    return tiny_data, full, split


def test_two_rank_dense_modsquad_run_resumes_exactly(dense_runs):
    _, full, split = dense_runs
    for rank in (0, 1):
        uninterrupted, resumed = losses(full, rank), losses(split, rank)
        assert sorted(uninterrupted) == sorted(resumed) == [0, 1, 2, 3]
        assert all(task == "dense" for task, _ in uninterrupted.values())  # every step runs the whole group
        for step in range(4):
            assert resumed[step] == uninterrupted[step], (rank, step)
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    per_task = metrics[-1]["task_loss"]
    assert set(per_task) == {"semseg", "human_parts", "saliency", "edge", "normals", "depth"}
    assert all(value > 0 for value in per_task.values())
    usage = json.loads((full / "expert_usage_ema.json").read_text())  # per task, though every step is a group
    assert len(usage["tasks"]) == 6 and all(sum(layer) > 0.99 for task in usage["share"] for layer in task)


def test_dense_checkpoint_evaluates_every_task_with_its_meter(dense_runs, tmp_path):
    _, full, _ = dense_runs
    out = tmp_path / "eval.json"
    run([str(BIN / "condmoe-eval"), "--config", str(full / "config.yaml"), "--out", str(out),
         "--batch-size", "16"])
    metrics = json.loads(out.read_text())
    for task, key in (("semseg", "mIoU"), ("human_parts", "mIoU"), ("saliency", "maxF"), ("edge", "odsF"),
                      ("normals", "mErr"), ("depth", "rmse")):
        assert key in metrics[task] and metrics[task]["headline"] == key, (task, metrics[task])
        assert metrics[task]["num_samples"] > 0
    # Delta_m against "single-task" results equal to this run's own: exactly 0
    again = tmp_path / "eval_delta.json"
    run([str(BIN / "condmoe-eval"), "--config", str(full / "config.yaml"), "--out", str(again), "--batch-size", "16",
         "--single-task", str(out)])
    delta = json.loads(again.read_text())["delta_m"]
    assert delta["value"] == 0.0 and len(delta["metrics"]) == 6


def test_dense_extraction_selects_on_train_sweeps_and_exports_a_standalone_model(dense_runs, tmp_path):
    _, full, _ = dense_runs
    experts = [str(BIN / "condmoe-experts"), "extract", "--config", str(full / "config.yaml"),
               "--task", "normals", "--out", str(tmp_path)]
    proc = run([*experts, "--sweep", "0,3,30"], timeout=600)
    curve = json.loads((tmp_path / "extract_normals_sweep.json").read_text())
    assert (tmp_path / "extract_normals_sweep.png").stat().st_size > 0
    assert curve["selected_on"] == {"train": curve["selected_on"]["train"]} and curve["selected_on"]["train"] > 0
    params = [p["params"] for p in curve["points"]]
    assert params == sorted(params, reverse=True) and params[0] < curve["full"]["params"]  # one task's router/head
    assert json.loads(proc.stdout.splitlines()[-1])["task"] == "normals"
    run([*experts, "--threshold", "3"], timeout=600)
    report = json.loads((tmp_path / "extracted_normals" / "report.json").read_text())
    assert "train" in report["selected_on"] and set(report["metric"]) == {"full", "extracted"}
    code = ("import sys, torch; from condmoe.models.extract import load_extracted; "
            f"m = load_extracted({str(tmp_path / 'extracted_normals')!r}).eval(); "
            "out = m.dense_predict(torch.zeros(1, 3, 32, 32), 0, 'normals'); print(list(out.shape))")
    assert run([sys.executable, "-c", code]).stdout.strip() == "[1, 3, 32, 32]"
