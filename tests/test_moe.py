"""Tier 1: the MoE MLP in one process against a per-token reference."""

import pytest
import torch
from timm.layers import Mlp

from condmoe.models import MoEArgs, MoEMLP, pop_moe_stats


def reference_moe(layer: MoEMLP, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token: sum over chosen experts of gate * expert(x), softmax over router logits."""
    probs = torch.softmax(x_TD @ layer.router.weight.t(), dim=-1)
    gates, idx = probs.topk(layer.top_k, dim=-1)
    if layer.normalize_gates and layer.top_k > 1:  # top-1 keeps the raw probability (Switch)
        gates = gates / gates.sum(-1, keepdim=True)
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(layer.top_k):
            out[t] += gates[t, k] * layer.experts.deepspeed_experts[idx[t, k]](x_TD[t:t + 1])[0]
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dropless_moe_matches_per_token_reference(top_k):
    torch.manual_seed(0)
    layer = MoEMLP(16, 32, args=MoEArgs(num_experts=4, top_k=top_k, drop_tokens=False)).eval()
    x = torch.randn(2, 5, 16)
    assert torch.allclose(layer(x), reference_moe(layer, x.reshape(-1, 16)).reshape(2, 5, 16), atol=1e-5)


def test_single_expert_equals_timm_mlp():
    torch.manual_seed(0)
    layer = MoEMLP(8, 16, args=MoEArgs(num_experts=1, top_k=1, drop_tokens=False))
    mlp = Mlp(8, 16)
    mlp.load_state_dict(layer.experts.deepspeed_experts[0].state_dict())
    x = torch.randn(3, 4, 8)
    assert torch.allclose(layer(x), mlp(x), atol=1e-6)


def test_capacity_drops_tokens_to_zero_output():
    torch.manual_seed(0)
    layer = MoEMLP(8, 16, args=MoEArgs(num_experts=2, top_k=1, capacity_factor=0.5, min_capacity=1)).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0  # all tokens with positive sum prefer expert 0
    x = torch.ones(1, 6, 8)
    y = layer(x)
    capacity = 2  # ceil(1 * 0.5 * 6 / 2) = 2 slots: tokens 2..5 are dropped
    assert y[0, :capacity].abs().sum() > 0
    assert torch.equal(y[0, capacity:], torch.zeros_like(y[0, capacity:]))
    stats = pop_moe_stats(layer)
    assert stats.dropped_fraction.item() == pytest.approx(4 / 6)


def test_stats_accumulate_over_calls_and_reset_on_pop():
    torch.manual_seed(0)
    layer = MoEMLP(8, 16, args=MoEArgs(num_experts=4, top_k=2, balance_loss_weight=0.5, z_loss_weight=0.1))
    assert pop_moe_stats(layer) is None
    layer(torch.randn(2, 3, 8))
    layer(torch.randn(4, 3, 8))
    stats = pop_moe_stats(layer)
    assert stats.expert_counts_LE.shape == (1, 4)
    assert stats.expert_counts_LE.sum().item() == (6 + 12) * 2
    assert stats.aux_loss.requires_grad
    expected = 0.5 * stats.balance_loss * 2 + 0.1 * stats.z_loss * 2  # mean over two calls, summed into aux
    assert stats.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert pop_moe_stats(layer) is None


def test_gradients_reach_router_and_every_expert():
    torch.manual_seed(0)
    layer = MoEMLP(8, 16, args=MoEArgs(num_experts=4, top_k=2, drop_tokens=False))
    out = layer(torch.randn(4, 8, 8))
    (out.square().mean() + pop_moe_stats(layer).aux_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    for expert in layer.experts.deepspeed_experts:
        assert all(p.grad is not None for p in expert.parameters())


def test_gate_noise_only_in_training():
    torch.manual_seed(0)
    layer = MoEMLP(8, 16, args=MoEArgs(num_experts=4, top_k=1, gate_noise_std=1.0, drop_tokens=False))
    x = torch.randn(2, 16, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_constructor_validates():
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(8, 16, args=MoEArgs(num_experts=2, top_k=3))
    with pytest.raises(ValueError, match="out_features"):
        MoEMLP(8, 16, out_features=4)
