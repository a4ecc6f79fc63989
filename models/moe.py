"""Token-routed Mixture-of-Experts MLP (plain PyTorch, runs in one process).

``MoEMLP`` is a drop-in for timm's ``Mlp`` (same constructor keywords), so a timm ``Block`` takes it as
``mlp_layer``. ``forward(x) -> x``; the auxiliary losses and expert counts of every call are accumulated on the layer
and read (and cleared) by the trainer with ``pop_moe_stats(model)``: no tuple-returning forward.

Expert parallelism is not this file's business: the layer exchanges expert buffers through ``self.comm``
(``LocalExpertComm`` here, all experts local). ``models/ds_moe.py`` swaps in DeepSpeed's expert-parallel all-to-all
and keeps only this rank's experts.

Shape legend: B batch, N sequence, T = B*N tokens, E experts, L local experts, S expert-parallel ranks,
C capacity, D model width.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import Mlp, trunc_normal_

from models import routing


class LocalExpertComm:
    """All experts live in this process: exchanges are identities."""

    ep_size = 1
    ep_rank = 0

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def agree_capacity(self, capacity: int) -> int:
        return capacity


class Experts(nn.Module):
    """The experts held by this process.

    The list is called ``deepspeed_experts`` because DeepSpeed's engine finds expert weights by that name when it
    writes one checkpoint file per global expert (``layer_{l}_expert_{e}_mp_rank_00_model_states.pt``) and maps them
    back to local experts on load; keeping its naming lets those files work across expert-parallel sizes.
    """

    def __init__(self, experts: list[nn.Module]):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(experts)

    def forward(self, x_SLCD: torch.Tensor) -> torch.Tensor:
        num_ranks, _, capacity, dim = x_SLCD.shape
        # Expert i serves slot i of every source rank: one [S * C, D] matmul per local expert.
        outputs = [expert(x_SLCD[:, i].reshape(num_ranks * capacity, dim)).reshape(num_ranks, capacity, dim)
                   for i, expert in enumerate(self.deepspeed_experts)]
        return torch.stack(outputs, dim=1)


@dataclass
class MoEStats:
    """What MoE layers report for one training step (summed over every call since the last pop)."""

    aux_loss: torch.Tensor  # weighted sum of balance and z losses over layers; differentiable
    balance_loss: torch.Tensor  # detached, mean over layers and calls
    z_loss: torch.Tensor  # detached, mean over layers and calls
    expert_counts_LE: torch.Tensor  # assignments per expert per MoE layer (before capacity dropping)
    dropped_fraction: torch.Tensor  # share of assignments dropped for capacity, over all layers


class MoEMLP(nn.Module):
    """Top-k token-routed MoE MLP with capacity, gate noise, balance and z losses.

    Args:
        in_features: model width D.
        hidden_features: hidden width of each expert MLP.
        out_features: output width (defaults to D; must equal it).
        act_layer, norm_layer, bias, drop: forwarded to every expert (timm ``Mlp`` semantics).
        num_experts: experts E in this layer.
        top_k: experts per token.
        capacity_factor: training capacity, ``ceil(k * factor * T / E)`` slots per expert.
        eval_capacity_factor: the same in eval mode.
        min_capacity: lower bound on slots per expert.
        drop_tokens: if False, dropless: capacity grows to the busiest expert's load.
        normalize_gates: renormalise the top-k gate values.
        gate_noise_std: std of Gaussian noise added to router logits in training (0 disables).
        balance_loss_weight, z_loss_weight: weights of the auxiliary losses this layer reports.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
        bias: bool = True,
        drop: float = 0.0,
        num_experts: int = 8,
        top_k: int = 2,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        normalize_gates: bool = True,
        gate_noise_std: float = 0.0,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if out_features not in (None, in_features):
            raise ValueError(f"MoEMLP keeps the width: out_features={out_features} != in_features={in_features}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.dim = in_features
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.normalize_gates = normalize_gates
        self.gate_noise_std = gate_noise_std
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        dd = {"device": device, "dtype": dtype}
        # Router kept in fp32 (cast in forward): tiny, and routing decisions are sensitive to rounding.
        self.router = nn.Linear(in_features, num_experts, bias=False, **dd)
        self.experts = Experts([
            Mlp(in_features, hidden_features, act_layer=act_layer, norm_layer=norm_layer, bias=bias, drop=drop, **dd)
            for _ in range(num_experts)
        ])
        self.comm = LocalExpertComm()
        self.reset_stats()

    @property
    def num_local_experts(self) -> int:
        return len(self.experts.deepspeed_experts)

    def init_weights(self, std: float = 0.02) -> None:
        trunc_normal_(self.router.weight, std=std)

    def reset_stats(self) -> None:
        self._aux_loss = None
        self._balance = []
        self._z = []
        self._counts_E = None
        self._dropped = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, self.dim)
        num_tokens = x_TD.shape[0]

        logits_TE = nn.functional.linear(x_TD.float(), self.router.weight.float())
        if self.training and self.gate_noise_std > 0:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * self.gate_noise_std

        if self.drop_tokens:
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            capacity = routing.expert_capacity(num_tokens, self.num_experts, self.top_k, factor, self.min_capacity)
        else:
            capacity = None
        # Every expert-parallel rank must use the same buffer shape, whatever its own token count.
        r = routing.route(logits_TE, self.top_k, capacity, self.normalize_gates, self.comm.agree_capacity)
        capacity = r.capacity

        x_ECD = routing.dispatch(x_TD, r, self.num_experts)
        x_SLCD = self.comm.all_to_all(x_ECD).reshape(self.comm.ep_size, self.num_local_experts, capacity, self.dim)
        y_SLCD = self.experts(x_SLCD)
        y_ECD = self.comm.all_to_all(y_SLCD).reshape(self.num_experts, capacity, self.dim)
        y_TD = routing.combine(y_ECD, r)

        self._record(logits_TE, r)
        return y_TD.to(x.dtype).reshape(shape)

    def _record(self, logits_TE: torch.Tensor, r: routing.Routing) -> None:
        balance = routing.load_balance_loss(r.probs_TE, r.expert_idx_TK)
        z = routing.router_z_loss(logits_TE) if self.z_loss_weight > 0 else logits_TE.new_zeros(())
        aux = self.balance_loss_weight * balance + self.z_loss_weight * z
        self._aux_loss = aux if self._aux_loss is None else self._aux_loss + aux
        self._balance.append(balance.detach())
        self._z.append(z.detach())
        counts_E = r.counts_E.detach()
        self._counts_E = counts_E if self._counts_E is None else self._counts_E + counts_E
        self._dropped.append(1.0 - r.kept_TK.float().mean().detach())


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def pop_moe_stats(model: nn.Module) -> MoEStats | None:
    """Collects and clears what every MoE layer recorded since the last call; None if nothing ran."""
    layers = [m for m in moe_layers(model) if m._aux_loss is not None]
    if not layers:
        return None
    stats = MoEStats(
        aux_loss=torch.stack([m._aux_loss for m in layers]).sum(),
        balance_loss=torch.stack([b for m in layers for b in m._balance]).mean(),
        z_loss=torch.stack([z for m in layers for z in m._z]).mean(),
        expert_counts_LE=torch.stack([m._counts_E for m in layers]),
        dropped_fraction=torch.stack([d for m in layers for d in m._dropped]).mean(),
    )
    for m in layers:
        m.reset_stats()
    return stats
