"""Routers of the conditional MoE layers: what a routing decision may look at, at five levels plus task gates.

Shape legend: B batch, N sequence, T = B*N tokens, G routing groups, E experts, A attribute width, D width.

| level       | the router sees                                   | decisions per pass             |
|-------------|---------------------------------------------------|--------------------------------|
| token       | each token                                        | one per token                  |
| context     | the mean of the token's sequence (padding masked) | one per sequence               |
| modality    | a learned embedding of the token's modality       | one per modality (static)      |
| task        | a learned embedding of the task                   | one per pass (static)          |
| attribute   | Linear -> LayerNorm of the token's attribute vector | one per distinct vector (static) |
| task_gate   | each token, with the task's own router (Mod-Squad) | one per token                 |

Static decisions depend only on side information, so the layer can run each group through its experts without
per-token dispatch (``MoEMLP``'s static path).
"""

from dataclasses import dataclass, field

import torch
from timm.layers import trunc_normal_
from torch import nn

ROUTING_LEVELS = ("token", "context", "modality", "task", "attribute", "task_gate")
STATIC_LEVELS = ("modality", "task", "attribute")
MODALITIES = ("image", "video", "text")

# Uni-Perceiver-MoE's 8-bit attribute vectors (shared/reference/uniperceiver.md): bits 0-2 modalities of the task's
# input, bit 3 always set, bit 4 visual token, bit 5 text token, bit 6 target side, bit 7 causal stream.
ATTRIBUTES = {
    "visual_input": (1, 0, 0, 1, 1, 0, 0, 0),  # image/video classification and retrieval inputs
    "text_input": (0, 1, 0, 1, 0, 1, 0, 0),  # MLM input
    "caption_visual": (1, 1, 0, 1, 1, 0, 0, 0),
    "caption_text": (1, 1, 0, 1, 0, 1, 0, 1),
    "text_target": (1, 0, 0, 1, 0, 1, 1, 0),  # class names, retrieval captions
    "vocab_target": (1, 1, 0, 1, 0, 1, 1, 0),
}
ATTRIBUTE_DIM = 8


@dataclass
class RoutingContext:
    """Side information of one encoder pass for conditional routers (unused fields may stay None).

    Attributes:
        task_id: index of the task (task level, Mod-Squad task gates, the mutual-information loss).
        modality_BN: modality id per token (``MODALITIES`` index).
        attribute_BNA: attribute vector per token.
        pad_mask_BN: True on real tokens (context pooling ignores padding).
    """

    task_id: int = 0
    modality_BN: torch.Tensor | None = None
    attribute_BNA: torch.Tensor | None = None
    pad_mask_BN: torch.Tensor | None = None
    _real_T: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def real_tokens(self, device) -> torch.Tensor | None:
        """Flat positions of the real (non-padding) tokens, or None without a padding mask. Computed once per pass
        (one host sync), not once per routed layer."""
        if self.pad_mask_BN is None:
            return None
        if self._real_T is None:
            self._real_T = torch.nonzero(self.pad_mask_BN.reshape(-1).to(device)).squeeze(1)
        return self._real_T


class Router(nn.Module):
    """Produces router logits (fp32) per routing group, and which group each token belongs to.

    Args:
        dim: token width D.
        num_experts: experts E.
        level: one of ``ROUTING_LEVELS``.
        num_tasks: tasks (task level and task gates).
        attribute_dim: attribute vector width (attribute level).
        noise_std: std of Gaussian noise on the logits in training, one draw per decision.
    """

    def __init__(self, dim: int, num_experts: int, level: str = "token", num_tasks: int = 1,
                 attribute_dim: int = ATTRIBUTE_DIM, noise_std: float = 0.0):
        super().__init__()
        if level not in ROUTING_LEVELS:
            raise ValueError(f"routing level must be one of {', '.join(ROUTING_LEVELS)}, got {level!r}")
        self.level = level
        self.num_experts = num_experts
        self.noise_std = noise_std
        if level == "task_gate":
            # Mod-Squad: one bias-free router per task, zero-initialised (every task starts from uniform routing).
            self.weight = nn.Parameter(torch.zeros(num_tasks, num_experts, dim))
        else:
            self.weight = nn.Parameter(torch.empty(num_experts, dim))
            trunc_normal_(self.weight, std=0.02)
        if level == "modality":
            self.embed = nn.Embedding(len(MODALITIES), dim)
        elif level == "task":
            self.embed = nn.Embedding(num_tasks, dim)
        elif level == "attribute":
            self.embed = nn.Sequential(nn.Linear(attribute_dim, dim), nn.LayerNorm(dim))

    @property
    def is_static(self) -> bool:
        return self.level in STATIC_LEVELS

    def init_weights(self) -> None:
        if self.level != "task_gate":
            trunc_normal_(self.weight, std=0.02)
        if self.level in ("modality", "task"):
            trunc_normal_(self.embed.weight, std=0.02)

    def forward(self, x_BND: torch.Tensor, ctx: RoutingContext | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``(logits_GE, group_T)``; ``group_T`` is None when every token is its own group."""
        batch, length, dim = x_BND.shape
        ctx = ctx or RoutingContext()
        if self.level == "token":
            return self._logits(x_BND.reshape(-1, dim), self.weight), None
        if self.level == "task_gate":
            return self._logits(x_BND.reshape(-1, dim), self.weight[ctx.task_id]), None
        if self.level == "context":
            mask = ctx.pad_mask_BN if ctx.pad_mask_BN is not None else x_BND.new_ones(batch, length, dtype=torch.bool)
            weights = mask.to(x_BND.dtype)[..., None]
            pooled_BD = (x_BND * weights).sum(1) / weights.sum(1).clamp_min(1)
            group_T = torch.arange(batch, device=x_BND.device).repeat_interleave(length)
            return self._logits(pooled_BD, self.weight), group_T
        if self.level == "task":
            task = torch.tensor([ctx.task_id], device=x_BND.device)
            return self._logits(self.embed(task), self.weight), x_BND.new_zeros(batch * length, dtype=torch.long)
        keys_TK = self._keys(ctx, batch, length, x_BND.device)
        # One decision per distinct key (a handful per pass): the host sync of unique() buys no per-token work.
        unique_GK, group_T = unique_rows(keys_TK)
        if self.level == "modality":
            inputs_GD = self.embed(unique_GK[:, 0].long())
        else:
            inputs_GD = self.embed(unique_GK.to(self.embed[0].weight.dtype))
        return self._logits(inputs_GD, self.weight), group_T

    def _keys(self, ctx: RoutingContext, batch: int, length: int, device) -> torch.Tensor:
        if self.level == "modality":
            if ctx.modality_BN is None:
                raise ValueError("modality routing needs RoutingContext.modality_BN")
            return ctx.modality_BN.reshape(batch * length, 1).to(device)
        if ctx.attribute_BNA is None:
            raise ValueError("attribute routing needs RoutingContext.attribute_BNA")
        return ctx.attribute_BNA.reshape(batch * length, -1).to(device)

    def _logits(self, inputs_GD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
        logits_GE = nn.functional.linear(inputs_GD.float(), weight_ED.float())
        if self.training and self.noise_std > 0:
            logits_GE = logits_GE + torch.randn_like(logits_GE) * self.noise_std
        return logits_GE


def unique_rows(keys_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(keys_TK, dim=0, return_inverse=True)``, fast for 0/1 keys (attribute vectors) and one-column
    integer keys (modalities): those are packed into one integer per row, most significant bit first, so the groups
    come out in the same (lexicographic) order. ``unique(dim=0)`` compares rows one by one on CPU."""
    num_keys = keys_TK.shape[1]
    binary = num_keys <= 62 and bool(((keys_TK == 0) | (keys_TK == 1)).all())
    if num_keys == 1 and not keys_TK.is_floating_point():
        packed_T = keys_TK[:, 0]
    elif binary:
        bits_K = 2 ** torch.arange(num_keys - 1, -1, -1, device=keys_TK.device)
        packed_T = (keys_TK.long() * bits_K).sum(-1)
    else:
        return torch.unique(keys_TK, dim=0, return_inverse=True)
    values_G, group_T = torch.unique(packed_T, return_inverse=True)
    first_G = torch.full((len(values_G),), len(packed_T), device=keys_TK.device)
    first_G = first_G.scatter_reduce(0, group_T, torch.arange(len(packed_T), device=keys_TK.device), "amin")
    return keys_TK.index_select(0, first_G), group_T


def routing_context(x_BND: torch.Tensor, modality: str, attribute: str, task_id: int,
                    pad_mask_BN: torch.Tensor | None = None) -> RoutingContext:
    """Side information of one pass: its modality and Uni-Perceiver-MoE attribute vector on every token."""
    batch, length, _ = x_BND.shape
    modality_BN = torch.full((batch, length), MODALITIES.index(modality), device=x_BND.device)
    attribute_A = torch.tensor(ATTRIBUTES[attribute], dtype=x_BND.dtype, device=x_BND.device)
    attribute_BNA = attribute_A.expand(batch, length, -1)
    return RoutingContext(task_id=task_id, modality_BN=modality_BN, attribute_BNA=attribute_BNA,
                          pad_mask_BN=pad_mask_BN)
