"""Layout-independent weight initialization: every rank draws the full tensor and keeps its part."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from models.args import ModelArgs
from models.decoder import tied_name
from models.registry import model_spec

# full value of a parameter by full-model name and shape, e.g. read from a Hugging Face checkpoint
InitialValues = Callable[[str, torch.Size], torch.Tensor]


def parameter_seed(seed: int, fqn: str) -> int:
    """A generator seed that depends only on the run seed and the parameter's name."""
    return (seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63)


@torch.no_grad()
def init_parameters(
    module: nn.Module, args: ModelArgs, seed: int, values: InitialValues | None = None
) -> None:
    """Fill every (possibly TP-sharded) parameter of `module` with its full-model initial value:
    drawn from the seed, or taken from `values` (e.g. pretrained weights). A tied head on a
    stage without the embedding takes the embedding's value: both copies start equal."""
    initial_value = model_spec(args.family).initial_value
    for name, param in module.named_parameters():
        fqn = tied_name(name, args)
        if values is not None:
            full = values(fqn, param.shape)
        else:
            generator = torch.Generator().manual_seed(parameter_seed(seed, fqn))
            full = initial_value(fqn, param.shape, args, generator)
        if isinstance(param, DTensor):
            # src_data_rank=None: each rank slices its own copy, no communication
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(full)
