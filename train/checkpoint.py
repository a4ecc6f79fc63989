"""Checkpoints: DeepSpeed's own (ZeRO optimizer shards, one file per global expert), committed atomically with a
typed record of their layout and of the run's other stateful parts, pruned, found, and read back. Whether a run
loads a checkpoint as written or reshards it is ``train.resume``'s.

Layout under ``<output_dir>/checkpoints``: one ``step_<N>`` directory per checkpoint and a ``latest`` file. A
checkpoint counts only once it is committed: after every rank finished writing, rank 0 writes ``step_<N>/condmoe.json``
(a ``Record``: the layout it was written with and the named states of the stateful parts) and then replaces
``latest`` atomically. DeepSpeed's own ``latest`` is not used: its rank 0 writes it before the other ranks are known to
be done, so a rank killed mid-save could leave ``latest`` pointing at a torn checkpoint.

``condmoe.json`` (format 3; format 2 is the same without ``files``, format 1, written before the format had a number,
also without ``format`` and ``trainer``)::

    {"format": 3, "step": 6, "world_size": 2, "zero_stage": 2, "ep_size": 2, "num_experts": 4,
     "ranks": [{"ep_rank": 0, "expert_dp_rank": 0, "stream_positions": [4, 2]}, ...],   # + each rank's own states
     "files": {"mp_rank_00_model_states.pt": {"size": 620880, "sha256": "9f2c..."}, ...},  # every file but this one
     "expert_usage_ema": {"share": ..., "started": ...}, "trainer": {"skipped_micro_steps": 0}}  # + shared states

A state is kept under its part's name: in each rank's entry for the parts that differ by rank, at the top for those
that are the same on every rank (rank 0's is written). ``Record.to_json`` and ``Record.from_json`` are the only code
that knows these keys.

Integrity: before anything loads a checkpoint, ``verify`` compares every file with its size and sha256 in ``files``
and unpickles every ``.pt`` file with ``weights_only=True`` and ``allowed_globals`` (tensors, plain data and the three
DeepSpeed types its files hold), so a file that would run code when unpickled is refused before DeepSpeed's loader,
which unpickles with ``weights_only=False``, reads it. ``find`` falls back to the newest committed checkpoint that
verifies.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from deepspeed import comm as dist

from condmoe.models.ds_moe import plain_name
from condmoe.train.dist import on_rank0

log = logging.getLogger("condmoe.checkpoint")

TAG = re.compile(r"^step_(\d+)$")
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
MARKER = "condmoe.json"
FORMAT = 3  # of condmoe.json; 2 had no checksums, 1 is the unnumbered format before it

# The keys of condmoe.json that are the layout and the file sums (the rest are states, under their parts' names).
LAYOUT_KEYS = ("format", "step", "world_size", "zero_stage", "ep_size", "num_experts", "ranks", "files")
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
class FileSum:
    """A checkpoint file as committed: its size in bytes and the sha256 of its bytes (hex)."""

    size: int
    sha256: str


@dataclass(frozen=True)
class Record:
    """What ``condmoe.json`` holds: the step, the layout and the named states of the stateful parts."""

    step: int
    layout: Layout
    states: dict[str, Any] = field(default_factory=dict)  # parts that are the same on every rank (rank 0's)
    rank_states: tuple[dict[str, Any], ...] = ()  # each rank's own parts, by global rank (empty: none saved)
    files: dict[str, FileSum] | None = None  # every file of the checkpoint but condmoe.json (None: before format 3)

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
        files = {} if self.files is None else {"files": {name: {"size": s.size, "sha256": s.sha256}
                                                         for name, s in sorted(self.files.items())}}
        return {"format": FORMAT, "step": self.step, "world_size": layout.world_size, "zero_stage": layout.zero_stage,
                "ep_size": layout.ep_size, "num_experts": layout.num_experts, "ranks": ranks, **files, **self.states}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "Record":
        """Reads formats 3, 2 (3 without ``files``) and 1 (2 without ``format``); raises ValueError or KeyError."""
        if not isinstance(record, dict):
            raise ValueError(f"a JSON object was expected, not {type(record).__name__}")
        version = record.get("format", 1)
        if version not in range(1, FORMAT + 1) or isinstance(version, bool):
            raise ValueError(f"format {version!r} is not one this condmoe reads (1..{FORMAT}): written by a newer one?")
        ep_size, num_experts = _int(record, "ep_size"), _int(record, "num_experts")
        entries = record["ranks"]
        if not isinstance(entries, list) or len(entries) != _int(record, "world_size"):
            raise ValueError(f"'ranks' must list world_size={record['world_size']} ranks")
        ranks = tuple(RankLayout(ep_size, num_experts, _int(e, "ep_rank"), _int(e, "expert_dp_rank")) for e in entries)
        rank_states = tuple({k: v for k, v in e.items() if k not in RANK_KEYS} for e in entries)
        files = record.get("files")
        if files is not None and not isinstance(files, dict):
            raise ValueError(f"'files' must map file names to their size and sha256, not {files!r}")
        return cls(step=_int(record, "step"), layout=Layout(len(ranks), _int(record, "zero_stage"), ranks),
                   states={k: v for k, v in record.items() if k not in LAYOUT_KEYS},
                   rank_states=rank_states if any(rank_states) else (),
                   files=None if files is None else {name: _file_sum(name, s) for name, s in files.items()})


def _file_sum(name: str, entry: Any) -> FileSum:
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise ValueError(f"files[{name!r}] must hold a size and a sha256, not {entry!r}")
    return FileSum(_int(entry, "size"), entry["sha256"])


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


def committed_tags(ckpt_dir: str | Path) -> list[str]:
    """The committed checkpoints in ``ckpt_dir``, newest (highest step) first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = sorted(((int(m.group(1)), p.name) for p in ckpt_dir.iterdir() if (m := TAG.match(p.name))
                    and is_complete(p)), reverse=True)
    return [tag for _, tag in steps]


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag ``latest`` names if that checkpoint is committed, else (with a warning if ``latest`` names another)
    the newest committed one (None if none is)."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    named = latest.read_text().strip() if latest.is_file() else None
    if named and TAG.match(named) and is_complete(ckpt_dir / named):
        return named
    tags = committed_tags(ckpt_dir)
    if named is not None:
        log.warning("%s names %r, which is not a committed checkpoint: using the newest committed one, %s", latest,
                    named, tags[0] if tags else "none")
    return tags[0] if tags else None


# Integrity: the files' sizes and sha256 in the record, and a weights_only=True unpickling of every .pt file.

HASH_THREADS = min(8, os.cpu_count() or 1)  # hashlib and file reads release the GIL: threads read in parallel


def allowed_globals() -> list[type]:
    """The classes besides tensors and plain data that DeepSpeed's checkpoint files hold (its optimizer shards of
    ZeRO-1/2/3, fp32 and bf16; module and expert files hold none): what a ``weights_only=True`` load may construct."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # fragment_address: the (numel, start) of each parameter's slice in the shard (param_slice_mappings);
    # LossScaler: the static loss scaler fp32/bf16 runs save (loss_scaler); ZeroStageEnum: the stage (zero_stage).
    return [fragment_address, LossScaler, ZeroStageEnum]


def _one_line(exc: BaseException) -> str:
    """What a failed torch.load says, on one line: the global a weights_only load refused, else its first line."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(exc).__name__]
    if not lines[0].startswith("Weights only load failed"):
        return lines[0]
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        allowed = ", ".join(t.__qualname__ for t in allowed_globals())
        return f"refused to unpickle {refused.group(1)} (a checkpoint may hold tensors, plain data and {allowed})"
    detail = next((line for line in lines[1:] if not line.startswith("Check the documentation")), "")
    return f"refused by weights_only=True: {detail}"


def _unpickle(file: Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU; call it inside ``safe_globals(allowed_globals())``. Raises
    ValueError naming ``file`` if it is not a torch file or holds anything else."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(file))
    except Exception as exc:  # a crafted or damaged pickle can raise anything: the file is bad, say which
        raise ValueError(f"{file}: {_one_line(exc)}") from exc


def safe_load(file: str | Path, mmap: bool = False) -> Any:
    """A checkpoint file's contents, unpickled with ``weights_only=True`` and the allow-list: no code runs."""
    with torch.serialization.safe_globals(allowed_globals()):
        return _unpickle(Path(file), mmap)


def _parallel(fn: Callable[[Path], Any], files: Iterable[Path]) -> list[Any]:
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(fn, files))


def _sum(file: Path) -> FileSum:
    with file.open("rb", buffering=0) as f:
        digest = hashlib.file_digest(f, "sha256")  # reads to the end: the position is the size that was hashed
        return FileSum(f.tell(), digest.hexdigest())


def data_files(path: str | Path) -> list[str]:
    """The names of a checkpoint's files: all but the record and hidden temporary files."""
    return sorted(p.name for p in Path(path).iterdir() if p.is_file() and p.name != MARKER
                  and not p.name.startswith("."))


def file_sums(path: str | Path, names: Iterable[str]) -> dict[str, FileSum]:
    """The size and sha256 of each of the files ``names`` in ``path``, hashed in parallel."""
    names = list(names)
    return dict(zip(names, _parallel(_sum, [Path(path) / name for name in names])))


def verify(path: str | Path, names: Iterable[str] | None = None) -> bool:
    """Checks a committed checkpoint before anything reads it: the files its record lists are there and no other,
    each of ``names`` (default: all) has its recorded size and sha256, and every one of them that is a ``.pt`` file
    unpickles with ``weights_only=True`` and the allow-list (so DeepSpeed's own loader, which unpickles anything,
    never reads a file that would run code). Returns False if the record predates checksums (only the unpickling
    was checked). Raises ValueError naming the first bad file, FileNotFoundError if it was never committed."""
    path = Path(path)
    record = read(path)
    present = data_files(path)
    chosen = sorted(present if names is None else set(names))
    if record.files is not None:
        missing = sorted(set(record.files) - set(present)) + sorted(set(chosen) - set(present))
        if missing:
            raise ValueError(f"{path / missing[0]}: missing (the checkpoint's {MARKER} lists it)")
        extra = sorted(set(present) - set(record.files))
        if extra:
            raise ValueError(f"{path / extra[0]}: not one of the checkpoint's files ({MARKER} does not list it)")
        for name in chosen:
            if (size := (path / name).stat().st_size) != record.files[name].size:
                raise ValueError(f"{path / name}: {size} bytes, {record.files[name].size} when committed (truncated "
                                 "or overwritten)")
        for name, got in file_sums(path, chosen).items():
            if got.sha256 != record.files[name].sha256:
                raise ValueError(f"{path / name}: sha256 {got.sha256[:12]}..., {record.files[name].sha256[:12]}... "
                                 "when committed (corrupted)")
    with torch.serialization.safe_globals(allowed_globals()):  # entered once: the allow-list is process-wide
        _parallel(lambda file: _unpickle(file, mmap=True), [path / n for n in chosen if n.endswith(".pt")])
    return record.files is not None


_UNVERIFIABLE: set[Path] = set()  # checkpoints without checksums this process has warned about


def check(path: str | Path, names: Iterable[str] | None = None) -> None:
    """``verify``, with one warning (once per checkpoint and process: a reshard or an evaluation reads it again) if
    the checkpoint was committed before checksums and so cannot be verified."""
    if not verify(path, names) and (resolved := Path(path).resolve()) not in _UNVERIFIABLE:
        _UNVERIFIABLE.add(resolved)
        log.warning("%s was committed without checksums (%s before format 3): its files cannot be verified, only "
                    "their unpickling with weights_only=True was checked", path, MARKER)


def newest_verified(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint to resume from in ``ckpt_dir``: the one ``latest`` names, else the newest committed one, that
    verifies; each one whose files fail is skipped with a warning naming the bad file. None if none is committed; a
    ValueError if none of those verifies or a record cannot be read."""
    ckpt_dir = Path(ckpt_dir)
    first = latest_tag(ckpt_dir)
    tags = [first] + [tag for tag in committed_tags(ckpt_dir) if tag != first] if first else []
    failures = []
    for tag in tags:
        read(ckpt_dir / tag)  # an unreadable record (cut short, a newer format) stops the run: it is not a bad file
        try:
            check(ckpt_dir / tag)
            return ckpt_dir / tag
        except ValueError as exc:
            failures.append(str(exc))
            log.warning("skipping %s: %s", tag, exc)
    if failures:
        raise ValueError(f"{ckpt_dir}: no committed checkpoint verifies ({'; '.join(failures)})")
    return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, output_dir: str | Path, step: int, keep_last: int, layout: RankLayout,
         states: Mapping[str, Part] | None = None, rank_states: Mapping[str, Part] | None = None,
         rank_files: Callable[[Path], None] | None = None) -> Path:
    """Saves on every rank (each writes its ZeRO shard and its experts), commits, then prunes old checkpoints.

    Args:
        engine: the DeepSpeed engine (model, optimizer, schedule).
        output_dir: the run's folder; the checkpoint goes to ``checkpoints/step_<step>`` in it.
        step: steps done.
        keep_last: how many committed checkpoints to keep.
        layout: this rank's place in expert parallelism.
        states: parts that are the same on every rank, by name (rank 0's are written).
        rank_states: this rank's own parts, by name (every rank's are written).
        rank_files: writes this rank's own files into the checkpoint directory (the EMA), hashed with the rest.

    Returns:
        The checkpoint's directory.
    """
    ckpt_dir = checkpoint_dir(output_dir)
    tag = f"step_{step}"
    path = ckpt_dir / tag
    # A torn save of this step by an earlier, killed run: never mix its files in.
    on_rank0(lambda: shutil.rmtree(path) if path.exists() else None)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    if rank_files is not None:
        rank_files(path)
    dist.barrier()  # every rank has written its files: each now hashes its share of them
    rank, world_size = dist.get_rank(), dist.get_world_size()
    sums = file_sums(path, data_files(path)[rank::world_size])
    mine = (layout, {name: _as_json(part) for name, part in (rank_states or {}).items()}, sums)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)

    def commit() -> None:
        hashed = {name: s for _, _, sums in gathered for name, s in sums.items()}
        names = data_files(path)  # what rank 0 sees; a file another rank did not list yet is hashed here
        hashed.update(file_sums(path, [name for name in names if name not in hashed]))
        ranks = tuple(r for r, _, _ in gathered)
        record = Record(step=step, layout=Layout(len(gathered), engine.zero_optimization_stage(), ranks),
                        states={name: _as_json(part) for name, part in (states or {}).items()},
                        rank_states=tuple(s for _, s, _ in gathered) if rank_states else (),
                        files={name: hashed[name] for name in names})
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
    """The checkpoint ``run.resume`` names, verified (``verify``): ``auto`` (the latest committed one that verifies,
    falling back to older ones with a warning; None if there is none), ``none``, a checkpoints folder (the same, in
    that folder) or a path to a ``step_N`` directory (which must verify: no fallback for a checkpoint named)."""
    if resume_from == "none":
        return None
    if resume_from == "auto":
        return newest_verified(checkpoint_dir(output_dir))
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(f"run.resume={resume_from}: no such checkpoint directory")
    if not TAG.match(path.name) and not is_complete(path):
        found = newest_verified(path)
        if found is None:
            raise FileNotFoundError(f"run.resume={resume_from}: no committed checkpoint in this folder")
        return found
    if not is_complete(path):
        raise FileNotFoundError(f"run.resume={resume_from}: not a complete checkpoint (no {MARKER}: its save never "
                                "finished)")
    check(path)
    return path


def load_plain_state_dict(path: str | Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """A DeepSpeed MoE checkpoint as the state dict of the plain model (all experts, no DeepSpeed needed).

    ``path`` is a checkpoint directory (``.../step_N``) or the checkpoints folder (then ``latest`` is used). Expert
    files are stored per global expert, so the result does not depend on the ep_size the checkpoint was written with.
    The files read are verified first (unless ``verify`` is false: the caller committed them a moment ago) and
    unpickled with ``weights_only=True``: a ValueError names a bad one.
    """
    path = Path(path)
    if not (path / "mp_rank_00_model_states.pt").is_file():
        tag = latest_tag(path)
        if tag is None:
            raise FileNotFoundError(f"{path}: neither a checkpoint (mp_rank_00_model_states.pt) nor a folder with one")
        path = path / tag
    names = ["mp_rank_00_model_states.pt", *sorted(p.name for p in path.iterdir() if EXPERT_FILE.match(p.name))]
    if verify and is_complete(path):
        check(path, names)  # ValueError naming a file that does not match its checksum
    elif verify:
        log.warning("%s has no %s (not a committed condmoe checkpoint): its files cannot be verified", path, MARKER)
    with torch.serialization.safe_globals(allowed_globals()):
        states = _unpickle(path / names[0])
        merged = dict(states["module"])
        for name in names[1:]:
            merged.update(_unpickle(path / name))
    # Expert keys already carry global expert ids; drop the DeepSpeed wrapper level everywhere.
    return {plain_name(key): value for key, value in merged.items()}
