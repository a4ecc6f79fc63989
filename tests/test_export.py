"""Weights that travel (issue 19 item 1): fp32 master weights out of a bf16 ZeRO-2 checkpoint with expert
parallelism (condmoe-ckpt consolidate, the checkpoints folder's zero_to_fp32.py), an export folder that holds its
tokenizer and class names and loads with UniPerceiver.from_pretrained to the same logits, and a ZeRO-3 dense run that
evaluates, exports and initialises another run."""

import json
import shutil
import sys

import pytest
import torch
from conftest import REPO, run, torchrun
from safetensors.torch import load_file

from condmoe.models import UniPerceiver
from condmoe.models.text_tokenizer import TextTokenizer
from condmoe.train.checkpoint import load_plain_state_dict
from condmoe.train.cli import eval_main, export_main, load_run_model
from condmoe.train.config import load_config
from condmoe.train.engine import build_model, initialise_from
from condmoe.train.reshard import consolidate

BIN = REPO / ".venv" / "bin"


def _train(tiny_data, out, *overrides, nproc=2, config="demo.yaml"):
    run([*torchrun(nproc), "-m", "condmoe.train", "--config", str(REPO / "configs" / config),
         f"data.root={tiny_data}", f"run.output_dir={out}", "run.max_steps=2", "run.tensorboard=false",
         "data.shuffle_buffer=50", *overrides])


@pytest.mark.slow
def test_bf16_zero2_expert_parallel_checkpoint_to_fp32_and_an_export_that_travels(tiny_data, tmp_path):
    out = tmp_path / "run"
    _train(tiny_data, out, "deepspeed_config=ds_configs/zero2_bf16.json", "tasks.0.batch_size=8",
           "tasks.1.batch_size=8")
    step = out / "checkpoints" / "step_2"
    module = load_plain_state_dict(step)
    masters = {name: entry["fp32"] for name, entry in consolidate(step)["params"].items()}
    assert module["blocks.0.mlp.experts.deepspeed_experts.3.fc1.weight"].dtype == torch.bfloat16  # as trained

    run([str(BIN / "condmoe-ckpt"), "consolidate", str(step), "--out", str(tmp_path / "fp32.safetensors")])
    fp32 = load_file(str(tmp_path / "fp32.safetensors"))
    assert set(masters) <= set(fp32) and all(fp32[n].dtype == torch.float32 for n in masters)
    assert all(torch.equal(fp32[n], masters[n]) for n in masters)  # the master copy, every expert by global id
    assert any(not torch.equal(fp32[n], module[n].float()) for n in masters)  # not the bf16 weights upcast
    # DeepSpeed's documented command, on condmoe's zero_to_fp32.py in the checkpoints folder
    script = out / "checkpoints" / "zero_to_fp32.py"
    assert "condmoe" in script.read_text()
    run([sys.executable, str(script), str(out / "checkpoints"), str(tmp_path / "ds_out")])
    again = load_file(str(tmp_path / "ds_out" / "model.safetensors"))
    assert all(torch.equal(again[n], fp32[n]) for n in fp32)

    args = ["--config", str(out / "config.yaml"), f"data.root={tiny_data}"]
    assert export_main([*args, "--out", str(tmp_path / "export")]) == 0
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "export", moved)  # nothing in it points back at the run or the data
    meta = json.loads((moved / "model_config.json").read_text())
    assert meta["tokenizer"] == "tokenizer" and meta["classes"] == "classes.json"
    classes = json.loads((moved / "classes.json").read_text())
    tokenizer = TextTokenizer(moved / meta["tokenizer"], meta["max_text_len"])
    model = UniPerceiver.from_pretrained(moved)
    _, reference, _ = load_run_model("test", str(out / "config.yaml"), [f"data.root={tiny_data}"], master=True)
    images = torch.randn(3, 3, 32, 32)
    ids, mask = tokenizer(classes["image"])
    with torch.no_grad():
        logits = model.classification_logits(model.encode_images(images), model.encode_texts(ids, mask),
                                             "image_classification")
        expected = reference.classification_logits(reference.encode_images(images),
                                                   reference.encode_texts(ids, mask), "image_classification")
    assert torch.equal(logits, expected) and model.blocks[0].attn.qkv.weight.dtype == torch.float32


ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1000000},
         "bf16": {"enabled": False}, "gradient_clipping": 1.0, "steps_per_print": 1000000}
ONE_TASK = ("tasks=[{name: shapes_classification, type: image_classification, dataset: image, batch_size: 8, "
            "label_smoothing: 0.1}]")


@pytest.mark.slow
def test_a_zero3_dense_run_evaluates_exports_and_initialises_another(tiny_data, tmp_path, capsys):
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps(ZERO3))  # every weight partitioned (no persistence threshold)
    out = tmp_path / "run"
    _train(tiny_data, out, f"deepspeed_config={config}", ONE_TASK, config="dense_baseline.yaml")
    step = out / "checkpoints" / "step_2"
    placeholders = torch.load(step / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert placeholders["blocks.0.attn.qkv.weight"].numel() == 0  # what DeepSpeed's module file holds under ZeRO-3
    args = ["--config", str(out / "config.yaml"), f"data.root={tiny_data}"]
    assert eval_main(args) == 0
    assert json.loads((out / "eval.json").read_text())["shapes_classification"]["num_samples"] == 60
    assert export_main([*args, "--out", str(tmp_path / "export")]) == 0
    model = UniPerceiver.from_pretrained(tmp_path / "export")
    assert model.blocks[0].attn.qkv.weight.shape == (192, 64)
    # an MoE model upcycled from it (run.init_from): every expert starts as the ZeRO-3 run's dense MLP
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.root={tiny_data}", ONE_TASK])
    moe = build_model(cfg, TextTokenizer(tiny_data / "tokenizer").vocab_size, 4)
    initialise_from(moe, str(out / "checkpoints"))
    assert torch.equal(moe.blocks[0].mlp.experts.deepspeed_experts[2].fc1.weight, model.blocks[0].mlp.fc1.weight)
