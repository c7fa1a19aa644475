"""Data parallelism over the `dp` mesh dim: FSDP2 sharding, or DDP-style replication."""

from __future__ import annotations

import torch
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from models.llama import Transformer


def mixed_precision(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """TorchTitan's default policy: parameters gathered and computed in `param_dtype`, gradients
    reduced in fp32; the sharded (master) weights and the optimizer state stay fp32."""
    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def apply_data_parallel(
    model: Transformer,
    dp_mesh: DeviceMesh,
    shard: bool,
    pipelined: bool,
    param_dtype: torch.dtype | None = None,
) -> None:
    """Wrap each block, then the root, so gradients reduce per block as backward proceeds.

    Under pipelining the parameters stay unsharded after forward: resharding would cost an
    all-gather for every microbatch. param_dtype: the dtype parameters are all-gathered and
    computed in (None: their own, fp32).
    """
    policy = mixed_precision(param_dtype)
    if not shard:
        for block in model.layers.values():
            replicate(block, mesh=dp_mesh, mp_policy=policy)
        replicate(model, mesh=dp_mesh, mp_policy=policy)
        return
    reshard = not pipelined
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=policy)
