"""Tier 3: prep -> train -> eval through the console scripts, as a user runs them; and their error messages."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port, run, subprocess_env

BIN = Path(sys.executable).parent


def script(name: str) -> str:
    path = shutil.which(name, path=str(BIN))
    assert path, f"{name} is installed by `pip install -e .`"
    return path


@pytest.mark.slow
def test_prep_train_eval_console_scripts(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    run([script("condmoe-prep"), "synthetic", "--out", str(data), "--num-train-images", "200", "--num-val-images",
         "50", "--num-train-videos", "8", "--num-val-videos", "4", "--shard-size", "80", "--no-progress"])
    assert json.loads((data / "sizes.json").read_text())["image/val"] == 50
    overrides = [f"data.root={data}", f"run.output_dir={out}", "run.max_steps=4", "run.save_every=2",
                 "run.log_every=2", "tasks.0.batch_size=8", "tasks.1.batch_size=8", "data.shuffle_buffer=50"]
    config = str(REPO / "configs" / "demo.yaml")
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "--no-python", script("condmoe-train"), "--config", config, *overrides])
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_4"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    for m in metrics:
        assert m["samples_per_s"] > 0 and m["tokens_per_s"] > m["samples_per_s"] and m["lr"] > 0
        assert m["grad_norm"] is not None and m["grad_norm"] > 0
        assert len(m["expert_share"]) == 2 and abs(sum(m["expert_share"][0]) - 1) < 1e-5

    proc = run([script("condmoe-eval"), "--config", config, *overrides])
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(metrics) == {"shapes_classification", "shapes_caption_retrieval"}
    assert metrics["shapes_classification"]["num_samples"] == 50
    for key in ("top1", "top5"):
        assert 0.0 <= metrics["shapes_classification"][key] <= 1.0
    assert metrics["shapes_classification"]["top5"] >= metrics["shapes_classification"]["top1"]
    for key in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r10"):
        assert 0.0 <= metrics["shapes_caption_retrieval"][key] <= 1.0
    assert "| shapes_classification | top1 |" in proc.stdout  # the printed table
    assert json.loads((out / "eval.json").read_text()) == metrics

    # a plain model out of the DeepSpeed checkpoint (experts of both EP ranks), loadable without DeepSpeed
    run([script("condmoe-export"), "--config", config, "--out", str(tmp_path / "export"), *overrides])
    code = ("import sys, torch; from condmoe.models.extract import load_extracted; "
            f"m = load_extracted({str(tmp_path / 'export')!r}); "
            "assert len(m.blocks[0].mlp.experts.deepspeed_experts) == 4; "
            "assert 'deepspeed' not in sys.modules; print('LOADED')")
    assert "LOADED" in run([sys.executable, "-c", code]).stdout


def _fails_with(cmd: list[str], message: str) -> None:
    import subprocess

    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if "error:" in line]
    assert lines and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_rejects_bad_config_values_in_one_line(tiny_data):
    config = str(REPO / "configs" / "demo.yaml")
    _fails_with([script("condmoe-train"), "--config", config, f"data.root={tiny_data}", "moe.ep_size=3"],
                "moe.num_experts=4 is not divisible by moe.ep_size=3")
    _fails_with([script("condmoe-train"), "--config", config, "data.root=/nonexistent"], "data.root=/nonexistent")
    _fails_with([script("condmoe-train"), "--config", config, f"data.root={tiny_data}", "optim.lr=fast"],
                "optim.lr: expected a number")


def test_eval_without_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    _fails_with([script("condmoe-eval"), "--config", str(REPO / "configs" / "demo.yaml"), f"data.root={tiny_data}",
                 f"run.output_dir={tmp_path}"], "checkpoint")


@pytest.mark.slow
def test_experts_tool_on_a_trained_mod_squad_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    overrides = [f"data.root={tiny_data}", f"run.output_dir={out}", "run.max_steps=3", "run.log_every=1",
                 "tasks.0.batch_size=8", "tasks.1.batch_size=8", "data.shuffle_buffer=50"]
    config = str(REPO / "configs" / "demo_modsquad.yaml")
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "-m", "condmoe.train", "--config", config, *overrides])
    proc = run([script("condmoe-experts"), "extract", "--config", config, "--task", "shapes_classification",
                "--threshold", "0", *overrides])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["metric"]["extracted"] == pytest.approx(report["metric"]["full"], abs=1e-6)  # keeps every used one
    assert report["params"]["extracted"] <= report["params"]["full"]
    assert (out / "experts" / "extracted_shapes_classification" / "model.safetensors").is_file()
    chosen_on = json.loads((out / "experts" / "expert_usage_train.json").read_text())  # extract chooses on train
    assert chosen_on["split"] == "train" and report["selected_on"] == {"train": chosen_on["samples"]}
    run([script("condmoe-experts"), "usage", "--config", config, *overrides])  # val usage and task similarity
    usage = json.loads((out / "experts" / "expert_usage.json").read_text())
    assert usage["split"] == "val" and (out / "experts" / "task_similarity.json").is_file()
    assert usage["tasks"] == ["shapes_classification", "shapes_caption_retrieval"] and len(usage["layers"]) == 4
    run([script("condmoe-experts"), "plot", "--usage", str(out / "experts" / "expert_usage.json")])
    assert (out / "experts" / "expert_usage.png").stat().st_size > 10_000


@pytest.mark.slow
def test_logs_tensorboard_progress_and_evaluation_during_training(tiny_data, tmp_path):
    out = tmp_path / "run"
    overrides = [f"data.root={tiny_data}", f"run.output_dir={out}", "run.max_steps=4", "run.log_every=1",
                 "run.save_every=2", "run.eval_every=2", "run.progress_bar=always", "tasks.0.batch_size=8",
                 "tasks.1.batch_size=8", "data.shuffle_buffer=50"]
    config = str(REPO / "configs" / "demo.yaml")
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "-m", "condmoe.train", "--config", config, *overrides])
    assert "train: 100%" in proc.stderr and "4/4" in proc.stderr  # rank 0's bar

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert m["task_loss"] and all(v > 0 for v in m["task_loss"].values()) and m["aux_loss"] > 0
        # 2 MoE layers x 4 experts; top-2 of every routed token of both ranks
        assert len(m["expert_counts"]) == 2 and sum(m["expert_counts"][0]) == sum(m["expert_counts"][1]) > 0
        assert m["bad_samples"] == 0 and m["skipped_micro_steps"] == 0
        assert m["elapsed_s"] > 0 and m["eta_s"] >= 0
    assert metrics[-1]["eta_s"] == 0 and metrics[0]["eta_s"] > 0
    # the log line a SLURM log shows: step of max_steps, elapsed and ETA; the resolved config at the start
    assert "step 1/4 | loss" in proc.stderr and "| elapsed 0:00:" in proc.stderr and "| ETA 0:00:00" in proc.stderr
    assert "resolved config (" in proc.stderr and "  max_steps: 4" in proc.stderr

    # Evaluated at steps 2 and 4 from the checkpoints, tasks split over the ranks; the same as condmoe-eval.
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]
    final = json.loads(run([script("condmoe-eval"), "--config", config, "--batch-size", "64",
                            *overrides]).stdout.strip().splitlines()[-1])
    assert {k: v for k, v in evals[-1].items() if k != "step"} == final

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "task_loss/shapes_classification",
            "expert_share/blocks.0.mlp/expert0", "eval/shapes_classification/top1",
            "eval/shapes_caption_retrieval/i2t_r1"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([m["loss"] for m in metrics])
    assert [e.step for e in events.Scalars("eval/shapes_classification/top1")] == [2, 4]
    images = set(events.Tags()["images"])  # per-task expert usage, routed layers x experts
    assert images and images <= {"expert_usage/shapes_classification", "expert_usage/shapes_caption_retrieval"}
