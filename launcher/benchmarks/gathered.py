"""Bytes all-gathered per rank, measured at the collective: FSDP2's parameter all-gathers."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# the c10d ops FSDP2 (and DTensor) all-gather with; CommDebugMode counts the same ones
_ALL_GATHERS = {
    torch.ops.c10d._allgather_base_.default,
    torch.ops.c10d.allgather_.default,
    torch.ops.c10d.allgather_into_tensor_coalesced_.default,
}


class AllGatherBytes(TorchDispatchMode):
    """Counts the bytes of every all-gather's output while active (the full tensors gathered):
    a ring all-gather sends (n-1)/n of them per rank."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.calls = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        """Record all-gathers by their output tensors, then run every op unchanged."""
        if func in _ALL_GATHERS:
            self.calls += 1
            out = args[0]
            tensors = out if isinstance(out, list | tuple) else [out]
            flat = [t for x in tensors for t in (x if isinstance(x, list | tuple) else [x])]
            self.bytes += sum(t.numel() * t.element_size() for t in flat)
        return func(*args, **(kwargs or {}))
