"""Every process condmoe starts tears down cleanly: process groups are destroyed, and their gloo threads joined,
before the interpreter finalizes (train/dist.py ``shutdown_distributed`` says what happens otherwise).

The run-level checks live in conftest.run: every multi-process command that succeeds must also show no teardown
fault (``TEARDOWN_FAULTS``) in its output.
"""

import sys
import textwrap

import pytest
from conftest import assert_clean_teardown, run, torchrun
from test_distributed import losses, small_config

# One process, a one-rank world plus a subgroup. The subgroup is held across the shutdown, as the engine and the
# model hold the expert groups: its threads must survive the destruction (the detector sees them), and end as soon
# as the reference is dropped.
DETECTOR = textwrap.dedent("""
    import gc

    import torch
    from deepspeed import comm as dist

    from condmoe.train.dist import COMM_THREAD_NAMES, init_distributed, live_comm_threads, shutdown_distributed

    init_distributed()
    group = dist.new_group([0])
    for g in (None, group):
        dist.all_reduce(torch.ones(4), group=g)
    running = live_comm_threads()
    assert len(running) >= 4 and all(n.startswith(COMM_THREAD_NAMES) for n in running), running
    held = shutdown_distributed(grace_seconds=0.5)
    assert 0 < len(held) < len(running), (held, running)  # the world's threads joined, the held group's not
    del group, g
    gc.collect()
    assert live_comm_threads() == [], live_comm_threads()
    print("DETECTOR-OK", flush=True)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="thread names are read from /proc/self/task")
def test_shutdown_joins_every_thread_of_the_groups_it_destroys():
    proc = run([sys.executable, "-c", DETECTOR], timeout=120, check=False)
    assert proc.returncode == 0 and "DETECTOR-OK" in proc.stdout, proc.stderr[-3000:]
    assert "communication threads still run" in proc.stderr  # the warning a held group gets


@pytest.mark.slow
def test_a_finished_two_rank_run_exits_0_with_every_thread_joined(tiny_data, tmp_path):
    """ep_size 2 (expert groups), ZeRO-2 (its gradient hooks hold the parameters), a loader worker per stream and
    tensorboard: everything the trainer owns is released before the groups are destroyed."""
    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 3, "run.tensorboard": True})
    proc = run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg)])  # fails on nonzero exit or teardown fault
    assert proc.returncode == 0
    assert sorted(losses(tmp_path / "run", 1)) == [0, 1, 2]


def test_teardown_faults_are_caught():
    """The run-level check itself: the abort's message fails a test."""
    with pytest.raises(pytest.fail.Exception, match="unclean teardown"):
        assert_clean_teardown("RESHARD-OK 97 tensors\nterminate called without an active exception\n")
    assert_clean_teardown("RESHARD-OK 97 tensors\n")


@pytest.mark.slow
def test_a_user_error_after_the_engine_exists_still_tears_down(tiny_data, tmp_path):
    """classes.json is read after the DeepSpeed engine is built: the half-built trainer must release the engine, so
    the one-line error (exit 2) is not followed by live gloo threads."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    (root / "classes.json").unlink()
    cfg = small_config(tmp_path, root, **{"run.max_steps": 1})
    proc = run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg)], check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "condmoe-train: error:" in output and "classes.json" in output, output[-3000:]
    assert_clean_teardown(output)
