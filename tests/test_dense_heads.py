"""models/dense.py: head shapes and pixel placement, the norm choice, gradients, and losses on hand-computed cases
(including batches where no pixel counts)."""

import math

import pytest
import torch
import torch.nn.functional as F

from condmoe.models.dense import (
    EDGE_POS_WEIGHT,
    DenseTaskSpec,
    LinearPatchHead,
    UpHead,
    cross_entropy_loss,
    dense_loss,
    l1_loss,
    make_head,
    normal_loss,
    patch_tokens,
    soft_label_mse,
    weighted_bce,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# Heads


@pytest.mark.parametrize("kind", ["linear", "uphead"])
def test_heads_output_image_resolution_on_non_square_grids(kind):
    torch.manual_seed(0)
    kwargs = {"channels": 16, "num_groups": 4} if kind == "uphead" else {}
    head = make_head(kind, dim=24, patch_size=8, out_channels=5, **kwargs)
    x = torch.randn(2, 3 * 5, 24)
    assert head(x, (3, 5)).shape == (2, 5, 24, 40)
    assert head(x, (3, 5), out_size=(30, 17)).shape == (2, 5, 30, 17)


def test_uphead_native_resolution_is_two_to_the_num_convs():
    """With 16 px patches and 4 convs the final resize is M3ViT's last 2x upsampling (no extra resize)."""
    head = UpHead(dim=8, out_channels=2, patch_size=16, channels=8, num_convs=4, num_groups=2)
    x = torch.randn(1, 2 * 3, 8)
    assert head(x, (2, 3)).shape == (1, 2, 32, 48)



def test_uphead_equals_m3vits_order_of_operations():
    """M3ViT: conv, norm, ReLU, 2x after each of the 4 blocks (the last 2x after the 1x1 conv). Resizing once after
    the 1x1 conv gives the same map: both are linear per pixel and bilinear weights sum to one."""
    torch.manual_seed(0)
    head = UpHead(dim=8, out_channels=3, patch_size=16, channels=8, num_convs=4, num_groups=2)
    x = torch.randn(2, 2 * 3, 8)
    y = head.norm(x).transpose(1, 2).reshape(2, 8, 2, 3)
    for i, block in enumerate(head.convs):
        y = block(y)
        if i < 3:
            y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
    y = F.interpolate(head.classifier(y), scale_factor=2.0, mode="bilinear", align_corners=False)
    torch.testing.assert_close(head(x, (2, 3)), y)

def test_linear_head_puts_each_token_in_its_own_patch():
    """Token n = (row gi, col gj) fills rows gi*p..gi*p+p-1 and cols gj*p..; its features are ordered (j, k, c)."""
    gh, gw, p, c = 2, 3, 2, 2
    num = gh * gw
    head = LinearPatchHead(dim=num, patch_size=p, out_channels=c, norm=False)
    rows = p * p * c
    with torch.no_grad():
        # output feature m of token n = weight[m, n] for a one-hot token n: 1000 * n + m
        head.proj.weight.copy_(1000.0 * torch.arange(num).float()[None, :] + torch.arange(rows).float()[:, None])
        head.proj.bias.zero_()
    x = torch.eye(num)[None].repeat(2, 1, 1)  # token n is the one-hot vector e_n
    out = head(x, (gh, gw))
    assert out.shape == (2, c, gh * p, gw * p)
    for gi in range(gh):
        for gj in range(gw):
            for j in range(p):
                for k in range(p):
                    for ch in range(c):
                        expected = 1000 * (gi * gw + gj) + (j * p + k) * c + ch
                        assert out[1, ch, gi * p + j, gj * p + k].item() == expected


@pytest.mark.parametrize("kind", ["linear", "uphead"])
def test_gradients_reach_every_head_parameter_and_the_tokens(kind):
    torch.manual_seed(0)
    kwargs = {"channels": 8, "num_groups": 2, "num_convs": 2} if kind == "uphead" else {}
    head = make_head(kind, dim=16, patch_size=4, out_channels=3, **kwargs)
    x = torch.randn(2, 6, 16, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 12))
    cross_entropy_loss(head(x, (2, 3)), target).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_uphead_gives_a_sample_the_same_output_in_any_batch_and_mode():
    """GroupNorm, not BatchNorm: no batch statistics, no running state (BatchNorm fails both checks)."""
    torch.manual_seed(0)
    head = UpHead(dim=16, out_channels=2, patch_size=4, channels=8, num_convs=2, num_groups=2)
    x = torch.randn(3, 4, 16)
    head.train()
    batched = head(x, (2, 2))
    alone = head(x[:1], (2, 2))
    head.eval()
    evaluated = head(x[:1], (2, 2))
    torch.testing.assert_close(batched[:1], alone)
    torch.testing.assert_close(alone, evaluated)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in head.modules())


def test_heads_reject_wrong_token_counts_and_kinds():
    head = LinearPatchHead(dim=8, patch_size=2, out_channels=1)
    with pytest.raises(ValueError, match="patch_tokens"):
        head(torch.randn(1, 7, 8), (2, 3))  # 1 + 2*3 tokens: the <|spe|> token left in
    with pytest.raises(ValueError, match="head kind"):
        make_head("conv", 8, 2, 1)
    with pytest.raises(ValueError, match="num_groups"):
        UpHead(dim=8, out_channels=1, channels=10, num_groups=4)


def test_patch_tokens_drops_the_spe_token():
    x = torch.arange(2 * 7 * 1.0).view(2, 7, 1)
    torch.testing.assert_close(patch_tokens(x, (2, 3)), x[:, 1:])
    with pytest.raises(ValueError, match="<|spe|>"):
        patch_tokens(x[:, 1:], (2, 3))


def test_task_spec_channels_and_dense_json():
    assert DenseTaskSpec("index", num_classes=21).out_channels == 21
    assert [DenseTaskSpec(k).out_channels for k in ("binary", "normal", "scalar")] == [1, 3, 1]
    with pytest.raises(ValueError, match="num_classes"):
        DenseTaskSpec("index")
    with pytest.raises(ValueError, match="kind"):
        DenseTaskSpec("depth")
    seg = DenseTaskSpec.from_dense_json("semseg", {"member": "semseg.png", "encoding": "index", "num_classes": 59,
                                                   "ignore": 255})
    assert (seg.kind, seg.num_classes, seg.ignore_index) == ("index", 59, 255)
    assert DenseTaskSpec.from_dense_json("edge", {"member": "edge.png", "encoding": "binary"}).pos_weight == 0.95
    assert DenseTaskSpec.from_dense_json("saliency", {"member": "sal.png", "encoding": "binary"}).pos_weight is None


# Losses


def test_cross_entropy_mean_over_labelled_pixels_only():
    logits = torch.zeros(1, 3, 1, 3)
    logits[0, :, 0, 0] = torch.tensor([2.0, 0.0, 0.0])
    logits[0, :, 0, 1] = torch.tensor([0.0, 1.0, 0.0])
    logits[0, :, 0, 2] = torch.tensor([9.0, -9.0, 3.0])  # ignored: would dominate the mean
    target = torch.tensor([[[0, 2, 255]]], dtype=torch.uint8)
    lse0 = math.log(math.exp(2) + 2)
    lse1 = math.log(2 + math.e)
    expected = ((lse0 - 2.0) + (lse1 - 0.0)) / 2
    assert cross_entropy_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    valid = torch.tensor([[[True, False, True]]])
    assert cross_entropy_loss(logits, target, valid).item() == pytest.approx(lse0 - 2.0, rel=1e-6)


def test_weighted_bce_matches_a_hand_computation():
    logits = torch.tensor([[[0.0, 2.0, -1.0]]])
    target = torch.tensor([[[1.0, 0.0, 1.0]]])
    pos = softplus(-0.0) + softplus(1.0)  # -log sigmoid(x) = softplus(-x) on positives
    neg = softplus(2.0)  # -log(1 - sigmoid(x)) = softplus(x) on negatives
    assert weighted_bce(logits, target, 0.95).item() == pytest.approx((0.95 * pos + 0.05 * neg) / 3, rel=1e-6)
    # balanced (HED): w = fraction of negatives = 1/3
    assert weighted_bce(logits, target, None).item() == pytest.approx((pos / 3 + 2 * neg / 3) / 3, rel=1e-6)
    # an invalid pixel leaves both the sums and the normaliser
    valid = torch.tensor([[[True, False, True]]])
    assert weighted_bce(logits[:, None], target, 0.95, valid).item() == pytest.approx(0.95 * pos / 2, rel=1e-6)
    assert dense_loss("binary", logits, target, pos_weight=EDGE_POS_WEIGHT).item() == pytest.approx(
        weighted_bce(logits, target).item())


def test_normal_loss_is_zero_for_the_same_direction_and_two_for_the_opposite():
    torch.manual_seed(0)
    target = F.normalize(torch.randn(2, 3, 4, 5), dim=1)
    assert normal_loss(3.0 * target, target).item() == pytest.approx(0.0, abs=1e-6)
    assert normal_loss(-0.5 * target, target).item() == pytest.approx(2.0, abs=1e-6)
    # orthogonal: cos 0, loss 1; unlabelled (zero) target pixels do not count whatever the prediction
    pred = torch.zeros(1, 3, 1, 2)
    pred[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    pred[0, :, 0, 1] = torch.tensor([-1.0, 0.0, 0.0])
    tgt = torch.zeros(1, 3, 1, 2)
    tgt[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0])
    assert normal_loss(pred, tgt).item() == pytest.approx(1.0, abs=1e-6)


def test_l1_loss_over_valid_pixels_ignores_nan_targets():
    pred = torch.tensor([[[[1.0, 2.0, 5.0]]]], requires_grad=True)
    target = torch.tensor([[[1.5, float("nan"), 3.0]]])
    loss = l1_loss(pred, target)
    assert loss.item() == pytest.approx((0.5 + 2.0) / 2)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    torch.testing.assert_close(pred.grad, torch.tensor([[[[-0.5, 0.0, 0.5]]]]))
    valid = torch.tensor([[[True, True, False]]])
    assert l1_loss(pred, target.nan_to_num(4.0), valid).item() == pytest.approx((0.5 + 2.0) / 2)


def test_soft_label_mse_is_the_mean_square_against_the_distribution():
    logits = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    target = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    assert soft_label_mse(logits, target).item() == pytest.approx((0.25 + 0.25 + 0 + 0) / 4)
    empty = torch.zeros(0, 5, requires_grad=True)
    loss = soft_label_mse(empty, torch.zeros(0, 5))
    assert loss.item() == 0.0
    loss.backward()


@pytest.mark.parametrize("kind", ["index", "binary", "edge", "normal", "scalar"])
def test_losses_are_zero_and_finite_when_no_pixel_counts(kind):
    b, h, w = 2, 3, 4
    channels = {"index": 4, "normal": 3}.get(kind, 1)
    pred = (10 * torch.randn(b, channels, h, w)).requires_grad_()
    valid = torch.zeros(b, h, w, dtype=torch.bool)
    if kind == "index":
        loss = dense_loss("index", pred, torch.full((b, h, w), 255, dtype=torch.uint8))
    elif kind in ("binary", "edge"):
        loss = dense_loss("binary", pred, torch.ones(b, h, w), valid,
                          pos_weight=EDGE_POS_WEIGHT if kind == "edge" else None)
    elif kind == "normal":
        loss = dense_loss("normal", pred, torch.zeros(b, 3, h, w))
    else:
        loss = dense_loss("scalar", pred, torch.full((b, h, w), float("nan")))
    assert loss.item() == 0.0
    loss.backward()  # still a graph through the prediction
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() == 0


def test_dense_loss_rejects_unknown_kinds_and_mismatched_shapes():
    with pytest.raises(ValueError, match="kind"):
        dense_loss("depth", torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="does not match"):
        dense_loss("scalar", torch.zeros(1, 1, 2, 3), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="do not match"):
        dense_loss("index", torch.zeros(1, 3, 2, 3), torch.zeros(1, 2, 2, dtype=torch.long))
