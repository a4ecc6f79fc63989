"""Checkpoints: DeepSpeed's own (ZeRO optimizer shards, one file per global expert), pruning, and a plain reader.

Layout under ``<output_dir>/checkpoints``: one ``step_<N>`` directory per checkpoint and DeepSpeed's ``latest`` file,
which DeepSpeed rewrites only after every rank finished writing that checkpoint.
"""

import re
import shutil
from pathlib import Path

import torch
from deepspeed import comm as dist

TAG = re.compile(r"^step_(\d+)$")
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
DS_EXPERTS = ".deepspeed_moe.experts.deepspeed_experts."


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def save(engine, output_dir: str | Path, step: int, keep_last: int) -> Path:
    """Saves on every rank (each writes its ZeRO shard and its experts), then rank 0 prunes old checkpoints."""
    ckpt_dir = checkpoint_dir(output_dir)
    tag = f"step_{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    dist.barrier()
    if dist.get_rank() == 0:
        tags = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := TAG.match(p.name)) and p.is_dir())
        for _, path in tags[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    return ckpt_dir / tag


def resume(engine, output_dir: str | Path, resume_from: str) -> int:
    """Loads model, ZeRO optimizer, scheduler and experts; returns the step to continue from (0 if fresh)."""
    if resume_from == "none":
        return 0
    if resume_from == "auto":
        ckpt_dir, tag = checkpoint_dir(output_dir), None
        if latest_tag(ckpt_dir) is None:
            return 0
    else:
        path = Path(resume_from)
        if not path.is_dir():
            raise FileNotFoundError(f"run.resume={resume_from}: no such checkpoint directory")
        ckpt_dir, tag = (path.parent, path.name) if TAG.match(path.name) else (path, None)
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise FileNotFoundError(f"run.resume={resume_from}: DeepSpeed found no checkpoint in {ckpt_dir}")
    return int(client_state["step"])


def load_plain_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A DeepSpeed MoE checkpoint as the state dict of the plain model (all experts, no DeepSpeed needed).

    ``path`` is a checkpoint directory (``.../step_N``) or the checkpoints folder (then ``latest`` is used). Expert
    files are stored per global expert, so the result does not depend on the ep_size the checkpoint was written with.
    """
    path = Path(path)
    if not (path / "mp_rank_00_model_states.pt").is_file():
        tag = latest_tag(path)
        if tag is None:
            raise FileNotFoundError(f"{path}: neither a checkpoint (mp_rank_00_model_states.pt) nor a folder with one")
        path = path / tag
    states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    merged = dict(states["module"])
    for file in sorted(path.iterdir()):
        if EXPERT_FILE.match(file.name):
            merged.update(torch.load(file, map_location="cpu", weights_only=False))
    # Expert keys already carry global expert ids; drop the DeepSpeed wrapper level everywhere.
    return {key.replace(".deepspeed_moe.", "."): value for key, value in merged.items()}
