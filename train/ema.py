"""An exponential moving average of the weights (``run.ema_decay``; timm's ``ModelEmaV3`` update, Uni-Perceiver's
trainer offers timm's ``ModelEma``), kept the way DeepSpeed runs hold weights.

Each rank averages the trainable parameters it holds, the replicated ones and its own experts, in float32 after
every optimizer step: ``ema = decay * ema + (1 - decay) * weight`` (one ``torch._foreach_lerp_`` over the list), of
the weights as the module holds them (bfloat16 in bf16 runs, ZeRO-1/2; ZeRO-3's partitioned weights are refused).
A checkpoint carries the average as files beside DeepSpeed's (hashed with them): ``ema_rank<r>.pt`` holds the
entries rank r owns, under their plain names (``models.ds_moe.global_parameter_names``: experts by global id), each
parameter written once: the replicated ones by rank 0, an ep group's experts by its rank of expert-data-parallel
index 0. So a resume with another world size or ep_size, and ``condmoe-eval --ema`` on one process, read it whole.
"""

import logging
import re
from pathlib import Path

import torch
from torch import nn

from condmoe.models.ds_moe import global_parameter_names

log = logging.getLogger("condmoe.ema")
EMA_FILE = re.compile(r"^ema_rank(\d+)\.pt$")


class WeightEMA:
    """The average of this rank's trainable parameters; ``names`` are their plain names."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"run.ema_decay={decay} must be in (0, 1)")
        names = global_parameter_names(model)
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = [names[p] for p in self.params]
        self.experts = {names[p] for p in self.params if getattr(p, "allreduce", True) is False}  # DeepSpeed's tag
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One optimizer step: ``shadow`` moves ``1 - decay`` of the way to the weights."""
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - self.decay)
        self.updates += 1

    def owned(self, rank: int, expert_dp_rank: int) -> dict[str, torch.Tensor]:
        """The entries this rank writes: the replicated ones on rank 0, its experts where it is the first copy."""
        return {name: shadow for name, shadow in zip(self.names, self.shadow)
                if (rank == 0 if name not in self.experts else expert_dp_rank == 0)}

    def save(self, path: Path, rank: int, expert_dp_rank: int) -> None:
        entries = self.owned(rank, expert_dp_rank)
        if entries:
            torch.save({"decay": self.decay, "updates": self.updates, "weights": entries}, path / f"ema_rank{rank}.pt")

    def load(self, path: Path) -> bool:
        """Takes this rank's entries from a checkpoint's EMA files; False (weights kept as the start) if it has none."""
        state = read_ema(path)
        if state is None:
            return False
        missing = [n for n in self.names if n not in state["weights"]]
        if missing:
            raise ValueError(f"{path}: its EMA lacks {len(missing)} of this model's parameters ({missing[0]}, ...)")
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(state["weights"][name])
        self.updates = state["updates"]
        return True


def read_ema(path: str | Path) -> dict | None:
    """A checkpoint's EMA files merged: ``{"decay", "updates", "weights": {plain name: tensor}}``; None without."""
    files = sorted(p for p in Path(path).iterdir() if EMA_FILE.match(p.name))
    if not files:
        return None
    merged = {"weights": {}}
    for file in files:
        part = torch.load(file, map_location="cpu", weights_only=True)
        merged["weights"].update(part["weights"])
        merged.setdefault("decay", part["decay"])
        merged.setdefault("updates", part["updates"])
    return merged
