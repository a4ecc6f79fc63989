"""Launchers without SLURM: the helpers of slurm/lib.sh, rank layout precedence and dry runs (train/dist.py),
``mpirun -np 2`` training (MPICH from PyPI, mpi4py discovery) and the deepspeed launcher's per-node hostfile form.

torchrun and the plain deepspeed launcher are covered in tests/test_distributed.py, the sbatch scripts on a real
SLURM in tests/test_slurm.py.
"""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port, run, subprocess_env, torchrun
from test_distributed import losses, small_config

from condmoe.train.dist import DEFAULT_MPI_PORT, DistInfo, describe, detect, dry_run, layout_problems, main

LIB = REPO / "slurm" / "lib.sh"
VENV_BIN = Path(sys.executable).parent


def lib(call: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs ``call`` in bash after sourcing slurm/lib.sh, with only PATH from this environment (plus ``env``)."""
    return subprocess.run(["bash", "-c", f'set -euo pipefail; source "{LIB}"; {call}'], capture_output=True,
                          text=True, env={"PATH": os.environ["PATH"], **(env or {})}, timeout=30)


# --- slurm/lib.sh: pure helpers ----------------------------------------------------------------------------------


def test_master_port_is_derived_from_the_job_id_below_the_ephemeral_range():
    ports = {job: int(lib(f"condmoe_master_port {job}").stdout) for job in (0, 1, 14999, 15000, 123456, 2**31 - 1)}
    assert ports[1] == 15001 and ports[14999] == 29999 and ports[15000] == 15000 == ports[0]
    assert all(15000 <= port < 30000 for port in ports.values())  # Linux's ephemeral ports start at 32768
    assert int(lib("condmoe_master_port 123456").stdout) == ports[123456]  # same job, same port on every task


def test_hostfile_lists_hosts_in_node_order():
    out = lib("condmoe_hostfile 8 gpu-a17 gpu-a03 gpu-b01").stdout
    assert out == "gpu-a17 slots=8\ngpu-a03 slots=8\ngpu-b01 slots=8\n"


def test_hostfile_is_read_by_deepspeed(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile

    hostfile = tmp_path / "hostfile"
    hostfile.write_text(lib("condmoe_hostfile 4 n1 n2").stdout)
    assert fetch_hostfile(str(hostfile)) == {"n1": 4, "n2": 4}  # ordered: n1 is node 0


@pytest.mark.parametrize(("env", "expected"), [
    ({"CONDMOE_GPUS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}, "4"),
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}, "8"),  # --ntasks-per-node=1 --gpus-per-node=8
    ({"SLURM_NTASKS_PER_NODE": "8(x2)"}, "8"),  # no GPUs allocated: the tasks per node
])
def test_gpus_per_node_precedence(env, expected):
    assert lib("condmoe_gpus_per_node", env).stdout.strip() == expected


def test_gpus_per_node_unknown_is_an_error():
    proc = lib("condmoe_gpus_per_node", {"SLURM_GPUS_ON_NODE": "gpu:a100"})
    assert proc.returncode == 1 and "CONDMOE_GPUS_PER_NODE" in proc.stderr


# --- slurm/lib.sh: the preemption logic, with a fake scontrol ----------------------------------------------------


def preemptible(tmp_path: Path, step: str, send: signal.Signals | None) -> tuple[int, str, list[str]]:
    """Runs ``condmoe_run_preemptible bash -c STEP`` as a batch shell would; sends it ``send`` once the step runs.

    Returns the shell's exit status, its output and the fake scontrol's calls.
    """
    bin_dir, calls, started = tmp_path / "bin", tmp_path / "calls", tmp_path / "started"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n')
    (bin_dir / "scontrol").chmod(0o755)
    for path in (calls, started):
        path.unlink(missing_ok=True)
    script = f'source "{LIB}"; condmoe_run_preemptible bash -c \'touch "$STARTED"; {step}\''
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "STARTED": str(started),
           "SLURM_JOB_ID": "42"}
    shell = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        if send is not None:
            deadline = time.monotonic() + 10
            while not started.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.1)  # the step's own trap is set right after it touched the file
            shell.send_signal(send)
        out, _ = shell.communicate(timeout=20)
    finally:
        if shell.poll() is None:
            shell.kill()
    return shell.returncode, out, calls.read_text().splitlines() if calls.exists() else []


# A stand-in for the ranks: on USR1/TERM it "checkpoints" (takes a while) and exits 75, as train/signals.py does.
RANKS = 'trap "sleep 0.3; echo saved; exit 75" USR1 TERM; while :; do sleep 0.05; done'


def test_usr1_is_forwarded_the_step_checkpoints_then_the_job_is_requeued(tmp_path):
    rc, out, calls = preemptible(tmp_path, RANKS, signal.SIGUSR1)
    assert rc == 75 and calls == ["requeue 42"], out
    # The shell waited for the step through the interrupted `wait`: requeue only after the checkpoint.
    assert out.index("USR1 (preemption warning)") < out.index("saved") < out.index("requeueing job 42"), out


def test_term_is_forwarded_but_never_requeues(tmp_path):
    rc, out, calls = preemptible(tmp_path, RANKS, signal.SIGTERM)
    assert rc == 75 and calls == [] and "saved" in out, out


@pytest.mark.parametrize(("status", "requeued"), [(75, True), (0, False), (3, False)])
def test_step_status_without_signal(tmp_path, status, requeued):
    # 75 without USR1 here: the ranks were signalled directly (scancel --signal=USR1 JOB), requeue all the same.
    rc, out, calls = preemptible(tmp_path, f"exit {status}", None)
    assert rc == status and calls == (["requeue 42"] if requeued else []), out


# --- train/dist.py: layout precedence, description, dry run ------------------------------------------------------


def test_mpi_variables_win_over_inherited_slurm_ones():
    # mpirun inside an sbatch script: every rank inherits the batch step's SLURM_PROCID=0; the MPI rank is the truth.
    slurm = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"}
    info = detect({**slurm, "PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1"})
    assert (info.rank, info.local_rank, info.world_size, info.source) == (3, 1, 4, "mpi")
    openmpi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"}
    info = detect({**slurm, **openmpi})
    assert (info.rank, info.world_size, info.source) == (2, 4, "mpi")
    # ...and the launcher's RANK wins over both (torchrun or the deepspeed launcher started by mpirun or srun).
    info = detect({**slurm, "PMI_RANK": "1", "PMI_SIZE": "2", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5"})
    assert (info.rank, info.world_size, info.source) == (5, 8, "env")


def test_describe_and_problems():
    env = {"MASTER_ADDR": "n1", "MASTER_PORT": "15042", "SLURMD_NODENAME": "n2"}
    line = describe(DistInfo(1, 0, 2, "slurm"), env)
    assert re.fullmatch(r"condmoe-layout rank=1 world_size=2 local_rank=0 source=slurm master=n1:15042 host=\S+ "
                        r"slurm_node=n2", line), line
    assert "master=mpi4py:29500" in describe(DistInfo(0, 0, 2, "mpi"), {})
    assert layout_problems(DistInfo(1, 0, 2, "slurm"), 2, env) == []
    problems = layout_problems(DistInfo(2, 3, 2, "slurm"), 4, {})
    assert len(problems) == 5, problems  # rank, local rank, MASTER_ADDR, MASTER_PORT, ep_size
    assert "moe.ep_size=4 does not divide the world size 2" in problems[-1]


def test_dry_run_exit_status(capsys):
    assert dry_run(2, {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}) == 0
    assert dry_run(1, {"RANK": "1", "WORLD_SIZE": "2"}) == 2  # torchrun would have set MASTER_*
    captured = capsys.readouterr()
    assert captured.out.count("condmoe-layout rank=1 world_size=2") == 2
    assert "MASTER_ADDR is not set" in captured.err


def test_python_m_train_dist_takes_train_arguments(tiny_data, tmp_path, monkeypatch, capsys):
    cfg = small_config(tmp_path, tiny_data)  # ep_size 2
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)  # a single process, whatever runs pytest
    assert main(["--config", str(cfg)]) == 2  # one process cannot hold ep_size 2
    assert main(["--config", str(cfg), "moe.ep_size=1", "--local_rank=0"]) == 0
    assert main(["--config", str(cfg), "moe.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "moe.ep_size=2 does not divide the world size 1" in err and "moe.nope" in err
    with pytest.raises(SystemExit):
        main(["run.max_steps=3"])  # overrides without --config: the sbatch script forgot --config


# --- real processes ----------------------------------------------------------------------------------------------


def mpirun() -> str:
    launcher = shutil.which("mpirun", path=str(VENV_BIN)) or shutil.which("mpirun")
    if not launcher:
        pytest.skip("no mpirun: pip install mpich (a test dependency, setup.cfg)")
    return launcher


@pytest.mark.slow
def test_mpirun_dry_run_prints_each_ranks_layout():
    proc = run([mpirun(), "-np", "2", sys.executable, "-m", "condmoe.train.dist"], timeout=60)
    layouts = sorted(re.findall(r"condmoe-layout rank=(\d) world_size=(\d) local_rank=(\d) source=(\w+)", proc.stdout))
    assert layouts == [("0", "2", "0", "mpi"), ("1", "2", "1", "mpi")], proc.stdout
    assert len([line for line in proc.stdout.splitlines() if line.startswith("condmoe-layout")]) == 2, proc.stdout


@pytest.mark.slow
def test_mpirun_trains_two_ranks(tiny_data, tmp_path, monkeypatch):
    """``mpirun -np 2`` (no RANK, no MASTER_ADDR): mpi4py discovery finds the ranks; MASTER_PORT is honoured (with
    DeepSpeed's default, 29500, held by another job here, the rendezvous would fail)."""
    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 2})
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # what `mpirun -x MASTER_PORT` (OpenMPI) passes on
    with socket.socket() as other_job:
        with contextlib.suppress(OSError):  # already taken: all the better
            other_job.bind(("0.0.0.0", DEFAULT_MPI_PORT))
            other_job.listen()
        run([mpirun(), "-np", "2", sys.executable, "-m", "condmoe.train", "--config", str(cfg)])
    for rank in (0, 1):
        assert sorted(losses(tmp_path / "run", rank)) == [0, 1]
    assert (tmp_path / "run" / "checkpoints" / "step_2").is_dir()


@pytest.mark.slow
def test_deepspeed_launcher_per_node_hostfile_form(tmp_path):
    """What each SLURM node runs in the deepspeed form, by hand: one launcher per "node" (two host names of this
    machine) with --no_ssh --node_rank and a shared hostfile; `python -m condmoe.train.dist` reports the ranks they
    start."""
    launcher = shutil.which("deepspeed", path=str(VENV_BIN))
    assert launcher, "the deepspeed launcher is installed with deepspeed"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(lib("condmoe_hostfile 2 localhost 127.0.0.1").stdout)  # 2 "nodes" x 2 slots
    port = free_port()
    nodes = [subprocess.Popen([launcher, "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={node}",
                               "--master_addr=127.0.0.1", f"--master_port={port}", "--module", "condmoe.train.dist"],
                              cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=120)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    for node, output in enumerate(outputs):
        ranks = sorted(re.findall(r"condmoe-layout rank=(\d) world_size=4 local_rank=(\d) source=env "
                                  rf"master=127\.0\.0\.1:{port}", output))
        assert ranks == [(str(2 * node), "0"), (str(2 * node + 1), "1")], output


# --- condmoe-launch: the launcher's status for requeue scripts ---------------------------------------------------


@pytest.mark.parametrize("launcher_status, records, expected", [
    (0, [], 0),
    (1, [{"pid": 10, "local_world_size": 2, "status": 75}, {"pid": 11, "local_world_size": 2, "status": 75}], 75),
    (1, [{"pid": 10, "local_world_size": 2, "status": 75}], 1),  # the other rank never committed its stop
    (1, [{"pid": 10, "local_world_size": 2, "status": 75}, {"pid": 11, "local_world_size": 2, "status": None}], 1),
    (1, [{"pid": 10, "local_world_size": None, "status": 75}], 75),  # a launcher that does not say the node's size
    (1, [], 1),
    (-9, [], 137),  # the launcher itself was killed: the shell's convention
])
def test_wrapper_status_is_75_only_when_every_rank_of_the_node_committed_its_stop(launcher_status, records, expected):
    from condmoe.train.launch import exit_status

    status, why = exit_status(launcher_status, records)
    assert status == expected and bool(why) == (expected == 75 != launcher_status)


@pytest.mark.slow
def test_sigterm_to_condmoe_launch_reaches_the_ranks_not_torchrun_and_the_wrapper_exits_75(tiny_data, tmp_path):
    """torchrun alone exits 1 on SIGTERM and SIGKILLs ranks 30 s after forwarding it; under condmoe-launch the ranks
    get the signal directly, checkpoint, and the wrapper exits 75; the run then resumes."""
    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 10000, "run.save_every": 10000})
    out = tmp_path / "run"
    wrapper = [str(VENV_BIN / "condmoe-launch"), *torchrun(2), "-m", "condmoe.train", "--config", str(cfg)]
    proc = subprocess.Popen(wrapper, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "train_rank1.jsonl").is_file():
            time.sleep(0.5)
        assert (out / "train_rank1.jsonl").is_file(), "training did not start"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, output[-3000:]
    assert "committed their stop checkpoint" in output and "death signal" not in output, output[-3000:]
    stopped_at = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    for rank in (0, 1):
        assert max(losses(out, rank)) == stopped_at - 1
    run([str(VENV_BIN / "condmoe-launch"), *torchrun(2), "-m", "condmoe.train", "--config", str(cfg),
         f"run.max_steps={stopped_at + 1}"])
    assert sorted(losses(out, 0))[-1] == stopped_at
