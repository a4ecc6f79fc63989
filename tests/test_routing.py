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
