"""Sampling: right-padding (for sequence parallelism) draws exactly the unpadded tokens."""

import torch
from torch import nn

from launcher.run.generate import generate
from models.llama import ModelArgs, Transformer
from parallel.init import init_parameters


class EvenLengthsOnly(nn.Module):
    """A model that, like one under sequence parallelism at tp=2, needs even sequence lengths."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        assert tokens.shape[1] % 2 == 0, tokens.shape
        return self.model(tokens)


def test_padded_sampling_equals_unpadded() -> None:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=32)
    model = Transformer(args)
    init_parameters(model, args, seed=0)
    prompt = [1, 2, 3]  # odd length; the window (max_seq_len) is reached too
    plain = generate(model, prompt, 40, args.max_seq_len)
    padded = generate(EvenLengthsOnly(model), prompt, 40, args.max_seq_len, pad_to=2)
    assert padded == plain and len(set(plain)) > 1
