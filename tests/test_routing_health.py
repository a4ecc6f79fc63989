"""Tier 2: routing health in a real 2-rank run: metrics.jsonl carries per-layer dropped share, balance, z and MI
losses and expert-load CV; a layer that drops more than 5% of its assignments is named once in a warning."""

import json

import pytest
from conftest import run, torchrun
from test_distributed import small_config

pytestmark = pytest.mark.slow


def test_metrics_carry_per_layer_routing_health_and_heavy_dropping_warns_once(tiny_data, tmp_path):
    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 3, "moe.capacity_factor": 0.3, "moe.min_capacity": 1})
    proc = run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg)])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    routing = records[0]["routing"]
    assert routing["layers"] == ["blocks.0.mlp", "blocks.2.mlp"]
    for key in ("dropped_share", "balance_loss", "z_loss", "mi_loss", "expert_load_cv"):
        assert len(routing[key]) == 2, key
    assert all(share > 0.05 for share in routing["dropped_share"])  # capacity 0.3 of the balanced load
    assert all(loss > 0 for loss in routing["balance_loss"]) and all(cv >= 0 for cv in routing["expert_load_cv"])
    log = proc.stdout + proc.stderr
    for layer in routing["layers"]:
        warnings = [line for line in log.splitlines() if f"{layer} drops" in line]
        assert len(warnings) == 1 and "moe.capacity_factor" in warnings[0], warnings
