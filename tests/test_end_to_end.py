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
    code = ("import sys, torch; from models.extract import load_extracted; "
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
         f"--master_port={free_port()}", "-m", "train", "--config", config, *overrides])
    proc = run([script("condmoe-experts"), "extract", "--config", config, "--task", "shapes_classification",
                "--threshold", "0", *overrides])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["metric"]["extracted"] == pytest.approx(report["metric"]["full"], abs=1e-6)  # keeps every used one
    assert report["params"]["extracted"] <= report["params"]["full"]
    assert (out / "experts" / "extracted_shapes_classification" / "model.safetensors").is_file()
    usage = json.loads((out / "experts" / "expert_usage.json").read_text())
    assert usage["tasks"] == ["shapes_classification", "shapes_caption_retrieval"] and len(usage["layers"]) == 4
    run([script("condmoe-experts"), "plot", "--usage", str(out / "experts" / "expert_usage.json")])
    assert (out / "experts" / "expert_usage.png").stat().st_size > 10_000
