"""Tier 1: rank layout detection from launcher, SLURM and MPI variables."""

from condmoe.train.dist import detect


def test_launcher_variables_win_over_slurm():
    # Under the deepspeed launcher inside SLURM, SLURM_PROCID is the node index: RANK must win.
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    info = detect(env)
    assert (info.rank, info.local_rank, info.world_size, info.source) == (5, 1, 8, "env")


def test_slurm_one_task_per_gpu():
    info = detect({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"})
    assert (info.rank, info.local_rank, info.world_size, info.source) == (3, 1, 4, "slurm")
    assert not info.is_main


def test_mpi_and_single_process():
    info = detect({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})
    assert (info.rank, info.world_size, info.source) == (1, 2, "mpi")
    info = detect({"PMI_RANK": "0", "PMI_SIZE": "2"})
    assert (info.rank, info.world_size, info.source) == (0, 2, "mpi")
    info = detect({})
    assert (info.rank, info.world_size, info.source, info.is_main) == (0, 1, "single", True)
