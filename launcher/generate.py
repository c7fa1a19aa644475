"""Sample text from a trained (unpipelined) model: the first thing a new user sees."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], n_tokens: int, max_seq_len: int,
             temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> list[int]:
    """Autoregressive top-k sampling; every rank running it in lockstep draws the same tokens."""
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for _ in range(n_tokens):
        logits = model(tokens[:, -max_seq_len:])[:, -1, :]
        if hasattr(logits, "full_tensor"):  # vocab-sharded under TP
            logits = logits.full_tensor()
        logits = logits.float() / temperature
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return tokens[0, len(prompt):].tolist()
