"""Round trip through another layout: load a checkpoint (written by any world size / ep_size) into this run's layout,
save it again untouched, and compare the two checkpoints' layout-free copies bit for bit (weights, Adam moments,
optimizer step count, schedule). Run under torchrun: dist_check_reshard.py CONFIG SOURCE_CKPT OUT_DIR [overrides]"""

import condmoe.models._compat  # noqa: F401  (first: before timm)

import sys

import torch

from condmoe.train import checkpoint, reshard, resume
from condmoe.train.config import load_config
from condmoe.train.dist import distributed
from condmoe.train.trainer import Trainer


def main() -> None:
    cfg_path, source, out = sys.argv[1:4]
    cfg = load_config(cfg_path, [f"run.output_dir={out}", *sys.argv[4:]])
    with distributed() as info, Trainer(cfg, info) as trainer:
        step, _ = resume.resume(trainer.engine, out, source, trainer.layout)
        saved = checkpoint.save(trainer.engine, out, step, keep_last=1, layout=trainer.layout)
        if info.rank == 0:
            compare(source, saved, step, info.world_size, cfg.moe.ep_size)


def compare(source: str, saved, step: int, world_size: int, ep_size: int) -> None:
    before, after = reshard.consolidate(source), reshard.consolidate(saved)
    assert after["source"]["world_size"] == world_size and after["step"] == before["step"] == step
    assert before["source"]["world_size"] != world_size or before["source"]["ep_size"] != ep_size
    assert sorted(before["params"]) == sorted(after["params"])
    for name, entry in before["params"].items():
        assert sorted(entry) == ["exp_avg", "exp_avg_sq", "fp32"], name
        for key, value in entry.items():
            assert torch.equal(value, after["params"][name][key]), (name, key)
    assert torch.equal(before["optimizer_step"], after["optimizer_step"])
    assert before["lr_scheduler"]["last_epoch"] == after["lr_scheduler"]["last_epoch"] == step
    assert set(after["lr_scheduler"]["_last_lr"]) == set(before["lr_scheduler"]["_last_lr"])
    print(f"RESHARD-OK {len(before['params'])} tensors", flush=True)


if __name__ == "__main__":
    main()
