"""Tensor parallelism inside a node: apply the model's TP plan with parallelize_module."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from models.tp_plan import LLAMA_TP_PLAN

STYLES: dict[str, ParallelStyle] = {
    "colwise": ColwiseParallel(),
    "rowwise": RowwiseParallel(),
    "vocab_parallel_embedding": RowwiseParallel(input_layouts=Replicate()),
    # logits leave as a DTensor sharded on the vocabulary dim: the loss runs under
    # loss_parallel() and the full logits are never gathered
    "colwise_vocab_logits": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
}


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str] = LLAMA_TP_PLAN) -> None:
    """Shard the modules named in `plan` that this (possibly partial) stage actually has."""
    present = {name for name, _ in model.named_modules()}
    styles = {}
    for pattern, style in plan.items():
        head = pattern.split(".")[0]
        if head in present:  # a pipeline stage may lack the embedding, head or some blocks
            styles[pattern] = STYLES[style]
    parallelize_module(model, tp_mesh, styles)
