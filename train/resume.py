"""Where a run continues from: the checkpoint ``run.resume`` names, loaded as DeepSpeed wrote it when its layout is
this run's, resharded (``train.reshard``) when the world size or ep_size differ."""

from pathlib import Path

from deepspeed import comm as dist

from condmoe.train import checkpoint, reshard
from condmoe.train.checkpoint import RankLayout, Record
from condmoe.train.dist import on_rank0


def resume(engine, output_dir: str | Path, resume_from: str, layout: RankLayout) -> tuple[int, Record | None]:
    """Loads model, optimizer, scheduler and experts.

    Written with the same world size and ep_size: DeepSpeed loads its own files (exact). Otherwise the checkpoint is
    first turned into a layout-free copy (``train.reshard``) and every rank takes its part of it.

    Args:
        engine: this run's DeepSpeed engine.
        output_dir: this run's folder (``auto`` looks in its checkpoints; a reshard writes its copy there).
        resume_from: ``run.resume``: ``auto``, ``none`` or a checkpoint path (``checkpoint.find``).
        layout: this rank's place in expert parallelism.

    Returns:
        The step to continue from (0 if fresh) and the checkpoint's record, whose states the caller restores (None if
        fresh).
    """
    # Rank 0 decides; every rank must then see that checkpoint (one shared filesystem for all nodes).
    path = on_rank0(lambda: checkpoint.find(output_dir, resume_from))
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, path is None or checkpoint.is_complete(path))
    if not all(seen):
        blind = [rank for rank, ok in enumerate(seen) if not ok]
        raise FileNotFoundError(f"rank(s) {blind} cannot see {path}: checkpoints must be on a filesystem that every "
                                "node shares")
    if path is None:
        return 0, None
    record = checkpoint.read(path)
    if (record.layout.world_size, record.layout.ep_size) != (dist.get_world_size(), layout.ep_size):
        return reshard.resume(engine, path, record, checkpoint.checkpoint_dir(output_dir)), record
    return checkpoint.load(engine, path), record
