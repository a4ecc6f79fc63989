"""The EMA of the weights (train/ema.py): the update by hand, which rank writes what, and a 2-rank expert-parallel
run whose average is saved per global expert, resumed on one rank and evaluated with condmoe-eval --ema."""

import json

import pytest
import torch
from conftest import REPO, run, torchrun

from condmoe.train.checkpoint import load_plain_state_dict
from condmoe.train.cli import eval_main
from condmoe.train.ema import WeightEMA, read_ema


def test_update_is_a_lerp_in_float32_and_each_rank_writes_its_own(monkeypatch):
    import condmoe.train.ema as ema_module

    layer = torch.nn.Linear(2, 2, bias=False).to(torch.bfloat16)
    expert = torch.nn.Parameter(torch.ones(3))
    expert.allreduce = False  # DeepSpeed's tag of expert parameters
    model = torch.nn.Module()
    model.layer, model.expert = layer, expert
    monkeypatch.setattr(ema_module, "global_parameter_names", lambda m: {p: n for n, p in m.named_parameters()})
    ema = WeightEMA(model, decay=0.75)
    start = layer.weight.detach().float().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
        expert.mul_(3.0)
    ema.update()
    shadow = dict(zip(ema.names, ema.shadow))
    assert shadow["layer.weight"].dtype == torch.float32
    assert torch.allclose(shadow["layer.weight"], 0.75 * start + 0.25 * layer.weight.float())
    assert torch.equal(shadow["expert"], torch.full((3,), 0.75 + 0.25 * 3.0)) and ema.updates == 1
    assert set(ema.owned(rank=0, expert_dp_rank=0)) == {"layer.weight", "expert"}
    assert set(ema.owned(rank=1, expert_dp_rank=0)) == {"expert"}  # the first copy of its experts
    assert ema.owned(rank=1, expert_dp_rank=1) == {}
    with pytest.raises(ValueError, match="run.ema_decay"):
        WeightEMA(model, decay=1.0)


@pytest.mark.slow
def test_ema_on_two_ranks_with_expert_parallelism_resumes_resharded_and_evaluates(tiny_data, tmp_path):
    out = tmp_path / "run"
    common = ["--config", str(REPO / "configs" / "demo.yaml"), f"data.root={tiny_data}", f"run.output_dir={out}",
              "run.tensorboard=false", "data.shuffle_buffer=50", "tasks.0.batch_size=8", "tasks.1.batch_size=8",
              "run.ema_decay=1e-6"]  # so small that the average is the last weights: the names must line up
    run([*torchrun(2), "-m", "condmoe.train", *common, "run.max_steps=3"])
    step = out / "checkpoints" / "step_3"
    assert sorted(p.name for p in step.glob("ema_rank*.pt")) == ["ema_rank0.pt", "ema_rank1.pt"]  # ep_size 2
    weights = load_plain_state_dict(step)
    averaged = read_ema(step)
    trainable = {n for n in weights if not n.endswith(("mi_history_WXE", "mi_cursor"))}
    assert set(averaged["weights"]) == trainable and averaged["updates"] == 3
    for name, value in averaged["weights"].items():  # every expert under its global id
        assert torch.allclose(value, weights[name].float(), atol=1e-5), name
    record = json.loads((step / "condmoe.json").read_text())
    assert {"ema_rank0.pt", "ema_rank1.pt"} <= set(record["files"])  # hashed with the checkpoint
    proc = run([*torchrun(1), "-m", "condmoe.train", *common, "run.max_steps=4", "moe.ep_size=1"])
    assert "has no EMA" not in proc.stderr
    assert read_ema(out / "checkpoints" / "step_4")["updates"] == 4  # resumed from the 2-rank average
    args = ["--config", str(out / "config.yaml"), f"data.root={tiny_data}", "--batch-size", "32"]
    assert eval_main(["--ema", *args]) == 0 and eval_main(args) == 0
    with_ema, plain = (json.loads((out / name).read_text()) for name in ("eval.ema.json", "eval.json"))
    assert with_ema["shapes_classification"]["top1"] == plain["shapes_classification"]["top1"]


def test_eval_ema_of_a_run_without_one_is_one_line(multitask_run, tiny_data, capsys):
    assert eval_main(["--ema", "--config", str(multitask_run / "config.yaml"), f"data.root={tiny_data}"]) == 2
    assert "--ema: " in capsys.readouterr().err.strip().splitlines()[-1]
