"""Tensor parallelism inside a node: apply the model's TP plan with parallelize_module."""

from __future__ import annotations

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

from models.tp_plan import llama_tp_plan

# Every collective below is inserted by the style, not written here; the comments say which.
STYLES: dict[str, ParallelStyle] = {
    # forward: none (input replicated); backward: all-reduce of the input's partial gradient
    "colwise": ColwiseParallel(),
    # forward: all-reduce of the partial sums, so the residual stream stays replicated
    "rowwise": RowwiseParallel(),
    # forward: reduce-scatter of the partial sums onto this rank's slice of the sequence (SP)
    "rowwise_to_sequence_shards": RowwiseParallel(output_layouts=Shard(1)),
    # each rank embeds the ids of its vocabulary rows; all-reduce makes the full embedding
    "vocab_parallel_embedding": RowwiseParallel(input_layouts=Replicate()),
    # as above, but reduce-scattered by sequence: the residual stream starts sequence-sharded
    "vocab_parallel_embedding_to_sequence_shards": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
    # logits leave as a DTensor sharded on the vocabulary dim: the loss runs under
    # loss_parallel() and the full logits are never gathered
    "colwise_vocab_logits": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    # as above, after an all-gather of the sequence-sharded final norm's output
    "colwise_vocab_logits_from_sequence_shards": ColwiseParallel(
        input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    # the norm runs on this rank's sequence slice; its replicated weight gets a partial
    # gradient per rank, which DTensor all-reduces across tp
    "sequence_parallel": SequenceParallel(),
    # all-gather the sequence before attention (cos/sin pass through untouched); the input stays
    # a DTensor so wq/wk/wv's partial input gradients are summed and reduce-scattered once
    "gather_sequence_for_attention": PrepareModuleInput(
        input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)),
    # the same before the feed-forward, whose only input is the hidden state
    "gather_sequence": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
}


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool = False) -> None:
    """Shard the modules of the Llama TP plan that this (possibly partial) stage actually has."""
    present = {name for name, _ in model.named_modules()}
    styles = {}
    for pattern, style in llama_tp_plan(sequence_parallel).items():
        head = pattern.split(".")[0]
        if head in present:  # a pipeline stage may lack the embedding, head or some blocks
            styles[pattern] = STYLES[style]
    parallelize_module(model, tp_mesh, styles)
