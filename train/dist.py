"""Who am I in the job: rank detection from torchrun / the deepspeed launcher, MPI or SLURM, then init.

Precedence, most specific first: the launcher's RANK/WORLD_SIZE (torchrun, the deepspeed launcher), then the MPI
launcher's variables, then SLURM's. A launcher started by ``srun`` inherits SLURM variables that describe the launcher
task, not the process: under the ``deepspeed`` launcher inside SLURM (and under OpenMPI's ``mpirun``, whose daemons
are started by srun) SLURM_PROCID is the node index, and a ``mpirun`` in a batch script leaves SLURM_PROCID=0 in every
rank. SLURM variables are therefore read only when nothing else set the layout (one ``srun`` task per process).

``python -m condmoe.train.dist`` prints the layout this process would use, without initialising anything: run it under
any launcher in place of ``condmoe.train`` to check a job's ranks (the sbatch scripts do this with
``CONDMOE_DRY_RUN=1``).
"""

import argparse
import contextlib
import gc
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The port mpi4py discovery uses when MASTER_PORT is not set (DeepSpeed's TORCH_DISTRIBUTED_DEFAULT_PORT).
DEFAULT_MPI_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    source: str  # which variables gave the layout: "env", "slurm", "mpi" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(environ: Mapping[str, str] | None = None) -> DistInfo:
    """Reads the process layout from the environment without touching it."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "env")
    if "OMPI_COMM_WORLD_RANK" in env:
        return DistInfo(int(env["OMPI_COMM_WORLD_RANK"]), int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                        int(env["OMPI_COMM_WORLD_SIZE"]), "mpi")
    if "PMI_RANK" in env and "PMI_SIZE" in env:  # MPICH / Intel MPI (hydra)
        return DistInfo(int(env["PMI_RANK"]), int(env.get("MPI_LOCALRANKID", 0)), int(env["PMI_SIZE"]), "mpi")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), "slurm")
    return DistInfo(0, 0, 1, "single")


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Initialises torch.distributed through DeepSpeed for any launcher and returns the layout.

    torchrun and the deepspeed launcher export RANK/MASTER_*; SLURM tasks get them mapped here (MASTER_ADDR and
    MASTER_PORT must come from the sbatch script); MPI launches go through DeepSpeed's mpi4py discovery, which takes
    rank 0's address and MASTER_PORT if set (else 29500). A single process without a launcher gets a one-rank group
    on localhost.
    """
    import datetime

    import deepspeed  # here, not at the top: `python -m condmoe.train.dist` and detect() must not pay for its import
    import torch.distributed.nn.functional  # noqa: F401  (before the init: see shutdown_distributed)

    info = detect()
    if info.source == "slurm":
        os.environ.update(RANK=str(info.rank), LOCAL_RANK=str(info.local_rank), WORLD_SIZE=str(info.world_size))
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"SLURM launch without {name}: export it in the sbatch script (slurm/)")
    elif info.source == "single":
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if info.source == "env":
        exit_with_launcher()
    # mpi4py discovery overwrites MASTER_PORT with this port: pass the one the user chose so that two MPI jobs
    # sharing a node need not collide on 29500.
    port = int(os.environ.get("MASTER_PORT", DEFAULT_MPI_PORT))
    deepspeed.init_distributed(auto_mpi_discovery=info.source == "mpi", distributed_port=port,
                               timeout=datetime.timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", info.local_rank))  # MPI discovery sets it from the host names
    return DistInfo(deepspeed.comm.get_rank(), local_rank, deepspeed.comm.get_world_size(), info.source)


def exit_with_launcher() -> bool:
    """Asks Linux to send this process SIGTERM when its parent dies; returns whether it is armed.

    torchrun starts every rank in a session of its own, so a ``kill -9`` of torchrun (or of its process group, or
    the OOM killer) left the ranks training on as orphans: still writing the run's folder, which a relaunch then
    shares. With this the ranks get the stop signal instead, checkpoint together and exit (``train/signals.py``).
    Armed for the launchers that are a rank's parent (torchrun, the deepspeed launcher); srun and mpirun end their
    own tasks.
    """
    if sys.platform != "linux":
        return False
    import ctypes
    import signal

    parent = os.getppid()
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("could not arm the parent-death signal (errno %d): this rank outlives a killed launcher",
                    ctypes.get_errno())
        return False
    if parent == 1 or os.getppid() != parent:  # the launcher died before the call: the signal will never come
        os.kill(os.getpid(), signal.SIGTERM)
    return True


# Native threads of torch.distributed's gloo backend (their names in /proc/self/task/*/comm): the work loops of a
# ProcessGroupGloo and the event loops of its tcp devices. They end only when the process group object is destroyed.
COMM_THREAD_NAMES = ("pt_gloo_runloop", "gloo_tcp_loop")


def shutdown_distributed(grace_seconds: float = 5.0) -> list[str]:
    """Destroys every process group while the interpreter is fully alive; returns the communication threads still
    running afterwards (empty when the shutdown is clean), after waiting up to ``grace_seconds`` for them to end.

    Why: a ProcessGroupGloo's worker threads (``pt_gloo_runloop``) end only in its destructor. Without this the groups
    live until interpreter finalization, and a worker thread that drops its last reference to a finished work there
    (``~AsyncAllreduceWork`` freeing tensors with Python objects) takes the GIL during ``Py_FinalizeEx``; Python then
    ends that thread with ``pthread_exit``, whose forced unwind through a noexcept C++ frame aborts the process
    ("terminate called without an active exception", SIGABRT, exit -6 after a run that succeeded; pytorch#190489).
    ``deepspeed.comm.destroy_process_group`` destroys the groups and drops DeepSpeed's own references to them
    (``deepspeed.utils.groups``); the caller must have dropped its engine and model (they hold the expert groups)
    before, which :class:`train.trainer.Trainer`'s ``close`` does. The collection then runs the destructors, which
    wait for each group's queued work and join its threads.
    """
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Not imported here if it was not before: a module imported after the init captures the world group in its
        # default arguments (``group=dist.group.WORLD`` in deepspeed.comm.torch and torch.distributed.nn.functional)
        # and holds it for ever. init_distributed imports both before the init.
        comm = sys.modules.get("deepspeed.comm")
        if comm is not None and comm.is_initialized():
            comm.destroy_process_group()  # also drops deepspeed.utils.groups' references
        else:  # torch.distributed initialised without DeepSpeed
            torch.distributed.destroy_process_group()
    gc.collect()  # the engine and its hooks form reference cycles that hold process groups
    alive = live_comm_threads()
    # A group's last reference can sit in a finished work that a worker thread is still releasing (the destructors
    # then run on that thread, a moment later; seen once in four CI runs, on a short resumed run): poll briefly
    # before calling the threads held. A group that something really holds outlives the grace and is reported.
    deadline = time.monotonic() + grace_seconds
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
        alive = live_comm_threads()
    if alive:
        log.warning("process groups destroyed, but %d communication threads still run (%s): something still holds a "
                    "process group", len(alive), ", ".join(sorted(set(alive))))
    return alive


def live_comm_threads() -> list[str]:
    """Names of this process's gloo threads that are still running (Linux; empty elsewhere)."""
    names = []
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                name = Path(f"/proc/self/task/{task}/comm").read_text().strip()
                if name.startswith(COMM_THREAD_NAMES):
                    names.append(name)
    return names


@contextlib.contextmanager
def distributed(timeout_s: float = 1800.0) -> Iterator[DistInfo]:
    """``init_distributed`` for a ``with`` block that ends with ``shutdown_distributed``. Close what holds process
    groups (the trainer) inside the block."""
    info = init_distributed(timeout_s)
    yield info
    # Not on an exception: a peer may still wait in a collective with this rank, and destroying a group first waits
    # for its queued work, up to the process-group timeout; the process exits non-zero anyway, its launcher ends the
    # others. A user error the block handles (returning an exit code) gets here and shuts down cleanly.
    shutdown_distributed()


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` on rank 0 only and hands its result, or its error, to every rank: no rank is left waiting in a
    collective for a rank 0 that failed. A ValueError / FileNotFoundError stays one (the CLI's one-line errors)."""
    from deepspeed import comm as dist

    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box = [fn(), None]
        except Exception as exc:  # re-raised on every rank below
            box = [None, (type(exc).__name__, str(exc))]
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        kind, message = box[1]
        if kind in ("ValueError", "FileNotFoundError"):
            raise {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}[kind](message)
        raise RuntimeError(f"rank 0: {kind}: {message}")
    return box[0]


def describe(info: DistInfo, environ: Mapping[str, str] | None = None) -> str:
    """One ``key=value`` line: the layout, where it came from, the rendezvous address, and where this process runs."""
    env = os.environ if environ is None else environ
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        master = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    elif info.source == "mpi":
        master = f"mpi4py:{env.get('MASTER_PORT', DEFAULT_MPI_PORT)}"  # rank 0's address, found at init
    elif info.source == "single":
        master = "127.0.0.1:auto"
    else:
        master = "unset"
    node = env.get("SLURMD_NODENAME", "-")
    return (f"condmoe-layout rank={info.rank} world_size={info.world_size} local_rank={info.local_rank} "
            f"source={info.source} master={master} host={socket.gethostname()} slurm_node={node}")


def layout_problems(info: DistInfo, ep_size: int = 1, environ: Mapping[str, str] | None = None) -> list[str]:
    """What would make ``init_distributed`` or expert parallelism fail with this layout (empty when it is usable)."""
    env = os.environ if environ is None else environ
    problems = []
    if not 0 <= info.rank < info.world_size:
        problems.append(f"rank {info.rank} is not in [0, {info.world_size})")
    if info.local_rank < 0 or info.local_rank > info.rank:
        problems.append(f"local rank {info.local_rank} is impossible for rank {info.rank}")
    if info.source in ("env", "slurm"):  # torchrun and the deepspeed launcher set them; for srun, slurm/ does
        problems += [f"{name} is not set: the launcher or the sbatch script must export it"
                     for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
    if info.world_size % ep_size:
        problems.append(f"moe.ep_size={ep_size} does not divide the world size {info.world_size}")
    return problems


def dry_run(ep_size: int = 1, environ: Mapping[str, str] | None = None) -> int:
    """Prints the layout this process would train with (stdout) and any problem (stderr); 0 if usable, else 2.

    What ``condmoe-train --dry-run`` and ``python -m condmoe.train.dist`` run instead of training.
    """
    info = detect(environ)
    # One write per line: ranks of one mpirun share its stdout, and print() writes the text and the newline
    # separately, so two ranks' lines could run together (seen in CI).
    sys.stdout.write(describe(info, environ) + "\n")
    sys.stdout.flush()
    problems = layout_problems(info, ep_size, environ)
    for problem in problems:
        print(f"condmoe-layout: error: rank {info.rank}: {problem}", file=sys.stderr, flush=True)
    return 2 if problems else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m condmoe.train.dist [--config FILE [key.sub=value ...]]``: takes ``python -m condmoe.train``'s
    arguments, so that a launch command becomes a dry run by changing the module; with a config it also checks
    moe.ep_size."""
    parser = argparse.ArgumentParser(prog="python -m condmoe.train.dist", description="Print the rank layout this "
                                     "process would train with (no initialisation, no training).")
    parser.add_argument("--config", help="also check that the config's moe.ep_size divides the world size")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    # The deepspeed launcher appends --local_rank; the layout is read from the environment, as in training.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.overrides and not args.config:
        parser.error(f"overrides {args.overrides} without --config")
    ep_size = 1
    if args.config:
        from condmoe.train.config import load_config

        try:
            cfg = load_config(args.config, args.overrides)
        except (ValueError, FileNotFoundError) as exc:
            print(f"condmoe-layout: error: {exc}", file=sys.stderr)
            return 2
        ep_size = cfg.moe.ep_size if cfg.moe.num_experts else 1
    return dry_run(ep_size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
