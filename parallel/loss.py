"""The training loss: token-mean cross-entropy, vocab-parallel when the logits are TP-sharded."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.tensor.parallel import loss_parallel


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all tokens of one (micro)batch, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def loss_context(tp: int) -> contextlib.AbstractContextManager:
    """Under TP the logits are a DTensor sharded by vocabulary; loss_parallel computes the
    softmax across shards without gathering them. It must cover the backward too."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()
