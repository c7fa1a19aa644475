"""A model family added from this file alone (a spec registered at import, no edit elsewhere)
trains at pp=2 x tp=2 equal to one process; an unknown family is refused before start."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from launcher.config import ConfigError
from models.args import ModelArgs
from models.hf import HFLayout
from models.llama.model import Transformer, TransformerBlock, initial_value
from models.registry import families, model_spec, register
from models.spec import ModelSpec
from tests.helpers.run_training import make_config, train_and_report
from tests.helpers.spawn import run_ranks


class GeluMLP(nn.Module):
    """A plain (ungated) GELU feed-forward: fc2(gelu(fc1 x))."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.fc1 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)
        self.fc2 = nn.Linear(args.ffn_hidden_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ToyBlock(TransformerBlock):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.feed_forward = GeluMLP(args)


class Toy(Transformer):
    block_class = ToyBlock


def _count(args: ModelArgs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Toy(args).parameters())


TOY = register(
    ModelSpec(
        family="toy",
        build=Toy,
        initial_value=initial_value,
        parameter_count=_count,
        tp_plan={
            "tok_embeddings": "embedding",
            "layers.*.attention.w[qkv]": "colwise",
            "layers.*.attention.wo": "rowwise",
            "layers.*.feed_forward.fc1": "colwise",
            "layers.*.feed_forward.fc2": "rowwise",
            "output": "head",
        },
        sp_plan={},
        hf=HFLayout(architecture="ToyForCausalLM", model_type="toy", per_layer={}),
    )
)
BASE = [
    "model=debug",
    "model.family=toy",
    "train.steps=3",
    "train.seq_len=16",
    "train.global_batch_size=8",
    "train.sample_tokens=0",
    "train.val_interval=1000",
    "optim.warmup_steps=1",
    "optim.eps=1e-5",  # see tests/parallel/test_parity.py
    "device=cpu",
]


def _train(overrides: list[str], world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """train_and_report from this module: a spawned rank imports it, which registers the toy."""
    return train_and_report(overrides, world)


@pytest.mark.long(8)
def test_a_family_registered_in_a_test_trains_at_pp2_tp2_like_one_process() -> None:
    assert "toy" in families() and model_spec("toy") is TOY
    ref_losses, ref_weights = train_and_report(BASE, 1)
    assert any(".feed_forward.fc1." in k for k in ref_weights)  # the toy's own modules
    layout = ["parallel.pp=2", "parallel.tp=2", "parallel.microbatches=4"]
    weights: dict[str, torch.Tensor] = {}
    for losses, rank_weights in run_ranks(4, _train, BASE + layout, 4):
        assert max(abs(a - b) / b for a, b in zip(losses, ref_losses)) <= 1e-5, losses
        weights.update(rank_weights)
    assert weights.keys() == ref_weights.keys()
    for name, ref in ref_weights.items():
        assert ((weights[name] - ref).norm() / ref.norm()).item() <= 1e-5, name


def test_an_unknown_family_is_refused_before_start() -> None:
    with pytest.raises(ConfigError, match=r"config error: model.family='gpt2': use .*llama.*qwen3"):
        make_config(["model.family=gpt2"])
