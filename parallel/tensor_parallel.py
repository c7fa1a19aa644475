"""Tensor parallelism inside a node: the Llama TP plan, in torch's ParallelStyle vocabulary,
applied with parallelize_module. Reading the plan tells the sharding; every collective is
inserted by a style, not written here (the comments say which).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def llama_tp_plan(sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """Module path pattern -> ParallelStyle for the Llama of models/llama.py.

    Without sequence parallelism the hidden state between blocks is replicated across tp and
    each block ends in an all-reduce. With it (Megatron-style) the residual stream and the
    norms run on a 1/tp slice of the sequence: each block starts with an all-gather and ends
    in a reduce-scatter.
    """
    sp = Shard(1) if sequence_parallel else None  # the residual stream's layout between blocks
    plan: dict[str, ParallelStyle] = {
        # each rank embeds the ids of its vocabulary rows; the partial sums are all-reduced
        # (or reduce-scattered by sequence under SP)
        "tok_embeddings": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=sp or Replicate()
        ),
        # q/k/v and w1/w3 split by heads / hidden units: no forward collective; backward
        # all-reduces the input's partial gradient
        "layers.*.attention.wq": ColwiseParallel(),
        "layers.*.attention.wk": ColwiseParallel(),
        "layers.*.attention.wv": ColwiseParallel(),
        "layers.*.feed_forward.w1": ColwiseParallel(),
        "layers.*.feed_forward.w3": ColwiseParallel(),
        # forward: all-reduce of the partial sums (reduce-scatter onto this rank's sequence
        # slice under SP)
        "layers.*.attention.wo": RowwiseParallel(output_layouts=sp or Replicate()),
        "layers.*.feed_forward.w2": RowwiseParallel(output_layouts=sp or Replicate()),
        # logits leave as a DTensor sharded by vocabulary: the loss runs under loss_parallel()
        # and the full logits are never gathered (under SP: after an all-gather of the norm)
        "output": ColwiseParallel(
            input_layouts=sp or Replicate(), output_layouts=Shard(-1), use_local_output=False
        ),
    }
    if sequence_parallel:
        plan |= {
            # norms run on this rank's sequence slice; their replicated weights get partial
            # gradients, which DTensor all-reduces across tp
            "layers.*.attention_norm": SequenceParallel(),
            "layers.*.ffn_norm": SequenceParallel(),
            "norm": SequenceParallel(),
            # attention needs every position: all-gather the sequence (cos/sin pass through);
            # the input stays a DTensor so wq/wk/wv's partial input gradients are reduced once
            "layers.*.attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None),
                desired_input_layouts=(Replicate(), None, None),
            ),
            "layers.*.feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
        }
    return plan


def matches(pattern: str, name: str) -> bool:
    """True if a dotted module name matches a plan pattern, `*` standing for one component."""
    parts, atoms = name.split("."), pattern.split(".")
    return len(parts) == len(atoms) and all(fnmatchcase(p, a) for p, a in zip(parts, atoms))


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool = False
) -> None:
    """Shard the modules of the Llama TP plan that this (possibly partial) stage really has."""
    names = [name for name, _ in model.named_modules() if name]
    plan = {
        pattern: style
        for pattern, style in llama_tp_plan(sequence_parallel).items()
        if any(matches(pattern, name) for name in names)
    }  # a stage may lack the ends or blocks
    parallelize_module(model, tp_mesh, plan)
