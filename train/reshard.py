"""Resuming on a different layout (world size, ep_size) with the optimizer state: a layout-free copy of a ZeRO-1/2
checkpoint, and loading it into an engine of any layout.

DeepSpeed's universal checkpoint (``ds_to_universal``) does not handle its native MoE layers, and its own loader
refuses ZeRO shards written by another world size. Here:

* ``consolidate`` reads every rank's ZeRO shard of a checkpoint and puts each parameter back together: fp32 master
  weight, Adam's ``exp_avg`` and ``exp_avg_sq``, under the plain model's names with global expert ids. Each shard
  names the slice of every parameter it holds (``param_slice_mappings``); non-expert groups are split over all ranks,
  expert groups over the expert-data-parallel group, which the checkpoint's ``Layout`` records per rank.
* ``load`` writes each of this rank's parameters and its ZeRO partition of the master weights and moments from that
  copy, then restores the schedule and the step counters.

Rank 0 writes the copy (atomically) into this run's checkpoints folder, never into the source checkpoint (which may be
another run's, or read-only); every rank maps it, and it is deleted once every rank has loaded it.
"""

import logging
from collections import defaultdict
from pathlib import Path

import torch
from deepspeed import comm as dist

from condmoe.models.ds_moe import global_expert_name, global_parameter_names, plain_name
from condmoe.train import checkpoint
from condmoe.train.checkpoint import Record, load_plain_state_dict, safe_load
from condmoe.train.dist import on_rank0

log = logging.getLogger("condmoe.reshard")

UNIVERSAL = "universal.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero_file(path: Path, rank: int) -> Path:
    for prefix in ("", "bf16_"):
        file = path / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        if file.is_file():
            return file
    raise FileNotFoundError(f"{path}: rank {rank}'s ZeRO shard is missing")


def consolidate(path: str | Path, verify: bool = True) -> dict:
    """The checkpoint at ``path`` without its layout: ``params`` maps each plain parameter name to its fp32 weight and
    Adam moments; also the step, the optimizer's step count, the LR schedule and the source layout. ``verify=False``
    skips the module files' checksums (for a caller that has just verified the checkpoint)."""
    path = Path(path)
    record = checkpoint.read(path)
    layout = record.layout
    if layout.zero_stage not in (1, 2):
        raise ValueError(f"{path}: resuming on another world size or ep_size needs a ZeRO-1/2 checkpoint, this one is "
                         f"ZeRO-{layout.zero_stage}")
    plain = load_plain_state_dict(path, verify)
    shapes = {name: value.shape for name, value in plain.items()}
    num_local = layout.num_experts // layout.ep_size if layout.num_experts else 1
    pieces = defaultdict(lambda: defaultdict(list))  # name -> key -> [(partition rank, fragment)]
    optimizer_step = None
    for rank, place in enumerate(layout.ranks):
        shard = safe_load(_zero_file(path, rank))["optimizer_state_dict"]
        base = shard["base_optimizer_state"]
        for i, mapping in enumerate(shard["param_slice_mappings"]):
            group = base["param_groups"][i]
            expert_group = bool(group.get("moe", False))
            partition = place.expert_dp_rank if expert_group else rank
            flat = {"fp32": shard["single_partition_of_fp32_groups"][i]}
            state = base["state"].get(group["params"][0], {})
            for key in MOMENTS:
                flat[key] = state.get(key, torch.zeros_like(flat["fp32"]))
            if "step" in state:
                optimizer_step = state["step"]
            for name, fragment in mapping.items():
                name = global_expert_name(name, place.ep_rank, num_local) if expert_group else plain_name(name)
                for key, tensor in flat.items():
                    pieces[name][key].append((partition, tensor.narrow(0, fragment.start, fragment.numel)))
    params = {}
    for name, by_key in pieces.items():
        if name not in shapes:
            raise ValueError(f"{path}: the ZeRO shards hold {name}, which the model files do not")
        entry = {}
        for key, parts in by_key.items():
            partitions = [p for p, _ in parts]
            if len(set(partitions)) != len(partitions):
                raise ValueError(f"{path}: {name} has two fragments from one partition; {checkpoint.MARKER} does "
                                 "not match the shards")
            full = torch.cat([t for _, t in sorted(parts, key=lambda part: part[0])])
            if full.numel() != shapes[name].numel():
                raise ValueError(f"{path}: the shards hold {full.numel()} values of {name}, its shape "
                                 f"{tuple(shapes[name])} has {shapes[name].numel()}")
            entry[key] = full.view(shapes[name]).clone()
        params[name] = entry
    states = safe_load(path / "mp_rank_00_model_states.pt")
    frozen = {name: {"fp32": value.float()} for name, value in plain.items() if name not in params}
    # "source" as condmoe.json has it: plain data, so that the copy loads without this module's classes
    return {"format": 1, "source": record.to_json(), "step": record.step, "params": {**params, **frozen},
            "optimizer_step": optimizer_step, "lr_scheduler": states.get("lr_scheduler"),
            "global_steps": states.get("global_steps", record.step),
            "global_samples": states.get("global_samples", 0)}


def write_universal(path: str | Path, out: str | Path, verify: bool = True) -> Path:
    """The layout-free copy of the checkpoint at ``path``, written to the file ``out`` (atomically)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(consolidate(path, verify), tmp)
    tmp.replace(out)
    return out


@torch.no_grad()
def load(engine, universal: dict) -> int:
    """Loads a layout-free copy into ``engine`` (ZeRO-1/2, any world size and ep_size); returns the step."""
    optimizer = engine.optimizer
    if not hasattr(optimizer, "single_partition_of_fp32_groups"):
        raise ValueError(f"resuming on another world size or ep_size needs ZeRO-1/2 in the DeepSpeed config (this run "
                         f"uses ZeRO-{engine.zero_optimization_stage()})")
    params = universal["params"]
    names = global_parameter_names(engine.module)
    missing = sorted(set(names.values()) - set(params))
    if missing:
        raise ValueError(f"the checkpoint does not match the model: it lacks {missing[:3]}")
    for param, name in names.items():
        param.copy_(params[name]["fp32"].to(param.dtype))
    step_count = universal["optimizer_step"]
    for i, group in enumerate(optimizer.bit16_groups):
        flat = optimizer.single_partition_of_fp32_groups[i]
        moments = {key: torch.zeros_like(flat) for key in MOMENTS}
        for param in group:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:
                continue  # no slice of this parameter in this rank's partition
            src, dst = mapping.lp_fragment_address, mapping.hp_fragment_address
            entry = params[names[param]]
            for key, target in (("fp32", flat), *moments.items()):
                target.narrow(0, dst.start, dst.numel).copy_(entry[key].reshape(-1).narrow(0, src.start, src.numel))
        if step_count is not None:
            optimizer.optimizer.state[flat] = {"step": step_count.clone(), **moments}
    scheduler = engine.lr_scheduler
    if scheduler is not None and universal["lr_scheduler"] is not None:
        state = dict(universal["lr_scheduler"])
        groups = len(optimizer.param_groups)
        # The group count follows the layout's expert groups; every group runs the same schedule.
        for key in ("base_lrs", "_last_lr", "lr_lambdas"):
            if key in state and len(set(map(repr, state[key]))) == 1:
                state[key] = state[key][:1] * groups
        scheduler.load_state_dict(state)
        # Each group's lr from its own schedule at the loaded step: with layer-wise decay the groups' lrs differ,
        # and this layout's groups need not be the checkpoint's (base * factor is how LambdaLR computes it).
        lrs = [base * schedule(scheduler.last_epoch) for base, schedule in zip(scheduler.base_lrs,
                                                                               scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
    engine.global_steps = universal["global_steps"]
    engine.global_samples = universal["global_samples"]
    return int(universal["step"])


def resume(engine, path: Path, record: Record, work_dir: Path) -> int:
    """Resumes ``engine`` from a checkpoint written with another world size or ep_size; the layout-free copy goes
    to ``work_dir`` (this run's checkpoints folder) and is deleted after every rank loaded it."""
    out = Path(work_dir) / f"{UNIVERSAL.removesuffix('.pt')}_{path.name}.pt"

    def convert() -> None:
        log.info("%s was written by %d ranks with ep_size %d; resharding for %d ranks", path,
                 record.layout.world_size, record.layout.ep_size, dist.get_world_size())
        write_universal(path, out, verify=False)  # checkpoint.find verified every file of it

    on_rank0(convert)
    step = load(engine, safe_load(out, mmap=True))
    dist.barrier()
    on_rank0(lambda: out.unlink(missing_ok=True))
    return step
