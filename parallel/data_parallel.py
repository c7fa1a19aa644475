"""Data parallelism over the `dp` mesh dim: FSDP2 sharding, or DDP-style replication."""

from __future__ import annotations

from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from models.llama import Transformer


def apply_data_parallel(
    model: Transformer, dp_mesh: DeviceMesh, shard: bool, pipelined: bool
) -> None:
    """Wrap each block, then the root, so gradients reduce per block as backward proceeds.

    Under pipelining the parameters stay unsharded after forward: resharding would cost an
    all-gather for every microbatch.
    """
    if not shard:
        for block in model.layers.values():
            replicate(block, mesh=dp_mesh)
        replicate(model, mesh=dp_mesh)
        return
    reshard = not pipelined
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard)
