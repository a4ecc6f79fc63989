"""Tier 1: the generalist model, its registry and the text tokenizer."""

import json

import pytest
import torch
from transformers import AutoTokenizer, CLIPTokenizer

from condmoe.models import SIZES, TASK_TYPES, MoAArgs, MoEArgs, MoEMLP, create_model, moe_layer_indices, pop_moe_stats
from condmoe.models.text_tokenizer import TextTokenizer

VOCAB, SPE = 100, 4


def debug_model(**kw):
    torch.manual_seed(0)
    return create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, max_text_len=12,
                        moe_layers=moe_layer_indices(SIZES["debug"]["depth"]), moe=MoEArgs(num_experts=4, top_k=2),
                        **kw)


def task_batch(task_type: str, batch_size: int = 6, num_classes: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch_size, 3, 32, 32, generator=g)
    visual = {"videos": torch.randn(batch_size, 3, 3, 32, 32, generator=g)} if "video" in task_type else {
        "images": images}
    mask = torch.ones(batch_size, 12, dtype=torch.bool)
    mask[:, 8:] = False
    if task_type.endswith("classification"):
        class_mask = torch.ones(num_classes, 12, dtype=torch.bool)
        class_mask[:, 6:] = False
        return {**visual, "labels": torch.arange(batch_size) % num_classes,
                "target_ids": torch.randint(5, VOCAB, (num_classes, 12), generator=g), "target_mask": class_mask}
    vocab_ids = torch.stack([torch.full((VOCAB,), SPE), torch.arange(VOCAB), torch.full((VOCAB,), 2)], dim=1)
    vocab = {"target_ids": vocab_ids, "target_mask": torch.ones(VOCAB, 3, dtype=torch.bool)}
    if task_type == "captioning":
        ids = torch.randint(5, VOCAB, (batch_size, 12), generator=g)
        ids[:, 0] = SPE
        return {**visual, "text_ids": ids, "text_mask": mask, **vocab}
    if task_type == "mlm":
        labels = torch.full((batch_size, 12), -100)
        labels[:, 2] = torch.randint(5, VOCAB, (batch_size,), generator=g)
        return {"text_ids": torch.randint(5, VOCAB, (batch_size, 12), generator=g), "text_mask": mask,
                "mlm_labels": labels, **vocab}
    return {**visual, "text_ids": torch.randint(5, VOCAB, (batch_size, 12), generator=g), "text_mask": mask}


@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_task_forward_shapes_and_every_parameter_gets_a_gradient(task_type):
    """Every parameter must receive a gradient whatever the task: ranks that drew different tasks still reduce the
    same gradient buckets under ZeRO (a parameter unused by one task would desynchronise them)."""
    model = debug_model()
    batch = task_batch(task_type)
    out = model(task_type, batch, label_smoothing=0.1)
    expected = {"mlm": (6, VOCAB), "captioning": (6 * 7, VOCAB)}.get(
        task_type, (6, 5) if task_type.endswith("classification") else (6, 6))
    assert out.logits.shape == expected
    assert torch.isfinite(out.loss)
    stats = pop_moe_stats(model)
    assert stats.expert_counts_LE.shape == (len(model.moe_layers), 4)
    (out.loss + stats.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_each_task_makes_exactly_two_encoder_passes():
    """The lock-step contract of expert parallelism: one input pass and one target pass per task step."""
    model = debug_model()
    calls = []
    model.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    for task_type in TASK_TYPES:
        calls.clear()
        model(task_type, task_batch(task_type))
        assert len(calls) == 2, task_type


def test_padding_does_not_change_text_features():
    model = debug_model().eval()
    ids = torch.randint(5, VOCAB, (1, 12))
    short_mask = torch.zeros(1, 12, dtype=torch.bool)
    short_mask[:, :5] = True
    a = model.encode_texts(ids, short_mask)
    ids2 = ids.clone()
    ids2[:, 5:] = 0  # different padding content must not matter
    b = model.encode_texts(ids2, short_mask)
    assert torch.allclose(a, b, atol=1e-5)


def test_unknown_task_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task type"):
        debug_model()("captioning_v9", {})


def test_moe_placement_and_validation():
    model = debug_model()
    kinds = [type(b.mlp).__name__ for b in model.blocks]
    assert kinds == ["MoEMLP", "Mlp", "MoEMLP", "Mlp"]
    assert moe_layer_indices(12) == (0, 2, 4, 6, 8, 10)
    assert moe_layer_indices(4, every=1) == (0, 1, 2, 3)
    with pytest.raises(ValueError):
        moe_layer_indices(4, every=2, offset=2)
    with pytest.raises(ValueError, match="moe_layers"):
        create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, moe_layers=(7,))
    with pytest.raises(ValueError, match="unknown model size"):
        create_model("huge", vocab_size=VOCAB, spe_token_id=SPE)


def test_experts_start_different_and_active_params_count_top_k():
    model = debug_model()
    experts = model.blocks[0].mlp.experts.deepspeed_experts
    assert not torch.equal(experts[0].fc1.weight, experts[1].fc1.weight)
    per_expert = sum(p.numel() for p in experts[0].parameters())
    assert model.num_params() - model.num_params(active_only=True) == 2 * (4 - 2) * per_expert
    lookups = model.text_embed.token_embed.weight.numel() + sum(  # MFU: lookups and added vectors are not compute
        p.numel() for p in (model.text_embed.pos_embed, model.text_embed.type_embed, model.image_embed.pos_embed,
                            model.image_embed.temporal_embed, model.image_embed.type_embed))
    assert model.num_params(active_only=True) - model.num_params(active_only=True, embeddings=False) == lookups


def test_base_size_matches_vit_b_shape():
    model = create_model("base", vocab_size=VOCAB, spe_token_id=SPE, max_text_len=16)
    blocks = sum(p.numel() for p in model.blocks.parameters())
    assert len(model.blocks) == 12 and model.dim == 768
    assert 85.0e6 < blocks < 85.2e6  # 12 x (attention 2.36M + MLP 4.72M + norms and LayerScale)


def test_no_weight_decay_names_exist():
    model = debug_model()
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)


# ------------------------------------------------------------------------------------------------- text tokenizer
def test_bpe_tokenizer_from_prep(tiny_data):
    tok = TextTokenizer(tiny_data / "tokenizer", max_length=10)
    ids, mask = tok(["a small red circle", "a " * 40])
    assert ids.shape == mask.shape == (2, 10)
    assert (ids[:, 0] == tok.spe_id).all()
    assert ids[0, mask[0].sum() - 1] == tok.eos_id
    assert bool(mask[1].all())  # truncated to max_length, still ends with eos
    assert ids[1, -1] == tok.eos_id
    assert (ids[0][~mask[0]] == tok.pad_id).all()
    assert tok.decode(ids[0]) == "a small red circle"
    assert (tok.spe_id, tok.mask_id, tok.pad_id) == (4, 3, 0)


def _bytes_to_unicode() -> list[str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def test_local_clip_tokenizer_directory(tmp_path):
    """A CLIP tokenizer saved locally loads through transformers; missing <|spe|>/<|mask|> are added."""
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[("c", "a"), ("ca", "t</w>")]).save_pretrained(
        tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"].startswith("CLIPTokenizer")
    assert AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    tok = TextTokenizer(tmp_path, max_length=6)
    ids, mask = tok(["a cat"])
    cat = vocab.index("cat</w>")
    assert ids[0, :4].tolist() == [tok.spe_id, vocab.index("a</w>"), cat, tok.eos_id]
    assert tok.spe_id >= len(vocab) and tok.mask_id >= len(vocab)
    assert tok.vocab_size == len(vocab) + 2


def test_missing_tokenizer_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        TextTokenizer(tmp_path / "nope")


def test_moe_layers_are_plain_pytorch():
    """models/ holds architecture only: an MoE layer runs in one process without DeepSpeed."""
    layer = MoEMLP(8, 16, args=MoEArgs(num_experts=2))
    assert layer.comm.ep_size == 1
    assert layer(torch.randn(2, 3, 8)).shape == (2, 3, 8)


@pytest.mark.parametrize("level", ["token", "context", "modality", "task", "attribute", "task_gate"])
def test_mod_squad_placement_and_every_level_gives_every_parameter_a_gradient(level):
    """MoA in even blocks, MoE MLP in odd ones (Mod-Squad); whatever the level, every parameter gets a gradient."""
    torch.manual_seed(0)
    model = create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, max_text_len=12, num_tasks=2,
                         moe_layers=moe_layer_indices(4, 2, 1),
                         moe=MoEArgs(num_experts=4, top_k=2, routing=level, mi_loss_weight=0.01),
                         moa_layers=moe_layer_indices(4, 2, 0),
                         moa=MoAArgs(num_experts=6, num_heads=2, routing="task_gate", mi_loss_weight=0.0))
    assert [type(b.attn).__name__ for b in model.blocks] == ["MoAttention", "Attention"] * 2
    assert [type(b.mlp).__name__ for b in model.blocks] == ["Mlp", "MoEMLP"] * 2
    for task_id, task_type in enumerate(TASK_TYPES):
        out = model(task_type, task_batch(task_type), task_id=task_id % 2)
        stats = pop_moe_stats(model)
        assert stats.expert_counts_LE.shape == (4, 6)  # 2 MoA + 2 MoE layers, padded to the widest
        (out.loss + stats.aux_loss).backward()
        assert not [n for n, p in model.named_parameters() if p.grad is None], task_type
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("task_type", ["image_text_retrieval", "captioning"])
def test_activation_checkpointing_keeps_loss_gradients_and_moe_statistics_bitwise(task_type):
    """Recomputation replays dropout, drop-path and gate noise and routes the same way; routed layers record their
    statistics once (not again in the backward pass)."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, max_text_len=12, drop_path_rate=0.2,
                             num_tasks=2, moe_layers=moe_layer_indices(4, 2, 1),
                             moe=MoEArgs(num_experts=4, top_k=2, mi_loss_weight=0.01, gate_noise_std=1.0,
                                         z_loss_weight=0.001),
                             moa_layers=moe_layer_indices(4, 2, 0),
                             moa=MoAArgs(num_experts=6, num_heads=2, routing="task_gate", mi_loss_weight=0.0))
        model.set_grad_checkpointing(checkpointing)
        model.train()
        torch.manual_seed(1)
        out = model(task_type, task_batch(task_type), task_id=1)
        stats = pop_moe_stats(model)
        (out.loss + stats.aux_loss).backward()
        assert pop_moe_stats(model) is None  # nothing recorded during the recomputation
        results.append((out.loss, stats, {n: p.grad for n, p in model.named_parameters()}))
    (loss, stats, grads), (loss_ckpt, stats_ckpt, grads_ckpt) = results
    assert torch.equal(loss, loss_ckpt) and torch.equal(stats.aux_loss, stats_ckpt.aux_loss)
    assert torch.equal(stats.expert_counts_LE, stats_ckpt.expert_counts_LE)
    assert grads.keys() == grads_ckpt.keys()
    assert all(torch.equal(grads[n], grads_ckpt[n]) for n in grads)
