"""The preemption flag: SIGTERM/SIGUSR1 (SLURM's warning, ``scancel``, a time limit) ask the loop to save and stop."""

from __future__ import annotations

import signal
from typing import Any, Optional

import torch
import torch.distributed as dist

from vespo_megatron.runtime.distributed import collective_device


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; the training loop polls it and saves before exiting.

    The handler only records the signal. ``should_stop`` all-reduces the flag (MAX), so every rank
    sees the same answer at the same step even if the signal reached only some of them.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = True
        self.signum = signum

    def should_stop(self, group=None) -> bool:
        """True on every rank of ``group`` (default: the world) when any of them got the signal."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=collective_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def uninstall(self) -> None:
        """Put back the handlers that were there before."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def install_preemption_handler(signals=(signal.SIGTERM, signal.SIGUSR1)) -> PreemptionFlag:
    """Install a handler for ``signals`` (main thread only) that sets the returned flag."""
    flag = PreemptionFlag()
    for signum in signals:
        flag._previous[signum] = signal.signal(signum, flag._handle)
    return flag
