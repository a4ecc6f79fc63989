"""Tier 1: Uni-Perceiver-MoE's linear experts (models/linear_moe.py): merged static routing is the per-token mixture
exactly, the fresh layer is its dense twin, evaluation caches merges, padding is not routed, the model wires them."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention

from condmoe.models import MoEArgs, create_model, moe_layer_indices, pop_moe_stats
from condmoe.models.linear_moe import ExpertLinear, LinearMoEAttention, LinearMoEMLP
from condmoe.models.router import ATTRIBUTES, RoutingContext
from condmoe.models.routing import topk_experts
from condmoe.models.tasks import TASK_TYPES

DIM, HIDDEN, EXPERTS = 16, 24, 4
REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def two_segments(batch: int = 2, length: int = 6, pad: bool = True) -> RoutingContext:
    attrs = torch.tensor(ATTRIBUTES["visual_input"], dtype=torch.float32).expand(batch, length, -1).clone()
    attrs[:, length // 2:] = torch.tensor(ATTRIBUTES["text_target"], dtype=torch.float32)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if pad:
        mask[-1, -2:] = False
    return RoutingContext(attribute_BNA=attrs, pad_mask_BN=mask)


def distinct(layer) -> None:
    """Experts start as copies (the reference's deep copy); make them differ so that mixing is tested."""
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, ExpertLinear):
                for w in m.weight:
                    w.add_(0.3 * torch.randn_like(w))
                for b in m.bias or ():
                    b.normal_()
        layer.router.weight.normal_()


def per_token_mixture(linear: ExpertLinear, x_TI: torch.Tensor, idx_TK, gate_TK) -> torch.Tensor:
    """``sum_k g_k (W_{e_k} x + b_{e_k})`` token by token: the definition the layers must match."""
    rows = []
    for t in range(x_TI.shape[0]):
        rows.append(sum(g * F.linear(x_TI[t], linear.weight[e], linear.bias[e] if linear.bias is not None else None)
                        for e, g in zip(idx_TK[t].tolist(), gate_TK[t])))
    return torch.stack(rows)


def token_decisions(layer, x_BND, ctx):
    logits_GE, group_T = layer.router(x_BND, ctx)
    logits_TE = logits_GE if group_T is None else logits_GE.index_select(0, group_T)
    _, idx_TK, gate_TK = topk_experts(logits_TE, layer.top_k, normalize=True)
    return idx_TK, gate_TK


@pytest.mark.parametrize("routing", ["attribute", "token"])
def test_ffn_equals_the_per_token_mixture_of_both_linears(routing):
    """Static levels merge weights per group and token levels dispatch; both equal the definition, with gradients."""
    torch.manual_seed(0)
    layer = LinearMoEMLP(DIM, HIDDEN, args=MoEArgs(num_experts=EXPERTS, top_k=2, routing=routing, expert_type="linear",
                                                   drop_tokens=False))
    distinct(layer)
    x = torch.randn(2, 6, DIM, requires_grad=True)
    ctx = two_segments(pad=False)
    out = layer(x, ctx)
    idx, gate = token_decisions(layer, x, ctx)
    x_TD = x.reshape(-1, DIM)
    expected = per_token_mixture(layer.fc2, F.gelu(per_token_mixture(layer.fc1, x_TD, idx, gate)), idx, gate)
    assert torch.allclose(out.reshape(-1, DIM), expected, atol=1e-5)
    inputs = [x, *layer.fc1.weight, layer.router.weight]
    grads = torch.autograd.grad(out.square().sum(), inputs, allow_unused=True)
    ref = torch.autograd.grad(expected.square().sum(), inputs, allow_unused=True)
    for mine, theirs in zip(grads, ref):
        assert (mine is None) == (theirs is None)  # an expert nothing chose: no gradient here (unused_zero's job)
        assert mine is None or torch.allclose(mine, theirs, atol=1e-4)


def test_static_groups_run_one_matmul_each_at_dense_cost():
    """Two attribute segments: the layer makes one merged matmul per linear and segment, not k per token."""
    torch.manual_seed(0)
    layer = LinearMoEMLP(DIM, HIDDEN, args=MoEArgs(num_experts=EXPERTS, top_k=2, routing="attribute",
                                                   expert_type="linear"))
    calls = []
    original = F.linear

    def counting(x, w, b=None):
        calls.append(tuple(x.shape))
        return original(x, w, b)

    torch.nn.functional.linear, saved = counting, F.linear
    try:
        layer(torch.randn(2, 6, DIM), two_segments(pad=False))
    finally:
        torch.nn.functional.linear = saved
    expert_calls = [c for c in calls if c[-1] in (DIM, HIDDEN) and c[0] == 6]  # the router's own linears aside
    assert len(expert_calls) == 4  # (fc1, fc2) x 2 segments of 6 tokens


def test_a_fresh_layer_is_its_dense_twin():
    """All experts start as one linear copied: whatever the gates, the fresh layer computes the dense FFN/attention."""
    torch.manual_seed(0)
    args = MoEArgs(num_experts=EXPERTS, top_k=2, routing="attribute", expert_type="linear")
    moe, dense = LinearMoEMLP(DIM, HIDDEN, args=args), Mlp(DIM, HIDDEN)
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            getattr(dense, name).weight.copy_(getattr(moe, name).weight[0])
            getattr(dense, name).bias.copy_(getattr(moe, name).bias[0])
    x, ctx = torch.randn(2, 6, DIM), two_segments(pad=False)
    assert torch.allclose(moe(x, ctx), dense(x), atol=1e-5)
    attn, timm_attn = LinearMoEAttention(DIM, 4, args), Attention(DIM, 4, qkv_bias=True)
    with torch.no_grad():
        for name in ("qkv", "proj"):
            getattr(timm_attn, name).weight.copy_(getattr(attn, name).weight[0])
            getattr(timm_attn, name).bias.copy_(getattr(attn, name).bias[0])
    assert torch.allclose(attn(x, ctx=ctx), timm_attn(x), atol=1e-5)


def test_attention_mixes_qkv_and_output_with_one_decision():
    torch.manual_seed(0)
    layer = LinearMoEAttention(DIM, 4, MoEArgs(num_experts=EXPERTS, top_k=2, routing="attribute",
                                               expert_type="linear"))
    distinct(layer)
    x, ctx = torch.randn(2, 6, DIM), two_segments(pad=False)
    idx, gate = token_decisions(layer, x, ctx)
    qkv = per_token_mixture(layer.qkv, x.reshape(-1, DIM), idx, gate)
    q, k, v = qkv.reshape(2, 6, 3, 4, DIM // 4).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, DIM)
    expected = per_token_mixture(layer.proj, o, idx, gate).reshape(2, 6, DIM)
    assert torch.allclose(layer(x, ctx=ctx), expected, atol=1e-5)


def test_padding_is_not_routed_and_does_not_change_real_tokens():
    torch.manual_seed(0)
    layer = LinearMoEMLP(DIM, HIDDEN, args=MoEArgs(num_experts=EXPERTS, top_k=2, routing="token", expert_type="linear",
                                                   capacity_factor=1.0, min_capacity=1))
    distinct(layer)
    ctx = two_segments()
    x = torch.randn(2, 6, DIM)
    noisy = x.clone()
    noisy[-1, -2:] = 100 * torch.randn(2, DIM)  # garbage in the padding
    out, out_noisy = layer(x, ctx), layer(noisy, ctx)
    stats = pop_moe_stats(layer)
    assert torch.equal(out[ctx.pad_mask_BN], out_noisy[ctx.pad_mask_BN])
    assert (out[~ctx.pad_mask_BN] == 0).all()
    assert stats.expert_counts_LE.sum().item() == 2 * 2 * 10  # two calls, top-2, 10 real tokens each


def test_evaluation_caches_merges_until_the_weights_change():
    torch.manual_seed(0)
    layer = LinearMoEMLP(DIM, HIDDEN, args=MoEArgs(num_experts=EXPERTS, top_k=2, routing="attribute",
                                                   expert_type="linear"))
    distinct(layer)
    x, ctx = torch.randn(2, 6, DIM), two_segments()
    training = layer(x, ctx)
    layer.eval()
    with torch.no_grad():
        first, second = layer(x, ctx), layer(x, ctx)
        assert len(layer._merge_cache) == 2  # fc1 and fc2, each merged for both segments at once
        assert torch.allclose(first, training, atol=1e-6) and torch.equal(first, second)
        for w in layer.fc2.weight:  # an optimizer step or a load: the cache must not serve stale merges
            w.mul_(2.0)
        changed = layer(x, ctx)
    assert not torch.allclose(changed, first)
    layer.train()
    assert not layer._merge_cache


def test_merged_linears_are_what_one_attribute_applies():
    """The deployment export: the dense linears of one attribute give the layer's output on that attribute."""
    torch.manual_seed(0)
    layer = LinearMoEMLP(DIM, HIDDEN, args=MoEArgs(num_experts=EXPERTS, top_k=2, routing="attribute",
                                                   expert_type="linear"))
    distinct(layer)
    x = torch.randn(1, 5, DIM)
    attrs = torch.tensor(ATTRIBUTES["text_target"], dtype=torch.float32).expand(1, 5, -1)
    ctx = RoutingContext(attribute_BNA=attrs)
    merged = layer.merged_linears(RoutingContext(attribute_BNA=attrs[:, :1]))
    dense = F.linear(F.gelu(F.linear(x, *merged["fc1"])), *merged["fc2"])
    assert torch.allclose(layer(x, ctx), dense, atol=1e-5)
    with pytest.raises(ValueError, match="static"):
        LinearMoEMLP(DIM, args=MoEArgs(expert_type="linear")).merged_linears(ctx)


def test_the_model_wires_linear_experts_into_attention_and_ffn():
    """Uni-Perceiver-MoE's placement: qkv, proj, fc1, fc2 of every other block; every parameter gets a gradient on
    every task type (ZeRO's buckets stay aligned whatever a rank drew)."""
    from test_model import SPE, VOCAB, task_batch

    torch.manual_seed(0)
    model = create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, max_text_len=12,
                         moe_layers=moe_layer_indices(4),
                         moe=MoEArgs(num_experts=4, top_k=2, routing="attribute", expert_type="linear",
                                     targets=["attn", "ffn"]))
    assert [type(b.attn).__name__ for b in model.blocks] == ["LinearMoEAttention", "Attention"] * 2
    assert [type(b.mlp).__name__ for b in model.blocks] == ["LinearMoEMLP", "Mlp"] * 2
    for task_type in TASK_TYPES:
        out = model(task_type, task_batch(task_type))
        stats = pop_moe_stats(model)
        assert stats.dropped_fraction.item() == 0.0
        (out.loss + stats.aux_loss).backward()
        assert not [n for n, p in model.named_parameters() if p.grad is None], task_type
        model.zero_grad(set_to_none=True)


def test_config_combinations_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="expert_type"):
        MoEArgs(expert_type="conv")
    with pytest.raises(ValueError, match="needs moe.expert_type=linear"):
        MoEArgs(targets=["attn"])
    with pytest.raises(ValueError, match="subset"):
        MoEArgs(targets=["ffn", "ffn"])


def test_the_config_reads_targets_and_refuses_expert_parallel_linear_experts():
    from condmoe.train.config import load_config

    cfg = load_config(REPO_CONFIG, ["moe.expert_type=linear", "moe.targets=[attn, ffn]", "moe.routing=attribute",
                                      "moe.ep_size=1"])
    assert cfg.moe.layer_args().targets == ["attn", "ffn"]
    with pytest.raises(ValueError, match="moe.targets"):
        load_config(REPO_CONFIG, ["moe.targets=[attn, 3]"])
    with pytest.raises(ValueError, match="set moe.ep_size=1"):
        load_config(REPO_CONFIG, ["moe.expert_type=linear", "moe.ep_size=2"])


def test_a_linear_expert_model_extracts_exactly():
    """Mod-Squad's extraction on linear experts (attention and FFN): keeping every expert the task used gives the
    full model's outputs with fewer parameters."""
    from test_model import SPE, VOCAB, task_batch

    from condmoe.models.extract import collect_usage, experts_to_keep, extract_task_model, track_usage

    torch.manual_seed(0)
    model = create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, max_text_len=12, num_tasks=2,
                         moe_layers=moe_layer_indices(4),
                         moe=MoEArgs(num_experts=8, top_k=2, routing="task", expert_type="linear",
                                     targets=["attn", "ffn"], drop_tokens=False)).eval()
    for layer in model.modules():
        if isinstance(layer, LinearMoEMLP | LinearMoEAttention):
            distinct(layer)
    batch = task_batch("image_text_retrieval")
    track_usage(model)
    with torch.no_grad():
        full = model("image_text_retrieval", batch, task_id=1)
    keep = experts_to_keep(collect_usage(model), task_id=1, threshold=0.0)
    assert any(len(v) < 8 for v in keep.values()), "nothing pruned: the test would prove little"
    small = extract_task_model(model, 1, keep).eval()
    with torch.no_grad():
        extracted = small("image_text_retrieval", batch, task_id=0)
    assert torch.allclose(extracted.logits, full.logits, atol=1e-5)
    assert small.num_params() < model.num_params()


def test_merged_dense_models_are_the_encoders_of_their_attribute():
    """Deployment (Uni-Perceiver-MoE): one dense model per attribute; the visual_input one is the image encoder and the
    text_target one the text encoder of the MoE model, exactly, at dense size."""
    from test_model import SPE, VOCAB

    from condmoe.models.extract import merge_static

    torch.manual_seed(0)
    model = create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, max_text_len=12, moe_layers=moe_layer_indices(4),
                         moe=MoEArgs(num_experts=4, top_k=2, routing="attribute", expert_type="linear",
                                     targets=["attn", "ffn"])).eval()
    for layer in model.modules():
        if isinstance(layer, LinearMoEMLP | LinearMoEAttention):
            distinct(layer)

    def ctx(name):
        return RoutingContext(attribute_BNA=torch.tensor(ATTRIBUTES[name], dtype=torch.float32)[None, None])

    images = torch.randn(2, 3, 32, 32)
    ids, mask = torch.randint(5, VOCAB, (2, 8)), torch.ones(2, 8, dtype=torch.bool)
    ids[:, 0] = SPE
    with torch.no_grad():
        image_encoder, text_encoder = merge_static(model, ctx("visual_input")), merge_static(model, ctx("text_target"))
        assert torch.allclose(image_encoder.encode_images(images), model.encode_images(images), atol=1e-5)
        assert torch.allclose(text_encoder.encode_texts(ids, mask), model.encode_texts(ids, mask), atol=1e-5)
        assert not torch.allclose(image_encoder.encode_texts(ids, mask), model.encode_texts(ids, mask), atol=1e-3)
    assert image_encoder.num_params() < model.num_params() and not image_encoder.moe_layers


def test_evaluation_loads_weights_whatever_the_mi_window():
    """The MI window is run state: a checkpoint loads for evaluation into a model configured with another window (or
    none), while a real weight mismatch is still refused."""
    from condmoe.train.engine import load_weights

    def layer(window):
        torch.manual_seed(0)
        return LinearMoEMLP(DIM, HIDDEN, args=MoEArgs(num_experts=EXPERTS, expert_type="linear", routing="task_gate",
                                                      mi_loss_weight=0.1, mi_window=window), num_tasks=2)

    with_window, without = layer(4), layer(0)
    load_weights(without, with_window.state_dict())
    load_weights(with_window, without.state_dict())
    assert torch.equal(without.fc1.stacked()[0], with_window.fc1.stacked()[0])
    state = without.state_dict()
    state.pop("fc2.bias.0")
    with pytest.raises(ValueError, match="missing"):
        load_weights(with_window, state)


def test_state_dicts_of_stacked_experts_still_load():
    """Before one parameter per expert, a linear's experts were one [E, O, I] weight and one [E, O] bias."""
    torch.manual_seed(0)
    args = MoEArgs(num_experts=EXPERTS, top_k=2, routing="attribute", expert_type="linear")
    source, target = LinearMoEMLP(DIM, HIDDEN, args=args), LinearMoEMLP(DIM, HIDDEN, args=args)
    distinct(source)
    old = {k: v for k, v in source.state_dict().items() if not k.startswith(("fc1.", "fc2."))}
    for name in ("fc1", "fc2"):
        old[f"{name}.weight"], old[f"{name}.bias"] = getattr(source, name).stacked()
    target.load_state_dict(old, strict=True)
    x, ctx = torch.randn(2, 6, DIM), two_segments()
    assert torch.equal(target(x, ctx), source(x, ctx))


def test_experts_no_group_chose_get_an_exact_zero_gradient_through_the_aux_loss():
    """A static call reads (and differentiates) only its k experts; the step's aux loss gives the others a zero
    gradient, so every parameter has one (data-parallel ranks reduce the same parameters)."""
    torch.manual_seed(0)
    layer = LinearMoEMLP(DIM, HIDDEN, args=MoEArgs(num_experts=EXPERTS, top_k=2, routing="attribute",
                                                   expert_type="linear", balance_loss_weight=0.0))
    distinct(layer)
    x = torch.randn(1, 4, DIM)
    attrs = torch.tensor(ATTRIBUTES["text_target"], dtype=torch.float32).expand(1, 4, -1)
    out = layer(x, RoutingContext(attribute_BNA=attrs))
    chosen = set(layer.fc1.used)
    assert len(chosen) == 2 and layer.fc2.used == chosen  # one group, top-2, shared by both linears
    stats = pop_moe_stats(layer)
    (out.square().sum() + stats.aux_loss).backward()
    for e in range(EXPERTS):
        for p in (layer.fc1.weight[e], layer.fc1.bias[e], layer.fc2.weight[e], layer.fc2.bias[e]):
            assert p.grad is not None
            assert (p.grad.abs().sum() > 0) == (e in chosen), e
    assert not layer.fc1.used  # reset for the next step
