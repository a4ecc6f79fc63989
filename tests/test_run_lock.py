"""One run per output folder (train/run_lock.py): the lock, its stale takeover, and run.resume=none on a used folder."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, subprocess_env, torchrun

from condmoe.train.run_lock import LOCK_NAME, RunLock, prepare_fresh_run


def test_a_held_folder_is_refused_naming_the_holder(tmp_path):
    lock = RunLock.acquire(tmp_path / "run")
    try:
        with pytest.raises(ValueError, match=rf"is in use by another run \(pid {os.getpid()} on "):
            RunLock.acquire(tmp_path / "run")
    finally:
        lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    RunLock.acquire(tmp_path / "run").release()  # free again


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout),
                                                  "started": time.time()}))
    RunLock.acquire(tmp_path).release()
    assert f"pid {int(dead.stdout)} on this host has exited" in caplog.text


def test_a_lock_from_another_host_is_stale_only_when_not_refreshed(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    with pytest.raises(ValueError, match="pid 1 on elsewhere"):
        RunLock.acquire(tmp_path, stale_s=60)
    os.utime(path, (time.time() - 120, time.time() - 120))  # its holder stopped refreshing two minutes ago
    RunLock.acquire(tmp_path, stale_s=60).release()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    """After a node failure SLURM requeues the job (same job id) on another host within seconds."""
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "failed-node", "pid": 1, "started": 0, "slurm_job": "77"}))
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(ValueError, match="in use"):
        RunLock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    RunLock.acquire(tmp_path).release()


def test_the_holder_refreshes_its_lock(tmp_path):
    lock = RunLock.acquire(tmp_path, refresh_s=0.05)
    try:
        path = tmp_path / LOCK_NAME
        os.utime(path, (0, 0))
        time.sleep(0.3)
        assert path.stat().st_mtime > time.time() - 5
    finally:
        lock.release()


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        RunLock.acquire(tmp_path / "run")


def test_a_fresh_run_refuses_a_used_folder_unless_it_may_move_it_aside(tmp_path):
    assert prepare_fresh_run(tmp_path, overwrite=False) is None  # empty: nothing to do
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoints, metrics.jsonl\).*run.overwrite=true"):
        prepare_fresh_run(tmp_path, overwrite=False)
    moved = prepare_fresh_run(tmp_path, overwrite=True)
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoints", "metrics.jsonl"]  # nothing deleted
    assert [p.name for p in tmp_path.iterdir()] == [moved.name]
    assert prepare_fresh_run(tmp_path, overwrite=False) is None  # earlier replaced-* folders are not a run


def test_resume_none_on_a_used_folder_is_one_line_before_anything_is_built(tiny_data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    proc = subprocess.run([sys.executable, "-m", "condmoe.train", "--config", "configs/demo.yaml",
                           f"data.root={tiny_data}", "moe.ep_size=1", f"run.output_dir={tmp_path / 'run'}",
                           "run.resume=none"],
                          cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "condmoe-train: error: run.resume=none but run.output_dir=" in proc.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"


@pytest.mark.slow
def test_a_second_run_on_the_folder_of_a_running_one_refuses(tiny_data, tmp_path):
    """The reproduction: a relaunch on the folder of a run that still trains (an orphan, a duplicate job) shared it
    and wrote the same steps twice. Now it refuses on every rank and the running one trains on."""
    from test_distributed import small_config

    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 1000})
    out = tmp_path / "run"
    first = subprocess.Popen([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={out}"],
                             cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "train_rank0.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / LOCK_NAME).is_file()
        second = subprocess.run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={out}"],
                                cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
        assert second.returncode != 0
        assert second.stderr.count(f"condmoe-train: error: run.output_dir={out} is in use by another run") == 2
        assert first.poll() is None  # the holder trains on
    finally:
        os.killpg(first.pid, signal.SIGTERM)  # its stop signal: checkpoint, exit 75, lock released
        first.wait(timeout=120)
    assert not (out / LOCK_NAME).exists()
