"""Checkpoints: DeepSpeed's own (ZeRO optimizer shards, one file per global expert), committed atomically with a
typed record of their layout and of the run's other stateful parts, pruned, found, and read back. Whether a run
loads a checkpoint as written or reshards it is ``train.resume``'s.

Layout under ``<output_dir>/checkpoints``: one ``step_<N>`` directory per checkpoint and a ``latest`` file. A
checkpoint counts only once it is committed: after every rank finished writing, rank 0 writes ``step_<N>/condmoe.json``
(a ``Record``: the layout it was written with and the named states of the stateful parts) and then replaces
``latest`` atomically. DeepSpeed's own ``latest`` is not used: its rank 0 writes it before the other ranks are known to
be done, so a rank killed mid-save could leave ``latest`` pointing at a torn checkpoint.

``condmoe.json`` (format 2; format 1, written before the format had a number, is the same without ``format`` and
``trainer``)::

    {"format": 2, "step": 6, "world_size": 2, "zero_stage": 2, "ep_size": 2, "num_experts": 4,
     "ranks": [{"ep_rank": 0, "expert_dp_rank": 0, "stream_positions": [4, 2]}, ...],   # + each rank's own states
     "expert_usage_ema": {"share": ..., "started": ...}, "trainer": {"skipped_micro_steps": 0}}  # + shared states

A state is kept under its part's name: in each rank's entry for the parts that differ by rank, at the top for those
that are the same on every rank (rank 0's is written). ``Record.to_json`` and ``Record.from_json`` are the only code
that knows these keys.
"""

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from deepspeed import comm as dist

from condmoe.models.ds_moe import plain_name
from condmoe.train.dist import on_rank0

TAG = re.compile(r"^step_(\d+)$")
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
MARKER = "condmoe.json"
FORMAT = 2  # of condmoe.json; 1 is the unnumbered format before it

# The keys of condmoe.json that are the layout (the rest are states, under their parts' names).
LAYOUT_KEYS = ("format", "step", "world_size", "zero_stage", "ep_size", "num_experts", "ranks")
RANK_KEYS = ("ep_rank", "expert_dp_rank")


@runtime_checkable
class Stateful(Protocol):
    """A part of the run whose state a checkpoint carries (a JSON-serialisable dict, as ``nn.Module``'s API)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# A part as ``save`` takes it: its ``state_dict()`` is written, or the value itself if it is plain JSON already.
Part = Stateful | dict[str, Any] | list[Any] | int | float | str


@dataclass(frozen=True)
class RankLayout:
    """One rank's place in expert parallelism (``models.ds_moe.expert_layout``)."""

    ep_size: int
    num_experts: int  # per MoE layer, over all ranks (0: a dense model)
    ep_rank: int  # in its expert-parallel group: which experts it holds
    expert_dp_rank: int  # in its expert-data-parallel group: which ZeRO partition of those experts


@dataclass(frozen=True)
class Layout:
    """How a checkpoint's files are split: what decides whether a run can load them as DeepSpeed wrote them."""

    world_size: int
    zero_stage: int
    ranks: tuple[RankLayout, ...]  # by global rank

    def __post_init__(self) -> None:
        assert len(self.ranks) == self.world_size, (len(self.ranks), self.world_size)
        assert len({(r.ep_size, r.num_experts) for r in self.ranks}) == 1, "the ranks disagree on ep_size or experts"

    @property
    def ep_size(self) -> int:
        return self.ranks[0].ep_size

    @property
    def num_experts(self) -> int:
        return self.ranks[0].num_experts


@dataclass(frozen=True)
class Record:
    """What ``condmoe.json`` holds: the step, the layout and the named states of the stateful parts."""

    step: int
    layout: Layout
    states: dict[str, Any] = field(default_factory=dict)  # parts that are the same on every rank (rank 0's)
    rank_states: tuple[dict[str, Any], ...] = ()  # each rank's own parts, by global rank (empty: none saved)

    def __post_init__(self) -> None:
        assert not set(self.states) & set(LAYOUT_KEYS), f"state names {sorted(self.states)} shadow layout keys"
        assert all(not set(r) & set(RANK_KEYS) for r in self.rank_states), "rank state names shadow layout keys"
        assert len(self.rank_states) in (0, self.layout.world_size), "rank states of some ranks only"

    def load_states(self, parts: Mapping[str, Stateful]) -> None:
        """Restores each part from its state in ``states``; a part this checkpoint has no state of (one written before
        the part was checkpointed) keeps its own."""
        for name, part in parts.items():
            if name in self.states:
                part.load_state_dict(self.states[name])

    def rank_state(self, rank: int, name: str) -> Any | None:
        """The state ``name`` of rank ``rank``'s part (None if the checkpoint has none)."""
        return self.rank_states[rank].get(name) if self.rank_states else None

    def to_json(self) -> dict[str, Any]:
        layout = self.layout
        ranks = [{"ep_rank": r.ep_rank, "expert_dp_rank": r.expert_dp_rank} for r in layout.ranks]
        for entry, states in zip(ranks, self.rank_states):
            entry.update(states)
        return {"format": FORMAT, "step": self.step, "world_size": layout.world_size, "zero_stage": layout.zero_stage,
                "ep_size": layout.ep_size, "num_experts": layout.num_experts, "ranks": ranks, **self.states}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "Record":
        """Reads format 2 and format 1 (which is format 2 without ``format``); raises ValueError or KeyError."""
        if not isinstance(record, dict):
            raise ValueError(f"a JSON object was expected, not {type(record).__name__}")
        version = record.get("format", 1)
        if version not in (1, FORMAT):
            raise ValueError(f"format {version!r} is not one this condmoe reads (1..{FORMAT}): written by a newer one?")
        ep_size, num_experts = _int(record, "ep_size"), _int(record, "num_experts")
        entries = record["ranks"]
        if not isinstance(entries, list) or len(entries) != _int(record, "world_size"):
            raise ValueError(f"'ranks' must list world_size={record['world_size']} ranks")
        ranks = tuple(RankLayout(ep_size, num_experts, _int(e, "ep_rank"), _int(e, "expert_dp_rank")) for e in entries)
        rank_states = tuple({k: v for k, v in e.items() if k not in RANK_KEYS} for e in entries)
        return cls(step=_int(record, "step"), layout=Layout(len(ranks), _int(record, "zero_stage"), ranks),
                   states={k: v for k, v in record.items() if k not in LAYOUT_KEYS},
                   rank_states=rank_states if any(rank_states) else ())


def _int(record: dict[str, Any], key: str) -> int:
    value = record[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key!r} must be an integer, not {value!r}")
    return value


def _as_json(part: Part) -> Any:
    return part.state_dict() if isinstance(part, Stateful) else part


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read(path: str | Path) -> Record:
    """The committed checkpoint's record. Raises FileNotFoundError if it was never committed, ValueError naming
    ``condmoe.json`` if that cannot be read."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER}: its save never finished)")
    try:
        return Record.from_json(json.loads(marker.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # JSONDecodeError is a ValueError; a missing key is a KeyError, whose message is just the key
        reason = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"{marker}: unreadable checkpoint record: {' '.join(reason.split())}") from exc


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


def save(engine, output_dir: str | Path, step: int, keep_last: int, layout: RankLayout,
         states: Mapping[str, Part] | None = None, rank_states: Mapping[str, Part] | None = None) -> Path:
    """Saves on every rank (each writes its ZeRO shard and its experts), commits, then prunes old checkpoints.

    Args:
        engine: the DeepSpeed engine (model, optimizer, schedule).
        output_dir: the run's folder; the checkpoint goes to ``checkpoints/step_<step>`` in it.
        step: steps done.
        keep_last: how many committed checkpoints to keep.
        layout: this rank's place in expert parallelism.
        states: parts that are the same on every rank, by name (rank 0's are written).
        rank_states: this rank's own parts, by name (every rank's are written).

    Returns:
        The checkpoint's directory.
    """
    ckpt_dir = checkpoint_dir(output_dir)
    tag = f"step_{step}"
    path = ckpt_dir / tag
    # A torn save of this step by an earlier, killed run: never mix its files in.
    on_rank0(lambda: shutil.rmtree(path) if path.exists() else None)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    mine = (layout, {name: _as_json(part) for name, part in (rank_states or {}).items()})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)  # also a barrier: every rank has written its files

    def commit() -> None:
        record = Record(step=step,
                        layout=Layout(len(gathered), engine.zero_optimization_stage(), tuple(r for r, _ in gathered)),
                        states={name: _as_json(part) for name, part in (states or {}).items()},
                        rank_states=tuple(s for _, s in gathered) if rank_states else ())
        _write_atomic(path / MARKER, json.dumps(record.to_json(), indent=1) + "\n")
        _write_atomic(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, step, keep_last)

    on_rank0(commit)
    return path


def load(engine, path: Path) -> int:
    """Loads a checkpoint written with this run's layout into ``engine`` as DeepSpeed wrote it (exact); returns its
    step."""
    load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise FileNotFoundError(f"{path}: DeepSpeed found no checkpoint there")
    return int(client_state["step"])


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
