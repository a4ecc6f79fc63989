"""Mod-Squad's mixture of attention heads (MoA): per-expert query and output projections, shared K/V, top-k heads.

Each token picks its top-k of E head experts; expert e has its own query projection (D -> h) and output projection
(h -> D); keys and values come from one projection shared by every head (multi-query attention). The k chosen heads
attend with the token's k queries; their outputs pass the chosen experts' output projections, weighted by the gates
(Mod-Squad keeps raw top-k probabilities, no renormalisation).

All E query projections are computed and the chosen ones gathered (and the output side scattered back into an
[E * h] vector): 2 x E/k times the FLOPs of the projections the tokens use, in exchange for dense matmuls and no
dispatch. The head experts are small and replicated on every rank (no expert parallelism).

Shape legend: B batch, N sequence, T = B*N, K heads per token, E head experts, h head width, D width.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from condmoe.models import routing
from condmoe.models.moe import LocalComm, RoutedLayer, _slots
from condmoe.models.router import ROUTING_LEVELS, Router, RoutingContext


@dataclass
class MoAArgs:
    """What an ``MoAttention`` layer is (Mod-Squad's defaults). train/config.py's ``moa`` section is this plus
    placement; errors name a field as ``moa.<field>``."""

    num_experts: int = 0
    """Head experts per mixture-of-attention-heads layer (0 disables MoA)."""
    num_heads: int = 0
    """Heads each token picks (0: the model's num_heads)."""
    head_dim: int = 0
    """Width per head (0: dim / num_heads)."""
    routing: str = "task_gate"
    """Router level (Mod-Squad: task_gate)."""
    balance_loss_weight: float = 0.0
    """Balance loss weight per layer."""
    mi_loss_weight: float = 0.005
    """Mutual-information loss weight per layer (Mod-Squad's 0.005)."""
    mi_window: int = 0
    """Past micro-steps whose statistics join the MI loss's P(T, E), without gradient (see moe.mi_window)."""

    def __post_init__(self):
        if self.routing not in ROUTING_LEVELS:
            raise ValueError(f"moa.routing={self.routing!r} is not one of {', '.join(ROUTING_LEVELS)}")
        if min(self.num_experts, self.num_heads, self.head_dim, self.mi_window) < 0:
            raise ValueError("moa.num_experts, moa.num_heads, moa.head_dim and moa.mi_window must be >= 0")
        if self.num_experts and self.num_heads > self.num_experts:
            raise ValueError(f"moa.num_heads={self.num_heads} exceeds moa.num_experts={self.num_experts}")
        if self.balance_loss_weight < 0 or self.mi_loss_weight < 0:
            raise ValueError("moa.balance_loss_weight and moa.mi_loss_weight must be >= 0")


class MoAttention(RoutedLayer):
    """Args:
        dim: width D.
        num_heads: heads per token K when ``args.num_heads`` is 0 (the block's heads; Mod-Squad: 12 of 24).
        args: head experts, heads, head width, router level and loss weights (``MoAArgs``).
        num_tasks: tasks known to task-level routers, task gates and the MI loss.
        qkv_bias: biases on the query experts and the shared K/V projection.
        gate_noise_std: std of Gaussian noise on router logits in training.
        normalize_gates: renormalise the top-k gates (Mod-Squad: False).
        z_loss_weight: router z-loss weight.
        attn_drop, proj_drop: dropout on attention weights and on the output.
        kept_experts: build only these head experts (an extracted layer; choices of removed heads are dropped).

    Other keywords that timm's ``Block`` passes to its attention layer (qk_norm, norm_layer, ...) are accepted and
    ignored.
    """

    def __init__(self, dim: int, num_heads: int, args: MoAArgs, num_tasks: int = 1,
                 qkv_bias: bool = True, gate_noise_std: float = 0.0, normalize_gates: bool = False,
                 z_loss_weight: float = 0.0, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 kept_experts: list[int] | None = None, **_timm_kwargs):
        super().__init__()
        num_experts, num_heads = args.num_experts, args.num_heads or num_heads
        if not 1 <= num_heads <= num_experts:
            raise ValueError(f"MoA picks num_heads={num_heads} of num_experts={num_experts} head experts")
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = num_heads
        self.head_dim = args.head_dim or dim // num_heads
        self.normalize_gates = normalize_gates
        self.attn_drop = attn_drop
        self.router = Router(dim, num_experts, args.routing, num_tasks, noise_std=gate_noise_std)
        kept = list(range(num_experts)) if kept_experts is None else sorted(kept_experts)
        self.num_local_experts = len(kept)
        self.expert_slot = None if kept_experts is None else _slots(kept, num_experts)
        self.q_weight = nn.Parameter(torch.empty(len(kept) * self.head_dim, dim))
        self.q_bias = nn.Parameter(torch.zeros(len(kept) * self.head_dim)) if qkv_bias else None
        self.kv = nn.Linear(dim, 2 * self.head_dim, bias=qkv_bias)
        self.o_weight = nn.Parameter(torch.empty(dim, len(kept) * self.head_dim))
        self.o_bias = nn.Parameter(torch.zeros(dim))
        self.proj_drop = nn.Dropout(proj_drop)
        self.comm = LocalComm()
        self._setup_stats(num_tasks, args.balance_loss_weight, z_loss_weight, args.mi_loss_weight,
                          mi_window=args.mi_window)
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.q_weight, std=0.02)
        trunc_normal_(self.o_weight, std=0.02)
        self.router.init_weights()

    def forward(self, x_BND: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                ctx: RoutingContext | None = None) -> torch.Tensor:
        batch, length, dim = x_BND.shape
        heads, h = self.top_k, self.head_dim
        logits_GE, group_T = self.router(x_BND, ctx)
        logits_TE = logits_GE if group_T is None else logits_GE.index_select(0, group_T)
        r = routing.route(logits_TE, heads, capacity=None, normalize=self.normalize_gates)
        if ctx is not None and ctx.pad_mask_BN is not None:  # padding's head choices count in no statistic
            real_T = ctx.real_tokens(x_BND.device)
            self._record(logits_TE.index_select(0, real_T), _rows(r, real_T), ctx.task_id)
        else:
            self._record(logits_TE, r, ctx.task_id if ctx is not None else 0)
        if self.expert_slot is not None:
            r = routing.remap_experts(r, self.expert_slot.to(x_BND.device))

        q_TEh = F.linear(x_BND, self.q_weight, self.q_bias).reshape(batch * length, self.num_local_experts, h)
        idx_TKh = r.expert_idx_TK[..., None].expand(-1, -1, h)
        q_BKNh = q_TEh.gather(1, idx_TKh).reshape(batch, length, heads, h).transpose(1, 2)
        k_B1Nh, v_B1Nh = self.kv(x_BND).reshape(batch, length, 2, 1, h).permute(2, 0, 3, 1, 4)
        o_BKNh = F.scaled_dot_product_attention(q_BKNh, k_B1Nh, v_B1Nh, attn_mask=attn_mask, is_causal=is_causal,
                                                dropout_p=self.attn_drop if self.training else 0.0, enable_gqa=True)
        o_TKh = o_BKNh.transpose(1, 2).reshape(batch * length, heads, h) * r.gate_TK[..., None].to(x_BND.dtype)
        # scatter_add: in a pruned layer removed heads map to slot 0 with a zero gate
        o_TEh = o_TKh.new_zeros(batch * length, self.num_local_experts, h).scatter_add(1, idx_TKh, o_TKh)
        out = F.linear(o_TEh.reshape(batch, length, -1), self.o_weight, self.o_bias)
        return self.proj_drop(out)


def _rows(r: routing.Routing, rows_T: torch.Tensor) -> routing.Routing:
    """The routing of some tokens only (counts recomputed over them)."""
    idx_TK = r.expert_idx_TK.index_select(0, rows_T)
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=r.probs_TE.shape[-1])
    return routing.Routing(idx_TK, r.gate_TK.index_select(0, rows_T), r.slot_TK.index_select(0, rows_T),
                           r.probs_TE.index_select(0, rows_T), counts_E, r.capacity)
