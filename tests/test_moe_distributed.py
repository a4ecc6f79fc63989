"""Tier 2: MoE layers across real processes (gloo): DeepSpeed reference (with dropping), ep_size 2 vs 1,
dropless static routing at ep_size 2, MI loss across ranks."""

import pytest
from conftest import REPO, run, torchrun

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode, nproc", [("reference", 1), ("ep", 2), ("static", 2), ("mi", 2)])
def test_moe_across_processes(mode, nproc):
    proc = run([*torchrun(nproc), str(REPO / "tests" / "dist_check_moe.py"), mode], timeout=180)
    assert f"MOE-{mode.upper()}-OK" in proc.stdout


def test_split_targets_and_gathered_negatives():
    proc = run([*torchrun(2), str(REPO / "tests" / "dist_check_collectives.py")], timeout=180)
    assert "COLLECTIVES-OK" in proc.stdout
