"""condmoe-train with a crash in the middle of a save: rank 1 writes half of its ZeRO shard of step_<N>, then is
killed with SIGKILL (no handler runs). Run under torchrun: dist_check_torn_save.py N --config CONFIG [overrides]"""

import models._compat  # noqa: F401  (first: before timm)

import os
import signal
import sys

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from train.cli import train_main

torn_step = int(sys.argv[1])
save = TorchCheckpointEngine.save


def torn_save(self, state_dict, path: str):
    if os.environ["RANK"] == "1" and f"step_{torn_step}" in path and "zero_pp_rank_1" in path:
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip file")
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, state_dict, path)


TorchCheckpointEngine.save = torn_save
sys.exit(train_main(sys.argv[2:]))
