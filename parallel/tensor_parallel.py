"""Tensor parallelism inside a node: a family's TP plan (data in its spec, models/<family>/)
turned into torch's ParallelStyles and applied with parallelize_module. Reading the plan tells
the sharding; every collective is inserted by a style, not written here (the comments say which).
"""

from __future__ import annotations

import inspect
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

from models.spec import ModelSpec


def _style(name: str, sequence_parallel: bool, module: nn.Module) -> ParallelStyle:
    """The torch ParallelStyle of one plan entry (models/spec.py's vocabulary), given whether
    the residual stream between blocks is sequence-sharded."""
    sp = Shard(1) if sequence_parallel else None  # the residual stream's layout between blocks
    if name == "embedding":
        # each rank embeds the ids of its vocabulary rows; the partial sums are all-reduced
        # (or reduce-scattered by sequence under SP)
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=sp or Replicate())
    if name == "colwise":
        # split by heads / hidden units: no forward collective; backward all-reduces the
        # input's partial gradient
        return ColwiseParallel()
    if name == "rowwise":
        # forward: all-reduce of the partial sums (reduce-scatter onto this rank's sequence
        # slice under SP)
        return RowwiseParallel(output_layouts=sp or Replicate())
    if name == "head":
        # logits leave as a DTensor sharded by vocabulary: the loss runs under loss_parallel()
        # and the full logits are never gathered (under SP: after an all-gather of the norm)
        return ColwiseParallel(
            input_layouts=sp or Replicate(), output_layouts=Shard(-1), use_local_output=False
        )
    if name == "per_head_norm":
        # input [b, s, heads, head_dim] holds this rank's heads: mark it Shard(2) so the
        # replicated weight's partial gradient is all-reduced across tp by DTensor
        return SequenceParallel(sequence_dim=2, use_local_output=True)
    if name == "sequence_norm":
        # norms run on this rank's sequence slice; their replicated weights get partial
        # gradients, which DTensor all-reduces across tp
        return SequenceParallel()
    if name == "gather_sequence":
        # every position is needed: all-gather the sequence of the first input (the others,
        # e.g. cos/sin, pass through); it stays a DTensor so the partial input gradients of
        # the colwise projections are reduced once
        inputs = _positional_inputs(module)
        return PrepareModuleInput(
            input_layouts=(Shard(1),) + (None,) * (inputs - 1),
            desired_input_layouts=(Replicate(),) + (None,) * (inputs - 1),
        )
    raise ValueError(f"unknown TP style {name!r}")


def _positional_inputs(module: nn.Module) -> int:
    """How many positional inputs the module's forward takes without a default (its first is
    the hidden state; optional extra inputs must be passed by keyword)."""
    params = inspect.signature(module.forward).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)


def tp_plan(
    spec: ModelSpec, model: nn.Module, sequence_parallel: bool = False
) -> dict[str, ParallelStyle]:
    """Module path pattern -> ParallelStyle: the family's plan (plus its SP entries under
    sequence parallelism), for the modules this (possibly partial) stage really has."""
    entries = {**spec.tp_plan, **(spec.sp_plan if sequence_parallel else {})}
    modules = [(name, m) for name, m in model.named_modules() if name]
    plan = {}
    for pattern, style in entries.items():
        found = [m for name, m in modules if matches(pattern, name)]
        if found:  # a stage may lack the ends or blocks
            plan[pattern] = _style(style, sequence_parallel, found[0])
    return plan


def matches(pattern: str, name: str) -> bool:
    """True if a dotted module name matches a plan pattern, `*` standing for one component."""
    parts, atoms = name.split("."), pattern.split(".")
    return len(parts) == len(atoms) and all(fnmatchcase(p, a) for p, a in zip(parts, atoms))


def apply_tensor_parallel(
    model: nn.Module, spec: ModelSpec, tp_mesh: DeviceMesh, *, sequence_parallel: bool = False
) -> None:
    """Shard the modules of the family's TP plan that this (possibly partial) stage has."""
    parallelize_module(model, tp_mesh, tp_plan(spec, model, sequence_parallel))
