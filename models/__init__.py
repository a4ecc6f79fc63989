"""condmoe models: architecture only (no ranks, no config files, no environment).

``models/ds_moe.py`` is the single adapter to DeepSpeed's expert parallelism and is imported only by train/.
"""

from condmoe.models import _compat  # noqa: F401  (must precede every timm import; see the module docstring)
from condmoe.models.args import UniPerceiverArgs
from condmoe.models.generalist import TaskOutput, UniPerceiver
from condmoe.models.moa import MoAArgs
from condmoe.models.moe import MoEArgs, MoEMLP, MoEStats, pop_moe_stats
from condmoe.models.registry import SIZES, create_model, model_args, moe_layer_indices
from condmoe.models.tasks import TASK_TYPES, TASKS, TaskSpec, task_spec

__all__ = ["TASKS", "TASK_TYPES", "SIZES", "MoAArgs", "MoEArgs", "MoEMLP", "MoEStats", "TaskOutput", "TaskSpec",
           "UniPerceiver", "UniPerceiverArgs", "create_model", "model_args", "moe_layer_indices", "pop_moe_stats",
           "task_spec"]
