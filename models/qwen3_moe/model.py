"""Qwen3-MoE: Qwen3's QK-normed attention with a routed Mixture-of-Experts feed-forward in every
block (models/moe.py: top-k of n_experts, renormalized weights, dropless)."""

from __future__ import annotations

import math

import torch

from models.args import ModelArgs
from models.llama.model import initial_value as llama_initial_value
from models.moe import MoE
from models.qwen3.model import Qwen3, Qwen3Block
from models.qwen3.model import parameter_count as qwen3_parameter_count


class Qwen3MoeBlock(Qwen3Block):
    """Pre-norm QK-normed attention and a routed MoE feed-forward, with residuals."""

    feed_forward_class = MoE


class Qwen3Moe(Qwen3):
    """The Qwen3-MoE decoder: Qwen3's parts, MoE blocks."""

    block_class = Qwen3MoeBlock


def initial_value(
    fqn: str, shape: torch.Size, args: ModelArgs, generator: torch.Generator
) -> torch.Tensor:
    """Llama's initialization; the experts' (and shared expert's) down projections depth-scaled
    as Llama's feed-forward w2 is."""
    if fqn.endswith(("experts.w2", "shared_expert.w2.weight")):
        layer = int(fqn.split(".")[1])
        std = 0.02 / math.sqrt(2 * (layer + 1))
        return torch.randn(shape, generator=generator).clamp_(-3, 3) * std
    return llama_initial_value(fqn, shape, args, generator)


def expert_parameters(args: ModelArgs) -> int:
    """Parameters of one routed expert (its three SwiGLU matrices)."""
    return 3 * args.dim * args.expert_hidden_dim


def parameter_count(args: ModelArgs) -> int:
    """Parameters of the whole model: Qwen3's without its dense feed-forward, plus per layer a
    router, the routed experts and the shared expert."""
    dense_ffn = 3 * args.dim * args.ffn_hidden_dim
    moe = (
        args.dim * args.n_experts
        + args.n_experts * expert_parameters(args)
        + 3 * args.dim * args.shared_expert_ffn_dim
    )
    return qwen3_parameter_count(args) + args.n_layers * (moe - dense_ffn)


def active_parameter_count(args: ModelArgs) -> int:
    """Parameters one token goes through: all but the routed experts it was not sent to."""
    unused = (args.n_experts - args.experts_per_token) * expert_parameters(args)
    return parameter_count(args) - args.n_layers * unused
