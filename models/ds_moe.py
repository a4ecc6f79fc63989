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
* routed rows travel with a differentiable variable-size all-to-all over DeepSpeed's expert-parallel group;
* routed layers without expert parallelism (mixture of attention heads) get a communicator for their statistics
  (the mutual-information loss sums over every rank).

Routing and expert compute stay in ``models/moe.py``; DeepSpeed's own gate and ``MOELayer`` are not used.
"""

import re

import torch
import torch.distributed.nn.functional
import torch.nn as nn
from deepspeed import comm as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups

from condmoe.models.moe import MoEMLP, RoutedLayer


class DeepSpeedExpertComm:
    """Expert-parallel exchanges over one DeepSpeed expert-parallel group, statistics over all ranks.

    Rows arrive sorted by global expert; expert ``e`` lives on rank ``e // L``. ``dispatch`` first swaps the per-expert
    row counts (a small all-to-all and one host sync for the split sizes), then the rows themselves with a
    differentiable variable-size all-to-all, and regroups what arrived (ordered by source rank) by local expert.
    Ranks may route different token counts (each draws its own task): no common buffer shape is needed.
    """

    def __init__(self, group_name: str):
        self.group = groups._get_expert_parallel_group(group_name)
        self.ep_size = groups._get_expert_parallel_world_size(group_name)
        self.ep_rank = groups._get_expert_parallel_rank(group_name)

    def dispatch(self, x_RD: torch.Tensor, counts_E: torch.Tensor):
        if self.ep_size == 1:
            return x_RD, counts_E, None
        send_SL = counts_E.reshape(self.ep_size, -1)
        recv_SL = torch.empty_like(send_SL)
        torch.distributed.all_to_all_single(recv_SL, send_SL, group=self.group)
        send_splits = send_SL.sum(1).tolist()
        recv_splits = recv_SL.sum(1).tolist()
        x_recv = _all_to_all(x_RD, recv_splits, send_splits, self.group)
        # What arrived is ordered (source rank, local expert); the experts want (local expert, source rank).
        num_local = send_SL.shape[1]
        local_expert_R = torch.repeat_interleave(torch.arange(num_local, device=x_RD.device).repeat(self.ep_size),
                                                 recv_SL.reshape(-1), output_size=x_recv.shape[0])
        order = torch.argsort(local_expert_R, stable=True)
        return x_recv.index_select(0, order), recv_SL.sum(0), (order, send_splits, recv_splits)

    def combine(self, y_RD: torch.Tensor, handle) -> torch.Tensor:
        if handle is None:
            return y_RD
        order, send_splits, recv_splits = handle
        y_recv = torch.empty_like(y_RD).index_copy(0, order, y_RD)
        return _all_to_all(y_recv, send_splits, recv_splits, self.group)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        # Autograd-aware: the backward all-reduces the gradient, which is what the engine's gradient averaging of a
        # loss computed identically on every rank needs.
        if torch.distributed.get_world_size() == 1:
            return x
        return torch.distributed.nn.functional.all_reduce(x)


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    output = x.new_empty(sum(output_splits), *x.shape[1:])
    return torch.distributed.nn.functional.all_to_all_single(output, x.contiguous(), output_splits, input_splits,
                                                            group=group)


class StatsComm(DeepSpeedExpertComm):
    """For routed layers without expert parallelism (MoA): only the statistics reduction is distributed."""

    def __init__(self):
        self.group, self.ep_size, self.ep_rank = None, 1, 0


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

    takes_routing_context = True

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        # Called by deepspeed.initialize; the groups already exist (apply_expert_parallel made them).
        self.deepspeed_moe.comm = DeepSpeedExpertComm(self.expert_group_name)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.deepspeed_moe(x, ctx)


# DeepSpeed's names for the parameters of an expert-parallel layer: a wrapper level (``deepspeed_moe``) and local
# expert ids. Plain names (the model in one process) drop the wrapper level and use global expert ids.
DS_WRAPPER = re.compile(r"\.deepspeed_moe(?=\.|$)")
DS_EXPERTS = ".deepspeed_moe.experts.deepspeed_experts."


def plain_name(name: str) -> str:
    """A parameter's or module's name without DeepSpeed's wrapper level."""
    return DS_WRAPPER.sub("", name)


def global_expert_name(name: str, ep_rank: int, num_local: int) -> str:
    """The plain name of a parameter as DeepSpeed names it on ep rank ``ep_rank`` (local expert ``i`` is global expert
    ``ep_rank * num_local + i``)."""
    head, sep, tail = name.partition(DS_EXPERTS)
    if not sep:
        return plain_name(name)
    local, _, rest = tail.partition(".")
    return plain_name(f"{head}{DS_EXPERTS}{ep_rank * num_local + int(local)}.{rest}")


def expert_layout(model: nn.Module) -> dict:
    """This rank's place in expert parallelism (as checkpoints record it): ep_size, experts per layer, its rank in the
    expert-parallel group and in the expert-data-parallel group."""
    for module in model.modules():
        if isinstance(module, ExpertParallelMoE):
            name = module.expert_group_name
            return {"ep_size": module.ep_size, "num_experts": module.num_experts,
                    "ep_rank": groups._get_expert_parallel_rank(name),
                    "expert_dp_rank": groups._get_expert_data_parallel_rank(name)}
    return {"ep_size": 1, "num_experts": 0, "ep_rank": 0, "expert_dp_rank": dist.get_rank()}


def global_parameter_names(model: nn.Module) -> dict[nn.Parameter, str]:
    """Every parameter's name in the plain model, as ``checkpoint.load_plain_state_dict`` names it: DeepSpeed's wrapper
    level dropped and local expert ids made global (expert ``i`` of ep rank ``r`` is global expert ``r * L + i``)."""
    names = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            offset = groups._get_expert_parallel_rank(module.expert_group_name) * module.num_local_experts
            experts = module.deepspeed_moe.experts.deepspeed_experts
            for local, expert in enumerate(experts):
                for name, param in expert.named_parameters():
                    names[param] = f"{prefix}.experts.deepspeed_experts.{offset + local}.{name}"
    for name, param in model.named_parameters():
        names.setdefault(param, plain_name(name))
    return names


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
    for layer in model.modules():
        if isinstance(layer, RoutedLayer) and not isinstance(layer, MoEMLP):
            layer.comm = StatsComm()
    return model
