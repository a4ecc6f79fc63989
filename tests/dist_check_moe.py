"""Run under torchrun by tests/test_moe_distributed.py; exits non-zero with a message on the first mismatch.

Modes:
  reference  (1 rank)  condmoe's token top-1/top-2 MoE == DeepSpeed's stock ``deepspeed.moe.layer.MoE``: outputs and
                       gradients, same weights, unlimited capacity.
  ep         (2 ranks) ep_size=2 == one process holding all experts, on per-rank batches of different sizes:
                       outputs, input/router gradients, expert gradients (summed over the ranks that fed them).
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
    for k in (1, 2):
        torch.manual_seed(k)
        ds = MoE(hidden_size=DIM, expert=Mlp(DIM, HIDDEN), num_experts=EXPERTS, ep_size=1, k=k, drop_tokens=False,
                 use_rts=False, top2_2nd_expert_sampling=False)
        ds.set_deepspeed_parallelism()
        ours = MoEMLP(DIM, HIDDEN, args=MoEArgs(num_experts=EXPERTS, top_k=k, drop_tokens=False))
        with torch.no_grad():
            ours.router.weight.copy_(ds.deepspeed_moe.gate.wg.weight)
            for mine, theirs in zip(ours.experts.deepspeed_experts, ds.deepspeed_moe.experts.deepspeed_experts):
                mine.load_state_dict(theirs.state_dict())
        x = torch.randn(3, 10, DIM)
        x_ds, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ds = ds(x_ds)[0]
        out_ours = ours(x_ours)
        close(out_ours, out_ds, f"top-{k} output")
        grad = torch.randn_like(out_ds)
        out_ds.backward(grad)
        out_ours.backward(grad)
        close(x_ours.grad, x_ds.grad, f"top-{k} input gradient")
        close(ours.router.weight.grad, ds.deepspeed_moe.gate.wg.weight.grad, f"top-{k} router gradient")
        for e, (mine, theirs) in enumerate(zip(ours.experts.deepspeed_experts,
                                               ds.deepspeed_moe.experts.deepspeed_experts)):
            close(mine.fc1.weight.grad, theirs.fc1.weight.grad, f"top-{k} expert {e} fc1 gradient")
            close(mine.fc2.bias.grad, theirs.fc2.bias.grad, f"top-{k} expert {e} fc2 bias gradient")


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


def main() -> None:
    mode = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    {"reference": lambda: reference_mode(), "ep": lambda: ep_mode(rank), "mi": lambda: mi_mode(rank)}[mode]()
    torch.distributed.barrier()
    check(not shutdown_distributed(), "communication threads outlived the process groups")
    if rank == 0:
        print(f"MOE-{mode.upper()}-OK", flush=True)


if __name__ == "__main__":
    main()
