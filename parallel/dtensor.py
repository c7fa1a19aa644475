"""Plain tensors from DTensors: the two ways tridist unwraps them, in one place."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a replicated one's full value); plain tensors pass through."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from its shards (a collective over its mesh when a DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
