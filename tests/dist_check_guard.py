"""Run under torchrun (2 ranks) by tests/test_distributed.py: a NaN loss on one rank makes both ranks skip the
micro-step together (their collectives stay paired) and training goes on, one optimizer step per trainer step also
with gradient accumulation. Usage: dist_check_guard.py CONFIG POISONED_CALL [overrides]"""

import condmoe.models._compat  # noqa: F401  (first: before anything imports timm or torchvision)

import sys

import torch
from deepspeed import comm as dist

from condmoe.train.cli import _setup_logging
from condmoe.train.config import load_config
from condmoe.train.dist import distributed
from condmoe.train.trainer import Trainer


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[3:])
    poisoned_call = int(sys.argv[2])
    with distributed() as info, Trainer(cfg, info) as trainer:
        _setup_logging(info.rank)
        check(trainer, info, poisoned_call)


def check(trainer: Trainer, info, poisoned_call: int) -> None:
    cfg = trainer.cfg
    engine_forward = trainer.engine.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = engine_forward(*args, **kwargs)
        calls["n"] += 1
        if info.rank == 1 and calls["n"] == poisoned_call:
            out.loss = out.loss * float("nan")
        return out

    trainer.engine.forward = poisoned
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for step in range(3):
        trainer.train_step(step)
    changed = any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    finite = all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # Without accumulation the poisoned step is skipped whole (no optimizer step, the schedule waits, as DeepSpeed does
    # on an fp16 overflow); with it, the other micro-steps' gradients make the step. DeepSpeed's step count and the
    # schedule must never drift off the trainer's steps by a micro-step.
    optimizer_steps = 2 if cfg.run.gradient_accumulation_steps == 1 else 3
    in_step = trainer.engine.global_steps == trainer.engine.lr_scheduler.last_epoch == optimizer_steps
    ok = trainer.skipped_steps == 1 and changed and finite and in_step
    flag = torch.tensor([0.0 if ok else 1.0])
    dist.all_reduce(flag)
    if flag.item() or not ok:
        print(f"rank {info.rank}: FAILED: skipped={trainer.skipped_steps} changed={changed} finite={finite} "
              f"global_steps={trainer.engine.global_steps} schedule={trainer.engine.lr_scheduler.last_epoch}",
              file=sys.stderr, flush=True)
        sys.exit(1)
    if info.rank == 0:
        print("GUARD-OK", flush=True)


if __name__ == "__main__":
    main()
