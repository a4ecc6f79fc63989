"""The DeepSpeed JSON against the run config (train.engine.load_ds_config): optimizer and scheduler blocks refused
in one line, batch keys reconciled with the tasks' batch sizes, the optimizer chosen for ZeRO-Offload."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from condmoe.train.config import load_config
from condmoe.train.engine import BATCH_KEYS, load_ds_config, optimizer_kind

DEMO = REPO / "configs" / "demo.yaml"  # two tasks of batch_size 32, run.gradient_accumulation_steps 1
ZERO2 = {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}


def _config(tmp_path, ds_config: dict, *overrides: str):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config))
    return load_config(DEMO, [*overrides, f"deepspeed_config={path}"]), path


def _refused(tmp_path, ds_config: dict, *overrides: str, world_size: int = 1) -> str:
    cfg, path = _config(tmp_path, ds_config, *overrides)
    with pytest.raises(ValueError) as exc:
        load_ds_config(cfg, world_size)
    message = str(exc.value)
    assert message.startswith(f"deepspeed_config={path}: ") and "\n" not in message
    return message.removeprefix(f"deepspeed_config={path}: ")


@pytest.mark.parametrize("block, expected", [
    ({"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.1}},
     'the "optimizer" block (AdamW) is refused: condmoe builds AdamW from optim.* (lr, betas, eps, weight_decay); '
     "remove it and set optim.lr=0.0002 optim.betas=[0.9,0.999] optim.eps=1e-06 optim.weight_decay=0.1"),
    ({"type": "Adam", "params": {"lr": "auto", "weight_decay": 0.05}},  # DeepSpeed's Adam is AdamW by default
     'the "optimizer" block (Adam) is refused: condmoe builds AdamW from optim.* (lr, betas, eps, weight_decay); '
     "remove it and set optim.weight_decay=0.05"),
    ({"type": "Adam", "params": {"lr": 1e-3, "adam_w_mode": False}},  # L2 Adam: nothing to translate
     'the "optimizer" block (Adam) is refused: condmoe builds AdamW from optim.* (lr, betas, eps, weight_decay); '
     "remove it"),
    ({"type": "Lamb", "params": {"lr": 1e-3}},
     'the "optimizer" block (Lamb) is refused: condmoe builds AdamW from optim.* (lr, betas, eps, weight_decay); '
     "remove it"),
])
def test_an_optimizer_block_is_refused_with_the_overrides_it_means(tmp_path, block, expected):
    assert _refused(tmp_path, {**ZERO2, "optimizer": block}) == expected


SCHEDULE = ("condmoe's schedule is linear warmup over optim.warmup_steps, then cosine to optim.min_lr at "
            "run.max_steps")


@pytest.mark.parametrize("block, expected", [
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": 1000, "warmup_num_steps": 50, "cos_min_ratio": 0.01}},
     f'the "scheduler" block (WarmupCosineLR) is refused: {SCHEDULE}; '
     "remove it and set run.max_steps=1000 optim.warmup_steps=50"),
    ({"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 10}},
     f'the "scheduler" block (WarmupLR) is refused: {SCHEDULE}; remove it and set optim.lr=0.001 '
     "optim.warmup_steps=10"),
    ({"type": "WarmupDecayLR", "params": {}},
     f'the "scheduler" block (WarmupDecayLR) is refused: {SCHEDULE}; remove it'),
    ({"type": "OneCycle", "params": {"cycle_max_lr": 0.1, "total_num_steps": 5}},
     f'the "scheduler" block (OneCycle) is refused: {SCHEDULE}; remove it'),
])
def test_a_scheduler_block_is_refused_pointing_at_optim(tmp_path, block, expected):
    assert _refused(tmp_path, {**ZERO2, "scheduler": block}) == expected


@pytest.mark.parametrize("ds_config, overrides, world_size, expected", [
    ({"train_micro_batch_size_per_gpu": 16}, [], 1,
     "train_micro_batch_size_per_gpu=16 disagrees with the run config: every task's batch_size is 32 (condmoe's "
     "micro-batch is per task)"),
    ({"train_micro_batch_size_per_gpu": 32}, ["tasks.1.batch_size=16"], 1,
     "train_micro_batch_size_per_gpu=32 disagrees with the run config: the tasks' batch sizes differ (16, 32 in "
     "tasks[*].batch_size), and condmoe's micro-batch is per task"),
    ({"gradient_accumulation_steps": 4}, ["run.gradient_accumulation_steps=2"], 1,
     "gradient_accumulation_steps=4 disagrees with the run config: run.gradient_accumulation_steps=2"),
    ({"gradient_accumulation_steps": True}, [], 1,  # json's true is Python's 1: still not a step count
     "gradient_accumulation_steps=true disagrees with the run config: run.gradient_accumulation_steps=1"),
    ({"train_batch_size": 64}, ["run.gradient_accumulation_steps=2"], 2,
     "train_batch_size=64 disagrees with the run config: batch_size 32 x run.gradient_accumulation_steps 2 x "
     "world size 2 = 128"),
    ({"train_batch_size": 96}, ["tasks.1.batch_size=64"], 1,
     "train_batch_size=96 disagrees with the run config: the tasks' batch sizes differ (32, 64 in "
     "tasks[*].batch_size), so a step has no one global batch"),
])
def test_a_batch_key_that_disagrees_with_the_run_is_refused(tmp_path, ds_config, overrides, world_size, expected):
    message = _refused(tmp_path, {**ZERO2, **ds_config}, *overrides, world_size=world_size)
    assert message == f"{expected}; remove the key (condmoe fills it in) or make the two agree"


@pytest.mark.parametrize("stage, deepspeed_steps", [(0, 2), (2, 1)])  # ZeRO-1/2 accumulate in MicroSteps
def test_batch_keys_that_agree_are_taken_and_replaced_by_the_internal_values(tmp_path, stage, deepspeed_steps):
    ds_config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 32,
                 "gradient_accumulation_steps": 2, "train_batch_size": 32 * 2 * 4}
    cfg, _ = _config(tmp_path, ds_config, "run.gradient_accumulation_steps=2")
    ds = load_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["gradient_accumulation_steps"] == deepspeed_steps
    assert "train_batch_size" not in ds  # DeepSpeed derives it from the two and its world size


@pytest.mark.parametrize("ds_config", [{}, dict.fromkeys(BATCH_KEYS, "auto")])
def test_absent_or_auto_batch_keys_are_filled_in_from_the_run(tmp_path, ds_config):
    cfg, _ = _config(tmp_path, {"zero_optimization": {"stage": 0}, **ds_config}, "tasks.0.batch_size=8",
                     "run.gradient_accumulation_steps=3")
    ds = load_ds_config(cfg, world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 3)  # the largest task
    assert "train_batch_size" not in ds


def test_world_size_defaults_to_one_process_outside_a_process_group(tmp_path):
    cfg, _ = _config(tmp_path, {**ZERO2, "train_batch_size": 32})
    assert load_ds_config(cfg)["train_micro_batch_size_per_gpu"] == 32
    cfg, _ = _config(tmp_path, {**ZERO2, "train_batch_size": 64})
    with pytest.raises(ValueError, match=r"x world size 1 = 32;"):
        load_ds_config(cfg)


def test_a_json_that_is_not_an_object_is_one_line(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    cfg = load_config(DEMO, [f"deepspeed_config={path}"])
    with pytest.raises(ValueError, match=rf"^deepspeed_config={path}: a DeepSpeed config is a JSON object, not list$"):
        load_ds_config(cfg)


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_deepspeed_config_loads(path):
    overrides = [f"deepspeed_config={path}", "run.gradient_accumulation_steps=2"]
    if "zero3" in path.name:  # dense and one task type (tests/test_config.py)
        overrides += ["moe.num_experts=0", "tasks.1.type=image_classification", "tasks.1.name=second"]
    ds = load_ds_config(load_config(DEMO, overrides), world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 32 and "optimizer" not in ds and "scheduler" not in ds


@pytest.mark.parametrize("zero, device_type, kind", [
    ({"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}, "cuda", "DeepSpeedCPUAdam"),
    ({"stage": 3, "offload_optimizer": {"device": "nvme"}}, "cuda", "DeepSpeedCPUAdam"),  # the CPU steps it too
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, "cpu", "AdamW"),  # no C++ build of minutes here
    ({"stage": 2, "offload_optimizer": {"device": "none"}}, "cuda", "AdamW"),
    ({"stage": 2}, "cuda", "AdamW"),
    ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, "cuda", "AdamW"),  # no ZeRO, no offload (run.freeze)
])
def test_offloaded_optimizer_on_cuda_is_deepspeeds_cpu_adam(zero, device_type, kind):
    assert optimizer_kind({"zero_optimization": zero}, device_type) == kind


def test_the_shipped_offload_config_takes_cpu_adam_on_cuda_only():
    ds = json.loads((REPO / "ds_configs" / "zero2_offload_bf16.json").read_text())
    assert [optimizer_kind(ds, d) for d in ("cuda", "cpu")] == ["DeepSpeedCPUAdam", "AdamW"]


def test_train_refuses_an_optimizer_block_in_one_line(tiny_data, tmp_path):
    path = tmp_path / "adamw.json"
    path.write_text(json.dumps({**ZERO2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
    cmd = [sys.executable, "-m", "condmoe.train", "--config", str(DEMO), f"data.root={tiny_data}",
           f"run.output_dir={tmp_path / 'run'}", "moe.ep_size=1", f"deepspeed_config={path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [f'condmoe-train: error: deepspeed_config={path}: the "optimizer" block (AdamW) is refused: '
                      "condmoe builds AdamW from optim.* (lr, betas, eps, weight_decay); remove it and set "
                      "optim.lr=0.0001"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
