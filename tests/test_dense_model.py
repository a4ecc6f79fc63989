"""Dense tasks in the model: per-task heads on the patch tokens, Mod-Squad's group step (one pass per task with its
task id and task embedding, MI over all passes), and extraction of one dense task's model."""

import math

import pytest
import torch

from condmoe.models import SIZES, MoAArgs, MoEArgs, create_model, moe_layer_indices, pop_moe_stats
from condmoe.models.dense import dense_family_loss
from condmoe.models.extract import extract_task_model

VOCAB, SPE, SIZE = 100, 4, 32
HEADS = {"seg": {"family": "segmentation", "channels": 4}, "sal": {"family": "saliency", "channels": 1},
         "edge": {"family": "edge", "channels": 1}, "normals": {"family": "normals", "channels": 3},
         "depth": {"family": "depth", "channels": 1}}
TYPES = {"seg": "semseg", "sal": "saliency", "edge": "edge", "normals": "normals", "depth": "depth"}


def dense_model(head: str = "linear", **kw):
    torch.manual_seed(0)
    depth = SIZES["debug"]["depth"]
    return create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, num_tasks=len(HEADS), dense_heads=HEADS,
                        dense_head=head, task_embedding=True,
                        moe_layers=moe_layer_indices(depth, 2, 1),
                        moe=MoEArgs(num_experts=4, top_k=2, routing="task_gate", mi_loss_weight=0.01,
                                    balance_loss_weight=0.0, drop_tokens=False),
                        moa_layers=moe_layer_indices(depth, 2, 0),
                        moa=MoAArgs(num_experts=4, num_heads=2, routing="task_gate", mi_loss_weight=0.01), **kw)


def dense_batch(batch_size: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    seg = torch.randint(0, 4, (batch_size, SIZE, SIZE), generator=g)
    seg[:, :2] = 255  # unlabelled rows
    sal = (torch.rand(batch_size, SIZE, SIZE, generator=g) > 0.7).float()
    depth = torch.rand(batch_size, SIZE, SIZE, generator=g) + 0.5
    depth[:, :, :3] = float("nan")
    normals = torch.nn.functional.normalize(torch.randn(batch_size, 3, SIZE, SIZE, generator=g), dim=1)
    return {"images": torch.randn(batch_size, 3, SIZE, SIZE, generator=g), "target.seg": seg, "target.sal": sal,
            "target.edge": sal.clone(), "target.normals": normals, "target.depth": depth}


@pytest.mark.parametrize("head", ["linear", "uphead"])
def test_every_dense_head_predicts_its_channels_at_input_resolution_and_trains(head):
    model = dense_model(head)
    batch = dense_batch()
    for task_id, (name, spec) in enumerate(HEADS.items()):
        out = model(TYPES[name], batch, task_id=task_id, head=name)
        assert out.logits.shape == (3, spec["channels"], SIZE, SIZE)
        assert torch.isfinite(out.loss) and out.loss > 0
        pop_moe_stats(model)
    model.zero_grad()
    out = model("semseg", batch, task_id=0, head="seg")
    out.loss.backward()
    # the other heads got an exact-zero gradient (every parameter has one, as ZeRO needs), this head a real one
    assert model.dense_heads["seg"].proj.weight.grad.abs().sum() > 0 if head == "linear" else True
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.dense_heads["sal"].parameters())


def test_a_group_step_is_one_pass_per_task_and_equals_the_tasks_run_one_by_one():
    model = dense_model().eval()  # eval: no drop-path randomness between the two computations
    _random_task_routers(model)
    batch = dense_batch()
    names = tuple(HEADS)
    group = model(tuple(TYPES[n] for n in names), batch, task_id=tuple(range(len(names))), head=names)
    stats = pop_moe_stats(model)
    assert group.loss.shape == (len(names),) and group.logits is None
    one_by_one = []
    for i, name in enumerate(names):
        one_by_one.append(model(TYPES[name], batch, task_id=i, head=name).loss)
        alone = pop_moe_stats(model)
        assert abs(alone.mi_loss) < 1e-6  # one task alone: P(T) is a point mass, there is no information to share
        # the group's expert counts split by task: each task's share is what it routes alone
        assert torch.equal(stats.task_expert_counts_TLE[i], alone.expert_counts_LE)
        assert torch.equal(alone.task_expert_counts_TLE.sum(0), alone.expert_counts_LE)
    assert torch.equal(stats.task_expert_counts_TLE.sum(0), stats.expert_counts_LE)
    assert torch.allclose(group.loss, torch.stack(one_by_one), atol=1e-6)
    # the group step's statistics hold every task: the (negative) MI of different task routers is not 0
    assert stats is not None and stats.mi_loss < -1e-3


def _random_task_routers(model) -> None:
    """Task gates start at zero (Mod-Squad): uniform routing for every task. Give each task its own."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.modules():
            router = getattr(layer, "router", None)
            if router is not None and getattr(router, "level", "") == "task_gate":
                router.weight.copy_(torch.randn(router.weight.shape, generator=g))


def test_the_task_embedding_makes_passes_of_one_image_differ_by_task():
    model = dense_model().eval()
    _random_task_routers(model)
    images = dense_batch()["images"]
    a, b = (model.dense_predict(images, task_id, "seg") for task_id in (0, 1))
    assert not torch.allclose(a, b)
    with torch.no_grad():
        model.task_embed.zero_()
        for layer in model.modules():
            if hasattr(layer, "router") and hasattr(layer.router, "weight"):
                layer.router.weight.copy_(layer.router.weight[:1].expand_as(layer.router.weight))
    a, b = (model.dense_predict(images, task_id, "seg") for task_id in (0, 1))
    assert torch.allclose(a, b)


def test_family_losses_read_the_decoded_conventions():
    pred = torch.zeros(1, 1, 2, 2, requires_grad=True)
    sal = torch.tensor([[[1.0, 0.0], [float("nan"), float("nan")]]])
    loss = dense_family_loss("saliency", pred, sal)  # balanced: 1 positive, 1 negative of 2 valid pixels
    assert loss.item() == pytest.approx(math.log(2) / 2)
    edge = dense_family_loss("edge", pred, sal)  # positives weigh 0.95, negatives 0.05, over 2 valid pixels
    assert edge.item() == pytest.approx((0.95 + 0.05) * math.log(2) / 2)
    nothing = dense_family_loss("depth", pred, torch.full((1, 2, 2), float("nan")))
    assert nothing.item() == 0 and torch.isfinite(nothing)
    nothing.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_extracting_a_dense_task_keeps_its_head_embedding_and_router_and_predicts_the_same():
    model = dense_model().eval()
    images = dense_batch()["images"]
    keep = {"blocks.1.mlp": [0, 1, 2, 3], "blocks.3.mlp": [0, 1, 2, 3]}
    small = extract_task_model(model, 3, keep, "normals").eval()
    assert list(small.dense_heads) == ["normals"] and small.task_embed.shape[0] == 1
    assert torch.allclose(small.dense_predict(images, 0, "normals"), model.dense_predict(images, 3, "normals"),
                          atol=1e-5)
    with pytest.raises(ValueError, match="no dense head 'seg'"):
        small.dense_predict(images, 0, "seg")
