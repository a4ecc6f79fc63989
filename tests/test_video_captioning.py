"""Video captioning: captioning with frames through the shared patch embedding (temporal positions, video modality in
the routing context), and its zero-shot evaluation on videos of a model that only saw image captions."""

import json

import pytest
import torch

from condmoe.models import TASK_TYPES, MoEArgs, create_model, moe_layer_indices, pop_moe_stats
from condmoe.models.captioning import generate
from condmoe.models.tasks import modality_twins
from condmoe.train.cli import eval_main
from condmoe.train.run_config import kind

VOCAB, SPE, EOS = 40, 4, 2


def model(routing: str):
    torch.manual_seed(0)
    m = create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, max_text_len=12,
                     moe_layers=moe_layer_indices(4) if routing else (),
                     moe=MoEArgs(num_experts=4, top_k=1, drop_tokens=False, routing=routing or "token")).eval()
    for name, p in m.named_parameters():
        if ".router." in name:  # routers start near uniform: give each modality its own experts
            torch.nn.init.normal_(p, std=1.0)
    return m


def caption_batch(pixels):
    ids = torch.tensor([[SPE, 10, 11, 12, EOS], [SPE, 20, 21, EOS, 0]])
    vocab_ids = torch.stack([torch.full((VOCAB,), SPE), torch.arange(VOCAB), torch.full((VOCAB,), EOS)], 1)
    return {"text_ids": ids, "text_mask": ids.ne(0), "target_ids": vocab_ids,
            "target_mask": torch.ones(VOCAB, 3, dtype=torch.bool), **pixels}


def test_video_captioning_trains_the_temporal_positions_with_captionings_temperature():
    m = model("").train()
    out = m("video_captioning", caption_batch({"videos": torch.randn(2, 3, 3, 32, 32)}))
    out.loss.backward()
    temporal = m.image_embed.temporal_embed.grad[0]
    assert temporal[:3].abs().sum() > 0 and temporal[3:].eq(0).all()  # 3 frames
    assert "video_captioning" not in TASK_TYPES and len(m.logit_scale) == len(TASK_TYPES)  # checkpoints keep shape
    grad = m.logit_scale.grad
    assert grad[TASK_TYPES.index("captioning")] != 0 and grad.count_nonzero() == 1


@pytest.mark.parametrize("routing", ["", "modality"])
def test_a_one_frame_video_is_an_image_except_where_routing_reads_the_modality(routing):
    m = model(routing)
    image = torch.randn(2, 3, 32, 32)
    as_image = m("captioning", caption_batch({"images": image})).loss
    as_video = m("video_captioning", caption_batch({"videos": image[:, None]})).loss
    pop_moe_stats(m)
    if routing:  # the video modality picks other experts for the visual tokens
        assert not torch.equal(as_image, as_video)  # (LayerScale 1e-3 keeps the difference small)
    else:  # same patches, same positions (frame 0), same weights
        assert torch.equal(as_image, as_video)


def test_cached_video_generation_equals_recomputation():
    m = model("modality")
    ids = torch.stack([torch.full((VOCAB,), SPE), torch.arange(VOCAB), torch.full((VOCAB,), EOS)], 1)
    with torch.no_grad():
        vocab = m.encode_texts(ids, torch.ones(VOCAB, 3, dtype=torch.bool), attribute="vocab_target")
    videos = torch.randn(3, 4, 3, 32, 32)
    cached = generate(m, videos, vocab, SPE, EOS, max_length=6, beam_size=2, cache=True)
    recomputed = generate(m, videos, vocab, SPE, EOS, max_length=6, beam_size=2, cache=False)
    for (a, sa), (b, sb) in zip(cached, recomputed):
        assert a == b and sa == pytest.approx(sb, abs=1e-4)
    pop_moe_stats(m)


def test_image_and_video_twins_are_an_evaluation_change_other_types_the_model():
    assert modality_twins("captioning", "video_captioning") and modality_twins("image_text_retrieval",
                                                                              "video_text_retrieval")
    assert not modality_twins("captioning", "mlm") and not modality_twins("image_classification", "semseg")
    assert kind("tasks.5.type", "captioning", "video_captioning") == "eval"
    assert kind("tasks.5.type", "captioning", "mlm") == "model" and kind("tasks.5.type") == "model"


@pytest.mark.slow
def test_zero_shot_video_captioning_of_an_image_captioning_run(multitask_run, tiny_data, capsys):
    """The 6-task demo trains captioning on images (task 5); evaluated as video captioning on the videos."""
    args = ["--batch-size", "4", "--config", str(multitask_run / "config.yaml"), f"data.root={tiny_data}"]
    assert eval_main([*args, "tasks.5.type=video_captioning", "tasks.5.dataset=video"]) == 0
    out = multitask_run / "eval.tasks.5.dataset=video,tasks.5.type=video_captioning.json"
    metrics = json.loads(out.read_text())["shapes_captioning"]
    assert metrics["num_samples"] == 4 and {"bleu4", "cider", "example"} <= set(metrics)  # tiny_data: 4 val videos
    capsys.readouterr()
    assert eval_main([*args, "tasks.5.type=mlm"]) == 2
    assert "tasks.5.type=mlm (the run has captioning)" in capsys.readouterr().err
