"""Tier 3: Uni-Perceiver-MoE's form end to end: demo_attribute (linear experts on attention and FFN, attribute
routing) trains on 2 ranks without dropping, and condmoe-export --merge-static writes per-attribute dense models that
are the trained model's encoders."""

import json

import pytest
import torch
from conftest import REPO, run, torchrun
from test_end_to_end import script

from condmoe.models.extract import load_extracted

pytestmark = pytest.mark.slow


def test_demo_attribute_trains_dropless_and_exports_merged_encoders(tiny_data, tmp_path):
    config = str(REPO / "configs" / "demo_attribute.yaml")
    overrides = [f"data.root={tiny_data}", f"run.output_dir={tmp_path / 'run'}", "run.max_steps=3", "run.log_every=1",
                 "data.shuffle_buffer=50", "tasks.0.batch_size=8", "tasks.1.batch_size=8"]
    run([*torchrun(2), "-m", "condmoe.train", "--config", config, *overrides])
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        routing = json.loads(line)["routing"]
        assert routing["layers"] == ["blocks.0.attn", "blocks.0.mlp", "blocks.2.attn", "blocks.2.mlp"]
        assert max(routing["dropped_share"]) == 0.0
    proc = run([script("condmoe-export"), "--config", config, "--out", str(tmp_path / "export"), "--merge-static",
                *overrides])
    assert "attribute_visual_input" in proc.stdout
    full = load_extracted(tmp_path / "export").eval()
    image_encoder = load_extracted(tmp_path / "export" / "attribute_visual_input").eval()
    assert not image_encoder.moe_layers
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(image_encoder.encode_images(images), full.encode_images(images), atol=1e-5)
