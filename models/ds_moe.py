"""The one adapter between condmoe's MoE layers and DeepSpeed's expert parallelism.

``apply_expert_parallel(model, ep_size)`` turns every ``MoEMLP`` of a model built identically on every rank into an
expert-parallel layer:

* DeepSpeed's expert and expert-data-parallel process groups are created (``deepspeed.utils.groups``), the same ones
  DeepSpeed's own ``MoE`` layer uses, so ZeRO reduces expert gradients over the expert-data-parallel group only;
* each rank keeps its slice of experts (global experts ``[rank * L, (rank + 1) * L)``) and drops the others, so
  expert ``e`` has the same initial weights whatever ``ep_size`` is;
* expert parameters are tagged as DeepSpeed expects (``allreduce=False``, ``group_name``);
* the layer is wrapped in a subclass of ``deepspeed.moe.layer.MoE``, which is how the engine recognises MoE layers
  and writes one checkpoint file per global expert;
* the buffers of routed tokens travel with DeepSpeed's differentiable all-to-all.

Routing and expert compute stay in ``models/moe.py``; DeepSpeed's own gate and ``MOELayer`` are not used.
"""

import torch
import torch.nn as nn
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import _AllToAll
from deepspeed.utils import groups

from models.moe import MoEMLP


class DeepSpeedExpertComm:
    """Expert-parallel exchanges over one DeepSpeed expert-parallel group."""

    def __init__(self, group_name: str):
        self.group = groups._get_expert_parallel_group(group_name)
        self.ep_size = groups._get_expert_parallel_world_size(group_name)
        self.ep_rank = groups._get_expert_parallel_rank(group_name)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        # [E, C, D] ordered by global expert: chunk s of dim 0 goes to rank s; what comes back is [S * L, C, D]
        # ordered by source rank. The same call maps expert outputs back.
        if self.ep_size == 1:
            return x
        return _AllToAll.apply(self.group, x)

    def agree_capacity(self, capacity: int) -> int:
        if self.ep_size == 1:
            return capacity
        # Ranks may route different token counts (each draws its own task): all must use the largest buffer.
        value = torch.tensor([capacity], dtype=torch.int64, device=get_accelerator().current_device_name())
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return int(value.item())


class ExpertParallelMoE(MoE):
    """``deepspeed.moe.layer.MoE`` in type only: holds a condmoe ``MoEMLP`` as ``deepspeed_moe``.

    ``MoE.__init__`` is deliberately not called (it would build DeepSpeed's gate and experts); this class sets the
    attributes the engine reads (``num_experts``, ``num_local_experts``, ``ep_size``, ``expert_group_name``). Expert
    weights live at ``deepspeed_moe.experts.deepspeed_experts.<local id>``, DeepSpeed's checkpoint naming.
    """

    def __init__(self, moe: MoEMLP, ep_size: int):
        nn.Module.__init__(self)
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = moe.num_experts
        self.num_local_experts = moe.num_local_experts
        self.deepspeed_moe = moe

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        # Called by deepspeed.initialize; the groups already exist (apply_expert_parallel made them).
        self.deepspeed_moe.comm = DeepSpeedExpertComm(self.expert_group_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deepspeed_moe(x)


def apply_expert_parallel(model: nn.Module, ep_size: int) -> nn.Module:
    """Makes every ``MoEMLP`` of ``model`` expert parallel over groups of ``ep_size`` ranks (in place).

    Call after ``deepspeed.init_distributed()`` and before ``deepspeed.initialize``, on a model built with the same
    seed on every rank. Works for ``ep_size == 1`` too (experts replicated, gradients all-reduced by ZeRO as usual).
    """
    world_size = dist.get_world_size()
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"moe.ep_size={ep_size} must divide the world size {world_size}")
    group_name = f"ep_size_{ep_size}"
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_rank = groups._get_expert_parallel_rank(group_name)

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, MoEMLP):
                continue
            if child.num_experts % ep_size:
                raise ValueError(f"moe.num_experts={child.num_experts} must be divisible by moe.ep_size={ep_size}")
            num_local = child.num_experts // ep_size
            local = list(child.experts.deepspeed_experts)[ep_rank * num_local:(ep_rank + 1) * num_local]
            child.experts.deepspeed_experts = nn.ModuleList(local)
            for param in child.experts.parameters():
                param.allreduce = False
                param.group_name = group_name
            wrapped = ExpertParallelMoE(child, ep_size)
            wrapped.set_deepspeed_parallelism()
            setattr(parent, child_name, wrapped)
    return model
