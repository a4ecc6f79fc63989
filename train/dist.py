"""Who am I in the job: rank detection from torchrun / the deepspeed launcher, SLURM or MPI, then init.

The launcher's RANK/WORLD_SIZE always win: under the ``deepspeed`` launcher inside SLURM, SLURM_PROCID is the node
index, not the rank, so SLURM variables are only read when RANK is absent (one ``srun`` task per process).
"""

import os
from dataclasses import dataclass

import deepspeed


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    source: str  # which variables gave the layout: "env", "slurm", "mpi" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(environ: os._Environ | dict[str, str] | None = None) -> DistInfo:
    """Reads the process layout from the environment without touching it."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "env")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), "slurm")
    if "OMPI_COMM_WORLD_RANK" in env:
        return DistInfo(int(env["OMPI_COMM_WORLD_RANK"]), int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                        int(env["OMPI_COMM_WORLD_SIZE"]), "mpi")
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return DistInfo(int(env["PMI_RANK"]), int(env.get("MPI_LOCALRANKID", 0)), int(env["PMI_SIZE"]), "mpi")
    return DistInfo(0, 0, 1, "single")


def init_distributed(timeout_minutes: int = 30) -> DistInfo:
    """Initialises torch.distributed through DeepSpeed for any launcher and returns the layout.

    torchrun and the deepspeed launcher export RANK/MASTER_*; SLURM tasks get them mapped here (MASTER_ADDR and
    MASTER_PORT must come from the sbatch script); MPI launches go through DeepSpeed's mpi4py discovery.
    A single process without a launcher gets a one-rank group on localhost.
    """
    import datetime

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
    deepspeed.init_distributed(auto_mpi_discovery=info.source == "mpi",
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(deepspeed.comm.get_rank(), info.local_rank, deepspeed.comm.get_world_size(), info.source)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
