"""Tier 1: video tokens, MLM masking, video/text pipelines, retrieval recall, sparse upcycling."""

import random

import pytest
import torch

from condmoe.models.embeddings import ImageEmbed
from condmoe.models.text_tokenizer import TextTokenizer
from condmoe.train.config import DataConfig, TaskConfig
from condmoe.train.data import TaskStream, val_batches
from condmoe.train.evaluate import retrieval_recall, vocabulary_targets
from condmoe.train.masking import IGNORE, mask_whole_words, word_starts


def test_video_and_image_share_the_patch_embedding_with_temporal_positions():
    torch.manual_seed(0)
    embed = ImageEmbed(32, 8, 16, max_frames=4)
    embed.init_weights()
    image = torch.randn(2, 3, 32, 32)
    assert torch.equal(embed(image), embed(image.unsqueeze(1)))  # an image is a 1-frame video
    video = image.unsqueeze(1).repeat(1, 3, 1, 1, 1)
    tokens = embed(video).reshape(2, 3, 16, 16)
    step = embed.temporal_embed[0, 1] - embed.temporal_embed[0, 0]
    assert torch.allclose(tokens[:, 1] - tokens[:, 0], step.expand_as(tokens[:, 0]), atol=1e-6)
    assert embed(torch.randn(1, 6, 3, 32, 32)).shape == (1, 6 * 16, 16)  # more frames: interpolated positions
    assert embed(torch.randn(1, 3, 48, 48)).shape == (1, 36, 16)  # larger images: interpolated grid


def test_word_starts_for_both_bpe_conventions():
    assert word_starts(["a", "Ġsm", "all", "Ġcat"]) == [True, True, False, True]
    assert word_starts(["sm", "all</w>", "cat</w>"]) == [True, False, True]


def test_whole_word_masking_rates_and_labels():
    rng = random.Random(0)
    ids = list(range(100, 200))
    starts = [i % 2 == 0 for i in range(100)]  # 50 two-token words
    maskable = [True] * 100
    chosen_words, replaced, kept = 0, 0, 0
    for _ in range(200):
        inputs, labels = mask_whole_words(ids, starts, maskable, rng, mask_id=3, random_ids=[7, 8])
        predicted = [i for i, label in enumerate(labels) if label != IGNORE]
        assert all(labels[i] == ids[i] for i in predicted)
        assert all(i + 1 in predicted if i % 2 == 0 else i - 1 in predicted for i in predicted)  # whole words
        chosen_words += len(predicted) // 2
        replaced += sum(inputs[i] in (7, 8) for i in predicted)
        kept += sum(inputs[i] == ids[i] for i in predicted)
        assert all(inputs[i] == ids[i] for i in range(100) if i not in predicted)
    total = 2 * chosen_words
    assert chosen_words == 200 * round(0.15 * 50)
    assert 0.07 < replaced / total < 0.13 and 0.07 < kept / total < 0.13


def test_masking_skips_special_tokens_and_masks_at_least_one_word():
    inputs, labels = mask_whole_words([4, 50, 2], [True, True, True], [False, True, False], random.Random(1), 3, [9])
    assert labels == [IGNORE, 50, IGNORE] and inputs[0] == 4 and inputs[2] == 2


def stream(root, task_type, dataset, batch_size=4):
    tokenizer = TextTokenizer(root / "tokenizer", 16)
    task = TaskConfig(name="t", type=task_type, dataset=dataset, batch_size=batch_size)
    return TaskStream(task, 0, DataConfig(root=str(root), num_workers=0, shuffle_buffer=8, num_frames=3),
                      tokenizer, 32, rank=0, world_size=1, seed=0), tokenizer


def test_video_stream_batches(tiny_data):
    s, tokenizer = stream(tiny_data, "video_text_retrieval", "video")
    batch = next(s)
    assert batch["videos"].shape == (4, 3, 3, 32, 32)
    assert not torch.equal(batch["videos"][:, 0], batch["videos"][:, 2])  # frames differ: things move
    assert batch["text_ids"].shape == (4, 16) and (batch["labels"] < 4).all()
    words = [tokenizer.decode(row) for row in batch["text_ids"]]
    assert all("moving" in w for w in words)


def test_mlm_stream_batches(tiny_data):
    s, tokenizer = stream(tiny_data, "mlm", "image", batch_size=6)
    batch = next(s)
    assert set(batch) == {"text_ids", "text_mask", "mlm_labels", "num_skipped"}
    labels = batch["mlm_labels"]
    assert ((labels >= 0).sum(dim=1) >= 1).all()  # every caption has a prediction
    assert (labels[~batch["text_mask"]] == IGNORE).all() and (labels[:, 0] == IGNORE).all()  # never <|spe|>/pad
    predicted = labels >= 0
    assert (batch["text_ids"][predicted] == tokenizer.mask_id).float().mean() > 0.5


def test_mlm_val_masks_are_fixed(tiny_data):
    tokenizer = TextTokenizer(tiny_data / "tokenizer", 16)
    first = next(val_batches(tiny_data, "image", 32, 8, tokenizer, task_type="mlm"))
    second = next(val_batches(tiny_data, "image", 32, 8, tokenizer, task_type="mlm"))
    assert torch.equal(first["text_ids"], second["text_ids"]) and torch.equal(first["mlm_labels"],
                                                                             second["mlm_labels"])


def test_vocabulary_targets_row_v_is_token_v(tiny_data):
    tokenizer = TextTokenizer(tiny_data / "tokenizer", 16)
    ids, mask = vocabulary_targets(tokenizer)
    assert ids.shape == (tokenizer.vocab_size, 3) and mask.all()
    assert ids[:, 1].tolist() == list(range(tokenizer.vocab_size)) and (ids[:, 0] == tokenizer.spe_id).all()


def test_retrieval_recall_hand_made():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.1], [0.0, 0.2, 0.3]])
    r = retrieval_recall(sim, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(2 / 3)  # row 1 prefers column 0
    assert r["t2i_r1"] == pytest.approx(1.0)  # column 1's best row is 1
    assert r["i2t_r2"] == pytest.approx(1.0)


@pytest.mark.parametrize("top_k", [2, 3])
def test_upcycled_moe_equals_the_dense_model_at_step_zero(top_k):
    from condmoe.models import MoEArgs, create_model, moe_layer_indices
    from condmoe.models.upcycle import is_dense_checkpoint_for, upcycle_state_dict

    torch.manual_seed(0)
    dense = create_model("debug", vocab_size=100, spe_token_id=4, max_text_len=12).eval()
    torch.manual_seed(1)
    moe = create_model("debug", vocab_size=100, spe_token_id=4, max_text_len=12, moe_layers=moe_layer_indices(4),
                       moe=MoEArgs(num_experts=4, top_k=top_k, drop_tokens=False, gate_noise_std=1.0)).eval()
    assert is_dense_checkpoint_for(dense.state_dict(), moe)
    state = upcycle_state_dict(dense.state_dict(), moe)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert all(".router." in k for k in missing) and missing and not unexpected
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(moe.encode_images(images), dense.encode_images(images), atol=1e-5)
        ids, mask = torch.randint(5, 100, (2, 12)), torch.ones(2, 12, dtype=torch.bool)
        assert torch.allclose(moe.encode_texts(ids, mask), dense.encode_texts(ids, mask), atol=1e-5)
    experts = moe.blocks[0].mlp.experts.deepspeed_experts
    assert torch.equal(experts[0].fc1.weight, experts[3].fc1.weight)
    assert torch.equal(experts[0].fc1.weight, dense.blocks[0].mlp.fc1.weight)


def test_timm_vit_loads_and_gives_timm_features():
    import timm

    from condmoe.models import UniPerceiver, UniPerceiverArgs
    from condmoe.models.timm_compat import load_timm_vit

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0).eval()
    tiny = dict(vocab_size=50, spe_token_id=4, img_size=32, patch_size=8, dim=192, depth=12, num_heads=3)
    model = UniPerceiver(UniPerceiverArgs(**tiny, drop_path_rate=0.0, layer_scale_init=None, embed_norm=False)).eval()
    load_timm_vit(model, vit.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.visual_features(images), vit.forward_features(images)[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="embed_norm"):
        load_timm_vit(UniPerceiver(UniPerceiverArgs(**tiny)), vit.state_dict())
