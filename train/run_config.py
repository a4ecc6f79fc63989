"""The run's own config for the tools that read its checkpoint: ``condmoe-eval``, ``condmoe-export``,
``condmoe-experts``.

A run folder holds the config it trained with (``<output_dir>/config.yaml``, written by the trainer). The tools build
the model from that file, not from ``--config``: ``--config`` (with the overrides) only says where the run is
(``run.output_dir``), unless it is the run's ``config.yaml`` itself. The user's overrides then apply on top of the
run's config, in three kinds (docs/training.md, "Evaluation"):

- model keys (``model.*``, ``moe.*``, ``moa.*``, the tokenizer and the tasks' types and number): refused when they
  change the run's value, since the checkpoint then meets another model;
- evaluation keys (the data, the tasks' datasets and names, ``moe.expert_backend``): allowed; results of a changed
  evaluation go to a file whose name records the changes, never over the run's own;
- everything else is training only (``run.*``, ``optim.*``, batch sizes, augmentation, ...): allowed and without
  effect on what the tools compute.
"""

import re
import sys
from dataclasses import dataclass, field
from hashlib import sha1
from pathlib import Path
from typing import Any

from condmoe.models.tasks import TASKS, modality_twins
from condmoe.train.checkpoint import TAG
from condmoe.train.config import Config, load_config

# Keys (tasks.N written tasks.*) that evaluation, export and analysis read but that leave the model as it is.
EVAL_KEYS = ("data.root", "data.num_frames", "tasks.*.dataset", "tasks.*.name", "moe.expert_backend")
# What build_model and the model read that does not change the model's outputs at evaluation (no gradients, the plain
# model with every expert, whatever ep_size wrote the checkpoint).
NO_EFFECT_KEYS = ("moe.ep_size", "model.grad_checkpointing")
# Prefixes of keys that make another model: every field build_model or the model's layers read.
MODEL_PREFIXES = ("model.", "moe.", "moa.")
MODEL_KEYS = ("data.tokenizer", "data.max_text_len", "tasks", "tasks.*.type")


def kind(key: str, old: Any = None, new: Any = None) -> str:
    """``'model'``, ``'eval'`` or ``'none'`` (no effect on evaluation) for a flat config key (``tasks.0.type``) that
    changes from ``old`` to ``new``: a task's type changed to its image/video twin (captioning ->
    video_captioning) is evaluation, the zero-shot transfer of the same task to the other visual input."""
    key = re.sub(r"^tasks\.\d+", "tasks.*", key)
    if key == "tasks.*.type" and old in TASKS and new in TASKS and modality_twins(old, new):
        return "eval"
    if key in EVAL_KEYS:
        return "eval"
    if key in NO_EFFECT_KEYS:
        return "none"
    if key in MODEL_KEYS or key.startswith(MODEL_PREFIXES):
        return "model"
    if key.startswith(("data.", "tasks.*.")) and not _training_only(key):
        return "eval"  # a data or task field not listed here: assume it changes what is measured
    return "none"


# data.* and tasks.*.* fields that only training reads.
_TRAINING_ONLY = ("data.num_workers", "data.worker_budget", "tasks.*.train_data", "tasks.*.train_num_samples",
                  "data.shuffle_buffer", "tasks.*.weight", "tasks.*.batch_size",
                  "tasks.*.loss_weight", "tasks.*.label_smoothing", "tasks.*.split_targets",
                  "tasks.*.gather_negatives")


def _training_only(key: str) -> bool:
    return key in _TRAINING_ONLY or key.startswith("tasks.*.augment.")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config dict as ``{'moe.top_k': 2, 'tasks.0.type': ..., ...}`` (lists of values stay values)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}.{i}"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def differences(base: Config, other: Config) -> dict[str, tuple[Any, Any]]:
    """``{key: (base value, other value)}`` for every key whose value differs; ``tasks`` when the number does."""
    if len(base.tasks) != len(other.tasks):
        return {"tasks": (f"{len(base.tasks)} tasks", f"{len(other.tasks)} tasks")}
    a, b = flatten(base.to_dict()), flatten(other.to_dict())
    return {key: (a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}


@dataclass
class ResolvedRun:
    """What a tool works on: the config (the run's own with the overrides applied), the run folder, and the
    evaluation keys the overrides changed (empty: the run's own evaluation)."""

    cfg: Config
    run_dir: Path
    saved: Path | None = None
    """The run's config.yaml the config was built from (None: there is none; ``--config`` is used as given)."""
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """The changed evaluation keys as a file name part: ``data.num_frames=8`` (several joined by ``,``)."""
        text = ",".join(f"{key}={_value(new)}" for key, (_, new) in self.changes.items())
        text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
        if len(text) > 100:
            text = f"{','.join(self.changes)}"[:80] + "-" + sha1(text.encode()).hexdigest()[:10]
        return text

    def result_path(self, name: str) -> Path:
        """Where the results called ``name`` (``eval.json``, ``experts``) go in the run folder: ``name`` itself for
        the run's own evaluation, ``<stem>.<tag><suffix>`` when overrides changed it (never over the run's own)."""
        path = self.run_dir / name
        if not self.changes:
            return path
        return path.with_name(f"{path.stem}.{self.tag}{path.suffix}")


def _value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def find_run_dir(config: str, checkpoint: str, cfg: Config) -> Path:
    """The run folder: the one holding ``--checkpoint`` (``<run>/checkpoints[/step_N]``) when that has a config.yaml;
    the folder of ``--config`` when that is a run's config.yaml; else ``run.output_dir``."""
    if checkpoint:
        path = Path(checkpoint)
        for run_dir in ((path.parent.parent,) if TAG.match(path.name) else ()) + (path.parent,):
            if (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints").is_dir():
                return run_dir
    path = Path(config)
    if path.name == "config.yaml" and (path.parent / "checkpoints").is_dir():
        return path.parent
    return Path(cfg.run.output_dir)


def load_run_config(prog: str, config: str, overrides: list[str], checkpoint: str = "") -> ResolvedRun:
    """The run's own config with ``overrides`` on top. Raises ValueError naming every override that changes the model
    (one line). Without a config.yaml in the run folder, ``--config`` and the overrides are used as given (a note
    says so)."""
    given = load_config(config, overrides)
    run_dir = find_run_dir(config, checkpoint, given)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        print(f"{prog}: note: no config.yaml in {run_dir}: the model is built from --config {config} as given",
              file=sys.stderr)
        return ResolvedRun(given, run_dir)
    base = load_config(saved)
    cfg = load_config(saved, overrides)
    changed = differences(base, cfg)
    refused = [f"{key}={new} (the run has {old})" for key, (old, new) in changed.items()
               if kind(key, old, new) == "model"]
    if "data.tokenizer" not in changed and _other_tokenizer(base, cfg):
        # data.root names the tokenizer too (<root>/tokenizer) unless data.tokenizer is set
        refused.append(f"data.root={cfg.data.root} (its tokenizer {cfg.tokenizer_dir} is not the run's "
                       f"{base.tokenizer_dir})")
    if refused:
        what = ", ".join(refused)
        raise ValueError(f"{what}: would change the model the checkpoint was trained as; {prog} builds it from the "
                         f"run's {saved} and refuses model keys (docs/training.md, Evaluation)")
    ignored = [key for key, (old, new) in differences(base, given).items() if kind(key, old, new) == "model"]
    if ignored and Path(config).resolve() != saved.resolve():
        print(f"{prog}: note: the model is the run's ({saved}); --config {config} differs in "
              f"{', '.join(ignored[:5])}{', ...' if len(ignored) > 5 else ''}, which is ignored", file=sys.stderr)
    return ResolvedRun(cfg, run_dir, saved,
                       {key: values for key, values in changed.items() if kind(key, *values) == "eval"})


def _other_tokenizer(base: Config, cfg: Config) -> bool:
    """Whether ``cfg``'s tokenizer folder holds other files than the run's (False where either is missing: then the
    checkpoint's shapes are the only check)."""
    a, b = base.tokenizer_dir, cfg.tokenizer_dir
    if not (a.is_dir() and b.is_dir()) or a.resolve() == b.resolve():
        return False
    return _files(a) != _files(b)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
