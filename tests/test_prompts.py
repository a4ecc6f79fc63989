"""Tier 1: deep prompt tuning (prompts per block and side, only prompts, LayerNorms and temperatures train)."""

import pytest
import torch

from models import create_model, moe_layer_indices, pop_moe_stats
from models.extract import freeze_for_prompt_tuning

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
                        moe_layers=moe_layer_indices(4), moe_kwargs=dict(num_experts=4, top_k=2, drop_tokens=False))


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
