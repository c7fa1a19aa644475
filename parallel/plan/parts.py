"""What each part of the model costs, from its real shapes on the meta device: the numbers the
pipeline split (parallel/pipeline/split.py) balances stages with."""

from __future__ import annotations

import functools
from dataclasses import fields, replace

import torch

from models.args import ModelArgs
from models.registry import model_spec
from parallel.pipeline.split import PartCosts
from parallel.plan.flops import forward_flops_per_token
from parallel.plan.memory import block_activation_elements, head_activation_bytes, routing_bytes
from parallel.plan.params import active_expert_share, count_stage

# log-softmax (max, exp, sum, subtract) and its gradient per logit: elementwise work, counted
# so that the loss is not free; ~5/(6·dim) of the head's matmuls
LOSS_FLOPS_PER_LOGIT = 5


def part_costs(args: ModelArgs, seq_len: int) -> PartCosts:
    """The costs of `args`' parts from a one-block model built on the meta device (cached: a
    layout search asks again)."""
    return _part_costs(tuple(getattr(args, f.name) for f in fields(ModelArgs)), seq_len)


@functools.lru_cache(maxsize=64)
def _part_costs(key: tuple, seq_len: int) -> PartCosts:
    args = ModelArgs(*key)
    with torch.device("meta"):
        model = model_spec(args.family).build(replace(args, n_layers=1))
    assert model.tok_embeddings is not None and model.norm is not None  # a whole model
    # a MoE block's matmuls: those a token goes through (its k routed experts of E)
    counted = count_stage(model, model_spec(args.family).expert_parameters)
    block = counted.largest_block - (1 - active_expert_share(args)) * counted.block_experts
    width = args.n_heads * args.head_dim
    vocab, dim = model.tok_embeddings.weight.shape
    norm = sum(p.numel() for p in model.norm.parameters())
    head = 3 * forward_flops_per_token(norm + vocab * dim, 0, width, seq_len)
    return PartCosts(
        block=round(3 * forward_flops_per_token(block, 1, width, seq_len)),
        embedding=dim,  # the backward's row added per token; the forward is a lookup
        head=round(head) + LOSS_FLOPS_PER_LOGIT * vocab,
        block_activation=2 * block_activation_elements(args, 1, False, "none")
        + routing_bytes(args, "none"),
        head_activation=head_activation_bytes(args, 1, False, pipelined=True),
    )
