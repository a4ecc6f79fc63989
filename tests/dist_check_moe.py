"""Run under torchrun by tests/test_moe_distributed.py; exits non-zero with a message on the first mismatch.

Modes:
  reference  (1 rank)  condmoe's token top-1/top-2 MoE == DeepSpeed's stock ``deepspeed.moe.layer.MoE``: outputs,
                       gradients and balance loss, same weights, dropless and WITH token dropping (capacity factor
                       1.0 on router logits skewed so that most tokens want one expert).
  ep         (2 ranks) ep_size=2 == one process holding all experts, on per-rank batches of different sizes:
                       outputs, input/router gradients, expert gradients (summed over the ranks that fed them).
  static     (2 ranks) attribute routing at ep_size=2 == the static path of one process holding all experts, with a
                       capacity factor that would drop most tokens of token routing: nothing is dropped.
  mi         (2 ranks) the mutual-information loss summed over ranks == the loss of the concatenated batch.
"""

import condmoe.models._compat  # noqa: F401  (first: before anything imports timm or torchvision)

import copy
import os
import sys

import deepspeed
import torch
from deepspeed.moe.layer import MoE
from timm.layers import Mlp
from torch import nn

from condmoe.models import MoEArgs, MoEMLP, pop_moe_stats
from condmoe.models.ds_moe import apply_expert_parallel
from condmoe.models.router import RoutingContext
from condmoe.train.dist import shutdown_distributed

DIM, HIDDEN, EXPERTS = 16, 32, 4


def check(ok: bool, message: str) -> None:
    if not ok:
        print(f"rank {os.environ.get('RANK', '?')}: FAILED: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


def close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    check(torch.allclose(a, b, atol=atol, rtol=1e-4), f"{what}: max abs diff {(a - b).abs().max().item():.3e}")


def reference_mode() -> None:
    from deepspeed.moe import sharded_moe

    # DeepSpeed's top-1 keeps, per expert, the tokens of highest random priority (RTS); given priorities in token
    # order it keeps the first tokens, as condmoe does (without RTS its choice among ties is torch.topk's).
    sharded_moe.exp_selection_uniform_map[torch.device("cpu")] = lambda shape: torch.linspace(1, 0.5, shape[0])[
        :, None].expand(shape)
    for k, drop in ((1, False), (2, False), (1, True), (2, True)):
        what = f"top-{k} {'with dropping' if drop else 'dropless'}"
        torch.manual_seed(k)
        ds = MoE(hidden_size=DIM, expert=Mlp(DIM, HIDDEN), num_experts=EXPERTS, ep_size=1, k=k, drop_tokens=drop,
                 capacity_factor=1.0, min_capacity=1, use_rts=True, top2_2nd_expert_sampling=False)
        ds.set_deepspeed_parallelism()
        ours = MoEMLP(DIM, HIDDEN, args=MoEArgs(num_experts=EXPERTS, top_k=k, drop_tokens=drop, capacity_factor=1.0,
                                                min_capacity=1))
        with torch.no_grad():
            ours.router.weight.copy_(ds.deepspeed_moe.gate.wg.weight)
            ours.router.weight[0] += 0.5  # skew: expert 0 is most tokens' favourite, so its queue overflows
            ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
            for mine, theirs in zip(ours.experts.deepspeed_experts, ds.deepspeed_moe.experts.deepspeed_experts):
                mine.load_state_dict(theirs.state_dict())
        x = torch.randn(3, 10, DIM) + 1.0
        x_ds, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ds, l_aux, _ = ds(x_ds)
        out_ours = ours(x_ours)
        stats = pop_moe_stats(ours)
        check((stats.dropped_fraction.item() > 0.1) == drop, f"{what}: dropped share {stats.dropped_fraction.item()}")
        close(out_ours, out_ds, f"{what} output")
        close(stats.balance_loss, l_aux, f"{what} balance loss")
        grad = torch.randn_like(out_ds)
        out_ds.backward(grad)
        out_ours.backward(grad)
        close(x_ours.grad, x_ds.grad, f"{what} input gradient")
        close(ours.router.weight.grad, ds.deepspeed_moe.gate.wg.weight.grad, f"{what} router gradient")
        for e, (mine, theirs) in enumerate(zip(ours.experts.deepspeed_experts,
                                               ds.deepspeed_moe.experts.deepspeed_experts)):
            close(mine.fc1.weight.grad, theirs.fc1.weight.grad, f"{what} expert {e} fc1 gradient")
            close(mine.fc2.bias.grad, theirs.fc2.bias.grad, f"{what} expert {e} fc2 bias gradient")


def ep_mode(rank: int) -> None:
    for drop_tokens in (False, True):
        torch.manual_seed(0)
        reference = MoEMLP(DIM, HIDDEN, args=MoEArgs(num_experts=EXPERTS, top_k=2, drop_tokens=drop_tokens,
                                                     capacity_factor=1.0, min_capacity=1))
        holder = nn.Sequential(copy.deepcopy(reference))
        apply_expert_parallel(holder, ep_size=2)
        layer = holder[0]
        check(layer.deepspeed_moe.num_local_experts == EXPERTS // 2, "EP layer holds the wrong number of experts")
        torch.manual_seed(100 + rank)
        x = torch.randn(2 + rank, 5 + 2 * rank, DIM)  # different token counts on the two ranks
        x_ep, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ep, out_ref = layer(x_ep), reference(x_ref)
        close(out_ep, out_ref, f"output (drop_tokens={drop_tokens})")
        grad = torch.randn_like(out_ep)
        out_ep.backward(grad)
        out_ref.backward(grad)
        close(x_ep.grad, x_ref.grad, "input gradient")
        close(layer.deepspeed_moe.router.weight.grad, reference.router.weight.grad, "router gradient")
        local = layer.deepspeed_moe.experts.deepspeed_experts
        for e, ref_expert in enumerate(reference.experts.deepspeed_experts):
            ref_grad = ref_expert.fc1.weight.grad.clone()
            torch.distributed.all_reduce(ref_grad)  # the EP expert saw the tokens of both ranks
            if e // len(local) == rank:
                close(local[e % len(local)].fc1.weight.grad, ref_grad, f"expert {e} gradient (drop={drop_tokens})")


def static_mode(rank: int) -> None:
    from condmoe.models.router import ATTRIBUTES

    torch.manual_seed(0)
    reference = MoEMLP(DIM, HIDDEN, args=MoEArgs(num_experts=EXPERTS, top_k=2, routing="attribute",
                                                 capacity_factor=0.25, min_capacity=1))
    holder = nn.Sequential(copy.deepcopy(reference))
    apply_expert_parallel(holder, ep_size=2)
    layer = holder[0]
    torch.manual_seed(100 + rank)
    batch, length = 2 + rank, 6
    attrs = torch.tensor(ATTRIBUTES["visual_input"], dtype=torch.float32).expand(batch, length, -1).clone()
    attrs[:, length // 2:] = torch.tensor(ATTRIBUTES["text_target"], dtype=torch.float32)
    pad = torch.ones(batch, length, dtype=torch.bool)
    pad[-1, -2:] = False
    ctx = RoutingContext(attribute_BNA=attrs, pad_mask_BN=pad)
    x = torch.randn(batch, length, DIM)
    x_ep, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ep, out_ref = layer(x_ep, ctx), reference(x_ref, ctx)
    for stats in (pop_moe_stats(holder), pop_moe_stats(reference)):
        check(stats.dropped_fraction.item() == 0.0, f"static routing dropped {stats.dropped_fraction.item():.1%}")
    close(out_ep, out_ref, "static routing output at ep_size 2")
    grad = torch.randn_like(out_ep)
    out_ep.backward(grad)
    out_ref.backward(grad)
    close(x_ep.grad, x_ref.grad, "static routing input gradient")
    close(layer.deepspeed_moe.router.embed[0].weight.grad, reference.router.embed[0].weight.grad,
          "static routing attribute-embedding gradient")


def mi_mode(rank: int) -> None:
    torch.manual_seed(0)
    reference = MoEMLP(DIM, HIDDEN, args=MoEArgs(num_experts=EXPERTS, top_k=2, routing="task_gate", mi_loss_weight=1.0,
                                                 balance_loss_weight=0.0, drop_tokens=False), num_tasks=2)
    with torch.no_grad():  # zero-initialised task gates would give the trivial MI = 0
        reference.router.weight.normal_()
    holder = nn.Sequential(copy.deepcopy(reference))
    apply_expert_parallel(holder, ep_size=1)
    inputs = [torch.randn(2, 6, DIM, generator=torch.Generator().manual_seed(10 + r)) for r in range(2)]
    holder[0](inputs[rank], RoutingContext(task_id=rank))  # rank r runs task r only
    distributed = pop_moe_stats(holder).mi_loss
    for task, x in enumerate(inputs):  # one process sees both tasks' tokens
        reference(x, RoutingContext(task_id=task))
    concatenated = pop_moe_stats(reference).mi_loss
    check(abs(distributed.item()) > 1e-4, "MI is trivially zero; the check would prove nothing")
    close(distributed, concatenated, "MI loss across ranks vs concatenated batch", atol=1e-6)

    # One task per step on every rank (both ranks drew task 0): P(T) of the step alone is one task and MI is 0 with
    # no gradient; a window of past steps (here the step above) makes the term act.
    for window in (0, 4):
        torch.manual_seed(0)
        layer = copy.deepcopy(reference)
        layer.train()
        layer.mi_window = window
        if window:
            layer.register_buffer("mi_history_WXE", torch.zeros(window, 2, EXPERTS))
            layer.register_buffer("mi_cursor", torch.zeros((), dtype=torch.long))
        holder = nn.Sequential(layer)
        apply_expert_parallel(holder, ep_size=1)
        holder[0](inputs[rank], RoutingContext(task_id=rank))
        pop_moe_stats(holder)
        holder[0](inputs[rank], RoutingContext(task_id=0))
        mi = pop_moe_stats(holder).aux_loss  # only the MI term has a weight here
        (grad,) = torch.autograd.grad(mi, layer.router.weight)
        if window:
            check(grad.norm().item() > 1e-4, f"MI gradient on a single-task step is {grad.norm().item()} with "
                  f"mi_window={window}")
        else:
            check(abs(mi.item()) < 1e-6 and grad.norm().item() < 1e-6,
                  f"without a window a single-task step's MI should be 0, got {mi.item()}")


def main() -> None:
    mode = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    {"reference": lambda: reference_mode(), "ep": lambda: ep_mode(rank), "static": lambda: static_mode(rank),
     "mi": lambda: mi_mode(rank)}[mode]()
    torch.distributed.barrier()
    check(not shutdown_distributed(), "communication threads outlived the process groups")
    if rank == 0:
        print(f"MOE-{mode.upper()}-OK", flush=True)


if __name__ == "__main__":
    main()
