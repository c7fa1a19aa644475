"""Data parallelism over dp (and cp): FSDP2 sharding, HSDP, or DDP-style replication.

cp ranks hold the same weights and see different tokens of the same sequences, so gradients are
averaged over dp and cp together, as TorchTitan's `dp_shard_cp` does.
"""

from __future__ import annotations

import torch
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from models.decoder import Decoder


def mixed_precision(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """TorchTitan's default policy: parameters gathered and computed in `param_dtype`, gradients
    reduced in fp32; the sharded (master) weights and the optimizer state stay fp32."""
    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def data_parallel_mesh(mesh: DeviceMesh, dp_replicate: int = 1) -> DeviceMesh:
    """The mesh gradients are averaged over: dp and cp flattened (1-D), or under HSDP
    (dp_replicate > 1) that split into (dp_replicate, dp_shard_cp): FSDP2 shards over the
    inner dim (dp / dp_replicate groups times cp, neighbouring ranks) and replicates over the
    outer one."""
    flat = mesh["dp", "cp"]._flatten("dp_cp")  # torch's bookkeeping of a flattened dim
    if dp_replicate == 1:
        return flat
    shard = flat.size() // dp_replicate
    return flat._unflatten(0, (dp_replicate, shard), ("dp_replicate", "dp_shard_cp"))


def apply_data_parallel(
    model: Decoder,
    dp_mesh: DeviceMesh,
    shard: bool,
    pipelined: bool,
    param_dtype: torch.dtype | None = None,
    ignored: set[torch.nn.Parameter] | None = None,
) -> None:
    """Wrap each block, then the root, so gradients reduce per block as backward proceeds.

    dp_mesh: 1-D (FSDP2 or replication) or 2-D (dp_replicate, dp_shard_cp) for HSDP, whose
    parameters are sharded within a group and replicated across groups.
    Under pipelining the parameters stay unsharded after forward: resharding would cost an
    all-gather for every microbatch. param_dtype: the dtype parameters are all-gathered and
    computed in (None: their own, fp32). ignored: parameters whose gradients are reduced
    elsewhere (expert-parallel experts: parallel/expert_parallel.py).
    """
    policy = mixed_precision(param_dtype)
    if not shard:
        for block in model.layers.values():
            replicate(block, mesh=dp_mesh, mp_policy=policy, ignored_params=ignored)
        replicate(model, mesh=dp_mesh, mp_policy=policy, ignored_params=ignored)
        return
    reshard = not pipelined
    for block in model.layers.values():
        fully_shard(
            block,
            mesh=dp_mesh,
            reshard_after_forward=reshard,
            mp_policy=policy,
            ignored_params=ignored,
        )
    fully_shard(
        model, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=policy, ignored_params=ignored
    )
