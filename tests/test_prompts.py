"""Tier 1: deep prompt tuning (prompts per block and side; only prompts, LayerNorms, temperatures and the class head
train)."""

import pytest
import torch

from condmoe.models import MoEArgs, create_model, moe_layer_indices, pop_moe_stats
from condmoe.models.extract import freeze_for_prompt_tuning
from condmoe.models.losses import similarity_logits

VOCAB, SPE = 50, 4


def batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[:, 8:] = False
    return {"images": torch.randn(3, 3, 32, 32, generator=g), "text_ids": torch.randint(5, VOCAB, (3, 12), generator=g),
            "text_mask": mask}


def model(num_prompts: int):
    torch.manual_seed(0)
    return create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, max_text_len=12, num_prompts=num_prompts,
                        moe_layers=moe_layer_indices(4), moe=MoEArgs(num_experts=4, top_k=2, drop_tokens=False))


def test_zero_prompts_change_nothing_and_prompts_change_features():
    plain, prompted = model(0).eval(), model(3).eval()
    prompted.load_state_dict({**plain.state_dict(), "prompts": prompted.prompts.detach()}, strict=True)
    b = batch()
    with torch.no_grad():
        base = plain.encode_images(b["images"])
        assert not torch.allclose(prompted.encode_images(b["images"]), base, atol=1e-4)
        # padding stays invisible with prompts too
        ids = b["text_ids"].clone()
        ids[:, 8:] = 7
        assert torch.allclose(prompted.encode_texts(b["text_ids"], b["text_mask"]),
                              prompted.encode_texts(ids, b["text_mask"]), atol=1e-5)


def test_prompt_tuning_trains_only_prompts_norms_and_temperatures():
    m = model(3).train()
    trainable = set(freeze_for_prompt_tuning(m))
    assert "prompts" in trainable and "logit_scale" in trainable and "ln_post.weight" in trainable
    assert "blocks.0.norm1.weight" in trainable and "blocks.0.attn.qkv.weight" not in trainable
    assert not any("experts" in n or "router" in n or "proj.weight" == n for n in trainable)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = m("image_text_retrieval", batch())
        (out.loss + pop_moe_stats(m).aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in m.named_parameters():
        assert torch.equal(param, before[name]) != (name in trainable), name


def test_prompt_tuning_needs_prompts():
    with pytest.raises(ValueError, match="num_prompts"):
        freeze_for_prompt_tuning(model(0))


def classification_batch(num_classes: int = 4):
    b = batch()
    g = torch.Generator().manual_seed(1)
    return {"images": b["images"], "labels": torch.tensor([0, 1, 3]),
            "target_ids": torch.randint(5, VOCAB, (num_classes, 6), generator=g),
            "target_mask": torch.ones(num_classes, 6, dtype=torch.bool)}


def test_class_head_starts_at_zero_trains_and_checks_the_class_count():
    """Uni-Perceiver's fc_prompt: zero-initialised, so prompt tuning starts from the zero-shot logits; it trains with
    the prompts and norms, gets an exact-zero gradient from other tasks, and refuses a task with another class count."""
    torch.manual_seed(0)
    m = create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, max_text_len=12, num_prompts=2, head_classes=4)
    assert not m.class_head.weight.any() and not m.class_head.bias.any()
    b = classification_batch()
    with torch.no_grad():
        features, targets = m.encode_images(b["images"]), m.encode_texts(b["target_ids"], b["target_mask"])
        zero_shot = similarity_logits(features, targets, m.logit_scale[0])
        assert torch.equal(m.classification_logits(features, targets), zero_shot)
    trainable = set(freeze_for_prompt_tuning(m))
    assert {"class_head.weight", "class_head.bias"} <= trainable
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    out = m("image_classification", b)
    out.loss.backward()
    optimizer.step()
    assert m.class_head.weight.any()
    with torch.no_grad():
        features = m.encode_images(b["images"])
        targets = m.encode_texts(b["target_ids"], b["target_mask"])
        head = m.classification_logits(features, targets) - similarity_logits(features, targets, m.logit_scale[0])
        assert torch.allclose(head, m.class_head(features), atol=1e-6)

    m.zero_grad(set_to_none=True)
    m("image_text_retrieval", batch()).loss.backward()
    assert torch.equal(m.class_head.weight.grad, torch.zeros_like(m.class_head.weight))  # present, and exactly zero
    with pytest.raises(ValueError, match="head_classes"):
        m("image_classification", classification_batch(num_classes=5))
