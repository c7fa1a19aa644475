"""Sample text from a trained (unpipelined) model: the first thing a new user sees."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.dtensor import full_value


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    n_tokens: int,
    max_seq_len: int,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    pad_to: int = 1,
) -> list[int]:
    """Autoregressive top-k sampling; every rank running it in lockstep draws the same tokens.

    pad_to: pad the input on the right to a multiple of this (sequence parallelism splits the
    sequence into tp equal slices); causal attention keeps the last real position's logits exact.
    """
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    window = max_seq_len // pad_to * pad_to
    for _ in range(n_tokens):
        context = tokens[:, -window:]
        n = context.shape[1]
        logits = model(F.pad(context, (0, -n % pad_to)))[:, n - 1, :]
        logits = full_value(logits).float() / temperature  # vocab-sharded under TP: gathered
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return tokens[0, len(prompt) :].tolist()
