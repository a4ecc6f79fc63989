"""Tier 1: expert usage, task similarity, extraction (exact when every used expert is kept), transfer freezing."""

import subprocess
import sys

import pytest
import torch

from condmoe.models import MoAArgs, MoEArgs, create_model, moe_layer_indices, pop_moe_stats
from condmoe.models.extract import (
    collect_usage,
    experts_to_keep,
    extract_task_model,
    freeze_for_transfer,
    load_extracted,
    save_extracted,
    task_similarity,
    track_usage,
)
from condmoe.train.experts import plot

VOCAB, SPE = 100, 4


def mod_squad_model(level: str = "task_gate", moa: bool = True):
    torch.manual_seed(0)
    model = create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, max_text_len=12, num_tasks=2,
                         moe_layers=moe_layer_indices(4, 2, 1),
                         moe=MoEArgs(num_experts=8, top_k=2, routing=level),
                         moa_layers=moe_layer_indices(4, 2, 0) if moa else (),
                         moa=MoAArgs(num_experts=8, num_heads=2, routing=level, mi_loss_weight=0.0)).eval()
    # Task-specific expert sets, as a trained Mod-Squad model has: the routed sublayer's input gets a shared direction
    # u (its LayerNorm bias) and each router row a large +-u component, so task 0 prefers experts 0-3, task 1 4-7.
    u = torch.nn.functional.normalize(torch.randn(model.dim), dim=0)
    preferred = torch.tensor([[1.0] * 4 + [-1.0] * 4, [-1.0] * 4 + [1.0] * 4])  # [task, expert]
    with torch.no_grad():
        for block in model.blocks:
            for norm, sub in ((block.norm1, block.attn), (block.norm2, block.mlp)):
                if hasattr(sub, "router"):
                    norm.bias.copy_(3 * u)
                    direction = 4 * preferred[..., None] * u + 0.5 * torch.randn(2, 8, model.dim)
                    if sub.router.level == "task_gate":
                        sub.router.weight.copy_(direction)
                    else:
                        sub.router.weight.copy_(direction[0])
    return model


def task_batch(batch: int = 4):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(batch, 12, dtype=torch.bool)
    mask[:, 7:] = False
    return {"images": torch.randn(batch, 3, 32, 32, generator=g), "labels": torch.arange(batch) % 3,
            "text_ids": torch.randint(5, VOCAB, (batch, 12), generator=g), "text_mask": mask,
            "target_ids": torch.randint(5, VOCAB, (3, 12), generator=g), "target_mask": mask[:3]}


@pytest.mark.parametrize("level, moa", [("task_gate", True), ("token", True), ("task_gate", False)])
def test_extracted_model_equals_full_model_when_every_used_expert_is_kept(level, moa):
    model = mod_squad_model(level, moa)
    batch = task_batch()
    track_usage(model)
    with torch.no_grad():
        full = model("image_text_retrieval", batch, task_id=1)
    usage = collect_usage(model)
    keep = experts_to_keep(usage, task_id=1, threshold=0.0)
    assert any(len(v) < 8 for v in keep.values()), "nothing pruned: the test would prove little"
    small = extract_task_model(model, 1, keep).eval()
    with torch.no_grad():
        extracted = small("image_text_retrieval", batch, task_id=0)
    if moa:
        # MoA's output projection then sums over fewer (zero) head slots: equal up to float rounding.
        assert torch.allclose(extracted.logits, full.logits, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(extracted.logits, full.logits)  # MoE MLPs only: bitwise
    assert small.num_params() < model.num_params()


def test_pruning_too_much_changes_outputs_but_keeps_k_experts():
    model = mod_squad_model()
    batch = task_batch()
    track_usage(model)
    with torch.no_grad():
        full = model("image_text_retrieval", batch, task_id=1)
    keep = experts_to_keep(collect_usage(model), task_id=1, threshold=1e9)
    assert all(len(v) == 2 for v in keep.values())  # at least top-k survive
    with torch.no_grad():
        pruned = extract_task_model(model, 1, keep).eval()("image_text_retrieval", batch, task_id=0)
    assert not torch.allclose(pruned.logits, full.logits)


def test_usage_counts_and_keep_rule_on_hand_made_usage():
    usage = {"blocks.1.mlp": {"kind": "moe", "top_k": 2, "tokens": [10, 10],
                              "counts": [[10, 9, 1, 0], [0, 0, 10, 10]], "mean_prob": [[0.25] * 4] * 2}}
    # shares of task 0: 50%, 45%, 5%, 0%: threshold 3 / k=2 -> keep shares above 1.5%
    assert experts_to_keep(usage, 0, threshold=3.0) == {"blocks.1.mlp": [0, 1, 2]}
    assert experts_to_keep(usage, 0, threshold=20.0) == {"blocks.1.mlp": [0, 1]}  # > 10%
    assert experts_to_keep(usage, 1, threshold=0.0) == {"blocks.1.mlp": [2, 3]}
    sim = task_similarity(usage, keep_threshold=3.0)
    assert sim["cosine"][0][0] == pytest.approx(1.0)
    assert sim["cosine"][0][1] == pytest.approx((0.05 * 0.5) / ((0.5**2 + 0.45**2 + 0.05**2) ** 0.5 * 0.5**0.5))
    assert sim["overlap"][0][1] == pytest.approx(1 / 4)  # {0,1,2} vs {2,3}


def test_collected_usage_counts_every_selection():
    model = mod_squad_model()
    track_usage(model)
    with torch.no_grad():
        model.encode_images(torch.randn(2, 3, 32, 32), task_id=0)
    usage = collect_usage(model)
    tokens = 2 * (1 + 16)  # spe + 16 patches per image
    for stats in usage.values():
        assert stats["tokens"] == [tokens, 0]
        assert sum(stats["counts"][0]) == tokens * stats["top_k"]
        assert sum(stats["mean_prob"][0]) == pytest.approx(1.0)
    pop_moe_stats(model)


def test_saved_extraction_loads_and_runs_without_deepspeed(tmp_path):
    model = mod_squad_model()
    track_usage(model)
    with torch.no_grad():
        model.encode_images(torch.randn(2, 3, 32, 32), task_id=1)
    small = extract_task_model(model, 1, experts_to_keep(collect_usage(model), 1, 0.0))
    save_extracted(small, tmp_path / "small", {"task": "t1"})
    restored = load_extracted(tmp_path / "small")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored.eval().encode_images(x), small.eval().encode_images(x))
    code = ("import sys, torch; from condmoe.models.extract import load_extracted; "
            f"m = load_extracted({str(tmp_path / 'small')!r}).eval(); m.encode_images(torch.randn(1, 3, 32, 32)); "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'; print('OK')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("OK"), out.stderr[-2000:]


def test_transfer_freezes_experts_for_real():
    model = mod_squad_model()
    trainable = freeze_for_transfer(model)
    assert trainable and all(".router." in n or n.startswith(("ln_post", "proj", "logit_scale")) for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any("experts" in n for n in frozen) and any("q_weight" in n for n in frozen)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        out = model("image_text_retrieval", task_batch(), task_id=1)
        (out.loss + pop_moe_stats(model).aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, routers[n]) for n, p in model.named_parameters() if n in routers)


def test_plots_are_written(tmp_path):
    model = mod_squad_model()
    track_usage(model)
    with torch.no_grad():
        model.encode_images(torch.randn(2, 3, 32, 32), task_id=0)
        model.encode_images(torch.randn(2, 3, 32, 32), task_id=1)
    usage = {"tasks": ["a", "b"], "layers": collect_usage(model)}
    pngs = plot(usage, task_similarity(usage["layers"]), tmp_path)
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
