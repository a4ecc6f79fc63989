"""bench/gpu_suite.py: its pure parts (requirements, the batch-size search), its time limit, and its CPU dry run."""

import importlib.util
import json
import subprocess
import sys
import time

import psutil
import pytest
from conftest import REPO, subprocess_env


def load_script(name: str):
    """A bench script as a module (bench/ is no package, and stays off sys.path)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_suite = load_script("gpu_suite")
largest_batch = load_script("peak_memory").largest_batch


def test_runtime_requirements_leave_torch_out():
    cfg = "[options]\ninstall_requires =\n    torch>=2.5\n    deepspeed>=0.19.4\n    Torch_Vision\n    numpy\n"
    assert gpu_suite.runtime_requirements(cfg) == ["deepspeed>=0.19.4", "Torch_Vision", "numpy"]
    shipped = gpu_suite.runtime_requirements((REPO / "setup.cfg").read_text())
    assert "webdataset>=1.0" in shipped and not any(line.startswith("torch") for line in shipped)


def test_unmet_requirements():
    installed = {"deepspeed": None, "timm": "0.9.2", "numpy": "2.0.1", "pyyaml": "6.0", "av": "12.1.0rc1"}
    requirements = ["deepspeed>=0.19.4", "timm>=1.0", "numpy", "PyYAML", "av>=12", "tqdm"]
    assert gpu_suite.unmet(requirements, installed) == ["deepspeed>=0.19.4", "timm>=1.0", "tqdm"]


def test_largest_batch_doubles_then_bisects():
    result = largest_batch(lambda b: b <= 300, start=64, cap=8192, resolution=16)
    assert result["tried"] == [[64, True], [128, True], [256, True], [512, False], [384, False], [320, False],
                               [288, True], [304, False]]
    assert (result["largest"], result["smallest_failing"], result["capped"], result["stopped"]) == (288, 304, False,
                                                                                                    False)


def test_largest_batch_stops_at_the_cap():
    result = largest_batch(lambda b: True, start=3, cap=10, resolution=1)
    assert result["tried"] == [[3, True], [6, True], [10, True]]
    assert result["largest"] == 10 and result["capped"] and result["smallest_failing"] is None


def test_largest_batch_when_the_start_does_not_fit():
    result = largest_batch(lambda b: b <= 40, start=128, cap=1024, resolution=16)
    assert result["tried"] == [[128, False], [64, False], [32, True], [48, False]]
    assert (result["largest"], result["smallest_failing"]) == (32, 48)
    nothing = largest_batch(lambda b: False, start=64, cap=1024, resolution=16)
    assert nothing["tried"] == [[64, False], [32, False], [16, False]] and nothing["largest"] is None


def test_largest_batch_time_limit_and_bad_arguments():
    calls = []
    result = largest_batch(lambda b: calls.append(b) is None, start=1, cap=1024, resolution=1,
                           stop=lambda: len(calls) >= 3)
    assert calls == [1, 2, 4] and result["stopped"] and result["largest"] == 4 and not result["capped"]
    with pytest.raises(ValueError, match="start"):
        largest_batch(lambda b: True, start=0, cap=8, resolution=1)
    with pytest.raises(ValueError, match="resolution"):
        largest_batch(lambda b: True, start=16, cap=8, resolution=0)


def test_a_command_past_the_step_time_is_ended_with_its_children(tmp_path):
    suite = gpu_suite.Suite(tmp_path, dry_run=True, step="slow", deadline=time.monotonic() + 1.5)
    child = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; " \
            "time.sleep(60)']); print('grandchild', p.pid, flush=True); time.sleep(60)"
    start = time.monotonic()
    assert suite.run([sys.executable, "-c", child]) == 124
    assert time.monotonic() - start < 15 and suite.timed_out and suite.rcs == [124]
    log = (tmp_path / "slow.log").read_text()
    assert "time limit of the step reached" in log
    grandchild = int(log.split("grandchild ")[1].split()[0])
    for _ in range(50):  # the signal is delivered when the grandchild next runs
        try:
            if psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the grandchild {grandchild} outlived the time limit")
    assert suite.run([sys.executable, "-c", "print('LA' + 'TE')"]) == 124  # no time left: not started
    assert "LATE" not in (tmp_path / "slow.log").read_text()


@pytest.mark.slow
def test_dry_run_passes_every_step_and_writes_figures(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), str(out), "--dry-run"], cwd=tmp_path,
                          env={**subprocess_env(), "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry-run"
    steps = {row["step"]: row for row in summary["steps"]}
    assert list(steps) == [step.name for step in gpu_suite.STEPS]
    failed = {name: row for name, row in steps.items() if row["rc"] or row["timed_out"] or row["problems"]}
    assert not failed, f"{failed}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0 and summary["ok"]
    figures = {name: json.loads((out / f"{name}.json").read_text()) for name in steps}
    assert figures["install"]["versions"]["deepspeed"] and figures["install"]["missing_after"] == []
    assert all(r["ms"] > 0 for r in figures["moe_layer"]["results"]) and len(figures["moe_layer"]["results"]) >= 10
    for name, models in (("train_step", gpu_suite.TRAIN_STEP_MODELS), ("train_step_compile", ["timm", "dense"])):
        rows = figures[name]["results"]
        assert [r["model"] for r in rows] == models and all(r["images_per_s"] > 0 for r in rows)
    assert figures["train_step_compile"]["env"]["compile"] is True
    trainer = figures["trainer"]
    assert (trainer["train"]["latest_checkpoint"], trainer["resume"]["latest_checkpoint"]) == ("step_2", "step_3")
    assert [m["step"] for m in trainer["resume"]["metrics"]] == [3] and trainer["resume"]["metrics"][0]["loss"] > 0
    assert figures["gpu_tests"]["failures"] == figures["gpu_tests"]["errors"] == 0
    for stage in figures["peak_memory"]["stages"]:
        assert stage["largest"] == 4 and all(t["fits"] and t["ms"] > 0 for t in stage["trials"])
    for name in steps:
        assert (out / f"{name}.log").stat().st_size > 0
    assert "| condmoe MoE, token routing" in (out / "train_step.log").read_text()  # the printed table
