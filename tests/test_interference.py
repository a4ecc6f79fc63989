"""train/interference.py on hand cases: which parameters are shared, how they group, and the gradient cosines."""

import math

import pytest
import torch

from condmoe.models import MoEArgs, create_model, moe_layer_indices
from condmoe.train.interference import gradient_cosines, mean_off_diagonal, parameter_groups, shared_parameters


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
