"""Run under torchrun (2 ranks) by tests/test_distributed.py: a NaN loss on one rank makes both ranks skip the
micro-step together (their collectives stay paired) and training goes on."""

import models._compat  # noqa: F401  (first: before anything imports timm or torchvision)

import sys

import torch
from deepspeed import comm as dist

from train.cli import _setup_logging
from train.config import load_config
from train.dist import init_distributed
from train.trainer import Trainer


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    info = init_distributed()
    _setup_logging(info.rank)
    trainer = Trainer(cfg, info)
    engine_forward = trainer.engine.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = engine_forward(*args, **kwargs)
        calls["n"] += 1
        if info.rank == 1 and calls["n"] == 2:  # rank 1's second micro-step
            out.loss = out.loss * float("nan")
        return out

    trainer.engine.forward = poisoned
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for step in range(3):
        trainer.train_step(step)
    changed = any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    finite = all(torch.isfinite(p).all() for p in trainer.model.parameters())
    ok = trainer.skipped_steps == 1 and changed and finite
    flag = torch.tensor([0.0 if ok else 1.0])
    dist.all_reduce(flag)
    if flag.item() or not ok:
        print(f"rank {info.rank}: FAILED: skipped={trainer.skipped_steps} changed={changed} finite={finite}",
              file=sys.stderr, flush=True)
        sys.exit(1)
    if info.rank == 0:
        print("GUARD-OK", flush=True)


if __name__ == "__main__":
    main()
