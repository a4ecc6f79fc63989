"""Typed run configuration: YAML in, ``key.sub=value`` overrides, validation that names the bad field.

A config file may name a ``_base_`` file (relative to itself) whose values it overrides. The resolved config is
written next to the checkpoints (``<output_dir>/config.yaml``). DeepSpeed settings (ZeRO stage, precision, gradient
clipping) live in the JSON file named by ``deepspeed_config`` and nowhere else.
"""

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from condmoe.data_prep import schema
from condmoe.models import SIZES, TASKS, MoAArgs, MoEArgs, TaskSpec
from condmoe.train.data_specs import check_spec_fields
from condmoe.train.yaml_config import apply_overrides, build_dataclass, load_yaml

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Checkpoints, logs and the resolved config go here."""
    seed: int = 0
    """Seeds model init, task sampling, data order and every step's randomness."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    log_every: int = 10
    """Steps between log lines (rank 0)."""
    save_every: int = 500
    """Steps between checkpoints (a final one is always written)."""
    keep_last: int = 3
    """Checkpoints to keep; older ones are deleted after a new one is complete."""
    ema_decay: float = 0.0
    """An exponential moving average of the weights (train/ema.py), updated after every optimizer step with this
    decay (e.g. 0.9999); 0 keeps none. Checkpoints carry it; ``condmoe-eval --ema`` evaluates it."""
    resume: str = "auto"
    """'auto' (latest checkpoint in output_dir if any), 'none' (a fresh run: refused if output_dir holds a run,
    unless run.overwrite), or a checkpoint directory."""
    overwrite: bool = False
    """With resume 'none': move what output_dir holds into output_dir/replaced-<time>/ and start fresh."""
    dist_timeout_s: float = 1800.0
    """Seconds a rank waits in a collective for the others before the job fails (a rank that hangs or was
    stopped); checkpoint saves and evaluations on one rank count against it."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step (each draws its own task)."""
    init_from: str = ""
    """Checkpoint to initialise the weights from (a fresh run; task-indexed router rows are copied where they exist)."""
    freeze: str = ""
    """'' trains everything; 'experts' only routers and output heads (transfer to a new task); 'prompt' only the
    prompts, LayerNorms and temperatures (prompt tuning, with model.num_prompts > 0)."""
    eval_every: int = 0
    """Steps between zero-shot evaluations on the val splits during training (0: none). Evaluation reads the
    checkpoint just written, so it must be a multiple of save_every; the last step is evaluated too."""
    eval_batch_size: int = 64
    """Val batch size of the evaluations during training."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device (e.g. 989 for an H100 in bf16) for the MFU estimate in metrics.jsonl; 0 looks the
    device up (H100/H200/A100 in bf16) and omits MFU where it is not known (CPU)."""
    tensorboard: bool = True
    """Rank 0 writes tensorboard scalars to <output_dir>/tensorboard."""
    wandb: bool = False
    """Rank 0 logs the interval metrics and the resolved config to Weights & Biases (``pip install wandb``; with
    ``WANDB_MODE=offline`` the run goes to <output_dir>/wandb without a network). A resume continues the same run."""
    wandb_project: str = "condmoe"
    """The Weights & Biases project of ``run.wandb``."""
    progress_bar: str = "auto"
    """Rank 0's progress bar (steps, loss, samples/s, ETA): 'auto' (when stderr is a terminal), 'always' or 'never'."""
    task_sampling: str = "per_rank"
    """'per_rank': each rank draws its own task per step (Uni-Perceiver); 'synchronized': all ranks draw the same one
    (needed by tasks with split_targets or gather_negatives)."""

    def __post_init__(self):
        if self.task_sampling not in ("per_rank", "synchronized"):
            raise ValueError(f"run.task_sampling={self.task_sampling!r} must be 'per_rank' or 'synchronized'")
        if not 0 <= self.ema_decay < 1:  # "not" also refuses NaN
            raise ValueError(f"run.ema_decay={self.ema_decay} must be in [0, 1) (0: no EMA)")
        _positive(self, "max_steps", "log_every", "save_every", "keep_last", "gradient_accumulation_steps")
        if self.freeze not in ("", "experts", "prompt"):
            raise ValueError(f"run.freeze={self.freeze!r} must be '', 'experts' or 'prompt'")
        if self.progress_bar not in ("auto", "always", "never"):
            raise ValueError(f"run.progress_bar={self.progress_bar!r} must be 'auto', 'always' or 'never'")
        _positive(self, "eval_batch_size", "dist_timeout_s")
        if self.seed < 0:
            raise ValueError(f"run.seed={self.seed} must be >= 0")
        if self.eval_every < 0 or self.eval_every % self.save_every:
            raise ValueError(f"run.eval_every={self.eval_every} must be 0 or a multiple of run.save_every="
                             f"{self.save_every} (evaluation reads the checkpoint written at that step)")


@dataclass
class DataConfig:
    root: str = "data/synthetic"
    """Directory written by condmoe-prep (shards, sizes.json, classes.json, tokenizer/)."""
    tokenizer: str = ""
    """Tokenizer directory; empty means <root>/tokenizer. A local CLIP tokenizer directory also works."""
    num_workers: int = 1
    """DataLoader workers per task stream and rank (when worker_budget is 0)."""
    worker_budget: int = 0
    """Workers per rank shared by the streams by task weight (data_specs.worker_shares); 0: num_workers per stream."""
    shuffle_buffer: int = 1000
    """Samples held in the shuffle buffer of each stream."""
    max_text_len: int = 32
    """Text length including <|spe|> and <|endoftext|>."""
    num_frames: int = 4
    """Frames per clip for video tasks (uniformly spread over the stored frames)."""
    test_clips: int = 1
    """Video classification at evaluation: clips per video, each ``num_frames`` frames at its own offset within the
    frames' segments (``train/data.py`` ``view_frame_indices``); the class scores are averaged over clips x crops."""
    test_crops: int = 1
    """Video classification at evaluation: 1 (the frame resized to the input size, as in training) or 3 (the
    short side resized to it, then crops at the start, centre and end of the long side)."""

    def __post_init__(self):
        _positive(self, "shuffle_buffer", "max_text_len", "num_frames", "test_clips")
        if self.test_crops not in (1, 3):
            raise ValueError(f"data.test_crops={self.test_crops} must be 1 or 3")
        if min(self.num_workers, self.worker_budget) < 0:
            raise ValueError(f"data.num_workers={self.num_workers}, data.worker_budget={self.worker_budget}: need >= 0")


@dataclass
class ModelConfig:
    size: str = "debug"
    """A size from condmoe.models.registry.SIZES (debug, small, base, large)."""
    img_size: int = 0
    """Input resolution; 0 keeps the size's default."""
    patch_size: int = 0
    """Patch size; 0 keeps the size's default."""
    drop_path_rate: float = -1.0
    """Stochastic depth; negative keeps the size's default."""
    num_prompts: int = 0
    """Learned prompt tokens per block and side for prompt tuning (Uni-Perceiver uses 10); 0: none."""
    head_classes: int = 0
    """Classes of the prompt-tuning head (Uni-Perceiver's zero-initialised fc_prompt, added to the classification
    logits); 0: none. Must equal the class count of the run's classification tasks."""
    grad_checkpointing: bool = False
    """Activation checkpointing per block: recompute activations in the backward pass (less memory, ~1/3 more
    compute). The loss is unchanged."""
    dense_head: str = "linear"
    """Heads of dense tasks: ``linear`` (Mod-Squad's Taskonomy decoder, one linear map per patch token to its pixels)
    or ``uphead`` (M3ViT's convolutional up-sampling head, used for PASCAL-Context)."""
    task_embedding: bool = False
    """A learned embedding per task added to the tokens before every block (Mod-Squad's task embedding)."""
    timm_layout: bool = False
    """timm's ViT layout (no embedding LayerNorm, no LayerScale), so that ``run.init_from`` can start from a timm ViT
    checkpoint (``models/timm_compat.py``)."""

    def __post_init__(self):
        if self.head_classes < 0:
            raise ValueError(f"model.head_classes={self.head_classes} must be >= 0")
        if self.dense_head not in ("linear", "uphead"):
            raise ValueError(f"model.dense_head={self.dense_head!r} must be 'linear' or 'uphead'")
        if self.size not in SIZES:
            raise ValueError(f"model.size={self.size!r} is not one of {', '.join(SIZES)}")
        if self.img_size < 0 or self.patch_size < 0:
            raise ValueError("model.img_size and model.patch_size must be >= 0 (0: the size's default)")
        img = self.img_size or SIZES[self.size].get("img_size", 224)
        patch = self.patch_size or SIZES[self.size].get("patch_size", 16)
        if img % patch:
            raise ValueError(f"model.img_size={img} is not a multiple of model.patch_size={patch} (model.size="
                             f"{self.size})")


@dataclass
class MoEConfig(MoEArgs):
    """The MoE layers' own fields (``models.moe.MoEArgs``: experts, routing, capacity, losses), and where they go."""

    every: int = 2
    """MoE in blocks offset, offset+every, ... (2: every other block, Uni-Perceiver-MoE's 'odd')."""
    offset: int = 0
    """First MoE block."""
    layers: list[int] = field(default_factory=list)
    """Explicit MoE blocks; overrides every/offset when not empty."""
    ep_size: int = 1
    """Expert-parallel group size; must divide the world size and num_experts."""

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "ep_size", "every")
        if self.num_experts and self.num_experts % self.ep_size:
            raise ValueError(f"moe.num_experts={self.num_experts} is not divisible by moe.ep_size={self.ep_size}")
        if self.expert_type == "linear" and self.ep_size > 1:
            raise ValueError("moe.expert_type=linear: linear experts are replicated on every rank (no all-to-all at "
                             "any level; docs/moe.md); set moe.ep_size=1")

    def layer_args(self) -> MoEArgs:
        """What the model is built from: the layer fields only (placement and ep_size are the trainer's)."""
        return MoEArgs(**{f.name: getattr(self, f.name) for f in fields(MoEArgs)})


@dataclass
class MoAConfig(MoAArgs):
    """The MoA layers' own fields (``models.moa.MoAArgs``), and where they go."""

    every: int = 2
    """MoA in blocks offset, offset+every, ... (Mod-Squad: even blocks, with MoE MLPs on odd ones)."""
    offset: int = 0
    """First MoA block."""
    layers: list[int] = field(default_factory=list)
    """Explicit MoA blocks; overrides every/offset when not empty."""

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "every")

    def layer_args(self) -> MoAArgs:
        return MoAArgs(**{f.name: getattr(self, f.name) for f in fields(MoAArgs)})


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.05
    """AdamW decay, applied to >=2-dim weights only (not norms, biases, positions, temperatures)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay (BEiT; timm's ``param_groups_layer_decay``): the output layers (``ln_post``,
    projection, heads, temperatures) train at ``lr``, block i at ``lr * layer_decay ** (depth - i)``, the embeddings
    at ``lr * layer_decay ** (depth + 1)``; 1 disables. Uni-Perceiver's trainer offers it (off in its pre-training
    configs)."""
    fused: bool = True
    """torch's fused AdamW kernel (CPU and CUDA; one pass over each tensor). false: torch's default implementation
    (the same update, rounded differently; about 6x slower on CPU)."""

    def __post_init__(self):
        _positive(self, "lr")
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} is above optim.lr={self.lr} (the cosine would climb to it)")
        if not 0 < self.layer_decay <= 1:  # "not" also refuses NaN
            raise ValueError(f"optim.layer_decay={self.layer_decay} must be in (0, 1] (1: no layer-wise decay)")
        if self.warmup_steps < 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps, optim.min_lr and optim.weight_decay must be >= 0")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")


@dataclass
class AugmentConfig:
    random_resized_crop: bool = False
    """RandomResizedCrop to the model's image size (area fraction in [crop_scale_min, 1])."""
    crop_scale_min: float = 0.5
    """Smallest crop area fraction."""
    hflip: float = 0.0
    """Horizontal flip probability (keep 0 when captions name left and right)."""
    rand_augment: str = ""
    """timm RandAugment config string, e.g. 'rand-m9-mstd0.5'; empty disables."""
    mixup: float = 0.0
    """Mixup alpha for classification (0 disables); label smoothing then goes through the mixed targets."""
    cutmix: float = 0.0
    """CutMix alpha for classification (0 disables)."""

    def __post_init__(self):
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"augment.crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"augment.hflip must be a probability, got {self.hflip}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError("augment.mixup and augment.cutmix must be >= 0")
        if self.rand_augment and not self.rand_augment.startswith("rand"):
            raise ValueError(f"augment.rand_augment={self.rand_augment!r} must be a timm 'rand-...' string")


@dataclass
class TaskConfig:
    name: str = ""
    """Unique task name (logs, metrics)."""
    type: str = "image_classification"
    """A task type of the task table, models/tasks.py: image_classification, image_text_retrieval,
    video_classification, video_text_retrieval, mlm, captioning."""
    dataset: str = "image"
    """Dataset folder under data.root (shards in <dataset>/<split>/)."""
    weight: float = 1.0
    """Sampling weight: each rank draws one task per micro-step with probability weight / sum(weights)."""
    batch_size: int = 32
    """Per-rank batch size of this task."""
    loss_weight: float = 1.0
    """Multiplies this task's loss."""
    label_smoothing: float = 0.0
    """Label smoothing of the task's cross-entropy."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training-time augmentation of this task's images."""
    split_targets: bool = False
    """Each rank encodes 1/world of the target set (class names, vocabulary), all-gathered with gradients."""
    gather_negatives: bool = False
    """Retrieval against the pairs of every rank (negatives gathered with gradients, CLIP-style)."""
    group: str = ""
    """Tasks with the same group run together on the same batch at every step they are drawn (Mod-Squad's
    multi-task step: one encoder pass per task, each with its own task id, and the weighted sum of their losses).
    Members share ``dataset``, ``batch_size``, ``weight`` and ``augment``; the group's stream is its first task's."""
    label: str = ""
    """Dense tasks: the label map in the dataset's dense.json (default: the task type's, e.g. ``semseg``)."""
    train_data: str = ""
    """Shards open_clip-style instead of <dataset>/train: brace patterns, '::' lists, folders, pipe: (data_specs.py)."""
    train_num_samples: int = 0
    """Samples of train_data (one epoch over all ranks); required unless a sizes.json beside its shards counts them."""
    val_data: str = ""
    """Val shards as a spec like train_data; '' reads <dataset>/val."""
    val_num_samples: int = 0
    """Samples of val_data, checked against what evaluation reads (a warning); 0: not checked."""

    def __post_init__(self):
        if not self.name:
            raise ValueError("tasks[].name is required")
        if self.type not in TASKS:
            raise ValueError(f"tasks[{self.name}].type={self.type!r} is not one of {', '.join(TASKS)}")
        if self.gather_negatives and self.spec.targets != "captions":
            raise ValueError(f"tasks[{self.name}].gather_negatives applies to retrieval tasks only")
        if self.split_targets and not self.spec.target_set:
            raise ValueError(f"tasks[{self.name}].split_targets applies to tasks with a target set, not retrieval")
        if (self.augment.mixup or self.augment.cutmix) and not self.spec.mixup:
            raise ValueError(f"tasks[{self.name}].augment: mixup/cutmix apply to image_classification only")
        if not (self.weight > 0 and self.batch_size > 0):  # "not >" also refuses NaN
            raise ValueError(f"tasks[{self.name}].weight and .batch_size must be > 0")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"tasks[{self.name}].label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.label and self.spec.targets != "pixels":
            raise ValueError(f"tasks[{self.name}].label names a dense label map: only dense task types read one")
        if self.spec.targets == "pixels" and self.label_smoothing:
            raise ValueError(f"tasks[{self.name}].label_smoothing does not apply to dense tasks")
        check_spec_fields(self)  # train_data, val_data and their counts: a ValueError naming the field
        if self.spec.targets == "pixels" and self.augment.rand_augment:
            raise ValueError(f"tasks[{self.name}].augment.rand_augment: its geometric ops would move the pixels away "
                             "from their label maps (dense tasks take random_resized_crop and hflip)")

    @property
    def dense_label(self) -> str:
        """The dense.json label this task reads (dense tasks only); comma-separated labels are stacked channels."""
        return self.label or (self.spec.label or "")

    @property
    def dense_labels(self) -> tuple[str, ...]:
        """The dense.json labels of ``dense_label``, one per target channel when there are several."""
        return tuple(name.strip() for name in self.dense_label.split(","))

    @property
    def spec(self) -> TaskSpec:
        """The task type's entry in the task table (inputs, targets, loss, metric)."""
        return TASKS[self.type]


def dense_label_specs(dense: dict, root: str | Path, task: TaskConfig) -> list[dict]:
    """The dense.json specs of ``task``'s labels (one per stacked channel, mostly one); a ValueError names the file,
    the dataset and the label."""
    where = f"{Path(root) / schema.DENSE}"
    labels = dense.get(task.dataset)
    if labels is None:
        raise ValueError(f"{where}: no entry {task.dataset!r} for tasks[{task.name}] (has {sorted(dense)})")
    if len(task.dense_labels) > 1 and task.spec.encoding != "scalar":
        raise ValueError(f"tasks[{task.name}].label={task.dense_label!r}: only scalar labels stack as channels, a "
                         f"{task.type} task reads one {task.spec.encoding!r} label")
    specs = []
    for label in task.dense_labels:
        spec = labels.get(label)
        if spec is None:
            raise ValueError(f"{where}: dataset {task.dataset!r} has no label {label!r} for tasks[{task.name}] "
                             f"(has {sorted(labels)}; tasks[].label picks another)")
        if spec["encoding"] != task.spec.encoding:
            raise ValueError(f"{where}: {task.dataset}/{label} is encoded {spec['encoding']!r}, a "
                             f"{task.type} task reads {task.spec.encoding!r} labels")
        specs.append(spec)
    return specs


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    moa: MoAConfig = field(default_factory=MoAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    deepspeed_config: str = "ds_configs/zero2_cpu.json"
    """DeepSpeed JSON (ZeRO stage, precision, clipping). Relative paths resolve against the repository root."""

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks: at least one task is required")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: names must be unique, got {names}")
        if self.run.freeze == "prompt" and not self.model.num_prompts:
            raise ValueError("run.freeze=prompt needs model.num_prompts > 0")
        self._check_groups()
        collective = [t.name for t in self.tasks if t.split_targets or t.gather_negatives]
        if collective and len(self.tasks) > 1 and self.run.task_sampling != "synchronized":
            raise ValueError(f"run.task_sampling must be 'synchronized' when tasks use split_targets or "
                             f"gather_negatives ({', '.join(collective)}): those are collectives across ranks")

    def _check_groups(self) -> None:
        for unit in self.units():
            first = self.tasks[unit[0]]
            for i in unit[1:]:
                task = self.tasks[i]
                for key in ("dataset", "batch_size", "weight", "augment"):
                    if getattr(task, key) != getattr(first, key):
                        raise ValueError(f"tasks[{task.name}].{key}={getattr(task, key)!r} differs from "
                                         f"tasks[{first.name}].{key}={getattr(first, key)!r}: tasks of group "
                                         f"{first.group!r} share one batch")
            if len(unit) > 1 and any(self.tasks[i].spec.inputs != "image" for i in unit):
                raise ValueError(f"group {first.group!r}: only image tasks can share a batch")
        # Encoder passes per step: a similarity task makes two (inputs, targets), a dense task one, a group the sum.
        # Under expert parallelism every pass is an all-to-all in each MoE layer, so ranks must make equally many.
        passes = {sum(1 if self.tasks[i].spec.targets == "pixels" else 2 for i in unit) for unit in self.units()}
        if len(passes) > 1 and self.run.task_sampling != "synchronized" and self.moe.num_experts and \
                self.moe.ep_size > 1:
            raise ValueError("run.task_sampling must be 'synchronized' with expert parallelism (moe.ep_size="
                             f"{self.moe.ep_size}) when the units a step draws make different numbers of encoder "
                             f"passes ({sorted(passes)}: one per dense task, two per other task): ranks on different "
                             "units would not pair their expert exchanges")

    def units(self) -> list[list[int]]:
        """What a step draws: task indices, one list per group (in order of first appearance) or ungrouped task."""
        units, by_group = [], {}
        for i, task in enumerate(self.tasks):
            if not task.group:
                units.append([i])
            elif task.group in by_group:
                by_group[task.group].append(i)
            else:
                by_group[task.group] = [i]
                units.append(by_group[task.group])
        return units

    def validate_paths(self) -> None:
        """Checks what must exist on disk before training (separate so configs can be built without data)."""
        root, folders = Path(self.data.root), [t for t in self.tasks if not t.train_data]  # specs: data_specs.py
        if folders and not (root / schema.SIZES).is_file():
            raise FileNotFoundError(f"data.root={root}: no {schema.SIZES} (run `condmoe-prep synthetic --out {root}`)")
        for task in self.tasks:
            splits = ("train", "val") if self.run.eval_every else ("train",)  # evaluation during training reads val
            for split in (s for s in splits if not (task.val_data if s == "val" else task.train_data)):
                shards = root / task.dataset / split
                if not any(shards.glob("*.tar")):
                    raise FileNotFoundError(f"tasks[{task.name}].dataset: no shards in {shards}")
        if folders:
            self._check_sizes(root)
        if not resolve_path(self.deepspeed_config).is_file():
            raise FileNotFoundError(f"deepspeed_config: {self.deepspeed_config} not found")

    def _check_sizes(self, root: Path) -> None:
        """sizes.json's train counts (they size every epoch) against the manifest: a one-line ``ValueError`` naming
        the file and the key, or a warning for a split that nothing cross-checks."""
        for line in schema.check_sizes(root, [f"{task.dataset}/train" for task in self.tasks if not task.train_data]):
            log.warning("warning: %s", line)

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.data.tokenizer) if self.data.tokenizer else Path(self.data.root) / "tokenizer"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML: what ``<run.output_dir>/config.yaml`` holds and ``--print-config`` prints."""
        return yaml.safe_dump(json.loads(json.dumps(self.to_dict())), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(path: str | Path) -> Path:
    """Absolute paths as given; relative ones against the working directory, else the repository root."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def _positive(obj, *names: str) -> None:
    section = type(obj).__name__.removesuffix("Config").lower()
    for name in names:
        value = getattr(obj, name)
        if not value > 0:  # also refuses NaN
            raise ValueError(f"{section}.{name} must be > 0, got {value}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Loads a YAML config (with ``_base_`` inheritance), applies overrides and validates every field."""
    data = load_yaml(Path(path)) if path else {}
    data = apply_overrides(data, overrides or [])
    return build_dataclass(Config, data, "")
