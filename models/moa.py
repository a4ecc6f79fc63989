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

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from condmoe.models import routing
from condmoe.models.moe import LocalComm, RoutedLayer, _slots
from condmoe.models.router import Router, RoutingContext


class MoAttention(RoutedLayer):
    """Args:
        dim: width D.
        num_heads: heads per token K (Mod-Squad: 12 of 24).
        num_experts: head experts E.
        head_dim: width per head h (default D / K).
        qkv_bias: biases on the query experts and the shared K/V projection.
        routing_level, num_tasks, gate_noise_std: the router (Mod-Squad: ``task_gate``).
        normalize_gates: renormalise the top-k gates (Mod-Squad: False).
        balance_loss_weight, z_loss_weight, mi_loss_weight: auxiliary losses (Mod-Squad: MI only).
        attn_drop, proj_drop: dropout on attention weights and on the output.

        kept_experts: build only these head experts (an extracted layer; choices of removed heads are dropped).

    Other keywords that timm's ``Block`` passes to its attention layer (qk_norm, norm_layer, ...) are accepted and
    ignored.
    """

    def __init__(self, dim: int, num_heads: int = 8, num_experts: int = 16, head_dim: int | None = None,
                 qkv_bias: bool = True, routing_level: str = "token", num_tasks: int = 1, gate_noise_std: float = 0.0,
                 normalize_gates: bool = False, balance_loss_weight: float = 0.0, z_loss_weight: float = 0.0,
                 mi_loss_weight: float = 0.0, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 kept_experts: list[int] | None = None, **_timm_kwargs):
        super().__init__()
        if not 1 <= num_heads <= num_experts:
            raise ValueError(f"MoA picks num_heads={num_heads} of num_experts={num_experts} head experts")
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.normalize_gates = normalize_gates
        self.attn_drop = attn_drop
        self.router = Router(dim, num_experts, routing_level, num_tasks, noise_std=gate_noise_std)
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
        self._setup_stats(num_tasks, balance_loss_weight, z_loss_weight, mi_loss_weight)
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
