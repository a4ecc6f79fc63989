"""Shared fixtures: a tiny synthetic dataset, the subprocess environment for multi-process runs."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import condmoe.models._compat  # noqa: F401  (before anything imports timm; see models/_compat.py)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic dataset (several shards per split, BPE tokenizer) shared by the whole session."""
    from condmoe.data_prep.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic_dataset(out, seed=0, num_train_images=240, num_val_images=60, num_train_videos=8,
                            num_val_videos=4, num_train_dense=48, num_val_dense=16, shard_size=100)
    return out


@pytest.fixture(scope="session")
def multitask_run(tiny_data, tmp_path_factory) -> Path:
    """A 2-step run of the 6-task demo (configs/demo_multitask.yaml, MoE every other block) in one process."""
    out = tmp_path_factory.mktemp("run") / "multitask"
    run([*torchrun(1), "-m", "condmoe.train", "--config", str(REPO / "configs" / "demo_multitask.yaml"),
         f"data.root={tiny_data}", f"run.output_dir={out}", "run.max_steps=2", "run.save_every=2",
         "run.tensorboard=false", "moe.ep_size=1", "data.shuffle_buffer=50",
         *[f"tasks.{i}.batch_size=4" for i in range(6)]])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(cmd: list[str], timeout: float = 300, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    """Runs a command, failing the test with its output if it fails (``check``) or hangs past ``timeout``."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{exc.stdout}\n{exc.stderr}")
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n--- stdout\n{proc.stdout[-6000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    if check:
        assert_clean_teardown(proc.stdout + proc.stderr)
    return proc


# What an unclean exit of a rank prints: the abort of a gloo thread in interpreter finalization (train/dist.py
# shutdown_distributed), and shutdown_distributed's warning that some process group outlived its destruction.
TEARDOWN_FAULTS = ("terminate called", "communication threads still run")


def assert_clean_teardown(output: str) -> None:
    """Every multi-process run that succeeds must also exit cleanly: its output shows none of TEARDOWN_FAULTS."""
    faults = [fault for fault in TEARDOWN_FAULTS if fault in output]
    if faults:
        pytest.fail(f"unclean teardown ({', '.join(faults)}):\n{output[-6000:]}")


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}"]
