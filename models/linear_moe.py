"""Uni-Perceiver-MoE's conditional MoE: every expert is ONE linear layer (plain PyTorch, one process).

In an MoE block each linear of a routed sublayer (attention: qkv and output projection; FFN: fc1 and fc2) holds E
experts, and one routing decision per sublayer is shared by its two linears (the reference's qkv decision reused by
the output projection, fc1's by fc2). A token routed to experts ``e_1..e_k`` with gates ``g_1..g_k`` gets, at every
such linear, ``sum_k g_k (W_{e_k} x + b_{e_k}) = (sum_k g_k W_{e_k}) x + sum_k g_k b_{e_k}``.

The right-hand side is why static levels (modality, task, attribute) cost a dense layer: all tokens of a routing group
share their experts and gates, so the layer merges the k chosen weights once per group and runs ONE matmul, exactly
the per-token mixture (tested). In evaluation the merged weights are cached per group key. Token, context and
task-gate levels mix per token through the dispatch of ``models/moe.py`` (capacity and dropping as there).

Linear experts are replicated on every rank (no expert parallelism: ``moe.ep_size`` must be 1), as in the reference:
an expert is one linear, so E copies of the MoE linears are what each rank holds and ZeRO shards their optimizer state
like any other parameter. Unlike MLP experts they need no all-to-all at any level.

Shape legend: B batch, N sequence, T = B*N tokens, K experts per token, R sorted (token, expert) rows, E experts,
G routing groups, I/O linear input/output width, D width, h head width.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from condmoe.models import routing
from condmoe.models.moe import LocalComm, MoEArgs, RoutedLayer, _slots, scatter_real
from condmoe.models.router import Router, RoutingContext


class ExpertLinear(nn.Module):
    """E linear maps I -> O: ``weight[e]`` ``[O, I]`` and ``bias[e]`` ``[O]``, one parameter per expert.

    One parameter per expert, not one ``[E, O, I]`` tensor, so that a call touches only the experts it uses: a group's
    merge reads its k experts, and the backward writes gradients for those k alone (an ``[E, O, I]`` parameter gets a
    whole ``[E, O, I]`` gradient from every call, then the calls' gradients are summed). The experts no call used get
    an exact-zero gradient once per step from ``unused_zero`` (through the layer's aux loss), so every parameter still
    has a gradient: data-parallel ranks reduce the same parameters and AdamW treats every expert as before.

    All experts start as copies of one xavier-initialised linear (the reference deep-copies one ``nn.Linear``), so a
    fresh linear MoE computes what its dense twin computes whatever the gates; experts diverge through the gates.
    State dicts written with one ``[E, O, I]`` ``weight`` (and ``[E, O]`` ``bias``) still load.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.ParameterList(torch.empty(out_features, in_features) for _ in range(num_experts))
        self.bias = nn.ParameterList(torch.zeros(out_features) for _ in range(num_experts)) if bias else None
        self.used: set[int] = set()  # experts whose parameters met a token since the last unused_zero()
        self._register_load_state_dict_pre_hook(_unstack_experts)
        self.init_weights()

    @property
    def num_experts(self) -> int:
        return len(self.weight)

    def init_weights(self) -> None:
        bound = math.sqrt(6.0 / (self.out_features + self.in_features))  # xavier-uniform of one expert
        with torch.no_grad():
            first = torch.empty(self.out_features, self.in_features).uniform_(-bound, bound)
            for e in range(self.num_experts):
                self.weight[e].copy_(first)
                if self.bias is not None:
                    self.bias[e].zero_()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([E, O, I], [E, O])``: every expert at once (tests, analysis; not the training path)."""
        return torch.stack(list(self.weight)), None if self.bias is None else torch.stack(list(self.bias))

    def merged(self, experts_GK: list[list[int]], gate_GK: torch.Tensor) -> list[tuple]:
        """Each group's linear ``(W_g, b_g) = sum_k gate[g, k] (W_{e_k}, b_{e_k})`` over its chosen local experts
        (``-1``: a removed expert of a pruned layer, left out), differentiable in weights and gates. Reads only the
        chosen experts."""
        gate_GK = gate_GK.to(self.weight[0].dtype)
        out = []
        for experts, gate_K in zip(experts_GK, gate_GK):
            kept = [k for k, e in enumerate(experts) if e >= 0]
            experts = [experts[k] for k in kept]
            if len(kept) < len(gate_K):
                gate_K = gate_K[kept]
            if torch.is_grad_enabled():
                self.used.update(experts)
            out.append((_weighted_sum(self.weight, experts, gate_K, (self.out_features, self.in_features)),
                        None if self.bias is None else _weighted_sum(self.bias, experts, gate_K, (self.out_features,))))
        return out

    def sorted_forward(self, x_RI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Each expert on its contiguous rows of ``x_RI`` (rows sorted by expert, ``counts_E`` per expert)."""
        out, start = [], 0
        for e, count in enumerate(counts_E.tolist()):
            if count:
                out.append(F.linear(x_RI[start:start + count], self.weight[e],
                                    None if self.bias is None else self.bias[e]))
                start += count
                if torch.is_grad_enabled():
                    self.used.add(e)
        if not out:
            return x_RI.new_zeros(0, self.out_features)
        return torch.cat(out)

    def unused_zero(self) -> torch.Tensor | None:
        """An exact zero whose backward gives every expert no call used since the last call of this method a zero
        gradient (a slice's backward: one zero-filled tensor per parameter, no arithmetic); None if all were used."""
        unused = [e for e in range(self.num_experts) if e not in self.used]
        self.used = set()
        params = [p for e in unused for p in (self.weight[e], None if self.bias is None else self.bias[e])
                  if p is not None and p.requires_grad]
        return sum(p.reshape(-1)[:0].sum() for p in params) if params else None


def _weighted_sum(params: nn.ParameterList, experts: list[int], gate_K: torch.Tensor, shape: tuple) -> torch.Tensor:
    if not experts:  # every chosen expert removed (a pruned layer): the zero map
        return params[0].new_zeros(shape)
    return _Merge.apply(gate_K, *(params[e] for e in experts))


class _Merge(torch.autograd.Function):
    """``sum_k gate[k] * param_k`` with a backward that makes no temporaries: ``gate[k] * grad`` for each parameter
    and ``<grad, param_k>`` (one BLAS dot) for each gate. Autograd's own graph of muls and adds would write a
    parameter-sized product per gate and sum it."""

    @staticmethod
    def forward(ctx, gate_K: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_K, *params)
        merged = params[0] * gate_K[0]
        for k in range(1, len(params)):
            merged.addcmul_(params[k], gate_K[k])  # gates come in the parameters' dtype (ExpertLinear.merged)
        return merged

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_K, *params = ctx.saved_tensors
        flat = grad.reshape(-1)
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.stack([torch.dot(flat, p.reshape(-1)) for p in params])
        grads = [grad * gate_K[k] if ctx.needs_input_grad[k + 1] else None for k in range(len(params))]
        return grad_gate, *grads


def _unstack_experts(state_dict: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook: one ``[E, O, I]`` ``weight`` / ``[E, O]`` ``bias`` (the layout before one parameter
    per expert) becomes ``weight.e`` / ``bias.e``."""
    for name, dims in (("weight", 3), ("bias", 2)):
        stacked = state_dict.get(prefix + name)
        if isinstance(stacked, torch.Tensor) and stacked.dim() == dims:
            del state_dict[prefix + name]
            for e, tensor in enumerate(stacked.unbind(0)):
                state_dict[f"{prefix}{name}.{e}"] = tensor


class LinearMoEMixer(RoutedLayer):
    """Router and the per-group / per-token mixing of ``ExpertLinear``s shared by the linear-MoE FFN and attention.

    A subclass builds its ``ExpertLinear``s and calls ``mix(x, linear, plan)`` for each with the ``plan`` of one
    ``route``: the decision is made once per sublayer and shared by its linears.
    """

    def _setup_router(self, dim: int, args: MoEArgs, num_tasks: int, kept_experts: list[int] | None) -> int:
        if not args.num_experts:
            raise ValueError("a linear MoE layer needs moe.num_experts >= 1")
        self.dim = dim
        self.num_experts = args.num_experts
        self.top_k = args.top_k
        self.capacity_factor = args.capacity_factor
        self.eval_capacity_factor = args.eval_capacity_factor
        self.min_capacity = args.min_capacity
        self.drop_tokens = args.drop_tokens
        self.normalize_gates = True
        self.batch_priority = args.batch_priority
        self.router = Router(dim, args.num_experts, args.routing, num_tasks, noise_std=args.gate_noise_std)
        kept = list(range(args.num_experts)) if kept_experts is None else sorted(kept_experts)
        self.expert_slot = None if kept_experts is None else _slots(kept, args.num_experts)
        self.comm = LocalComm()
        self._setup_stats(num_tasks, args.balance_loss_weight, args.z_loss_weight, args.mi_loss_weight,
                          args.importance_loss_weight, args.mi_window)
        self._merge_cache: dict = {}
        return len(kept)

    def init_weights(self) -> None:
        self.router.init_weights()
        for m in self.modules():
            if isinstance(m, ExpertLinear):
                m.init_weights()

    def train(self, mode: bool = True):
        self._merge_cache.clear()  # merged weights are cached for evaluation only
        return super().train(mode)

    def plan(self, x_BND: torch.Tensor, ctx: RoutingContext | None) -> dict:
        """Routes once; what ``mix`` needs for every linear of the sublayer."""
        x_TD, real_T, logits_GE, group_T, r = self.route_tokens(x_BND, ctx)
        if self.expert_slot is not None:
            r = routing.remap_experts(r, self.expert_slot.to(x_BND.device))
        plan = {"real_T": real_T, "num_tokens": x_BND.shape[0] * x_BND.shape[1], "x_TD": x_TD}
        if group_T is not None and self.router.is_static:
            num_groups = logits_GE.shape[0]
            experts_GK, gate_GK = self._group_choices(logits_GE)
            order_T = inverse_T = None
            sizes = [x_TD.shape[0]]
            if num_groups > 1:  # tokens grouped contiguously once per sublayer; one group needs no reordering
                order_T = torch.argsort(group_T, stable=True)
                inverse_T = torch.argsort(order_T)
                sizes = torch.bincount(group_T, minlength=num_groups).tolist()
            plan["static"] = ((experts_GK, gate_GK), sizes, order_T, inverse_T)
        else:
            plan["dispatch"] = (routing.plan_dispatch(r, self.num_local_experts), r)
        return plan

    def _group_choices(self, logits_GE: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
        """Each group's top-k local experts (``-1`` for an expert a pruned layer removed) and gates ``[G, K]``."""
        _, idx_GK, gate_GK = routing.topk_experts(logits_GE, self.top_k, self.normalize_gates)
        if self.expert_slot is not None:
            idx_GK = self.expert_slot.to(idx_GK.device)[idx_GK]
        return idx_GK.tolist(), gate_GK  # host sync: the experts to read (a handful of groups)

    @staticmethod
    def grouped(x_T: torch.Tensor, plan: dict) -> torch.Tensor:
        """Static plans: the routed tokens reordered so that each group's are contiguous."""
        order_T = plan["static"][2]
        return x_T if order_T is None else x_T.index_select(0, order_T)

    @staticmethod
    def ungrouped(y_T: torch.Tensor, plan: dict) -> torch.Tensor:
        inverse_T = plan["static"][3]
        return y_T if inverse_T is None else y_T.index_select(0, inverse_T)

    def mix_grouped(self, x_TI: torch.Tensor, linear: ExpertLinear, plan: dict, name: str) -> torch.Tensor:
        """A static plan's merged linears on tokens already ``grouped``: one dense matmul per group."""
        choices, sizes, _, _ = plan["static"]
        merged = self._merged(linear, name, choices)
        if len(sizes) == 1:
            return F.linear(x_TI, *merged[0])
        return torch.cat([F.linear(x_g, *merged[g]) for g, x_g in enumerate(torch.split(x_TI, sizes))])

    def mix(self, x_TI: torch.Tensor, linear: ExpertLinear, plan: dict, name: str) -> torch.Tensor:
        """``linear`` applied with the routing of ``plan`` to the routed tokens ``x_TI`` (token order): merged per
        group (static) or mixed per token (dispatch)."""
        if "static" in plan:
            return self.ungrouped(self.mix_grouped(self.grouped(x_TI, plan), linear, plan, name), plan)
        dispatch, r = plan["dispatch"]
        y_RO = linear.sorted_forward(x_TI.index_select(0, dispatch.token_R), dispatch.counts_E)
        return routing.combine_sorted(y_RO, dispatch, r)

    def _merged(self, linear: ExpertLinear, name: str, choices: tuple[list[list[int]], torch.Tensor]) -> list:
        if self.training or torch.is_grad_enabled():
            return linear.merged(*choices)
        # Inference: one merge per (linear, decisions) while the weights are unchanged (_version counts in-place
        # writes such as optimizer steps and load_state_dict). A static level has a handful of decisions.
        experts_GK, gate_GK = choices
        version = tuple(p._version for p in (*linear.weight, *(linear.bias or ())))
        cache_key = (name, str(experts_GK), gate_GK.detach().cpu().numpy().tobytes())
        hit = self._merge_cache.get(cache_key)
        if hit is None or hit[0] != version:
            hit = (version, linear.merged(experts_GK, gate_GK))
            self._merge_cache[cache_key] = hit
        return hit[1]

    def _pop(self):
        """The step's statistics, with an exact zero in the aux loss that gives the experts no call used a gradient
        (``ExpertLinear.unused_zero``)."""
        zeros = [z for m in self.children() if isinstance(m, ExpertLinear) for z in [m.unused_zero()] if z is not None]
        out = super()._pop()
        if out is None or not zeros:
            return out
        return (out[0] + sum(zeros), *out[1:])

    @property
    def num_local_experts(self) -> int:
        return self.num_experts if self.expert_slot is None else int((self.expert_slot >= 0).sum())

    def merged_linears(self, ctx: RoutingContext) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """The dense linears this layer applies to the tokens of ``ctx`` (one static group): what a deployment
        export writes for one attribute. ``{linear name: (weight, bias)}``."""
        if not self.router.is_static:
            raise ValueError(f"only static routing levels merge into one dense layer, not {self.router.level!r}")
        x_BND = torch.zeros(1, 1, self.dim, device=self.router.weight.device)
        logits_GE, _ = self.router(x_BND, ctx)
        choices = self._group_choices(logits_GE[:1])
        return {name: m.merged(*choices)[0] for name, m in self.named_children() if isinstance(m, ExpertLinear)}


class LinearMoEMLP(LinearMoEMixer):
    """The FFN of an MoE block with linear experts: ``fc2(act(fc1(x)))``, both linears mixed with one decision.

    A drop-in for timm's ``Mlp`` (its constructor keywords); ``forward(x, ctx)``.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] | None = None, bias: bool = True,
                 drop: float = 0.0, args: MoEArgs | None = None, num_tasks: int = 1,
                 kept_experts: list[int] | None = None, **_):
        super().__init__()
        if out_features not in (None, in_features):
            raise ValueError(f"LinearMoEMLP keeps the width: out_features={out_features} != in_features={in_features}")
        if norm_layer is not None:
            raise ValueError("LinearMoEMLP has no norm between its linears (timm Mlp's norm_layer)")
        num_local = self._setup_router(in_features, args or MoEArgs(expert_type="linear"), num_tasks, kept_experts)
        hidden = hidden_features or in_features
        self.fc1 = ExpertLinear(num_local, in_features, hidden, bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = ExpertLinear(num_local, hidden, in_features, bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        shape = x.shape
        x_BND = x.reshape(-1, *shape[-2:]) if x.dim() >= 3 else x.reshape(1, -1, shape[-1])
        plan = self.plan(x_BND, ctx)
        if "static" in plan:  # grouped once for both linears (the activation is per token)
            h_TH = self.drop1(self.act(self.mix_grouped(self.grouped(plan["x_TD"], plan), self.fc1, plan, "fc1")))
            y_TD = self.ungrouped(self.drop2(self.mix_grouped(h_TH, self.fc2, plan, "fc2")), plan)
        else:
            h_TH = self.drop1(self.act(self.mix(plan["x_TD"], self.fc1, plan, "fc1")))
            y_TD = self.drop2(self.mix(h_TH, self.fc2, plan, "fc2"))
        return scatter_real(y_TD, plan["real_T"], plan["num_tokens"]).to(x.dtype).reshape(shape)


class LinearMoEAttention(LinearMoEMixer):
    """Multi-head self-attention whose qkv and output projections are linear MoEs sharing one decision (the
    attention maths itself is shared, as in Uni-Perceiver-MoE). Accepts timm ``Attention``'s call."""

    def __init__(self, dim: int, num_heads: int, args: MoEArgs, num_tasks: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, kept_experts: list[int] | None = None, **_timm):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        num_local = self._setup_router(dim, args, num_tasks, kept_experts)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = ExpertLinear(num_local, dim, 3 * dim, qkv_bias)
        self.proj = ExpertLinear(num_local, dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_BND: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                ctx: RoutingContext | None = None) -> torch.Tensor:
        batch, length, dim = x_BND.shape
        plan = self.plan(x_BND, ctx)
        qkv_TO = scatter_real(self.mix(plan["x_TD"], self.qkv, plan, "qkv"), plan["real_T"], plan["num_tokens"])
        q, k, v = qkv_TO.reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o_BKNh = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                dropout_p=self.attn_drop if self.training else 0.0)
        o_TD = o_BKNh.transpose(1, 2).reshape(batch * length, dim)
        if plan["real_T"] is not None:
            o_TD = o_TD.index_select(0, plan["real_T"])
        y_TD = scatter_real(self.mix(o_TD, self.proj, plan, "proj"), plan["real_T"], plan["num_tokens"])
        return self.proj_drop(y_TD.reshape(batch, length, dim))
