"""condmoe-calibrate: the loss-scale average and the weight rule on hand cases, then a short run end to end."""

import json
import sys

import pytest
import yaml
from conftest import REPO, run

from condmoe.train.calibrate import calibrated_weights, config_fragment, loss_scale
from condmoe.train.config import load_config

RECORDS = [{"step": 1, "task_loss": {"a": 9.0}, "task_steps": {"a": 2}},
           {"step": 2, "task_loss": {"a": 3.0, "b": 6.0}, "task_steps": {"a": 1, "b": 3}},
           {"step": 3, "task_loss": {"a": 1.5}, "task_steps": {"a": 2}}]


def test_loss_scale_weights_records_by_their_micro_steps_after_skip():
    assert loss_scale(RECORDS, ["a", "b"], skip=1) == {"a": ((3.0 * 1 + 1.5 * 2) / 3, 3), "b": (6.0, 3)}
    assert loss_scale(RECORDS, ["a"], skip=0)["a"] == ((18 + 3 + 3) / 5, 5)
    old_log = [{k: v for k, v in r.items() if k != "task_steps"} for r in RECORDS]  # logs before task_steps
    assert loss_scale(old_log, ["a"], skip=0)["a"] == ((9 + 3 + 1.5) / 3, 3)
    with pytest.raises(ValueError, match="no loss recorded for b after step 2 .the log ends at step 3"):
        loss_scale(RECORDS, ["a", "b"], skip=2)


def test_calibrated_weights_equalise_weighted_losses_and_keep_the_expected_loss():
    losses, sampling = {"a": 2.0, "b": 6.0, "c": 1.0}, {"a": 1.0, "b": 1.0, "c": 2.0}
    weights = calibrated_weights(losses, sampling)
    expected = (2.0 + 6.0 + 2 * 1.0) / 4  # sum_t p_t L_t = 2.5
    assert weights == pytest.approx({"a": 1.25, "b": 2.5 / 6, "c": 2.5})
    assert {t: weights[t] * losses[t] for t in losses} == pytest.approx(dict.fromkeys(losses, expected))
    assert sum(sampling[t] / 4 * weights[t] * losses[t] for t in losses) == pytest.approx(expected)
    with pytest.raises(ValueError, match="positive"):
        calibrated_weights({"a": 0.0}, {"a": 1.0})


def test_config_fragment_is_the_resolved_tasks_section_with_new_weights():
    config = str(REPO / "configs" / "demo_multitask.yaml")  # tasks given in it, the rest from demo.yaml
    cfg = load_config(config, ["tasks.2.weight=0.7"])
    weights = {t.name: 0.1234 * (i + 1) for i, t in enumerate(cfg.tasks)}
    tasks = yaml.safe_load(config_fragment(config, ["tasks.2.weight=0.7"], weights))["tasks"]
    assert [t["name"] for t in tasks] == [t.name for t in cfg.tasks]
    assert [t["loss_weight"] for t in tasks] == [0.123, 0.247, 0.37, 0.494, 0.617, 0.74]
    assert tasks[2]["weight"] == 0.7 and tasks[0]["label_smoothing"] == 0.1


@pytest.mark.slow
def test_calibrate_runs_the_trainer_then_reads_its_log(tiny_data, tmp_path):
    out = tmp_path / "calib"
    base = [sys.executable, "-m", "condmoe.train.calibrate", "--config", str(REPO / "configs" / "demo.yaml"),
            "--steps", "12", "--skip", "2"]
    overrides = [f"data.root={tiny_data}", "data.shuffle_buffer=50", "tasks.0.batch_size=8", "tasks.1.batch_size=8"]
    proc = run([*base, "--out", str(out), *overrides], timeout=400)
    report = json.loads((out / "calibration.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13)) and all("task_steps" in r for r in records)
    assert sum(report["micro_steps"].values()) == 10  # steps 3..12, one task each in one process
    weighted = [report["loss_weight"][t] * report["loss"][t] for t in report["loss"]]
    assert weighted[0] == pytest.approx(weighted[1])
    assert "overrides: tasks.0.loss_weight=" in proc.stdout
    fragment = yaml.safe_load((out / "calibration.yaml").read_text())
    overrides_line = proc.stdout.strip().splitlines()[-1].split(": ", 1)[1].split()
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [*overrides, *overrides_line])
    assert [t.loss_weight for t in cfg.tasks] == [t["loss_weight"] for t in fragment["tasks"]]
    # the same numbers from the finished run's log, and a second short run into it is refused in one line
    again = run([*base, "--from-run", str(out), *overrides])
    assert proc.stdout.endswith(again.stdout) and json.loads((out / "calibration.json").read_text()) == report
    refused = run([*base, "--out", str(out), *overrides], check=False)
    assert refused.returncode == 2 and "--from-run" in refused.stderr.strip().splitlines()[-1]
