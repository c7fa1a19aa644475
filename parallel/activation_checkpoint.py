"""Activation recompute applied to blocks from outside the model, keeping parameter names."""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from models.decoder import Decoder
from parallel.context_parallel import GATHERED_OP
from parallel.ring_attention import RING_OP

# selective: keep the results of the expensive ops, recompute the cheap elementwise ones
_SAVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    GATHERED_OP,  # CP's attention, all-gathered K/V
    RING_OP,  # recomputing it would pass every K/V block around the ring again
}


def _policy(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Decoder, mode: str) -> None:
    """`full` recomputes every block in backward; `selective` recomputes all but matmuls/attention."""
    if mode == "none":
        return
    for block in model.layers.values():
        if mode == "full":
            checkpoint(block)
        else:
            checkpoint(block, context_fn=partial(create_selective_checkpoint_contexts, _policy))
