"""Model construction and the DeepSpeed engine: expert parallelism, parameter groups, optimizer, schedule.

The DeepSpeed JSON (ZeRO stage, precision, clipping) is read as is; only the batch fields DeepSpeed insists on are
filled in from the run config, because task batches differ per task and are not DeepSpeed's to choose.
"""

import json
import logging
import math
from collections.abc import Callable
from functools import partial

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from condmoe.data_prep import schema
from condmoe.models import SIZES, UniPerceiver, create_model, moe_layer_indices
from condmoe.models.ds_moe import apply_expert_parallel, plain_name
from condmoe.models.moe import RUN_STATE_BUFFERS
from condmoe.train.config import Config, dense_label_specs, resolve_path

log = logging.getLogger("condmoe.engine")


def build_model(cfg: Config, vocab_size: int, spe_token_id: int) -> UniPerceiver:
    """The plain model (all experts, one process), identical on every rank for a given seed."""
    overrides = {}
    if cfg.model.img_size:
        overrides["img_size"] = cfg.model.img_size
    if cfg.model.patch_size:
        overrides["patch_size"] = cfg.model.patch_size
    if cfg.model.drop_path_rate >= 0:
        overrides["drop_path_rate"] = cfg.model.drop_path_rate
    if cfg.model.num_prompts:
        overrides["num_prompts"] = cfg.model.num_prompts
    if cfg.model.head_classes:
        overrides["head_classes"] = cfg.model.head_classes
    heads = dense_heads(cfg)
    if heads:
        overrides.update(dense_heads=heads, dense_head=cfg.model.dense_head)
    if cfg.model.task_embedding:
        overrides["task_embedding"] = True
    if cfg.model.timm_layout:
        overrides.update(embed_norm=False, layer_scale_init=None)
    depth = SIZES[cfg.model.size]["depth"]
    moe, moa = cfg.moe, cfg.moa
    torch.manual_seed(cfg.run.seed)
    model = create_model(cfg.model.size, vocab_size=vocab_size, spe_token_id=spe_token_id,
                         max_text_len=cfg.data.max_text_len, num_tasks=len(cfg.tasks),
                         moe_layers=_placement(moe.num_experts, moe.layers, depth, moe.every, moe.offset, "moe"),
                         moe=moe.layer_args(),
                         moa_layers=_placement(moa.num_experts, moa.layers, depth, moa.every, moa.offset, "moa"),
                         moa=moa.layer_args(), **overrides)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model


# Output channels of a dense head by family; segmentation has one per class of its label map.
DENSE_CHANNELS = {"saliency": 1, "edge": 1, "normals": 3}  # the others: classes, or one per (stacked) scalar label


def dense_heads(cfg: Config) -> dict[str, dict]:
    """Each dense task's head (``UniPerceiverArgs.dense_heads``): segmentation's and soft classification's classes
    come from the dataset's ``dense.json`` (whose entry for the task's label must have the encoding the task type
    reads), a scalar task has one channel per stacked label."""
    tasks = [t for t in cfg.tasks if t.spec.targets == "pixels"]
    if not tasks:
        return {}
    dense = schema.read_dense(cfg.data.root)
    heads = {}
    for task in tasks:
        specs = dense_label_specs(dense, cfg.data.root, task)
        if task.spec.encoding in ("index", "soft"):
            channels = specs[0]["num_classes"]
        else:
            channels = DENSE_CHANNELS.get(task.spec.dense, len(specs))
        heads[task.name] = {"family": task.spec.dense, "channels": int(channels)}
    return heads


def _placement(num_experts: int, layers: list[int], depth: int, every: int, offset: int, name: str) -> tuple:
    if not num_experts:
        return ()
    if layers:
        if any(not 0 <= i < depth for i in layers):
            raise ValueError(f"{name}.layers={layers} must index blocks in [0, {depth})")
        return tuple(sorted(set(layers)))
    if not 0 <= offset < every:
        raise ValueError(f"{name}.offset={offset} must be in [0, {name}.every={every})")
    return moe_layer_indices(depth, every, offset)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A checkpoint's plain state into ``model`` for evaluation, export or analysis: every weight must match; buffers
    that belong to the run (the MI window, ``RUN_STATE_BUFFERS``) are taken where both have them (of one shape) and
    otherwise left, since they do not change what the model computes and a config may set ``mi_window`` differently."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith(RUN_STATE_BUFFERS)
             or (k in own and v.shape == own[k].shape)}
    for name, tensor in own.items():  # the model's order: the first mismatch, in one line (not torch's RuntimeError)
        if name in state and state[name].shape != tensor.shape:
            raise ValueError(f"checkpoint does not match the config's model: {name} has shape "
                             f"{tuple(state[name].shape)} in the checkpoint, {tuple(tensor.shape)} in the model "
                             "(a checkpoint of another model size or layout?)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(RUN_STATE_BUFFERS)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config's model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


def initialise_from(model: UniPerceiver, path: str) -> list[str]:
    """Loads weights into ``model`` from a condmoe checkpoint (any ZeRO stage), an export folder, a state dict file
    or a timm ViT checkpoint (``train/consolidate.py`` ``init_weights``). A dense source for an MoE model is upcycled
    (every expert a copy of the dense MLP, fresh routers). Task-indexed parameters (task gates, task embeddings of
    routers) of a checkpoint with fewer tasks fill the first rows; the new tasks' rows keep their initialisation.
    Spatial positions of another resolution (stage 2 at 224 px from 160 px) are resized bicubically over the patch
    grid (timm's ``resample_abs_pos_embed``, what the model does at forward for other input sizes). Returns the
    names that were only partly filled."""
    from condmoe.models.upcycle import is_dense_checkpoint_for, upcycle_state_dict
    from condmoe.train.consolidate import init_weights

    state, fresh = init_weights(path, model)
    # The MI window describes the run that wrote the checkpoint: this fresh run starts its own.
    state = {k: v for k, v in state.items() if not k.endswith(RUN_STATE_BUFFERS)}
    own = model.state_dict()
    if is_dense_checkpoint_for(state, model):
        # Sparse upcycling: every expert starts as the dense MLP, routers stay freshly initialised.
        state = upcycle_state_dict(state, model)
        state.update({k: v for k, v in own.items() if ".router." in k and k not in state})
    partial = []
    positions = state.get("image_embed.pos_embed")
    if positions is not None and positions.shape != own["image_embed.pos_embed"].shape:
        state["image_embed.pos_embed"] = resize_positions(positions, model.image_embed.patch_embed.grid_size, path)
    for name, value in state.items():
        if name in own and own[name].shape != value.shape:
            if ".router." not in name or own[name].shape[1:] != value.shape[1:] or value.shape[0] > own[name].shape[0]:
                raise ValueError(f"run.init_from={path}: {name} has shape {tuple(value.shape)}, the model "
                                 f"{tuple(own[name].shape)}")
            filled = own[name].clone()
            filled[:value.shape[0]] = value
            state[name] = filled
            partial.append(name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # New prompts and class head (prompt tuning) start from their initialisation.
    missing = [k for k in missing if k != "prompts" and not k.startswith(("class_head.", *fresh)) and
               not k.endswith(RUN_STATE_BUFFERS)]
    if missing or unexpected:
        raise ValueError(f"run.init_from={path}: checkpoint does not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return partial


def resize_positions(pos_1ND: torch.Tensor, grid: tuple[int, int], path: str) -> torch.Tensor:
    """A square grid's spatial positions ``[1, N, D]`` resized to ``grid`` (bicubic, timm)."""
    from timm.layers import resample_abs_pos_embed  # here: timm after condmoe.models (models/_compat.py)

    side = math.isqrt(pos_1ND.shape[1])
    if side * side != pos_1ND.shape[1]:
        raise ValueError(f"run.init_from={path}: image_embed.pos_embed holds {pos_1ND.shape[1]} positions, not a "
                         "square patch grid")
    log.info("run.init_from: spatial positions resized from %dx%d to %dx%d patches (bicubic)", side, side, *grid)
    return resample_abs_pos_embed(pos_1ND, list(grid), [side, side], num_prefix_tokens=0)


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Named groups: decay for >=2-dim weights; none for norms, biases, positions, temperatures (nanoGPT/timm).
    With ``layer_decay < 1`` one pair per layer of the model's ``group_matcher`` (timm's ``group_parameters``:
    embeddings, blocks, then the rest), each with its ``lr_scale``: ``layer_decay ** (last layer - layer)``."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    layer_of = {}
    if layer_decay < 1:
        from timm.models import group_parameters  # here: timm after condmoe.models (models/_compat.py)

        layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    last = max(layer_of.values(), default=0)  # the output layers: ln_post and what the matcher does not name
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim < 2 or plain_name(name) in skip)
        layer = layer_of.get(name, last)
        key = ("" if layer_decay == 1 else f"layer_{layer}_") + ("decay" if decays else "no_decay")
        group = groups.setdefault(key, {"name": key, "params": [], "weight_decay": weight_decay if decays else 0.0})
        if layer_decay < 1:
            group["lr_scale"] = layer_decay ** (last - layer)
        group["params"].append(param)
    if layer_decay == 1:  # the two groups in their usual order, even when one is empty
        return [groups.get(k, {"name": k, "params": [], "weight_decay": w})
                for k, w in (("decay", weight_decay), ("no_decay", 0.0))]
    return list(groups.values())


def lr_schedules(groups: list[dict], cfg: Config) -> list[Callable[[int], float]]:
    """Per optimizer group, the LambdaLR factor of each step: warmup-cosine times the group's ``lr_scale``."""
    min_ratio = cfg.optim.min_lr / cfg.optim.lr

    def schedule(scale: float, step: int) -> float:
        factor = lr_factor(step, cfg.optim.warmup_steps, cfg.run.max_steps, min_ratio)
        return factor if scale == 1.0 else scale * factor

    return [partial(schedule, g.get("lr_scale", 1.0)) for g in groups]


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def load_ds_config(cfg: Config, world_size: int | None = None) -> dict:
    """The JSON named by ``deepspeed_config``, checked against the run config and with DeepSpeed's batch fields filled
    in. Its ``optimizer`` and ``scheduler`` blocks are refused (``refuse_blocks``), its batch keys must agree with
    the run (``check_batch_keys``; ``world_size`` defaults to torch.distributed's, else 1)."""
    where = f"deepspeed_config={cfg.deepspeed_config}"
    path = resolve_path(cfg.deepspeed_config)
    try:
        ds_config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    if not isinstance(ds_config, dict):
        raise ValueError(f"{where}: a DeepSpeed config is a JSON object, not {type(ds_config).__name__}")
    refuse_blocks(ds_config, where)
    if world_size is None:
        world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    check_batch_keys(ds_config, cfg, world_size, where)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage == 3 and cfg.moe.num_experts:
        raise ValueError(f"{where}: ZeRO stage 3 is refused by DeepSpeed's native MoE;"
                         " use ZeRO-1/2 with MoE (ZeRO-3 only for dense configs, moe.num_experts=0)")
    if cfg.run.freeze and cfg.moe.num_experts and stage > 0:
        # DeepSpeed's ZeRO optimizer refuses an MoE model without a trainable expert parameter group, and transfer
        # and prompt tuning train only small replicated tensors, where partitioning buys nothing.
        log.info("run.freeze=%s: ZeRO stage %d -> 0 (all experts frozen)", cfg.run.freeze, stage)
        ds_config["zero_optimization"] = {**ds_config.get("zero_optimization", {}), "stage": 0}
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    task_types = sorted({t.type for t in cfg.tasks})
    if stage == 3 and len(task_types) > 1:
        raise ValueError(f"{where}: ZeRO stage 3 mis-reduces gradients when ranks run "
                         f"different task types ({', '.join(task_types)}): use ZeRO-1/2, or one task type")
    ds_config["train_micro_batch_size_per_gpu"] = max(t.batch_size for t in cfg.tasks)
    # ZeRO-1/2 accumulate in MicroSteps (one ordered reduction per optimizer step); ZeRO-0/3 in DeepSpeed.
    ds_config["gradient_accumulation_steps"] = 1 if stage in COALESCED_STAGES else cfg.run.gradient_accumulation_steps
    ds_config.pop("train_batch_size", None)  # DeepSpeed's product of the two above and its world size
    return ds_config


# The parameters of DeepSpeed's optimizer and warmup schedulers that are a key of condmoe's config.
OPTIMIZER_KEYS = {"lr": "optim.lr", "betas": "optim.betas", "eps": "optim.eps", "weight_decay": "optim.weight_decay"}
SCHEDULER_KEYS = {"warmup_num_steps": "optim.warmup_steps", "warmup_max_lr": "optim.lr", "total_num_steps":
                  "run.max_steps"}
WARMUP_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
SCHEDULE = "linear warmup over optim.warmup_steps, then cosine to optim.min_lr at run.max_steps"


def refuse_blocks(ds_config: dict, where: str) -> None:
    """Refuses the JSON's ``optimizer`` and ``scheduler`` blocks in one line: condmoe builds AdamW and its
    warmup-cosine from ``optim.*`` (per-group decay, layer-wise lr scales), so a block would be a second, ignored
    home for them. A block that is condmoe's own (AdamW/Adam, or a warmup scheduler) gets its overrides named."""
    for name in ("optimizer", "scheduler"):
        block = ds_config.get(name)
        if block is None:
            continue
        block = block if isinstance(block, dict) else {}
        kind, params = str(block.get("type", "?")), block.get("params") or {}
        params = params if isinstance(params, dict) else {}
        if name == "optimizer":
            own = kind.lower() in ("adamw", "adam") and params.get("adam_w_mode", True) is True
            keys, what = OPTIMIZER_KEYS, "condmoe builds AdamW from optim.* (lr, betas, eps, weight_decay)"
        else:
            own = kind in WARMUP_SCHEDULERS
            keys, what = SCHEDULER_KEYS, f"condmoe's schedule is {SCHEDULE}"
        sets = [f"{keys[k]}={json.dumps(v, separators=(',', ':'))}" for k, v in params.items()
                if own and k in keys and v != "auto"]
        hint = f"remove it and set {' '.join(sets)}" if sets else "remove it"
        raise ValueError(f'{where}: the "{name}" block ({kind}) is refused: {what}; {hint}')


BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def check_batch_keys(ds_config: dict, cfg: Config, world_size: int, where: str) -> None:
    """The JSON's batch keys, where given (and not ``"auto"``), must be the run's: the micro-batch is every task's
    ``batch_size`` (condmoe's micro-batch is per task), the accumulation ``run.gradient_accumulation_steps``, the
    global batch their product with the world size. Absent keys are filled in by ``load_ds_config``."""
    sizes = sorted({t.batch_size for t in cfg.tasks})
    steps = cfg.run.gradient_accumulation_steps
    differ = f"the tasks' batch sizes differ ({', '.join(map(str, sizes))} in tasks[*].batch_size)"
    says = {"gradient_accumulation_steps": (steps, f"run.gradient_accumulation_steps={steps}")}
    if len(sizes) == 1:
        says["train_micro_batch_size_per_gpu"] = (sizes[0], f"every task's batch_size is {sizes[0]} "
                                                             "(condmoe's micro-batch is per task)")
        says["train_batch_size"] = (sizes[0] * steps * world_size, f"batch_size {sizes[0]} x "
                                    f"run.gradient_accumulation_steps {steps} x world size {world_size} = "
                                    f"{sizes[0] * steps * world_size}")
    else:  # no one micro-batch: no value of these keys agrees with every task
        says["train_micro_batch_size_per_gpu"] = (None, f"{differ}, and condmoe's micro-batch is per task")
        says["train_batch_size"] = (None, f"{differ}, so a step has no one global batch")
    for key in BATCH_KEYS:
        value = ds_config.get(key, "auto")
        expected, run_says = says[key]
        if value != "auto" and (isinstance(value, bool) or value != expected):
            raise ValueError(f"{where}: {key}={json.dumps(value)} disagrees with the run config: {run_says}; remove "
                             "the key (condmoe fills it in) or make the two agree")


def offloads_optimizer(ds_config: dict) -> bool:
    """Whether ZeRO steps the optimizer on the CPU: ``zero_optimization.offload_optimizer`` on ``cpu`` (or ``nvme``,
    whose states the CPU steps too) at a ZeRO stage that offloads (1-3)."""
    zero = ds_config.get("zero_optimization") or {}
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    return zero.get("stage", 0) > 0 and device in ("cpu", "nvme")


def optimizer_kind(ds_config: dict, device_type: str) -> str:
    """``"DeepSpeedCPUAdam"`` for an offloaded optimizer on CUDA (what ZeRO-Offload is built for), torch's ``"AdamW"``
    otherwise: also for offload on the CPU accelerator, where DeepSpeed's CPU Adam first needs a C++ build of
    minutes (``zero_force_ds_cpu_optimizer: false`` in the JSON lets DeepSpeed take it)."""
    return "DeepSpeedCPUAdam" if device_type == "cuda" and offloads_optimizer(ds_config) else "AdamW"


def create_engine(cfg: Config, model: UniPerceiver):
    """Expert parallelism, then ``deepspeed.initialize`` with an AdamW (``optimizer_kind``: torch's, fused by default,
    or DeepSpeed's CPU Adam for an offloaded optimizer on CUDA) and a LambdaLR warmup-cosine schedule that DeepSpeed
    checkpoints with the engine."""
    from deepspeed.accelerator import get_accelerator

    ds_config = load_ds_config(cfg)
    apply_expert_parallel(model, cfg.moe.ep_size if cfg.moe.num_experts else 1)
    groups = split_params_into_different_moe_groups_for_optimizer(
        param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay))
    # DeepSpeed drops empty groups from the optimizer (e.g. no decayed weight is trainable in prompt tuning); the
    # schedule must see the same groups.
    groups = [g for g in groups if g["params"]]
    # Every group carries its own weight_decay (param_groups): the default below is never the one used.
    hyper = dict(lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    device_type = get_accelerator().device_name()
    if optimizer_kind(ds_config, device_type) == "DeepSpeedCPUAdam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        log.info("zero_optimization.offload_optimizer: DeepSpeedCPUAdam steps the offloaded states")
        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **hyper)
    else:
        if offloads_optimizer(ds_config):
            log.info("zero_optimization.offload_optimizer on %s: torch AdamW steps the offloaded states (DeepSpeed's "
                     "CPU Adam, for CUDA runs, would first need a C++ build of minutes)", device_type)
        optimizer = torch.optim.AdamW(groups, fused=cfg.optim.fused or None, **hyper)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedules(groups, cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)
    return engine


COALESCED_STAGES = (1, 2)  # ZeRO stages whose gradient reduction MicroSteps orders


class MicroSteps:
    """One optimizer step's micro-steps through DeepSpeed, with every rank's gradients reduced in the same order.

    ZeRO-1/2 (DeepSpeed 0.19.8) reduce gradients as autograd produces them, bucket by bucket, and pair the ranks'
    collectives by arrival order. Ranks that drew different tasks run different graphs, so their gradients arrive in
    different orders, and DeepSpeed then sums one rank's gradient of a parameter with another rank's gradient of a
    different one, without an error (``tests/dist_check_grads.py`` shows it on condmoe's model). Under ZeRO-1/2 the
    backward passes therefore run inside ``engine.coalesce_grad_reduction()``: gradients stay on the parameters, and
    one flush reduces them in parameter order. DeepSpeed's own accumulation is off (``load_ds_config`` sets its
    ``gradient_accumulation_steps`` to 1) and each micro-step's loss is divided by their number here, which is what
    DeepSpeed's accumulation does. The price: ZeRO-2 holds whole gradients until the flush, as ZeRO-1 does. ZeRO-0
    reduces in parameter order already and keeps DeepSpeed's accumulation (``step`` after every micro-step).

        steps = MicroSteps(engine, 4)
        with steps:
            for batch in micro_batches:
                steps.backward(loss_of(batch))  # or steps.skip() for a micro-step every rank drops
        steps.step()
    """

    def __init__(self, engine, count: int):
        self.engine = engine
        self.count = count
        self.coalesced = engine.zero_optimization_stage() in COALESCED_STAGES
        self.backwards = 0
        self._block = None

    def __enter__(self) -> "MicroSteps":
        self.backwards = 0
        if self.coalesced:
            self._block = self.engine.coalesce_grad_reduction()
            self._block.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        block, self._block = self._block, None
        # The flush (the ordered reduction) is a collective: with an exception propagating, peers may never join it,
        # so it is left out and the engine stays in the block (the run is ending).
        if block is not None and exc_type is None:
            block.__exit__(None, None, None)
        return False

    def backward(self, loss: torch.Tensor) -> None:
        self.backwards += 1
        if self.coalesced:
            self.engine.backward(loss / self.count)
        else:
            self.engine.backward(loss)
            self.engine.step()

    def skip(self) -> None:
        """A micro-step every rank drops (a non-finite loss). DeepSpeed's own accumulation counts micro-steps to place
        the optimizer step, so there it still runs, with an exact-zero gradient for every trainable parameter."""
        if self.coalesced or self.count == 1:
            return
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        self.engine.backward(sum(p.sum() for p in params) * 0.0)
        self.engine.step()

    def step(self) -> None:
        """The optimizer step of a coalesced block (none when every micro-step was skipped)."""
        if self.coalesced and self.backwards:
            self.engine.step()


def destroy_engine(engine) -> None:
    """DeepSpeed's ``engine.destroy()`` plus the module-level references it leaves behind, so that the engine, the
    model and the process groups their parameters name can be freed before the groups are destroyed
    (``train.dist.shutdown_distributed``).

    ``destroy`` removes ZeRO's gradient hooks, whose closures hold the parameters in a cycle through C++ that garbage
    collection cannot see. ZeRO-3 (DeepSpeed 0.19.8) also keeps the model on ``parameter_offload.FWD_MODULE_STACK``
    from set-up on, and its parameter coordinator in the ``functools.lru_cache`` of a method (cache keys hold
    ``self``): both are released here.
    """
    import sys

    module = engine.module
    engine.destroy()
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None:
        offload.FWD_MODULE_STACK[:] = [m for m in offload.FWD_MODULE_STACK if m is not module]
    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    cached = getattr(getattr(coordinator, "PartitionedParameterCoordinator", None),
                     "_PartitionedParameterCoordinator__params_to_release", None)
    for cell in getattr(cached, "__closure__", None) or ():  # under DeepSpeed's instrument_w_nvtx wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()
