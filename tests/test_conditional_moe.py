"""Tier 1: routing levels, the static (no-dispatch) path, task gates, mixture of attention heads, expert backends."""

import pytest
import torch

from condmoe.models import MoEArgs, MoEMLP, pop_moe_stats
from condmoe.models.moa import MoAArgs, MoAttention
from condmoe.models.router import ATTRIBUTES, ROUTING_LEVELS, Router, RoutingContext

DIM = 16


def context(batch=2, length=6, task_id=0, attribute="visual_input", modality=0) -> RoutingContext:
    attrs = torch.tensor(ATTRIBUTES[attribute], dtype=torch.float32).expand(batch, length, -1).clone()
    attrs[:, length // 2:] = torch.tensor(ATTRIBUTES["text_target"], dtype=torch.float32)  # two segments
    modality_BN = torch.full((batch, length), modality)
    modality_BN[:, length // 2:] = 2
    pad = torch.ones(batch, length, dtype=torch.bool)
    pad[1, -2:] = False
    return RoutingContext(task_id=task_id, modality_BN=modality_BN, attribute_BNA=attrs, pad_mask_BN=pad)


@pytest.mark.parametrize("level, num_groups", [("token", None), ("task_gate", None), ("context", 2), ("task", 1),
                                               ("modality", 2), ("attribute", 2)])
def test_router_groups_per_level(level, num_groups):
    torch.manual_seed(0)
    router = Router(DIM, 4, level, num_tasks=3)
    logits, group = router(torch.randn(2, 6, DIM), context(task_id=2))
    if num_groups is None:
        assert group is None and logits.shape == (12, 4)
    else:
        assert logits.shape == (num_groups, 4) and group.shape == (12,)
        assert int(group.max()) == num_groups - 1
    assert logits.dtype == torch.float32


def test_context_routing_ignores_padding():
    torch.manual_seed(0)
    router = Router(DIM, 4, "context")
    x = torch.randn(1, 6, DIM)
    ctx = RoutingContext(pad_mask_BN=torch.tensor([[True] * 4 + [False] * 2]))
    logits_a, _ = router(x, ctx)
    x[0, 4:] = 100.0  # padded tokens change; the decision must not
    logits_b, _ = router(x, ctx)
    assert torch.equal(logits_a, logits_b)


def test_task_gates_start_uniform_and_are_per_task():
    router = Router(DIM, 4, "task_gate", num_tasks=2)
    x = torch.randn(1, 3, DIM)
    assert torch.equal(router(x, RoutingContext(task_id=1))[0], torch.zeros(3, 4))  # zero-init: uniform routing
    with torch.no_grad():
        router.weight[1].normal_()
    assert torch.equal(router(x, RoutingContext(task_id=0))[0], torch.zeros(3, 4))
    assert not torch.equal(router(x, RoutingContext(task_id=1))[0], torch.zeros(3, 4))


def test_unknown_level_and_missing_side_information():
    with pytest.raises(ValueError, match="routing level"):
        Router(DIM, 4, "sentence")
    with pytest.raises(ValueError, match="attribute_BNA"):
        Router(DIM, 4, "attribute")(torch.randn(1, 2, DIM), RoutingContext())


@pytest.mark.parametrize("level", ["task", "modality", "attribute"])
def test_static_path_equals_per_token_dispatch_exactly(level):
    torch.manual_seed(0)
    layer = MoEMLP(DIM, 32, args=MoEArgs(num_experts=4, top_k=2, routing=level, drop_tokens=False), num_tasks=2).eval()
    x, ctx = torch.randn(2, 6, DIM), context(task_id=1)
    static = layer(x, ctx)
    layer.static_dispatch = False
    dispatched = layer(x, ctx)
    assert torch.allclose(static, dispatched, atol=1e-6)
    # and the decision really is one per group: tokens of a segment share their experts
    logits, group = layer.router(x, ctx)
    assert logits.shape[0] == int(group.max()) + 1 <= 2


def test_static_path_has_no_capacity_and_reports_stats():
    torch.manual_seed(0)
    layer = MoEMLP(DIM, 32, args=MoEArgs(num_experts=4, top_k=1, routing="task", capacity_factor=0.1, min_capacity=1))
    layer(torch.randn(2, 6, DIM), context())
    stats = pop_moe_stats(layer)
    assert stats.dropped_fraction.item() == 0.0
    # 12 tokens of which 2 are padding: only the 10 real ones are routed and counted
    assert stats.expert_counts_LE.sum().item() == 10 and (stats.expert_counts_LE > 0).sum().item() == 1


def test_every_level_trains_end_to_end():
    for level in ROUTING_LEVELS:
        torch.manual_seed(0)
        layer = MoEMLP(DIM, 32, args=MoEArgs(num_experts=4, top_k=2, routing=level, mi_loss_weight=0.1), num_tasks=2)
        out = layer(torch.randn(2, 6, DIM), context(task_id=1))
        (out.square().mean() + pop_moe_stats(layer).aux_loss).backward()
        assert all(p.grad is not None for p in layer.router.parameters()), level


def test_grouped_gemm_backend_equals_loop():
    torch.manual_seed(0)
    layer = MoEMLP(DIM, 32, args=MoEArgs(num_experts=4, top_k=2, drop_tokens=False, expert_backend="loop"))
    x = torch.randn(3, 8, DIM, requires_grad=True)
    loop = layer(x)
    loop.sum().backward()
    grads = [p.grad.clone() for p in layer.experts.parameters()]
    layer.zero_grad()
    layer.experts.backend = "grouped"
    x2 = x.detach().clone().requires_grad_()
    grouped = layer(x2)
    grouped.backward(torch.ones_like(grouped))
    assert torch.allclose(loop, grouped, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    for a, p in zip(grads, layer.experts.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-4)


def test_mi_loss_of_a_layer_prefers_task_specific_experts():
    torch.manual_seed(0)
    layer = MoEMLP(DIM, 32, args=MoEArgs(num_experts=2, top_k=1, routing="task_gate", mi_loss_weight=1.0,
                                         balance_loss_weight=0.0), num_tasks=2)
    x = torch.randn(1, 8, DIM)
    for task in (0, 1):
        layer(x, RoutingContext(task_id=task))
    assert pop_moe_stats(layer).mi_loss.item() == pytest.approx(0.0, abs=1e-6)  # zero-init gates: independent
    with torch.no_grad():
        layer.router.weight[0, 0] = 0.0
        layer.router.weight[0, 0, 0] = 50.0
        layer.router.weight[1, 1, 0] = 50.0
    x = torch.ones(1, 8, DIM)
    for task in (0, 1):
        layer(x, RoutingContext(task_id=task))
    stats = pop_moe_stats(layer)
    assert stats.mi_loss.item() < -0.6  # close to -log 2: each task on its own expert
    assert stats.aux_loss.item() == pytest.approx(stats.mi_loss.item(), rel=1e-5)


def reference_moa(layer: MoAttention, x_BND: torch.Tensor) -> torch.Tensor:
    """Per token and chosen head: q_e = W_q[e] x, shared k/v, output W_o[e] attn, gated and summed."""
    batch, length, _ = x_BND.shape
    h = layer.head_dim
    probs = torch.softmax(x_BND.reshape(-1, DIM) @ layer.router.weight.t(), -1)
    gates, idx = probs.topk(layer.top_k, -1)
    k, v = layer.kv(x_BND).split(h, dim=-1)
    wq = layer.q_weight.reshape(layer.num_experts, h, DIM)
    bq = layer.q_bias.reshape(layer.num_experts, h)
    wo = layer.o_weight.reshape(DIM, layer.num_experts, h)
    out = torch.zeros(batch * length, DIM)
    for t in range(batch * length):
        b = t // length
        for slot in range(layer.top_k):
            e = int(idx[t, slot])
            q = wq[e] @ x_BND[b, t % length] + bq[e]
            attn = torch.softmax(k[b] @ q / h ** 0.5, dim=0) @ v[b]
            out[t] += gates[t, slot] * (wo[:, e] @ attn)
    return (out + layer.o_bias).reshape(batch, length, DIM)


def test_mixture_of_attention_heads_matches_per_head_reference():
    torch.manual_seed(0)
    layer = MoAttention(DIM, 3, MoAArgs(num_experts=6, head_dim=4, routing="token", mi_loss_weight=0.0)).eval()
    x = torch.randn(2, 5, DIM)
    assert torch.allclose(layer(x), reference_moa(layer, x), atol=1e-5)
    out = layer(x, ctx=RoutingContext())
    (out.sum() + pop_moe_stats(layer).aux_loss).backward()
    assert layer.q_weight.grad.abs().sum() > 0 and layer.router.weight.grad.abs().sum() > 0


def test_moa_respects_padding_mask():
    torch.manual_seed(0)
    layer = MoAttention(DIM, 2, MoAArgs(num_experts=4, routing="token", mi_loss_weight=0.0)).eval()
    x = torch.randn(1, 5, DIM)
    mask = torch.zeros(1, 1, 1, 5)
    mask[..., 3:] = torch.finfo(torch.float32).min
    a = layer(x, attn_mask=mask)[:, :3]
    x[:, 3:] = 7.0
    b = layer(x, attn_mask=mask)[:, :3]
    assert torch.allclose(a, b, atol=1e-5)


def test_mi_window_is_a_ring_of_training_steps_in_the_state_dict():
    torch.manual_seed(0)
    layer = MoEMLP(DIM, 32, args=MoEArgs(num_experts=2, top_k=1, routing="task_gate", mi_loss_weight=1.0,
                                         mi_window=2), num_tasks=2)
    assert {"mi_history_WXE", "mi_cursor"} <= set(layer.state_dict())
    x = torch.randn(1, 4, DIM)
    for task in (0, 1, 0):
        layer(x, RoutingContext(task_id=task))
        pop_moe_stats(layer)
    assert layer.mi_cursor.item() == 3
    assert layer.mi_history_WXE[1, 1].sum().item() > 0 and layer.mi_history_WXE[0, 0].sum().item() > 0
    layer.eval()
    layer(x, RoutingContext(task_id=1))
    pop_moe_stats(layer)
    assert layer.mi_cursor.item() == 3  # evaluation reads the window but does not move it
    assert "mi_history_WXE" not in MoEMLP(DIM, 32, args=MoEArgs(num_experts=2, mi_window=2)).state_dict()  # no MI


def test_grouped_gemm_falls_back_to_the_loop_with_one_warning(monkeypatch, caplog):
    torch.manual_seed(0)
    layer = MoEMLP(DIM, 32, args=MoEArgs(num_experts=4, top_k=2, drop_tokens=False, expert_backend="grouped"))
    x = torch.randn(2, 6, DIM)
    reference = layer(x)

    def unsupported(*args, **kwargs):
        raise RuntimeError("grouped_mm: not supported on this device")

    monkeypatch.setattr(torch, "_grouped_mm", unsupported)
    with caplog.at_level("WARNING", logger="condmoe.moe"):
        first, second = layer(x), layer(x)
    assert torch.allclose(first, reference, atol=1e-5) and torch.equal(first, second)
    warnings = [r.getMessage() for r in caplog.records if r.name == "condmoe.moe"]
    assert len(warnings) == 1 and "not supported on this device" in warnings[0] and "loop" in warnings[0]


def test_grouped_gemm_runs_in_the_autocast_dtype_like_the_loop():
    """Autocast does not cover torch._grouped_mm: the layer casts, so float32 activations give a bf16 GEMM."""
    torch.manual_seed(0)
    dim, hidden = 64, 128  # _grouped_mm wants 16-byte strides
    layer = MoEMLP(dim, hidden, args=MoEArgs(num_experts=4, top_k=2, drop_tokens=False, expert_backend="grouped"))
    x_RD, counts_L = torch.randn(24, dim), torch.tensor([5, 7, 0, 12])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped = layer.experts(x_RD, counts_L)
        layer.experts.backend = "loop"
        loop = layer.experts(x_RD, counts_L)
    assert grouped.dtype == loop.dtype == torch.bfloat16
    assert torch.allclose(grouped.float(), loop.float(), atol=2e-2, rtol=2e-2)
    assert layer.experts(x_RD, counts_L).dtype == torch.float32  # no autocast: as given
