"""Tier 1: routing maths on hand-written logits."""

import math

import pytest
import torch

from models import routing


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


def test_route_dropless_grows_capacity_and_agree_capacity_wins():
    logits = torch.tensor([[5.0, 1.0, 0.0]] * 5)
    r = routing.route(logits, top_k=1, capacity=None)
    assert r.capacity == 5 and bool(r.kept_TK.all())
    r = routing.route(logits, top_k=1, capacity=2, agree_capacity=lambda c: 7)
    assert r.capacity == 7 and bool(r.kept_TK.all())


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


def test_dispatch_then_combine_with_identity_experts_returns_gated_tokens():
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    logits = torch.randn(6, 3)
    r = routing.route(logits, top_k=2, capacity=2)
    buffers = routing.dispatch(x, r, num_experts=3)
    assert buffers.shape == (3, 2, 5)
    y = routing.combine(buffers, r)
    expected = x * r.gate_TK.sum(-1, keepdim=True)
    assert torch.allclose(y, expected, atol=1e-6)
    # each kept (token, expert) sits in its slot
    for t, k in zip(*torch.nonzero(r.kept_TK, as_tuple=True)):
        assert torch.equal(buffers[r.expert_idx_TK[t, k], r.slot_TK[t, k]], x[t])


def test_dispatch_is_differentiable():
    x = torch.randn(4, 3, requires_grad=True)
    r = routing.route(torch.randn(4, 2), top_k=1, capacity=None)
    routing.combine(routing.dispatch(x, r, 2) * 2.0, r).sum().backward()
    assert torch.allclose(x.grad, 2.0 * r.gate_TK.sum(-1, keepdim=True).expand_as(x))
