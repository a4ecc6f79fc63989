"""Checkpoints: DeepSpeed's own (ZeRO optimizer shards, one file per global expert), committed atomically, pruned,
and read back as a plain state dict. Which checkpoint a run resumes from, and how, is ``train.resume``'s.

Layout under ``<output_dir>/checkpoints``: one ``step_<N>`` directory per checkpoint and a ``latest`` file. A
checkpoint counts only once it is committed: after every rank finished writing, rank 0 writes ``step_<N>/condmoe.json``
(the layout it was written with) and then replaces ``latest`` atomically. DeepSpeed's own ``latest`` is not used: its
rank 0 writes it before the other ranks are known to be done, so a rank killed mid-save could leave ``latest``
pointing at a torn checkpoint.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from deepspeed import comm as dist

from condmoe.models.ds_moe import plain_name
from condmoe.train.dist import on_rank0

TAG = re.compile(r"^step_(\d+)$")
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
MARKER = "condmoe.json"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_layout(path: str | Path) -> dict:
    """The committed checkpoint's record: step, world size, ep_size, ZeRO stage and each rank's expert group ranks."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER}: its save never finished)")
    return json.loads(marker.read_text())


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag ``latest`` names if that checkpoint is committed, else the newest committed one (None if none is)."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if latest.is_file() and is_complete(ckpt_dir / latest.read_text().strip()):
        return latest.read_text().strip()
    committed = sorted((int(m.group(1)), p.name) for p in ckpt_dir.glob("step_*") if (m := TAG.match(p.name))
                       and is_complete(p)) if ckpt_dir.is_dir() else []
    return committed[-1][1] if committed else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, output_dir: str | Path, step: int, keep_last: int, layout: dict) -> Path:
    """Saves on every rank (each writes its ZeRO shard and its experts), commits, then prunes old checkpoints.

    ``layout`` is this rank's part of the record (its expert-parallel and expert-data-parallel ranks, and optionally
    its task streams' positions); the record of every rank goes into ``condmoe.json``.
    """
    ckpt_dir = checkpoint_dir(output_dir)
    tag = f"step_{step}"
    path = ckpt_dir / tag
    # A torn save of this step by an earlier, killed run: never mix its files in.
    on_rank0(lambda: shutil.rmtree(path) if path.exists() else None)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, layout)  # also a barrier: every rank has written its files

    def commit() -> None:
        record = {"step": step, "world_size": len(ranks), "zero_stage": engine.zero_optimization_stage(),
                  "ep_size": ranks[0]["ep_size"], "num_experts": ranks[0]["num_experts"],
                  "ranks": [{key: r[key] for key in ("ep_rank", "expert_dp_rank", "stream_positions") if key in r}
                            for r in ranks]}
        if "expert_usage_ema" in ranks[0]:
            record["expert_usage_ema"] = ranks[0]["expert_usage_ema"]
        _write_atomic(path / MARKER, json.dumps(record, indent=1) + "\n")
        _write_atomic(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, step, keep_last)

    on_rank0(commit)
    return path


def _prune(ckpt_dir: Path, latest_step: int, keep_last: int) -> None:
    """Keeps the ``keep_last`` newest committed checkpoints up to the latest (the latest always among them); deletes
    older committed ones and torn ones older than the latest. Newer ones (another timeline of this folder, e.g. a run
    restarted with run.resume=none) are left alone. A deleted checkpoint loses its marker first."""
    tags = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := TAG.match(p.name)) and p.is_dir())
    complete = [p for step, p in tags if step <= latest_step and is_complete(p)]
    for path in complete[:-keep_last]:
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    for step, path in tags:
        if step < latest_step and not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)


def find(output_dir: str | Path, resume_from: str) -> Path | None:
    """The checkpoint ``run.resume`` names: ``auto`` (the latest committed one, None if there is none), ``none``, or a
    path to a ``step_N`` directory or to a checkpoints folder (its latest)."""
    if resume_from == "none":
        return None
    if resume_from == "auto":
        ckpt_dir = checkpoint_dir(output_dir)
        tag = latest_tag(ckpt_dir)
        return ckpt_dir / tag if tag else None
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(f"run.resume={resume_from}: no such checkpoint directory")
    if not TAG.match(path.name) and not is_complete(path):
        tag = latest_tag(path)
        if tag is None:
            raise FileNotFoundError(f"run.resume={resume_from}: no committed checkpoint in this folder")
        path = path / tag
    if not is_complete(path):
        raise FileNotFoundError(f"run.resume={resume_from}: not a complete checkpoint (no {MARKER}: its save never "
                                "finished)")
    return path


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
    return {plain_name(key): value for key, value in merged.items()}
