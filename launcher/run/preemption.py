"""Stop cleanly when told to: SIGUSR1 (Slurm's warning before preemption) or SIGTERM.

A handler only sets a flag. After each step the ranks agree on it (any rank signalled means all
stop), save a checkpoint, and leave the loop; the launcher then requeues the job under Slurm.
"""

from __future__ import annotations

import signal
import types

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignal:
    """Catches the stop signals on this rank and tells, collectively, whether any rank got one."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: int | None = None
        # a private gloo group: the agreement is a CPU int, never a device sync
        self._group = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled; a collective, call it once per step."""
        flag = torch.tensor([self.received is not None], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())  # a CPU tensor: no device sync

    def restore(self) -> None:
        """Put the previous handlers back."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
