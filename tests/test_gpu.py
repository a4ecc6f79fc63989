"""GPU-only paths (``-m gpu``; skipped without CUDA, run by bench/gpu_suite.sh): grouped expert GEMMs in bf16 against
the per-expert loop, autocast reaching them, fused AdamW on CUDA, a training step of the debug model in bf16."""

import logging

import pytest
import torch

from condmoe.models import MoEArgs, MoEMLP, create_model, moe_layer_indices, pop_moe_stats

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_grouped_experts_equal_the_loop_in_bf16_without_falling_back(caplog):
    torch.manual_seed(0)
    layer = MoEMLP(768, 3072, args=MoEArgs(num_experts=8, top_k=2, drop_tokens=False,
                                           expert_backend="grouped")).cuda().to(torch.bfloat16)
    x_RD, counts_L = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16), torch.tensor(
        [700, 300, 0, 900, 512, 512, 600, 572], device="cuda")
    with caplog.at_level(logging.WARNING, logger="condmoe.moe"):
        grouped = layer.experts(x_RD, counts_L)
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # torch._grouped_mm ran
    layer.experts.backend = "loop"
    loop = layer.experts(x_RD, counts_L)
    assert grouped.dtype == torch.bfloat16 and torch.allclose(grouped.float(), loop.float(), atol=5e-2, rtol=5e-2)


def test_autocast_reaches_the_grouped_gemm():
    torch.manual_seed(0)
    layer = MoEMLP(256, 1024, args=MoEArgs(num_experts=4, top_k=2, drop_tokens=False)).cuda()
    x = torch.randn(2, 64, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        grouped = layer.experts(x.reshape(-1, 256), torch.tensor([32, 32, 32, 32], device="cuda"))
        y = layer(x)
    assert grouped.dtype == torch.bfloat16 and y.dtype == torch.float32  # the layer hands back its input's dtype
    y.float().sum().backward()
    assert all(p.grad is not None for p in layer.experts.parameters())
    pop_moe_stats(layer)


def test_a_bf16_training_step_with_fused_adamw_on_cuda():
    torch.manual_seed(0)
    model = create_model("debug", vocab_size=64, spe_token_id=4, max_text_len=8, moe_layers=moe_layer_indices(4),
                         moe=MoEArgs(num_experts=4, top_k=2)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    images = torch.randn(8, 3, 32, 32, device="cuda")
    ids = torch.randint(5, 64, (3, 6), device="cuda")
    ids[:, 0] = 4
    batch = {"images": images, "labels": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1], device="cuda"),
             "target_ids": ids, "target_mask": torch.ones(3, 6, dtype=torch.bool, device="cuda")}
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model("image_classification", batch)
        loss = out.loss + pop_moe_stats(model).aux_loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.blocks[0].attn.qkv.weight)
