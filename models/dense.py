"""Dense prediction heads and losses for multi-task dense prediction (Mod-Squad, M3ViT, Multi-Task-Learning-PyTorch).

A head turns the encoder's patch tokens into a map per output channel at image resolution; a loss compares that map
with the decoded label of ``data_prep/schema.py`` (``DENSE_ENCODINGS``):

=========  ===============  ==========================  ======================================================
encoding   head channels    decoded target              loss
=========  ===============  ==========================  ======================================================
index      ``num_classes``  ``[B, H, W]`` int, 255 =     cross-entropy over labelled pixels
                            unlabelled
binary     1                ``[B, H, W]`` 0/1           ``weighted_bce``: balanced (saliency) or fixed
                                                        ``pos_weight`` 0.95 (edges)
normal     3                ``[B, 3, H, W]`` unit        1 - cosine similarity over labelled pixels
                            vectors, 0 = unlabelled
scalar     1 (or C stacked  ``[B, H, W]`` (``[B, C, H,    L1 over valid pixels (depth, Taskonomy's L1 tasks);
           labels)          W]``) float, NaN invalid    ``mse_loss`` for curvature (Mod-Squad's MSE)
soft       ``num_classes``  ``[B, K]`` class            ``soft_label_mse`` on ``PooledClassHead``'s outputs
                            distribution                (Taskonomy's class_object, class_scene)
=========  ===============  ==========================  ======================================================

Every loss is a mean over the pixels that count and returns an exact 0 that is still connected to the prediction
when none count (a crop without labels), never NaN: the step's other tasks keep training and DeepSpeed's non-finite
guard does not skip the step.

Shape legend: B batch, N patch tokens (``gh * gw``, row-major), D width, C output channels, K classes of a soft
label, H, W output height and width, p patch size.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from condmoe.models.tasks import DENSE_KINDS as DENSE_FAMILIES  # family -> encoding

DENSE_KINDS = ("index", "binary", "normal", "scalar", "soft")  # the encodings of data_prep/schema.py DENSE_ENCODINGS
IGNORE_INDEX = 255
EDGE_POS_WEIGHT = 0.95  # Multi-Task-Learning-PyTorch configs (edge_w) for PASCAL-Context and NYUD edges
HEAD_KINDS = ("linear", "uphead")  # model.dense_head: the map heads (a soft-label task always takes "pooled")


@dataclass(frozen=True)
class DenseTaskSpec:
    """What a dense output predicts, enough to size its head and pick its loss.

    Attributes:
        kind: The label's encoding: ``index``, ``binary``, ``normal`` or ``scalar``.
        num_classes: Classes of an ``index`` label (its logits); unused otherwise.
        ignore_index: The ``index`` value of unlabelled pixels.
        pos_weight: ``binary`` only: ``weighted_bce``'s weight of positive pixels; None weighs each image's
            positives by the fraction of negatives (HED-style balance, used for saliency).
    """

    kind: str
    num_classes: int = 0
    ignore_index: int = IGNORE_INDEX
    pos_weight: float | None = None

    def __post_init__(self):
        if self.kind not in DENSE_KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {DENSE_KINDS}")
        classes = self.num_classes
        if self.kind in ("index", "soft") and (isinstance(classes, bool) or not isinstance(classes, int)
                                               or classes < 1):
            raise ValueError(f"num_classes must be a positive integer for an {self.kind} label, got "
                             f"{self.num_classes!r}")
        if self.pos_weight is not None and not 0.0 < self.pos_weight < 1.0:
            raise ValueError(f"pos_weight must lie in (0, 1), got {self.pos_weight}")

    @property
    def out_channels(self) -> int:
        return {"index": self.num_classes, "binary": 1, "normal": 3, "scalar": 1, "soft": self.num_classes}[self.kind]

    @classmethod
    def from_dense_json(cls, label: str, spec: dict[str, Any]) -> "DenseTaskSpec":
        """The spec of one label entry of ``dense.json`` (``{"member", "encoding", ...}``); ``edge`` labels get
        ``EDGE_POS_WEIGHT``, other binary labels the balanced weights."""
        kind = spec["encoding"]
        if kind == "index":
            return cls(kind, num_classes=spec["num_classes"], ignore_index=spec.get("ignore", IGNORE_INDEX))
        if kind == "soft":
            return cls(kind, num_classes=spec["num_classes"])
        return cls(kind, pos_weight=EDGE_POS_WEIGHT if kind == "binary" and label == "edge" else None)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return dense_loss(self.kind, pred, target, valid, pos_weight=self.pos_weight, ignore_index=self.ignore_index)


def patch_tokens(x_BND: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The ``gh * gw`` patch tokens of the encoder's visual sequence ``[<|spe|>, patches...]``: ``[B, N, D]``."""
    num = grid[0] * grid[1]
    if x_BND.dim() != 3 or x_BND.shape[1] != num + 1:
        raise ValueError(f"expected [B, 1 + {grid[0]}*{grid[1]}, D] tokens (<|spe|> first), got {list(x_BND.shape)}")
    return x_BND[:, 1:]


def _check_tokens(x_BND: torch.Tensor, grid: tuple[int, int], dim: int) -> tuple[int, int]:
    gh, gw = grid
    if x_BND.dim() != 3 or x_BND.shape[1] != gh * gw or x_BND.shape[2] != dim:
        raise ValueError(f"expected patch tokens [B, {gh}*{gw}, {dim}] for grid {tuple(grid)}, got "
                         f"{list(x_BND.shape)} (drop the <|spe|> token with patch_tokens)")
    return gh, gw


def _resize(x_BCHW: torch.Tensor, out_size: tuple[int, int] | None) -> torch.Tensor:
    if out_size is None or tuple(x_BCHW.shape[-2:]) == tuple(out_size):
        return x_BCHW
    return F.interpolate(x_BCHW, size=tuple(out_size), mode="bilinear", align_corners=False)


class LinearPatchHead(nn.Module):
    """Mod-Squad's Taskonomy decoder: one ``Linear(D -> p * p * C)`` per patch token, each token's output filling its
    own ``p x p`` patch (no convolution, no mixing across patches).

    The output features of a token are ordered ``(row in patch, column in patch, channel)``, as Mod-Squad's
    ``Rearrange('(b h w) (j k c) -> b (h j) (w k) c')``, so its checkpoints map one-to-one. ``norm`` is the
    LayerNorm Mod-Squad applies to the tokens before the head (timm's final ``norm``): our encoder leaves patch
    tokens un-normalised (``ln_post`` is for the ``<|spe|>`` token), so the head owns it.
    """

    def __init__(self, dim: int, patch_size: int, out_channels: int, norm: bool = True):
        super().__init__()
        if patch_size < 1 or out_channels < 1:
            raise ValueError(f"patch_size and out_channels must be positive, got {patch_size}, {out_channels}")
        self.dim, self.patch_size, self.out_channels = dim, patch_size, out_channels
        self.norm = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()
        self.proj = nn.Linear(dim, patch_size * patch_size * out_channels)
        trunc_normal_(self.proj.weight, std=0.02)  # timm ViT init, as Mod-Squad's heads
        nn.init.zeros_(self.proj.bias)

    def forward(self, x_BND: torch.Tensor, grid: tuple[int, int],
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Patch tokens ``[B, gh * gw, D]`` (row-major) -> ``[B, C, gh * p, gw * p]``, or resized (bilinear) to
        ``out_size``."""
        gh, gw = _check_tokens(x_BND, grid, self.dim)
        p, c = self.patch_size, self.out_channels
        y = self.proj(self.norm(x_BND)).view(x_BND.shape[0], gh, gw, p, p, c)  # [B, gh, gw, j, k, C]
        y_BCHW = y.permute(0, 5, 1, 3, 2, 4).reshape(x_BND.shape[0], c, gh * p, gw * p)  # rows (gh, j), cols (gw, k)
        return _resize(y_BCHW, out_size)


class UpHead(nn.Module):
    """M3ViT's ``VisionTransformerUpHead`` (SETR-PUP, ``num_conv=4``, ``num_upsampe_layer=4``): LayerNorm on the
    tokens, the grid as a ``[B, D, gh, gw]`` map, ``num_convs`` x (3x3 conv, norm, ReLU) with a 2x bilinear
    upsampling after each but the last, a 1x1 conv to C, and one bilinear resize to the output size.

    M3ViT upsamples 2x after the 1x1 conv; a 1x1 conv and bilinear interpolation are both linear maps per pixel with
    weights summing to one, so they commute, and resizing once to ``out_size`` gives M3ViT's output exactly when
    ``out_size`` is ``2 ** num_convs`` times the grid (16 px patches, 4 convs), at C instead of ``channels`` channels.

    Norm: GroupNorm, not M3ViT's SyncBN. BatchNorm's statistics are per rank and per micro-batch (a few images per
    rank in dense multi-task training), they differ between training and evaluation, and SyncBN all-reduces in every
    forward of the head: with ranks that draw different tasks in a step, only some ranks run a given head and the
    collective would hang. GroupNorm has no running state and no collective, and gives one sample the same output
    in any batch and in either mode.
    """

    def __init__(self, dim: int, out_channels: int, patch_size: int = 16, channels: int = 256, num_convs: int = 4,
                 num_groups: int = 32):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"num_convs must be at least 1, got {num_convs}")
        if channels % num_groups:
            raise ValueError(f"channels ({channels}) must be a multiple of num_groups ({num_groups})")
        self.dim, self.patch_size, self.out_channels = dim, patch_size, out_channels
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim if i == 0 else channels, channels, kernel_size=3, padding=1),
                          nn.GroupNorm(num_groups, channels), nn.ReLU(inplace=True))
            for i in range(num_convs))
        self.classifier = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, x_BND: torch.Tensor, grid: tuple[int, int],
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Patch tokens ``[B, gh * gw, D]`` (row-major) -> ``[B, C, H, W]``; ``out_size`` defaults to
        ``(gh * p, gw * p)``, the image the tokens came from."""
        gh, gw = _check_tokens(x_BND, grid, self.dim)
        x = self.norm(x_BND).transpose(1, 2).reshape(x_BND.shape[0], self.dim, gh, gw)
        for i, block in enumerate(self.convs):
            x = block(x)
            if i < len(self.convs) - 1:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.classifier(x)
        return _resize(x, out_size if out_size is not None else (gh * self.patch_size, gw * self.patch_size))


class PooledClassHead(nn.Module):
    """Mod-Squad's Taskonomy classification head (class_object, class_scene): LayerNorm and Linear on the mean of the
    patch tokens, ``[B, gh * gw, D] -> [B, K]`` raw outputs (its loss, ``soft_label_mse``, applies no softmax)."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.dim, self.out_channels = dim, out_channels
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, out_channels)
        trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x_BND: torch.Tensor, grid: tuple[int, int],
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        _check_tokens(x_BND, grid, self.dim)
        return self.proj(self.norm(x_BND.mean(dim=1)))


def make_head(kind: str, dim: int, patch_size: int, out_channels: int, **kwargs: Any) -> nn.Module:
    """A dense head: ``linear`` (``LinearPatchHead``, Mod-Squad's Taskonomy decoder), ``uphead`` (``UpHead``,
    M3ViT's PASCAL-Context/NYUD decoder) or ``pooled`` (``PooledClassHead``, a classification). ``kwargs`` go to the
    head (``norm``; ``channels``, ``num_convs``, ``num_groups``). All take ``(patch tokens, grid, out_size=None)``."""
    if kind == "linear":
        return LinearPatchHead(dim, patch_size, out_channels, **kwargs)
    if kind == "uphead":
        return UpHead(dim, out_channels, patch_size=patch_size, **kwargs)
    if kind == "pooled":
        return PooledClassHead(dim, out_channels)
    raise ValueError(f"head kind {kind!r} is not one of {HEAD_KINDS}")


# Losses. Predictions are head outputs [B, C, H, W]; targets are decoded labels at the same H, W.


def _single_channel(pred: torch.Tensor, target_BHW: torch.Tensor, what: str) -> torch.Tensor:
    if pred.dim() == 4 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if pred.shape != target_BHW.shape:
        raise ValueError(f"{what}: prediction {list(pred.shape)} (expected [B, 1, H, W] or [B, H, W]) does not match "
                         f"the target {list(target_BHW.shape)}")
    return pred


def _valid_mask(valid: torch.Tensor | None, shape: torch.Size, device: torch.device, what: str) -> torch.Tensor:
    if valid is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if valid.shape != shape:
        raise ValueError(f"{what}: valid mask {list(valid.shape)} does not match the target {list(shape)}")
    return valid.to(device=device, dtype=torch.bool)


def _masked_mean(per_pixel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_pixel`` where ``mask`` holds; 0 (with a zero gradient) when it holds nowhere. ``where`` rather
    than a product, so a NaN or inf at an unmasked pixel cannot leak into the sum or its gradient."""
    total = torch.where(mask, per_pixel, torch.zeros_like(per_pixel)).sum()
    return total / mask.sum().clamp(min=1)


def cross_entropy_loss(logits_BCHW: torch.Tensor, target_BHW: torch.Tensor, valid: torch.Tensor | None = None,
                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel-wise cross-entropy, mean over the labelled pixels (target != ``ignore_index``, and ``valid``).

    Multi-Task-Learning-PyTorch ``SoftMaxwithLoss`` (``NLLLoss(ignore_index=255)`` of ``log_softmax``) for semantic
    segmentation and human parts; unlike ``F.cross_entropy``'s mean it gives 0, not NaN, when nothing is labelled.
    """
    if logits_BCHW.dim() != 4 or logits_BCHW.shape[:1] + logits_BCHW.shape[2:] != target_BHW.shape:
        raise ValueError(f"cross_entropy_loss: logits {list(logits_BCHW.shape)} do not match the target "
                         f"{list(target_BHW.shape)} ([B, C, H, W] and [B, H, W])")
    target = target_BHW.long()
    mask = (target != ignore_index) & _valid_mask(valid, target.shape, target.device, "cross_entropy_loss")
    per_pixel = F.cross_entropy(logits_BCHW.float(), torch.where(mask, target, torch.zeros_like(target)),
                                reduction="none")
    return _masked_mean(per_pixel, mask)


def weighted_bce(logits: torch.Tensor, target_BHW: torch.Tensor, pos_weight: float | None = EDGE_POS_WEIGHT,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """Class-balanced binary cross-entropy on logits, Multi-Task-Learning-PyTorch's ``BalancedCrossEntropyLoss``.

    ``(w * sum_pos bce + (1 - w) * sum_neg bce) / num_valid``: positives (target >= 0.5) weigh ``w`` and negatives
    ``1 - w``, normalised by the number of valid pixels (the reference's ``size_average``, which divides by all
    pixels: the same when every pixel is valid). ``pos_weight`` fixes ``w`` (0.95 for edges, the reference's
    ``edge_w``); None takes ``w`` = fraction of negative valid pixels in the batch (HED-style, the reference's
    saliency loss). Invalid pixels are left out in both cases (the reference ignores its void mask when
    ``pos_weight`` is set).
    """
    logits = _single_channel(logits, target_BHW, "weighted_bce").float()
    mask = _valid_mask(valid, target_BHW.shape, target_BHW.device, "weighted_bce")
    positive = target_BHW >= 0.5
    per_pixel = F.binary_cross_entropy_with_logits(logits, positive.float(), reduction="none")
    zero = torch.zeros_like(per_pixel)
    loss_pos = torch.where(mask & positive, per_pixel, zero).sum()
    loss_neg = torch.where(mask & ~positive, per_pixel, zero).sum()
    num_valid = mask.sum()
    if pos_weight is None:
        w = (mask & ~positive).sum() / num_valid.clamp(min=1)
    else:
        w = torch.tensor(float(pos_weight), device=logits.device)
    return (w * loss_pos + (1 - w) * loss_neg) / num_valid.clamp(min=1)


def normal_loss(pred_B3HW: torch.Tensor, target_B3HW: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - cos`` between the L2-normalised prediction and the target normal, mean over labelled pixels (target
    non-zero, and ``valid``): Mod-Squad's normal loss restricted to labelled pixels. 0 for the same direction, 2 for
    the opposite one, and independent of the prediction's length.

    Multi-Task-Learning-PyTorch instead takes an L1 loss between the normalised prediction and the target; the
    cosine loss measures the angle alone, which is what the metric (angular error) scores.
    """
    if pred_B3HW.dim() != 4 or pred_B3HW.shape[1] != 3 or pred_B3HW.shape != target_B3HW.shape:
        raise ValueError(f"normal_loss: prediction {list(pred_B3HW.shape)} and target {list(target_B3HW.shape)} must "
                         "both be [B, 3, H, W]")
    target = target_B3HW.float()
    norm = target.norm(dim=1)
    mask = (norm > 0) & _valid_mask(valid, norm.shape, norm.device, "normal_loss")
    cos = (F.normalize(pred_B3HW.float(), dim=1) * F.normalize(target, dim=1)).sum(dim=1)
    return _masked_mean(1.0 - cos, mask)


def _aligned(pred: torch.Tensor, target: torch.Tensor, what: str) -> torch.Tensor:
    """``pred`` shaped as ``target``: ``[B, 1, H, W]`` against a one-channel ``[B, H, W]``, else the same shape."""
    if target.dim() == 3:
        return _single_channel(pred, target, what)
    if pred.shape != target.shape:
        raise ValueError(f"{what}: prediction {list(pred.shape)} does not match the target {list(target.shape)}")
    return pred


def l1_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Absolute error, mean over valid entries (``valid`` and a finite target): Multi-Task-Learning-PyTorch's
    ``DepthLoss('l1')`` (and Mod-Squad's L1 tasks). ``target`` is ``[B, H, W]`` or ``[B, C, H, W]``; invalid
    entries may hold anything, NaN included."""
    pred, target = _aligned(pred, target, "l1_loss").float(), target.float()
    mask = torch.isfinite(target) & _valid_mask(valid, target.shape, target.device, "l1_loss")
    return _masked_mean((pred - torch.where(mask, target, pred.detach())).abs(), mask)


def mse_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error, mean over valid entries (``valid`` and a finite target): Mod-Squad's curvature loss. ``target``
    is ``[B, H, W]`` (one channel) or ``[B, C, H, W]`` (stacked labels, e.g. the two principal curvatures)."""
    pred, target = _aligned(pred, target, "mse_loss").float(), target.float()
    mask = torch.isfinite(target) & _valid_mask(valid, target.shape, target.device, "mse_loss")
    return _masked_mean((pred - torch.where(mask, target, pred.detach())) ** 2, mask)


def soft_label_mse(logits_BK: torch.Tensor, target_BK: torch.Tensor) -> torch.Tensor:
    """Mod-Squad's Taskonomy classification loss (class_object, class_scene): ``F.mse_loss(outputs, targets)``
    between the head's raw outputs (no softmax: ``engine_mt.py`` applies none) and the soft target distribution,
    mean over the ``B x K`` entries of the images that have a target (a row of NaN has none). 0 for none."""
    if logits_BK.shape != target_BK.shape:
        raise ValueError(f"soft_label_mse: outputs {list(logits_BK.shape)} do not match the targets "
                         f"{list(target_BK.shape)}")
    target = target_BK.float()
    mask = torch.isfinite(target).all(dim=-1, keepdim=True).expand_as(target)
    return _masked_mean((logits_BK.float() - torch.where(mask, target, 0.0)) ** 2, mask)


def dense_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, *,
               pos_weight: float | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The loss of a label encoding (see the module docstring); ``pos_weight`` is for ``binary`` labels (None:
    balanced weights; ``EDGE_POS_WEIGHT`` for edges), ``ignore_index`` for ``index`` labels."""
    if kind == "index":
        return cross_entropy_loss(pred, target, valid, ignore_index)
    if kind == "binary":
        return weighted_bce(pred, target, pos_weight, valid)
    if kind == "normal":
        return normal_loss(pred, target, valid)
    if kind == "scalar":
        return l1_loss(pred, target, valid)
    if kind == "soft":
        return soft_label_mse(pred, target)
    raise ValueError(f"kind {kind!r} is not one of {DENSE_KINDS}")


def dense_family_loss(family: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A dense family's loss on targets as ``train/data.py`` decodes them (unlabelled: 255 for segmentation, NaN
    for saliency, edges and scalars, a zero normal): cross-entropy, balanced BCE (saliency), BCE weighting edges 0.95
    (Multi-Task-Learning-PyTorch's edge_w), 1 - cosine, L1 (depth, Taskonomy's regression tasks), MSE (curvature,
    and the soft class distributions), as ``models/dense.py`` defines them."""
    encoding = DENSE_FAMILIES[family]
    if encoding == "binary":
        pos_weight = EDGE_POS_WEIGHT if family == "edge" else None
        return dense_loss(encoding, pred, target, torch.isfinite(target), pos_weight=pos_weight)
    if family == "curvature":
        return mse_loss(pred, target)
    return dense_loss(encoding, pred, target)
