"""Qwen3 (dense): the Llama decoder with QK-norm, an RMSNorm over each head of q and k before
RoPE, and a head width of its own (128 on the published sizes, decoupled from dim / n_heads)."""

from __future__ import annotations

from torch import nn

from models.args import ModelArgs
from models.llama.model import Attention, Transformer, TransformerBlock
from models.llama.model import parameter_count as llama_parameter_count


class Qwen3Attention(Attention):
    """Grouped-query attention whose q and k heads are RMS-normalized (per head) before RoPE."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.q_norm = nn.RMSNorm(args.head_dim, eps=args.norm_eps)
        self.k_norm = nn.RMSNorm(args.head_dim, eps=args.norm_eps)


class Qwen3Block(TransformerBlock):
    """Pre-norm QK-normed attention and SwiGLU feed-forward with residuals."""

    attention_class = Qwen3Attention


class Qwen3(Transformer):
    """The Qwen3 dense decoder: Llama's parts, Qwen3's blocks."""

    block_class = Qwen3Block


def parameter_count(args: ModelArgs) -> int:
    """Parameters of the whole model, by arithmetic: Llama's plus two head_dim norms per layer."""
    return llama_parameter_count(args) + args.n_layers * 2 * args.head_dim
