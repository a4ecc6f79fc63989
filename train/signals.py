"""Graceful stop on SIGTERM / SIGUSR1 (preemption, time limits): every rank finishes its step, then all checkpoint.

A handler only sets a flag; after each step the ranks agree (a one-element MAX all-reduce) so that they stop at the
same step even if the signal reached only some of them. The trainer then saves a checkpoint and the process exits
with ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL), which a SLURM script can use to requeue the job.
"""

import logging
import signal

import torch
from deepspeed import comm as dist

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, device: torch.device | str = "cpu"):
        self.received: int | None = None
        self.device = device
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank if any rank received a stop signal (a collective: call it on all ranks)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
        if stop and self.received is not None:
            log.warning("received %s: finishing this step, saving a checkpoint, exiting",
                        signal.Signals(self.received).name)
        return stop
