"""Optimizer parameter groups and schedules: weight-decay split, layer-wise learning-rate decay (timm's grouping),
per-group warmup-cosine factors; a real run with layer-wise decay on 2 ranks with expert parallelism."""

import json

import pytest
from conftest import REPO, run, torchrun

from condmoe.models import MoEArgs, create_model, moe_layer_indices
from condmoe.train.config import OptimConfig, load_config
from condmoe.train.engine import lr_factor, lr_schedules, param_groups


def model():
    return create_model("debug", vocab_size=50, spe_token_id=4, max_text_len=8, moe_layers=moe_layer_indices(4),
                        moe=MoEArgs(num_experts=4))


def _scale_and_decay(groups, m):
    names = {id(p): n for n, p in m.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in out, "a parameter in two groups"
            out[names[id(p)]] = (g.get("lr_scale", 1.0), g["weight_decay"])
    return out


def test_without_layer_decay_two_groups_split_by_weight_decay():
    m = model()
    groups = param_groups(m, 0.05)
    assert [g["name"] for g in groups] == ["decay", "no_decay"] and "lr_scale" not in groups[0]
    got = _scale_and_decay(groups, m)
    assert len(got) == len(list(m.parameters()))
    assert got["blocks.0.attn.qkv.weight"] == (1.0, 0.05) and got["image_embed.pos_embed"] == (1.0, 0.0)
    assert got["blocks.0.norm1.weight"] == (1.0, 0.0) and got["logit_scale"] == (1.0, 0.0)


def test_layer_decay_scales_each_layer_like_beit():
    m = model()  # depth 4: embeddings 0.5^5, block i 0.5^(4 - i), ln_post / projection / temperatures 1
    got = _scale_and_decay(param_groups(m, 0.05, layer_decay=0.5), m)
    plain = _scale_and_decay(param_groups(m, 0.05), m)
    assert {n: d for n, (_, d) in got.items()} == {n: d for n, (_, d) in plain.items()}  # the same decay split
    for name, (scale, _) in got.items():
        if name.startswith(("image_embed.", "text_embed.", "embed_norm.")):
            assert scale == 0.5 ** 5, name
        elif name.startswith("blocks."):
            assert scale == 0.5 ** (4 - int(name.split(".")[1])), name
        else:
            assert name.startswith(("ln_post.", "proj.", "logit_scale")) and scale == 1.0, name
    assert got["blocks.2.mlp.experts.deepspeed_experts.3.fc1.weight"] == (0.5 ** 2, 0.05)  # experts by block too


def test_each_group_runs_warmup_cosine_times_its_scale():
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), ["optim.warmup_steps=4", "run.max_steps=20"])
    schedules = lr_schedules([{"lr_scale": 0.25}, {}], cfg)
    for step in (0, 3, 4, 11, 20):
        factor = lr_factor(step, 4, 20, cfg.optim.min_lr / cfg.optim.lr)
        assert schedules[0](step) == 0.25 * factor and schedules[1](step) == factor


@pytest.mark.parametrize("value", [0.0, 1.5, float("nan")])
def test_layer_decay_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match="optim.layer_decay"):
        OptimConfig(layer_decay=value)


@pytest.mark.slow
def test_a_run_with_layer_decay_on_two_ranks_with_expert_parallelism(tiny_data, tmp_path):
    out = tmp_path / "run"
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(REPO / "configs" / "demo.yaml"),
         f"data.root={tiny_data}", f"run.output_dir={out}", "run.max_steps=3", "run.log_every=1",
         "run.tensorboard=false", "optim.layer_decay=0.65", "optim.warmup_steps=2", "data.shuffle_buffer=50",
         "tasks.0.batch_size=8", "tasks.1.batch_size=8"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), ["optim.warmup_steps=2", "run.max_steps=3"])
    for record in records:  # the peak group's lr (the output layers, scale 1) for the next step
        expected = cfg.optim.lr * lr_factor(record["step"], 2, 3, cfg.optim.min_lr / cfg.optim.lr)
        assert record["lr"] == pytest.approx(expected, rel=1e-6)
    # every optimizer group, the expert groups DeepSpeed splits off included, at its own scale of the schedule
    import torch

    state = torch.load(next((out / "checkpoints" / "step_3").glob("zero_pp_rank_0_*optim_states.pt")),
                       weights_only=False, map_location="cpu")
    groups = state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert {g["lr_scale"] for g in groups} == {0.65 ** k for k in range(6)}
    assert sum(g["name"].startswith("ep_size") for g in groups) == 4  # two MoE blocks x decay / no decay
    assert all(g["lr"] == pytest.approx(g["lr_scale"] * records[-1]["lr"], rel=1e-9) for g in groups)
