"""condmoe-train with an injected fault. Run under torchrun:

    dist_check_faults.py torn-save N --config CONFIG [overrides]   rank 1 writes half of its ZeRO shard of step_N,
                                                                   then is killed with SIGKILL (no handler runs)
    dist_check_faults.py raise N --config CONFIG [overrides]       every rank raises a RuntimeError in step N
"""

import condmoe.models._compat  # noqa: F401  (first: before timm)

import os
import signal
import sys

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from condmoe.train import trainer
from condmoe.train.cli import train_main

fault, at_step = sys.argv[1], int(sys.argv[2])

if fault == "torn-save":
    save = TorchCheckpointEngine.save

    def torn_save(self, state_dict, path: str):
        if os.environ["RANK"] == "1" and f"step_{at_step}" in path and "zero_pp_rank_1" in path:
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a zip file")
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, state_dict, path)

    TorchCheckpointEngine.save = torn_save
elif fault == "raise":
    train_step = trainer.Trainer.train_step

    def failing_step(self, step: int):
        if step == at_step:
            raise RuntimeError(f"injected fault at step {step}")
        return train_step(self, step)

    trainer.Trainer.train_step = failing_step
else:
    sys.exit(f"unknown fault {fault!r}")
sys.exit(train_main(sys.argv[3:]))
