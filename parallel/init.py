"""Layout-independent weight initialization: every rank draws the full tensor and keeps its part."""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from models.llama import ModelArgs, initial_value


def parameter_seed(seed: int, fqn: str) -> int:
    """A generator seed that depends only on the run seed and the parameter's name."""
    return (seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63)


@torch.no_grad()
def init_parameters(module: nn.Module, args: ModelArgs, seed: int) -> None:
    """Fill every (possibly TP-sharded) parameter of `module` with its full-model initial value."""
    for fqn, param in module.named_parameters():
        full = initial_value(fqn, param.shape, args, torch.Generator().manual_seed(parameter_seed(seed, fqn)))
        if isinstance(param, DTensor):
            # src_data_rank=None: each rank slices its own copy, no communication
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(full)
