"""Tier 1: routing maths on hand-written logits."""

import math

import pytest
import torch

from condmoe.models import routing


def test_topk_experts_renormalises_the_chosen_gates():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs, idx, gates = routing.topk_experts(logits, top_k=2, normalize=True)
    assert idx.tolist() == [[0, 1]]
    assert torch.allclose(probs.sum(-1), torch.ones(1))
    e = math.e
    assert gates[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)])
    _, _, raw = routing.topk_experts(logits, top_k=2, normalize=False)
    assert raw[0].tolist() == pytest.approx(probs[0, :2].tolist())


def test_topk_experts_general_k_and_bad_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    _, idx, gates = routing.topk_experts(logits, top_k=3)
    assert idx.tolist() == [[1, 3, 2]]
    assert gates.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="top_k"):
        routing.topk_experts(logits, top_k=5)


def test_assign_slots_queues_first_choices_before_second_choices():
    # tokens 0..2 all pick expert 0 first; their second choices are 1, 2, 1.
    idx = torch.tensor([[0, 1], [0, 2], [0, 1]])
    slots, counts = routing.assign_slots(idx, num_experts=3)
    assert slots.tolist() == [[0, 0], [1, 0], [2, 1]]
    assert counts.tolist() == [3, 2, 1]


def test_route_drops_assignments_beyond_capacity():
    logits = torch.tensor([[5.0, 1.0, 0.0], [5.0, 0.0, 1.0], [5.0, 1.0, 0.0]])
    r = routing.route(logits, top_k=2, capacity=2)
    # expert 0 takes tokens 0 and 1; token 2's first choice overflows and is dropped, its second choice is kept.
    assert r.kept_TK.tolist() == [[True, True], [True, True], [False, True]]
    assert r.gate_TK[2, 0].item() == 0.0 and r.gate_TK[2, 1].item() > 0
    assert r.slot_TK[2, 0].item() == 2  # == capacity marks a drop
    assert r.counts_E.tolist() == [3, 2, 1]


def test_route_dropless_keeps_everything():
    logits = torch.tensor([[5.0, 1.0, 0.0]] * 5)
    r = routing.route(logits, top_k=2, capacity=None)
    assert bool(r.kept_TK.all())
    assert r.counts_E.tolist() == [5, 5, 0]


def test_expert_capacity_formula():
    assert routing.expert_capacity(100, 8, 2, 1.25, 4) == math.ceil(2 * 1.25 * 100 / 8)
    assert routing.expert_capacity(3, 8, 1, 1.0, 4) == 4


def test_load_balance_loss_is_one_when_uniform_and_grows_with_imbalance():
    uniform_probs = torch.full((4, 4), 0.25)
    uniform_idx = torch.tensor([[0], [1], [2], [3]])
    assert routing.load_balance_loss(uniform_probs, uniform_idx).item() == pytest.approx(1.0)
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 4)
    skewed_idx = torch.zeros(4, 1, dtype=torch.long)
    assert routing.load_balance_loss(skewed_probs, skewed_idx).item() == pytest.approx(4 * 0.7)


def test_router_z_loss():
    assert routing.router_z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2)


def test_plan_dispatch_sorts_kept_pairs_by_expert():
    # token 0 -> (2, 0), token 1 -> (0, 1), token 2 -> (0, 2) with expert 0's capacity 1: token 2's pick is dropped.
    logits = torch.tensor([[2.0, 0.0, 3.0], [3.0, 2.0, 0.0], [3.0, 0.0, 2.0]])
    r = routing.route(logits, top_k=2, capacity=2)
    assert r.expert_idx_TK.tolist() == [[2, 0], [0, 1], [0, 2]]
    assert r.kept_TK.tolist() == [[True, False], [True, True], [True, True]]  # expert 0: tokens 1, 2 come first
    plan = routing.plan_dispatch(r, num_experts=3)
    assert plan.counts_E.tolist() == [2, 1, 2]
    assert plan.token_R.tolist() == [1, 2, 1, 0, 2]  # expert 0: tokens 1, 2; expert 1: token 1; expert 2: 0, 2
    assert plan.order_R.tolist() == [2, 4, 3, 0, 5]  # flat t * K + k


def test_combine_sorted_with_identity_experts_returns_gated_tokens():
    torch.manual_seed(0)
    x = torch.randn(6, 5, requires_grad=True)
    r = routing.route(torch.randn(6, 3), top_k=2, capacity=2)
    plan = routing.plan_dispatch(r, num_experts=3)
    y = routing.combine_sorted(x.index_select(0, plan.token_R) * 2.0, plan, r)
    expected = 2.0 * x * r.gate_TK.sum(-1, keepdim=True)
    assert torch.allclose(y, expected, atol=1e-6)
    y.sum().backward()
    assert torch.allclose(x.grad, 2.0 * r.gate_TK.sum(-1, keepdim=True).expand_as(x))


def test_mutual_information_loss_hand_computed():
    # Two tasks, each always on its own expert: MI = H(T) = log 2, loss = -log 2.
    separated = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    assert routing.mutual_information_loss(separated).item() == pytest.approx(-math.log(2))
    # Both tasks use experts identically: independent, MI = 0.
    shared = torch.tensor([[3.0, 1.0], [6.0, 2.0]])
    assert routing.mutual_information_loss(shared).item() == pytest.approx(0.0, abs=1e-6)
    # A hand-computed mixed case: P = [[.4, .1], [.1, .4]].
    mixed = torch.tensor([[4.0, 1.0], [1.0, 4.0]])
    expected = -(2 * 0.4 * math.log(0.4 / 0.25) + 2 * 0.1 * math.log(0.1 / 0.25))
    assert routing.mutual_information_loss(mixed).item() == pytest.approx(expected, rel=1e-6)
    # Scale-free: the counts' normalisation does not matter.
    assert routing.mutual_information_loss(mixed * 7).item() == pytest.approx(expected, rel=1e-6)


# --- equality with DeepSpeed's gating (deepspeed/moe/sharded_moe.py), with token dropping -------------------------
def _deepspeed_gates(combine_SEC: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's combine weights [T, E, C] as a gate per (token, expert) [T, E]."""
    return combine_SEC.sum(dim=-1)


def _our_gates(r: routing.Routing, num_experts: int) -> torch.Tensor:
    return torch.zeros(r.gate_TK.shape[0], num_experts).scatter_add(1, r.expert_idx_TK, r.gate_TK)


# 8 tokens, 4 experts: expert 0 is everyone's favourite, so its queue overflows at capacity 3 (T/E * factor * k).
CROWDED = torch.tensor([[3.0, 1.0, 0.2, 0.0], [2.5, 0.1, 1.5, 0.0], [2.0, 1.9, 0.0, 0.3], [1.0, 0.0, 3.0, 0.5],
                        [2.2, 0.0, 0.1, 1.0], [0.0, 2.0, 1.0, 0.0], [1.8, 0.2, 0.0, 1.7], [2.9, 0.0, 0.0, 2.0]])


def test_top2_with_dropping_equals_deepspeed_top2gating():
    """Kept assignments, renormalised gates (a token whose second choice was dropped gives its first expert weight
    1) and the balance loss are DeepSpeed's, in the regime users hit: capacity 3 of 8 tokens, drops on expert 0."""
    from deepspeed.moe.sharded_moe import top2gating

    factor = 0.75  # capacity = ceil(T / E * 2 * 0.75) = 3
    l_aux, combine_SEC, _, exp_counts = top2gating(CROWDED.clone(), factor, min_capacity=1,
                                                   top2_2nd_expert_sampling=False)
    capacity = routing.expert_capacity(8, 4, 2, factor, 1)
    assert capacity == combine_SEC.shape[-1] == 3
    r = routing.route(CROWDED, top_k=2, capacity=capacity)
    assert not bool(r.kept_TK.all())  # the regime under test: something is dropped
    assert torch.allclose(_our_gates(r, 4), _deepspeed_gates(combine_SEC), atol=1e-6)
    assert torch.equal(r.counts_E, exp_counts)
    ours = routing.load_balance_loss(r.probs_TE, r.expert_idx_TK)
    assert ours.item() == pytest.approx(l_aux.item(), rel=1e-6)
    one_kept = (r.kept_TK.sum(-1) == 1).nonzero().squeeze(1)
    assert len(one_kept) and torch.allclose(r.gate_TK[one_kept].sum(-1), torch.ones(len(one_kept)))


@pytest.mark.parametrize("batch_priority", [False, True])
def test_top1_with_dropping_equals_deepspeed_top1gating(monkeypatch, batch_priority):
    """Switch routing: raw top-1 probability as the gate, DeepSpeed's l_aux, and the same tokens kept. DeepSpeed
    keeps the tokens of highest priority (random: RTS; without RTS, torch.topk's order among ties, which is not token
    order); with its priorities set to token order it keeps ours, with the top-1 probability our batch priority."""
    from deepspeed.moe import sharded_moe

    probs = torch.softmax(CROWDED, dim=-1)
    scores = probs.max(-1, keepdim=True).values if batch_priority else torch.linspace(1, 0.5, 8)[:, None]
    monkeypatch.setitem(sharded_moe.exp_selection_uniform_map, CROWDED.device, lambda shape: scores.expand(shape))
    l_aux, combine_SEC, _, exp_counts = sharded_moe.top1gating(CROWDED.clone(), capacity_factor=1.0, min_capacity=1)
    capacity = routing.expert_capacity(8, 4, 1, 1.0, 1)
    assert capacity == combine_SEC.shape[-1] == 2
    r = routing.route(CROWDED, top_k=1, capacity=capacity, batch_priority=batch_priority)
    assert r.kept_TK.sum().item() < 8
    assert torch.allclose(_our_gates(r, 4), _deepspeed_gates(combine_SEC), atol=1e-6)
    assert torch.equal(r.counts_E, exp_counts)
    assert routing.load_balance_loss(r.probs_TE, r.expert_idx_TK).item() == pytest.approx(l_aux.item(), rel=1e-6)


def test_balance_loss_counts_first_choices_only():
    """Two tokens, first choices 0 and 1, second choices both 2: f = (1/2, 1/2, 0) whatever the second choices."""
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.2, 0.5, 0.3]])
    idx = torch.tensor([[0, 2], [1, 2]])
    assert routing.load_balance_loss(probs, idx).item() == pytest.approx(3 * (0.5 * 0.35 + 0.5 * 0.35))


def test_importance_loss_is_the_squared_coefficient_of_variation():
    assert routing.importance_loss(torch.full((4, 2), 0.5)).item() == pytest.approx(0.0)
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3]])  # importance (1.6, 0.4): mean 1, population std 0.6
    assert routing.importance_loss(probs).item() == pytest.approx(0.36)


def test_batch_priority_keeps_the_most_confident_tokens():
    """Capacity 1 on expert 0, wanted by tokens 0 (p=0.6) and 1 (p=0.9): token order keeps token 0, batch priority
    keeps token 1 (V-MoE)."""
    logits = torch.log(torch.tensor([[0.6, 0.4], [0.9, 0.1]]))
    plain = routing.route(logits, top_k=1, capacity=1)
    prio = routing.route(logits, top_k=1, capacity=1, batch_priority=True)
    assert plain.kept_TK[:, 0].tolist() == [True, False]
    assert prio.kept_TK[:, 0].tolist() == [False, True]
    assert prio.gate_TK[1, 0].item() == pytest.approx(0.9)


def test_unique_rows_equals_torch_unique_on_every_kind_of_key():
    from condmoe.models.router import ATTRIBUTES, unique_rows

    attrs = torch.tensor([ATTRIBUTES[name] for name in ("text_target", "visual_input", "text_target", "vocab_target",
                                                        "visual_input")], dtype=torch.float32)
    modality = torch.tensor([[2], [0], [2], [1]])
    other = torch.tensor([[0.5, 1.0], [0.5, 1.0], [0.25, 3.0]])
    for keys in (attrs, modality, other):
        rows, inverse = unique_rows(keys)
        expected_rows, expected_inverse = torch.unique(keys, dim=0, return_inverse=True)
        assert torch.equal(rows, expected_rows) and torch.equal(inverse, expected_inverse)
