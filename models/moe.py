"""Conditional Mixture-of-Experts MLP (plain PyTorch, runs in one process).

``MoEMLP`` is a drop-in for timm's ``Mlp`` (same constructor keywords) whose ``forward(x, ctx)`` routes at any level of
``models/router.py``. ``forward`` returns only the output; the auxiliary losses and expert counts of every call are
accumulated on the layer and read (and cleared) by the trainer with ``pop_moe_stats(model)``.

Two execution paths, the same maths:

* **dispatch** (token, context, task-gate levels; or any level under expert parallelism): (token, expert) pairs are
  sorted by expert, each expert runs on its contiguous rows (one grouped GEMM on GPU, a loop on CPU), and the outputs
  are gathered back and gated. Under expert parallelism ``self.comm`` moves the sorted rows to the ranks that hold
  their experts and back (``models/ds_moe.py``); locally it is the identity.
* **static** (modality, task, attribute levels, all experts local): one decision per group of tokens, so each group
  goes straight through its k experts, ``sum_k g_k * FFN_k(x_group)``, with no per-token dispatch.

Shape legend: B batch, N sequence, T = B*N tokens, K experts per token, R sorted (token, expert) rows, E experts,
L local experts, X tasks, D width, H expert hidden width.
"""

import contextlib
import contextvars
import logging
from dataclasses import dataclass, field

import torch
from timm.layers import Mlp
from torch import nn

from condmoe.models import routing
from condmoe.models.router import ROUTING_LEVELS, Router, RoutingContext

log = logging.getLogger("condmoe.moe")


@dataclass
class MoEArgs:
    """What an ``MoEMLP`` layer is. train/config.py's ``moe`` section is this plus placement and ``ep_size``, so a
    field is declared (and validated) once, here; errors name it as ``moe.<field>``."""

    num_experts: int = 8
    """Experts per MoE layer (0 disables MoE: a dense model)."""
    expert_type: str = "mlp"
    """'mlp': each expert is an MLP, ``sum_k g_k FFN_k(x)`` (Switch, GShard, DeepSpeed, Mod-Squad). 'linear': each
    expert is ONE linear layer, mixed at every MoE linear with one decision per sublayer (Uni-Perceiver-MoE); static
    levels then merge the chosen experts' weights, one dense matmul per routing group."""
    targets: list[str] = field(default_factory=lambda: ["ffn"])
    """Sublayers of an MoE block that are MoE: 'ffn' (both FFN linears), 'attn' (qkv and output projections; needs
    expert_type 'linear'). Uni-Perceiver-MoE: [attn, ffn]."""
    top_k: int = 2
    """Experts per token."""
    routing: str = "token"
    """What the router sees: token, context, modality, task, attribute, or task_gate (Mod-Squad). See docs/moe.md."""
    capacity_factor: float = 1.25
    """Training capacity per expert, as a multiple of the balanced load k*T/E."""
    eval_capacity_factor: float = 2.0
    """The same at evaluation."""
    min_capacity: int = 4
    """Lower bound on slots per expert."""
    drop_tokens: bool = True
    """False: dropless (capacity follows the busiest expert)."""
    gate_noise_std: float = 0.0
    """Gaussian noise on router logits during training."""
    balance_loss_weight: float = 0.01
    """Switch load-balance loss weight per layer."""
    z_loss_weight: float = 0.0
    """Router z-loss weight per layer."""
    importance_loss_weight: float = 0.0
    """Importance loss (CV^2 of the experts' summed router probabilities; Shazeer et al., V-MoE) weight per layer."""
    batch_priority: bool = False
    """Batch-priority routing (V-MoE): when capacity drops assignments, tokens with the highest top-1 probability
    keep their slots first (default: token order)."""
    mi_loss_weight: float = 0.0
    """Mod-Squad mutual-information loss weight per layer (statistics summed over all ranks); 0 disables."""
    mi_window: int = 0
    """Past micro-steps whose (task, expert) statistics join the current step's in the MI loss's P(T, E), without
    gradient (0: the current step only). With one task per rank a step often holds a single task, and MI over a
    single task is 0: a window lets the term act on every step. Kept in the model state (checkpoints resume it)."""
    static_dispatch: bool = True
    """Run static levels (modality, task, attribute) group by group without per-token dispatch (ep_size 1 only)."""
    expert_backend: str = "auto"
    """auto (grouped GEMM on GPU, loop on CPU), loop, or grouped."""

    def __post_init__(self):
        if self.routing not in ROUTING_LEVELS:
            raise ValueError(f"moe.routing={self.routing!r} is not one of {', '.join(ROUTING_LEVELS)}")
        if self.expert_backend not in ("auto", "loop", "grouped"):
            raise ValueError(f"moe.expert_backend={self.expert_backend!r} is not one of auto, loop, grouped")
        if min(self.mi_loss_weight, self.balance_loss_weight, self.z_loss_weight, self.importance_loss_weight) < 0:
            raise ValueError("moe.balance_loss_weight, moe.z_loss_weight, moe.importance_loss_weight and "
                             "moe.mi_loss_weight must be >= 0")
        if self.num_experts < 0 or self.mi_window < 0:
            raise ValueError(f"moe.num_experts and moe.mi_window must be >= 0, got {self.num_experts}, "
                             f"{self.mi_window}")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k={self.top_k} must be in [1, moe.num_experts={self.num_experts}]")
        if self.expert_type not in ("mlp", "linear"):
            raise ValueError(f"moe.expert_type={self.expert_type!r} is not one of mlp, linear")
        self.targets = list(self.targets)
        if not self.targets or not set(self.targets) <= {"ffn", "attn"} or len(set(self.targets)) < len(self.targets):
            raise ValueError(f"moe.targets={self.targets} must be a non-empty subset of [attn, ffn]")
        if "attn" in self.targets and self.expert_type != "linear":
            raise ValueError("moe.targets with 'attn' needs moe.expert_type=linear (attention experts are linear maps)")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ValueError(f"moe.{name} must be > 0, got {getattr(self, name)}")


class LocalComm:
    """All experts live in this process and no peer takes part in the statistics: every exchange is an identity."""

    ep_size = 1
    ep_rank = 0

    def dispatch(self, x_RD: torch.Tensor, counts_E: torch.Tensor):
        """Sends rows sorted by global expert to their experts' ranks. Returns (rows for my experts sorted by local
        expert, their counts per local expert, a handle for ``combine``)."""
        return x_RD, counts_E, None

    def combine(self, y_RD: torch.Tensor, handle) -> torch.Tensor:
        """The inverse of ``dispatch`` for the expert outputs."""
        return y_RD

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable sum over every data-parallel rank (statistics such as the mutual-information loss)."""
        return x


class Experts(nn.Module):
    """The experts held by this process, run on rows sorted by expert.

    The list is called ``deepspeed_experts`` because DeepSpeed's engine finds expert weights by that name when it
    writes one checkpoint file per global expert (``layer_{l}_expert_{e}_mp_rank_00_model_states.pt``) and maps them
    back to local experts on load; keeping its naming lets those files work across expert-parallel sizes.
    """

    def __init__(self, experts: list[nn.Module], backend: str = "auto"):
        super().__init__()
        if backend not in ("auto", "loop", "grouped"):
            raise ValueError(f"expert backend must be auto, loop or grouped, got {backend!r}")
        self.deepspeed_experts = nn.ModuleList(experts)
        self.backend = backend

    def forward(self, x_RD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        use_grouped = self.backend == "grouped" or (self.backend == "auto" and x_RD.is_cuda)
        if use_grouped and self._groupable():
            if not hasattr(torch, "_grouped_mm"):
                self._fall_back(f"torch {torch.__version__} has no torch._grouped_mm")
            else:
                try:
                    return self._grouped(x_RD, counts_L)
                except (RuntimeError, NotImplementedError) as exc:  # e.g. a device or dtype it does not support
                    self._fall_back(f"torch._grouped_mm failed ({' '.join(str(exc).split())[:200]})")
        chunks = torch.split(x_RD, counts_L.tolist())  # host sync: the split sizes
        return torch.cat([expert(chunk) for expert, chunk in zip(self.deepspeed_experts, chunks)])

    def _fall_back(self, reason: str) -> None:
        """The loop from now on, said once per layer: the result is the same, only slower."""
        self.backend = "loop"
        log.warning("%s: MoE experts run one matmul per expert instead (moe.expert_backend=loop)", reason)

    def _groupable(self) -> bool:
        first = self.deepspeed_experts[0]
        return (isinstance(first, Mlp) and isinstance(first.norm, nn.Identity) and first.drop1.p == 0
                and first.drop2.p == 0 and first.fc1.bias is not None and first.fc2.bias is not None)

    def _grouped(self, x_RD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        """Both expert matmuls as grouped GEMMs over the sorted rows (``torch._grouped_mm``, no Python loop).
        Autocast does not cover ``_grouped_mm`` (float32 rows would run a float32 GEMM): under autocast the rows and
        weights are cast to its dtype here, as ``nn.Linear`` in the loop would be."""
        experts = self.deepspeed_experts
        device = x_RD.device.type
        if torch.is_autocast_enabled(device):
            x_RD = x_RD.to(torch.get_autocast_dtype(device))
        offsets = torch.cumsum(counts_L, 0).to(torch.int32)
        expert_of_row = torch.repeat_interleave(torch.arange(len(experts), device=x_RD.device), counts_L,
                                                output_size=x_RD.shape[0])
        w1_LDH = torch.stack([e.fc1.weight.t() for e in experts])
        w2_LHD = torch.stack([e.fc2.weight.t() for e in experts])
        b1_LH = torch.stack([e.fc1.bias for e in experts])
        b2_LD = torch.stack([e.fc2.bias for e in experts])
        h_RH = torch._grouped_mm(x_RD, w1_LDH.to(x_RD.dtype), offs=offsets) + b1_LH[expert_of_row].to(x_RD.dtype)
        h_RH = experts[0].act(h_RH)
        return torch._grouped_mm(h_RH, w2_LHD.to(x_RD.dtype), offs=offsets) + b2_LD[expert_of_row].to(x_RD.dtype)


@dataclass
class MoEStats:
    """What routed layers report for one training step (summed over every call since the last pop)."""

    aux_loss: torch.Tensor  # weighted balance + z + mutual-information losses over layers; differentiable
    balance_loss: torch.Tensor  # detached, mean over layers and calls
    z_loss: torch.Tensor  # detached, mean over layers and calls
    mi_loss: torch.Tensor  # detached, sum over layers (0 when no layer has a mutual-information weight)
    expert_counts_LE: torch.Tensor  # assignments per expert per routed layer (before capacity dropping)
    task_expert_counts_TLE: torch.Tensor  # the same split by the task id of the pass (a group step runs several)
    dropped_fraction: torch.Tensor  # share of assignments dropped for capacity, over all layers
    layer_stats_LS: torch.Tensor  # per routed layer, the LAYER_STATS (detached, means over the layer's calls)


LAYER_STATS = ("dropped_share", "balance_loss", "z_loss", "mi_loss")  # the columns of MoEStats.layer_stats_LS


_recomputing = contextvars.ContextVar("condmoe_recomputing", default=False)


@contextlib.contextmanager
def recomputing():
    """Marks an activation-checkpointing recomputation (in the backward pass): routed layers run as before but do not
    record their losses and statistics a second time."""
    token = _recomputing.set(True)
    try:
        yield
    finally:
        _recomputing.reset(token)


# Buffers of a routed layer that belong to the run, not to the weights: a fresh run (init_from, extraction) starts them
# empty.
RUN_STATE_BUFFERS = ("mi_history_WXE", "mi_cursor")


class RoutedLayer(nn.Module):
    """Shared bookkeeping of layers with a router: per-call statistics accumulated until ``pop_moe_stats``."""

    num_experts: int
    comm: LocalComm
    takes_routing_context = True  # blocks pass the RoutingContext of the encoder pass to forward

    def _setup_stats(self, num_tasks: int, balance_loss_weight: float, z_loss_weight: float,
                     mi_loss_weight: float, importance_loss_weight: float = 0.0, mi_window: int = 0) -> None:
        self.num_tasks = num_tasks
        self.mi_window = mi_window if mi_loss_weight > 0 else 0
        if self.mi_window:
            # A ring of the last mi_window micro-steps' all-reduced P(T, E) sums (identical on every rank); buffers,
            # so checkpoints carry them and a resumed run continues bitwise.
            self.register_buffer("mi_history_WXE", torch.zeros(self.mi_window, num_tasks, self.num_experts))
            self.register_buffer("mi_cursor", torch.zeros((), dtype=torch.long))
        self.importance_loss_weight = importance_loss_weight
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        self.mi_loss_weight = mi_loss_weight
        self.reset_stats()

    def track_usage(self, enabled: bool = True) -> None:
        """Accumulate per-task expert usage (top-k selections, summed router probabilities, tokens) until reset."""
        self.usage = {"counts": torch.zeros(self.num_tasks, self.num_experts, dtype=torch.float64),
                      "prob_sum": torch.zeros(self.num_tasks, self.num_experts, dtype=torch.float64),
                      "tokens": torch.zeros(self.num_tasks, dtype=torch.float64)} if enabled else None

    def route_tokens(self, x_BND: torch.Tensor, ctx: RoutingContext | None):
        """The routing step every token-level MoE layer shares: router logits, padding taken out, capacity chosen,
        top-k routed and recorded.

        Returns ``(x_TD, real_T, logits_GE, group_T, r)``: the routed tokens (real ones only when ``ctx`` marks
        padding; ``real_T`` their flat positions, else None), the router's per-group logits and token groups
        (``group_T`` None for per-token levels) and the ``Routing``.
        """
        x_TD = x_BND.reshape(-1, x_BND.shape[-1])
        logits_GE, group_T = self.router(x_BND, ctx)
        logits_TE = logits_GE if group_T is None else logits_GE.index_select(0, group_T)
        real_T = None
        if ctx is not None and ctx.pad_mask_BN is not None:
            # Padding is not routed: it takes no capacity and no statistics (its output is zero; nothing attends to
            # it). Under expert parallelism the all-to-all is variable-size, so ranks may route different counts.
            real_T = ctx.real_tokens(x_BND.device)
            x_TD, logits_TE = x_TD.index_select(0, real_T), logits_TE.index_select(0, real_T)
            group_T = None if group_T is None else group_T.index_select(0, real_T)
        if self.router.is_static or not self.drop_tokens:
            # Static levels send a whole group to the same k experts: a capacity sized for balanced token routing
            # would drop most of a group, at any ep_size. They are dropless; so are dropless runs.
            capacity = None
        else:
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            capacity = routing.expert_capacity(x_TD.shape[0], self.num_experts, self.top_k, factor, self.min_capacity)
        r = routing.route(logits_TE, self.top_k, capacity, self.normalize_gates, self.batch_priority)
        self._record(logits_TE, r, ctx.task_id if ctx is not None else 0)
        return x_TD, real_T, logits_GE, group_T, r

    def reset_stats(self) -> None:
        self._aux_loss = None
        self._balance, self._z, self._dropped = [], [], []
        self._counts_XE = None  # assignments per (task id of the pass, expert)
        self._task_expert_XE = None  # summed router probabilities per (task, expert), for the MI loss

    def _record(self, logits_TE: torch.Tensor, r: routing.Routing, task_id: int) -> None:
        balance = routing.load_balance_loss(r.probs_TE, r.expert_idx_TK)
        z = routing.router_z_loss(logits_TE) if self.z_loss_weight > 0 else logits_TE.new_zeros(())
        aux = self.balance_loss_weight * balance + self.z_loss_weight * z
        if self.importance_loss_weight > 0:
            aux = aux + self.importance_loss_weight * routing.importance_loss(r.probs_TE)
        joint_XE = None
        if self.mi_loss_weight > 0:
            joint_XE = r.probs_TE.new_zeros(self.num_tasks, self.num_experts)
            joint_XE = joint_XE.index_add(0, torch.tensor([task_id], device=joint_XE.device),
                                          r.probs_TE.sum(0, keepdim=True))
        if _recomputing.get():
            # Recorded in the forward pass already. The losses above were still built: activation checkpointing
            # requires the recomputation to save the same tensors for backward as the forward pass did.
            return
        self._aux_loss = aux if self._aux_loss is None else self._aux_loss + aux
        self._balance.append(balance.detach())
        self._z.append(z.detach())
        counts_E = r.counts_E.detach()
        if self._counts_XE is None:
            self._counts_XE = counts_E.new_zeros(self.num_tasks, self.num_experts)
        self._counts_XE[task_id] += counts_E
        self._dropped.append(1.0 - r.kept_TK.float().mean().detach())
        if getattr(self, "usage", None) is not None:
            self.usage["counts"][task_id] += counts_E.double().cpu()
            self.usage["prob_sum"][task_id] += r.probs_TE.detach().sum(0).double().cpu()
            self.usage["tokens"][task_id] += r.probs_TE.shape[0]
        if joint_XE is not None:
            self._task_expert_XE = joint_XE if self._task_expert_XE is None else self._task_expert_XE + joint_XE

    def _pop(self):
        if self._aux_loss is None:
            return None
        aux, mi = self._aux_loss, self._aux_loss.new_zeros(())
        if self._task_expert_XE is not None:
            # Summed over every rank first: one rank often runs one task per step, so its own P(t, e) alone is
            # degenerate (the original Mod-Squad summed per GPU only).
            current_XE = self.comm.all_reduce_sum(self._task_expert_XE)
            joint_XE = current_XE
            if self.mi_window:  # gradient through the current step only
                joint_XE = current_XE + self.mi_history_WXE.sum(0).to(current_XE.dtype)
                if self.training:
                    with torch.no_grad():
                        self.mi_history_WXE[int(self.mi_cursor) % self.mi_window] = current_XE.detach()
                        self.mi_cursor += 1
            mi = routing.mutual_information_loss(joint_XE)
            aux = aux + self.mi_loss_weight * mi
        out = (aux, self._balance, self._z, mi.detach(), self._counts_XE, self._dropped)
        self.reset_stats()
        return out


class MoEMLP(RoutedLayer):
    """Top-k MoE MLP with conditional routing, capacity, gate noise, balance, z and mutual-information losses.

    Args:
        in_features: model width D.
        hidden_features: hidden width of each expert MLP.
        out_features: output width (defaults to D; must equal it).
        act_layer, norm_layer, bias, drop: forwarded to every expert (timm ``Mlp`` semantics).
        args: the layer's routing, capacity and loss settings (``MoEArgs``).
        num_tasks: tasks known to task-level routers, task gates and the MI loss.
        kept_experts: build only these global experts (a pruned, extracted layer; the router keeps all E outputs,
            and assignments to removed experts are dropped). None keeps all.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
        bias: bool = True,
        drop: float = 0.0,
        args: MoEArgs | None = None,
        num_tasks: int = 1,
        kept_experts: list[int] | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if out_features not in (None, in_features):
            raise ValueError(f"MoEMLP keeps the width: out_features={out_features} != in_features={in_features}")
        args = MoEArgs() if args is None else args
        if not args.num_experts:
            raise ValueError("MoEMLP needs moe.num_experts >= 1")
        self.dim = in_features
        self.num_experts = num_experts = args.num_experts
        self.top_k = args.top_k
        self.capacity_factor = args.capacity_factor
        self.eval_capacity_factor = args.eval_capacity_factor
        self.min_capacity = args.min_capacity
        self.drop_tokens = args.drop_tokens
        self.normalize_gates = True  # renormalised top-k gates (k > 1), as DeepSpeed's top2gating
        self.static_dispatch = args.static_dispatch
        dd = {"device": device, "dtype": dtype}
        self.router = Router(in_features, num_experts, args.routing, num_tasks, noise_std=args.gate_noise_std)
        kept = list(range(num_experts)) if kept_experts is None else sorted(kept_experts)
        self.experts = Experts([
            Mlp(in_features, hidden_features, act_layer=act_layer, norm_layer=norm_layer, bias=bias, drop=drop, **dd)
            for _ in kept
        ], backend=args.expert_backend)
        self.expert_slot = None if kept_experts is None else _slots(kept, num_experts)
        self.comm = LocalComm()
        self._setup_stats(num_tasks, args.balance_loss_weight, args.z_loss_weight, args.mi_loss_weight,
                          args.importance_loss_weight, args.mi_window)
        self.batch_priority = args.batch_priority

    @property
    def num_local_experts(self) -> int:
        return len(self.experts.deepspeed_experts)

    def init_weights(self) -> None:
        self.router.init_weights()

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        shape = x.shape
        x_BND = x.reshape(-1, *shape[-2:]) if x.dim() >= 3 else x.reshape(1, -1, shape[-1])
        x_TD, real_T, logits_GE, group_T, r = self.route_tokens(x_BND, ctx)
        # Static groups run without dispatch when every expert is local; under expert parallelism they dispatch
        # through the variable-size all-to-all (still dropless).
        if group_T is not None and self.router.is_static and self.static_dispatch and self.comm.ep_size == 1:
            y_TD = self._static(x_TD, logits_GE, group_T)
        elif self.expert_slot is not None:
            y_TD = self._dispatch(x_TD, routing.remap_experts(r, self.expert_slot.to(x_TD.device)))
        else:
            y_TD = self._dispatch(x_TD, r)
        return scatter_real(y_TD, real_T, x_BND.shape[0] * x_BND.shape[1]).to(x.dtype).reshape(shape)

    def _dispatch(self, x_TD: torch.Tensor, r: routing.Routing) -> torch.Tensor:
        plan = routing.plan_dispatch(r, self.num_experts if self.expert_slot is None else self.num_local_experts)
        x_RD = x_TD.index_select(0, plan.token_R)
        x_local, counts_L, handle = self.comm.dispatch(x_RD, plan.counts_E)
        y_RD = self.comm.combine(self.experts(x_local, counts_L), handle)
        return routing.combine_sorted(y_RD, plan, r)

    def _static(self, x_TD: torch.Tensor, logits_GE: torch.Tensor, group_T: torch.Tensor) -> torch.Tensor:
        """Each group's tokens through the group's k experts: ``sum_k g_k * FFN_k(x_group)``, no dispatch."""
        _, idx_GK, gate_GK = routing.topk_experts(logits_GE, self.top_k, self.normalize_gates)
        experts = self.experts.deepspeed_experts
        slot = list(range(self.num_experts)) if self.expert_slot is None else self.expert_slot.tolist()
        y_TD = torch.zeros_like(x_TD)
        used = set()
        for g in range(logits_GE.shape[0]):
            rows = torch.nonzero(group_T == g).squeeze(1)
            x_g = x_TD.index_select(0, rows)
            chosen = [(gate_GK[g, k], slot[int(idx_GK[g, k])]) for k in range(self.top_k)]
            chosen = [(gate, s) for gate, s in chosen if s >= 0]  # a pruned layer drops removed experts
            used.update(s for _, s in chosen)
            y_g = sum((gate.to(x_g.dtype) * experts[s](x_g) for gate, s in chosen), torch.zeros_like(x_g))
            y_TD = y_TD.index_copy(0, rows, y_g)
        # Experts no group chose still run on zero rows, adding an exact zero: every parameter then has a gradient,
        # so ranks whose groups chose different experts reduce the same ZeRO buckets.
        for e in sorted(set(range(len(experts))) - used):
            y_TD = y_TD + experts[e](x_TD[:0]).sum()
        return y_TD


def scatter_real(y_TD: torch.Tensor, real_T: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
    """Outputs of the routed (real) tokens back at their positions among all ``num_tokens``, zero on padding."""
    if real_T is None:
        return y_TD
    return y_TD.new_zeros(num_tokens, y_TD.shape[-1]).index_copy(0, real_T, y_TD)


def _slots(kept: list[int], num_experts: int) -> torch.Tensor:
    slot_E = torch.full((num_experts,), -1, dtype=torch.long)
    slot_E[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
    return slot_E


def routed_layers(model: nn.Module) -> list[RoutedLayer]:
    return [m for m in model.modules() if isinstance(m, RoutedLayer)]


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def pop_moe_stats(model: nn.Module) -> MoEStats | None:
    """Collects and clears what every routed layer recorded since the last call; None if nothing ran.

    Layers with a mutual-information weight all-reduce their (task, expert) statistics here: call it on every rank
    at the same point of each micro-step.
    """
    popped = [p for p in (m._pop() for m in routed_layers(model)) if p is not None]
    if not popped:
        return None
    width = max(p[4].shape[-1] for p in popped)
    tasks = max(p[4].shape[0] for p in popped)
    counts_LXE = torch.stack([nn.functional.pad(p[4], (0, width - p[4].shape[-1], 0, tasks - p[4].shape[0]))
                              for p in popped])
    return MoEStats(
        aux_loss=torch.stack([p[0] for p in popped]).sum(),
        balance_loss=torch.stack([b for p in popped for b in p[1]]).mean(),
        z_loss=torch.stack([z for p in popped for z in p[2]]).mean(),
        mi_loss=torch.stack([p[3] for p in popped]).sum(),
        expert_counts_LE=counts_LXE.sum(1),
        task_expert_counts_TLE=counts_LXE.transpose(0, 1),
        dropped_fraction=torch.stack([d for p in popped for d in p[5]]).mean(),
        layer_stats_LS=torch.stack([torch.stack([torch.stack(p[5]).mean(), torch.stack(p[1]).mean(),
                                                 torch.stack(p[2]).mean(), p[3].float()]) for p in popped]),
    )
