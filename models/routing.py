"""Routing maths for Mixture-of-Experts layers: pure functions from router logits to expert assignments.

Nothing here owns parameters, reads a rank or talks to other processes; every function is tested on hand-written
logits (tests/test_routing.py).

Shape legend (suffixes on tensor names):
    T  tokens routed in this call (batch and sequence flattened)
    E  experts (global count)
    K  experts chosen per token (top-k)
    C  capacity: token slots per expert
    R  kept (token, expert) pairs, sorted by expert
    X  tasks
    D  model width
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    """Where each token goes and with which weight.

    Attributes:
        expert_idx_TK: chosen experts per token, best first.
        gate_TK: combine weights; zero where the assignment was dropped for capacity.
        slot_TK: position of the token in its expert's queue; ``capacity`` where dropped.
        probs_TE: router softmax over all experts (what the balance loss sees).
        counts_E: assignments per expert before dropping (what logs and balance statistics see).
        capacity: token slots per expert used for this call (dropless: 1, with every assignment in slot 0).
    """

    expert_idx_TK: torch.Tensor
    gate_TK: torch.Tensor
    slot_TK: torch.Tensor
    probs_TE: torch.Tensor
    counts_E: torch.Tensor
    capacity: int

    @property
    def kept_TK(self) -> torch.Tensor:
        return self.slot_TK < self.capacity


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """Token slots per expert: ``ceil(k * factor * T / E)``, at least ``min_capacity`` (GShard/Switch)."""
    return max(min_capacity, math.ceil(top_k * capacity_factor * num_tokens / num_experts))


def topk_experts(logits_TE: torch.Tensor, top_k: int, normalize: bool = True):
    """Softmax over experts, then the top-k experts per token and their gate values.

    Args:
        logits_TE: router logits (noise, if any, already added).
        top_k: experts per token.
        normalize: renormalise the k gate values to sum to one (GShard top-2); otherwise keep raw probabilities.
            Top-1 always keeps the raw probability (Switch): a gate of exactly 1 would give the router no gradient.

    Returns:
        ``(probs_TE, expert_idx_TK, gate_TK)``.
    """
    num_experts = logits_TE.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    gate_TK, expert_idx_TK = torch.topk(probs_TE, top_k, dim=-1)
    if normalize and top_k > 1:
        gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gate_TK.dtype).eps)
    return probs_TE, expert_idx_TK, gate_TK


def assign_slots(expert_idx_TK: torch.Tensor, num_experts: int,
                 priority_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of every (token, choice) in its expert's queue.

    Priority follows GShard: all first choices are queued before any second choice, and within one choice rank
    tokens keep their order, or the order of ``priority_T`` (a permutation of the tokens, most important first:
    V-MoE's batch-priority routing). Returns ``(slot_TK, counts_E)``; a slot >= capacity means the assignment is
    dropped.
    """
    if priority_T is not None:
        slot_TK, counts_E = assign_slots(expert_idx_TK.index_select(0, priority_T), num_experts)
        return torch.empty_like(slot_TK).index_copy_(0, priority_T, slot_TK), counts_E
    num_tokens, top_k = expert_idx_TK.shape
    # Queue order: choice rank major, token minor -> flatten the transposed [K, T] one-hot.
    onehot_KTE = F.one_hot(expert_idx_TK.t(), num_experts).reshape(top_k * num_tokens, num_experts)
    position_KTE = torch.cumsum(onehot_KTE, dim=0) - 1
    slot_KT = (position_KTE * onehot_KTE).sum(dim=-1).reshape(top_k, num_tokens)
    counts_E = onehot_KTE.sum(dim=0)
    return slot_KT.t().contiguous(), counts_E


def route(
    logits_TE: torch.Tensor,
    top_k: int,
    capacity: int | None,
    normalize: bool = True,
    batch_priority: bool = False,
) -> Routing:
    """Top-k routing with a per-expert capacity.

    Args:
        logits_TE: router logits.
        top_k: experts per token.
        capacity: slots per expert; assignments beyond it are dropped (gate zero, token passes through the residual).
            ``None`` means dropless (every assignment kept).
        normalize: renormalise the top-k gate values over the assignments that were KEPT, as DeepSpeed's top2gating
            does: a token whose second choice was dropped gives its first expert the whole weight, one that lost
            both gets zero. Top-1 keeps the raw probability (see ``topk_experts``).
        batch_priority: fill expert queues in order of each token's top-1 probability, highest first (V-MoE's
            batch-priority routing), instead of token order; only matters when assignments are dropped.
    """
    num_experts = logits_TE.shape[-1]
    probs_TE, expert_idx_TK, gate_TK = topk_experts(logits_TE, top_k, normalize=False)
    if capacity is None:  # dropless: no queue positions needed, every assignment keeps slot 0 of 1
        if normalize and top_k > 1:
            gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gate_TK.dtype).eps)
        counts_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=num_experts)
        return Routing(expert_idx_TK, gate_TK, torch.zeros_like(expert_idx_TK), probs_TE, counts_E, 1)
    # Stable: ties keep token order, so batch priority over equal probabilities is the plain order.
    priority_T = torch.argsort(gate_TK[:, 0], descending=True, stable=True) if batch_priority else None
    slot_TK, counts_E = assign_slots(expert_idx_TK, num_experts, priority_T)
    kept_TK = slot_TK < capacity
    gate_TK = gate_TK * kept_TK
    if normalize and top_k > 1:
        gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gate_TK.dtype).eps)
    slot_TK = torch.where(kept_TK, slot_TK, torch.full_like(slot_TK, capacity))
    return Routing(expert_idx_TK, gate_TK, slot_TK, probs_TE, counts_E, capacity)


def load_balance_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor) -> torch.Tensor:
    """The Switch / GShard balance loss: ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of tokens whose FIRST choice is expert e, counted before capacity drops (not
    differentiable), ``P_e`` the mean router probability of e (differentiable). This is the value of DeepSpeed's
    ``top1gating`` (Switch) and of its ``top2gating`` (GShard's ``mean_e(f_e P_e) * E^2``, the same number), both
    tested against DeepSpeed. It equals 1 for perfectly uniform routing and grows with imbalance.
    """
    num_experts = probs_TE.shape[-1]
    fraction_E = F.one_hot(expert_idx_TK[:, 0], num_experts).float().mean(dim=0)
    return num_experts * torch.sum(fraction_E * probs_TE.mean(dim=0))


def importance_loss(probs_TE: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Importance loss (Shazeer et al. 2017; V-MoE): squared coefficient of variation of the experts' summed router
    probabilities, ``CV(sum_t p_te)^2`` (population variance). 0 when every expert gets the same total weight."""
    importance_E = probs_TE.float().sum(dim=0)
    return importance_E.var(unbiased=False) / importance_E.mean().square().clamp_min(eps)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition, keeps router logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def mutual_information_loss(joint_XE: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Mod-Squad's loss: minus the mutual information between tasks and experts.

    Args:
        joint_XE: summed router probabilities per (task, expert) over the tokens of every task (X tasks); the caller
            sums it over every data-parallel rank first. Normalised here, so ``P(t, e) = joint / joint.sum()``.

    Returns:
        ``-sum_{t,e} P(t,e) log(P(t,e) / (P(t) P(e)))``, with ``0 log 0 = 0``. Minimising it spreads the load over
        experts (high H(E)) while making each task's expert distribution sharp (low H(E|T)).
    """
    p_te = joint_XE.float() / joint_XE.float().sum().clamp_min(eps)
    p_t = p_te.sum(dim=1, keepdim=True)
    p_e = p_te.sum(dim=0, keepdim=True)
    ratio = p_te / (p_t * p_e).clamp_min(eps)
    return -(p_te * torch.log(ratio.clamp_min(eps))).sum()


@dataclass
class DispatchPlan:
    """(token, choice) pairs sorted by expert, the layout grouped GEMMs and all-to-all exchanges want.

    Attributes:
        order_R: for each of the R kept pairs in expert order, its flat index ``t * K + k`` among the T*K pairs.
        token_R: the token of each sorted pair.
        counts_E: kept pairs per expert (sums to R).
    """

    order_R: torch.Tensor
    token_R: torch.Tensor
    counts_E: torch.Tensor


def plan_dispatch(routing: Routing, num_experts: int) -> DispatchPlan:
    """Sorts the kept (token, expert) pairs by expert (stable: token order within an expert)."""
    num_tokens, top_k = routing.expert_idx_TK.shape
    # Dropped pairs get the sentinel expert E and sort last; slicing them off needs their count (one host sync).
    key_P = torch.where(routing.kept_TK, routing.expert_idx_TK, num_experts).reshape(-1)
    counts_E = torch.bincount(key_P, minlength=num_experts + 1)[:num_experts]
    num_kept = int(counts_E.sum())
    order_R = torch.argsort(key_P, stable=True)[:num_kept]
    return DispatchPlan(order_R, order_R // top_k, counts_E)


def combine_sorted(y_RD: torch.Tensor, plan: DispatchPlan, routing: Routing) -> torch.Tensor:
    """Gated sum per token of the expert outputs of its kept pairs: ``sum_k gate_k * y[pair (t, k)]``."""
    num_tokens, top_k = routing.expert_idx_TK.shape
    gate_R = routing.gate_TK.reshape(-1).index_select(0, plan.order_R).to(y_RD.dtype)
    out_TD = y_RD.new_zeros(num_tokens, y_RD.shape[-1])
    return out_TD.index_add(0, plan.token_R, y_RD * gate_R[:, None])


def remap_experts(routing_: Routing, slot_E: torch.Tensor) -> Routing:
    """Routing onto a pruned layer: global expert ids -> local slots (``slot_E[e]``, -1 where e was removed).

    Assignments to removed experts are dropped like capacity overflow (gate zero); what the layer reports about its
    routing (probabilities, counts) stays in the global expert space of the original router.
    """
    local_TK = slot_E[routing_.expert_idx_TK]
    kept_TK = routing_.kept_TK & (local_TK >= 0)
    return Routing(local_TK.clamp_min(0), routing_.gate_TK * kept_TK,
                   torch.where(kept_TK, routing_.slot_TK, torch.full_like(routing_.slot_TK, routing_.capacity)),
                   routing_.probs_TE, routing_.counts_E, routing_.capacity)
