"""Data-parallel collectives the model uses for split target sets and gathered negatives (see
``models.generalist.LocalCollectives``): a differentiable all-gather over all ranks."""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional


class DataParallelCollectives:
    def __init__(self):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        # The backward sums every rank's gradient for this rank's slice, which the engine's gradient averaging of
        # the per-rank losses turns into the gradient of their mean.
        return torch.cat(torch.distributed.nn.functional.all_gather(x.contiguous()), dim=0)
