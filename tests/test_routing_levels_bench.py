"""bench/routing_levels.py in its small mode: every routing level trains, times and evaluates (figures not checked:
a benchmark, not a timed test)."""

import json
import sys

from conftest import REPO, run


def test_routing_levels_benchmark_small_mode(tmp_path):
    out = tmp_path / "levels.json"
    proc = run([sys.executable, str(REPO / "bench" / "routing_levels.py"), "--small", "--json", str(out)], timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["level"] for r in rows] == ["dense", "token", "context", "modality", "task", "attribute"]
    for r in rows:
        assert r["train_ms_per_step"] > 0 and r["infer_ms_per_sample"] > 0, r
        assert r["metrics"]["motion_caption_retrieval"]["num_samples"] == 4  # the held-out videos, zero-shot
        assert 0 <= r["video_r1_held_out"] <= 100 and 0 <= r["image_top1"] <= 100
    dense, token = rows[0], rows[1]
    assert dense["active_params"] == dense["params"] < token["active_params"] < token["params"]  # top-2 of 4
    assert len([line for line in proc.stdout.splitlines() if line.startswith("| ")]) == 7  # header + 6 rows
