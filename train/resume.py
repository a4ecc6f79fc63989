"""Where a run continues from: the checkpoint ``run.resume`` names, loaded as DeepSpeed wrote it when the layout is
the same, resharded (``train.reshard``) when the world size or ep_size differ."""

from pathlib import Path

from deepspeed import comm as dist

from condmoe.train import reshard
from condmoe.train.checkpoint import checkpoint_dir, find, is_complete, read_layout
from condmoe.train.dist import on_rank0


def resume(engine, output_dir: str | Path, resume_from: str, layout: dict) -> tuple[int, dict | None]:
    """Loads model, optimizer, scheduler and experts; returns the step to continue from (0 if fresh) and the
    checkpoint's ``condmoe.json`` record (None if fresh).

    Written with the same world size and ep_size: DeepSpeed loads its own files (exact). Otherwise the checkpoint is
    first turned into a layout-free copy (``train.reshard``) and every rank takes its part of it.
    """
    # Rank 0 decides; every rank must then see that checkpoint (one shared filesystem for all nodes).
    path = on_rank0(lambda: find(output_dir, resume_from))
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, path is None or is_complete(path))
    if not all(seen):
        blind = [rank for rank, ok in enumerate(seen) if not ok]
        raise FileNotFoundError(f"rank(s) {blind} cannot see {path}: checkpoints must be on a filesystem that every "
                                "node shares")
    if path is None:
        return 0, None
    record = read_layout(path)
    if (record["world_size"], record["ep_size"]) != (dist.get_world_size(), layout["ep_size"]):
        return reshard.resume(engine, path, record, checkpoint_dir(output_dir)), record
    load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise FileNotFoundError(f"run.resume={resume_from}: DeepSpeed found no checkpoint in {path}")
    return int(client_state["step"]), record
