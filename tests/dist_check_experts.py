"""Run under torchrun (2 ranks) by tests/test_distributed.py: expert parallelism invariants, checked in-process.

Exits non-zero with a message on the first violated invariant.
"""

import condmoe.models._compat  # noqa: F401  (first: before anything imports timm or torchvision)

import sys

import torch
from deepspeed import comm as dist

from condmoe.models import MoEMLP
from condmoe.train.checkpoint import load_plain_state_dict, save
from condmoe.train.cli import _setup_logging
from condmoe.train.config import load_config
from condmoe.train.dist import distributed
from condmoe.train.engine import build_model
from condmoe.train.trainer import Trainer


def check(condition: bool, message: str) -> None:
    if not condition:
        print(f"rank {dist.get_rank()}: FAILED: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    with distributed() as info, Trainer(cfg, info) as trainer:
        _setup_logging(info.rank)
        check_experts(cfg, info, trainer)


def check_experts(cfg, info, trainer: Trainer) -> None:
    ep_size, num_experts = cfg.moe.ep_size, cfg.moe.num_experts
    num_local = num_experts // ep_size
    plain = build_model(cfg, trainer.tokenizer.vocab_size, trainer.tokenizer.spe_id)  # same seed: same init

    layers = [m for m in trainer.model.modules() if isinstance(m, MoEMLP)]
    check(len(layers) > 0, "no MoE layers")
    plain_layers = [m for m in plain.modules() if isinstance(m, MoEMLP)]
    for layer, plain_layer in zip(layers, plain_layers):
        check(layer.num_local_experts == num_local, f"{layer.num_local_experts} local experts, want {num_local}")
        for i, expert in enumerate(layer.experts.deepspeed_experts):
            global_id = info.rank % ep_size * num_local + i
            same = torch.equal(expert.fc1.weight, plain_layer.experts.deepspeed_experts[global_id].fc1.weight)
            check(same, f"local expert {i} is not global expert {global_id} at init")

    for step in range(3):
        trainer.train_step(step)

    # Experts differ across EP ranks; replicated (non-expert) parameters stay identical on every rank.
    expert_w = layers[0].experts.deepspeed_experts[0].fc1.weight.detach().clone()
    gathered = [torch.zeros_like(expert_w) for _ in range(info.world_size)]
    dist.all_gather(gathered, expert_w)
    check(not torch.equal(gathered[0], gathered[1]), "both ranks hold the same expert weights")
    router = layers[0].router.weight.detach().clone()
    routers = [torch.zeros_like(router) for _ in range(info.world_size)]
    dist.all_gather(routers, router)
    check(torch.equal(routers[0], routers[1]), "replicated router weights diverged across ranks")
    check(not torch.equal(router, plain_layers[0].router.weight), "router did not train")

    # The per-global-expert checkpoint files reassemble into the plain model (any ep_size can load them).
    path = save(trainer.engine, cfg.run.output_dir, 3, keep_last=1, layout=trainer.layout)
    state = load_plain_state_dict(path)
    plain.load_state_dict(state, strict=True)
    plain_experts = [m for m in plain.modules() if isinstance(m, MoEMLP)][0].experts.deepspeed_experts
    for i, expert in enumerate(layers[0].experts.deepspeed_experts):
        global_id = info.rank % ep_size * num_local + i
        check(torch.equal(expert.fc1.weight, plain_experts[global_id].fc1.weight),
              f"checkpointed global expert {global_id} differs from rank {info.rank}'s local expert {i}")
    dist.barrier()
    if info.rank == 0:
        print("EXPERT-CHECKS-OK", flush=True)


if __name__ == "__main__":
    main()
