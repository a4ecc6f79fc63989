"""The paper recipes next to MoE-B (issue 18 item 6): MoE-L and the 224-px stage 2, built on the meta device and
checked against the reference's parameter arithmetic; stage 2 starts from a stage-1 checkpoint of another
resolution (the spatial positions resized on load)."""

import pytest
import torch
from conftest import REPO
from timm.layers import resample_abs_pos_embed

from condmoe.train.checkpoint import load_plain_state_dict
from condmoe.train.config import load_config
from condmoe.train.engine import build_model, initialise_from
from condmoe.train.run_config import differences

CLIP_VOCAB = 49408  # the reference's counts include CLIP's token table


def params(name: str, *overrides: str) -> int:
    cfg = load_config(REPO / "configs" / name, list(overrides))
    with torch.device("meta"):
        return build_model(cfg, CLIP_VOCAB, 4).num_params()


@pytest.mark.parametrize("name, dense_m, total_m", [("uniperceiver_moe_b.yaml", 124, 422),
                                                    ("uniperceiver_moe_l.yaml", 354, 1410)])
def test_recipe_sizes_match_the_reference(name, dense_m, total_m):
    """shared/reference/uniperceiver.md: dense 124 M (B) / 354 M (L); with 8 linear experts on 6 / 12 blocks about
    124 + 7 x 42.5 = 422 M and 1.41 B."""
    assert params(name, "moe.num_experts=0") / 1e6 == pytest.approx(dense_m, rel=0.01)
    assert params(name) / 1e6 == pytest.approx(total_m, rel=0.01)


def test_moe_l_is_moe_b_on_the_large_encoder():
    b, large = (load_config(REPO / "configs" / n) for n in ("uniperceiver_moe_b.yaml", "uniperceiver_moe_l.yaml"))
    assert set(differences(b, large)) == {"model.size", "model.drop_path_rate", "run.output_dir",
                                          "run.gradient_accumulation_steps"}
    assert (large.model.size, large.model.drop_path_rate, large.moe.num_experts) == ("large", 0.2, 8)


def test_stage_two_changes_what_the_reference_says():
    one, two = (load_config(REPO / "configs" / f"uniperceiver_moe_b{n}.yaml") for n in ("", "_stage2"))
    changed = differences(one, two)
    assert {k for k in changed if not k.startswith("tasks.")} == {
        "model.img_size", "data.num_frames", "optim.lr", "optim.warmup_steps", "optim.weight_decay",
        "run.output_dir", "run.max_steps", "run.init_from"}
    assert (two.model.img_size, two.optim.lr, two.optim.weight_decay, two.optim.warmup_steps, two.run.max_steps) == (
        224, 2e-5, 0.05, 5000, 50000)
    tasks = {t.name: t for t in two.tasks}
    assert (tasks["k700"].weight, tasks["moments_in_time"].weight, tasks["imagenet22k"].batch_size) == (1.0, 0.2, 440)
    assert {k.split(".")[-1] for k in changed if k.startswith("tasks.")} == {"weight", "batch_size"}
    assert [t.loss_weight for t in one.tasks] == [t.loss_weight for t in two.tasks]


@pytest.mark.slow
def test_init_from_another_resolution_resizes_the_spatial_positions(multitask_run, tiny_data):
    """The 2-step run is at 32 px (4 x 4 patches of 8); a 48-px model (6 x 6) starts from its checkpoint."""
    cfg = load_config(REPO / "configs" / "demo_multitask.yaml", [f"data.root={tiny_data}", "model.img_size=48"])
    model = build_model(cfg, _vocab(tiny_data), 4)
    checkpoint = multitask_run / "checkpoints"
    initialise_from(model, str(checkpoint))
    state = load_plain_state_dict(str(checkpoint))
    expected = resample_abs_pos_embed(state["image_embed.pos_embed"], [6, 6], [4, 4], num_prefix_tokens=0)
    assert model.image_embed.pos_embed.shape == (1, 36, state["image_embed.pos_embed"].shape[-1])
    assert torch.equal(model.image_embed.pos_embed.data, expected)
    assert torch.equal(model.blocks[1].attn.qkv.weight.data, state["blocks.1.attn.qkv.weight"])  # the rest as stored


def _vocab(tiny_data) -> int:
    from condmoe.models.text_tokenizer import TextTokenizer

    return TextTokenizer(tiny_data / "tokenizer").vocab_size
