"""train/interference.py on hand cases: which parameters are shared, how they group, and the gradient cosines."""

import json
import math

import pytest
import torch
from conftest import REPO

from condmoe.models import MoEArgs, create_model, moe_layer_indices
from condmoe.train.experts import main as experts_main
from condmoe.train.interference import (
    conflict,
    gradient_cosines,
    mean_off_diagonal,
    parameter_groups,
    shared_parameters,
)

CONFIG = str(REPO / "configs" / "demo_multitask.yaml")


def test_gradient_cosines_by_hand():
    grads = {"a": {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([1.0])},
             "b": {"w": torch.tensor([-1.0, 0.0]), "v": torch.tensor([1.0])},
             "c": {"w": torch.zeros(2), "v": torch.zeros(1)}}
    cos = gradient_cosines(grads, {"all": ["w", "v"], "w": ["w"]})
    assert cos["all"][0][1] == pytest.approx(0.0)  # (-1 + 1) / 2
    assert cos["w"][0][1] == pytest.approx(-1.0)  # opposite directions
    assert cos["all"][2] == [0.0, 0.0, 1.0]  # no gradient: 0 with the others, 1 with itself
    assert mean_off_diagonal(cos["w"]) == pytest.approx((-1 + 0 + 0) * 2 / 6)
    assert math.isnan(mean_off_diagonal([[1.0]]))
    assert conflict(cos["w"]) == {"pairs": 3, "negative_pairs": 1, "min": -1.0, "mean_conflict": pytest.approx(1 / 3)}
    assert conflict([[1.0, 0.5], [0.5, 1.0]]) == {"pairs": 1, "negative_pairs": 0, "min": 0.5, "mean_conflict": 0.0}
    assert conflict([[1.0]])["pairs"] == 0


def test_shared_parameters_leave_out_routed_layers_and_task_parts():
    model = create_model("debug", vocab_size=50, spe_token_id=4, max_text_len=8, num_tasks=2,
                         moe_layers=moe_layer_indices(4, 2, 1), moe=MoEArgs(num_experts=4, top_k=2))
    shared = shared_parameters(model)
    assert not any(name.startswith(("blocks.1.mlp.", "blocks.3.mlp.", "logit_scale")) for name in shared)
    assert "blocks.0.mlp.fc1.weight" in shared and "blocks.1.attn.qkv.weight" in shared
    groups = parameter_groups(shared)
    assert set(groups) >= {"overall", "attention", "block_0", "block_3"}
    assert all(n.startswith("blocks.2.") for n in groups["block_2"])
    assert all(".attn." in n for n in groups["attention"]) and len(groups["overall"]) == len(shared)


@pytest.mark.slow
def test_interference_report_on_a_trained_run(multitask_run, tiny_data, capsys):
    args = ["--config", CONFIG, f"data.root={tiny_data}", f"run.output_dir={multitask_run}"]
    tasks = "shapes_classification,shapes_caption_retrieval,caption_mlm,shapes_captioning"
    assert experts_main(["interference", *args, "--tasks", tasks, "--batches", "2", "--batch-size", "4"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((multitask_run / "experts" / "interference.json").read_text())
    assert printed["mean_cosine"] == report["mean_cosine"] and printed["conflict"]["attention"]["pairs"] == 6
    assert report["tasks"] == tasks.split(",") and report["batches"] == dict.fromkeys(tasks.split(","), 2)
    assert {"overall", "attention", "block_0", "block_3"} <= set(report["cosine"])
    for group, matrix in report["cosine"].items():
        cos = torch.tensor(matrix)
        assert cos.shape == (4, 4) and torch.allclose(cos, cos.T, atol=1e-12), group
        assert torch.equal(cos.diagonal(), torch.ones(4)) and cos.abs().max() <= 1 + 1e-9, group
        assert cos.fill_diagonal_(0).abs().sum() > 0, group  # real gradients: the tasks are not orthogonal
    # MoE every other block from block 0: the routed FFNs (blocks 0 and 2) are not shared, those of 1 and 3 are
    assert report["parameters"]["block_0"] < report["parameters"]["block_1"] == report["parameters"]["block_3"]
    assert (multitask_run / "experts" / "interference.png").stat().st_size > 10_000


@pytest.mark.slow
def test_interference_refuses_unknown_or_single_tasks(multitask_run, tiny_data, capsys):
    args = ["--config", CONFIG, f"data.root={tiny_data}", f"run.output_dir={multitask_run}"]
    for tasks in ("shapes_classification,nope", "caption_mlm"):
        assert experts_main(["interference", *args, "--tasks", tasks]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("condmoe-experts interference: error: --tasks: need two or more of"), err
