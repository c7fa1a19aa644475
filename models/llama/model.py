"""A Llama-3-style decoder written as plain single-device PyTorch (the shape: models/decoder.py).

Parallelism is applied from outside (see parallel/): blocks live in an nn.ModuleDict keyed by
layer index, and the embedding, final norm and output head may be None on pipeline stages that
do not own them, so parameter names stay the same however the model is split.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.args import ModelArgs
from models.decoder import TIED_PARAMETERS as TIED_PARAMETERS  # re-exported: its old home
from models.decoder import Decoder, document_causal_mask
from models.decoder import tied_name as tied_name


def rope_frequencies(args: ModelArgs, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with optional Llama 3.1 scaling."""
    freqs = 1.0 / (
        args.rope_theta
        ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64, device=device) / args.head_dim)
    )
    if not args.rope_scaling:
        return freqs.float()
    low_wavelen = args.rope_original_max_seq_len / args.rope_low_freq_factor
    high_wavelen = args.rope_original_max_seq_len / args.rope_high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (args.rope_original_max_seq_len / wavelen - args.rope_low_freq_factor) / (
        args.rope_high_freq_factor - args.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * freqs / args.rope_scale_factor + smooth * freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / args.rope_scale_factor, smoothed)
    scaled = torch.where(wavelen < high_wavelen, freqs, scaled)
    return scaled.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [b, s, h, d] by the angles in cos/sin (Meta layout): [s, d/2]
    shared by the batch, or [b, s, d/2] per sequence (positions restarting per document)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class CausalCore(nn.Module):
    """softmax(q k^T / sqrt(d)) v under a causal mask, K/V heads shared by groups (GQA).

    A module of its own, with no parameters, so code outside models/ can swap it (context
    parallelism replaces it with an attention over the sequence of several ranks)."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q [b, h, s, d], k/v [b, h_kv, s, d] -> [b, h, s, d]; with doc_ids [b, s] block-causal
        (no token attends across a document boundary)."""
        repeats = q.shape[1] // k.shape[1]
        if repeats > 1:
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        if doc_ids is not None:
            mask = document_causal_mask(doc_ids)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    """Causal grouped-query attention: projections and RoPE here, the softmax in `core`."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.core: nn.Module = CausalCore()
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # per-head norms of q and k before RoPE (Qwen3's QK-norm); none in Llama
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend causally over the sequence; head counts come from the weights (TP-agnostic).

        cos/sin cover positions [0, max_seq_len) ([..., rows, d/2], optionally per sequence): the
        first s rows are used, with s read from x, which may be longer than the hidden state
        between blocks (sequence-sharded there). doc_ids: passed to the core (block-causal).
        """
        b, s, _ = x.shape
        cos, sin = cos[..., :s, :], sin[..., :s, :]
        q = apply_rope(self.q_norm(self.wq(x).view(b, s, -1, self.head_dim)), cos, sin)
        k = apply_rope(self.k_norm(self.wk(x).view(b, s, -1, self.head_dim)), cos, sin)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = self.core(q, k, v, doc_ids)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gated feed-forward."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward with residuals."""

    attention_class: type[Attention] = Attention  # a family's own attention (Qwen3's QK-norm)
    feed_forward_class: type[nn.Module] = FeedForward  # a family's own (Qwen3-MoE's experts)

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = self.attention_class(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = self.feed_forward_class(args)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decoder layer (doc_ids by keyword: TP's input preparation sees x, cos, sin)."""
        h = x + self.attention(self.attention_norm(x), cos, sin, doc_ids=doc_ids)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(Decoder):
    """The decoder: embedding, blocks keyed by layer index, final norm, output head.

    A pipeline stage is this same class with the parts it does not own set to None (or removed
    from `layers`); forward skips whatever is missing.
    """

    block_class: type[TransformerBlock] = TransformerBlock  # a family's own block

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): self.block_class(args) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._rope_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables for positions [0, seq_len), cached per length and device."""
        key = (seq_len, device)
        if key not in self._rope_cache:
            angles = torch.outer(
                torch.arange(seq_len, device=device, dtype=torch.float32),
                rope_frequencies(self.args, device),
            )
            self._rope_cache[key] = (angles.cos(), angles.sin())
        return self._rope_cache[key]

    def forward(
        self,
        tokens_or_hidden: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids [b, s] (first stage) or hidden states [b, s, dim] in; logits or hidden out.

        Packed documents (data/documents.py), each [b, s] over the whole sequence: doc_ids makes
        attention block-causal, positions are the RoPE positions (default 0..s-1)."""
        h = tokens_or_hidden
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(h)
        # tables for every position: a block may see a longer sequence than h (e.g. gathered)
        cos, sin = self.rope(self.args.max_seq_len, h.device)
        if positions is not None:
            cos, sin = cos[positions], sin[positions]  # [b, s, d/2]
        for layer in self.layers.values():
            h = layer(h, cos, sin, doc_ids)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
        return h


def initial_value(
    fqn: str, shape: torch.Size, args: ModelArgs, generator: torch.Generator
) -> torch.Tensor:
    """The full (unsharded) initial value of parameter `fqn`, drawn from `generator`.

    Depends only on the name, the shape and the generator, never on how the model is split, so
    every parallel layout starts from the same weights.
    """
    if fqn.endswith("norm.weight"):
        return torch.ones(shape)
    if fqn.startswith("tok_embeddings"):
        # a tied matrix is the head too: the head's scale keeps the first logits near 1
        std = args.dim**-0.5 if args.tie_embeddings else 1.0
    elif fqn.startswith("output"):
        std = args.dim**-0.5
    elif fqn.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        layer = int(fqn.split(".")[1])
        std = 0.02 / math.sqrt(2 * (layer + 1))  # depth-scaled residual projections
    else:
        std = 0.02
    return torch.randn(shape, generator=generator).clamp_(-3, 3) * std


def parameter_count(args: ModelArgs) -> int:
    """Parameters of the whole model, by arithmetic (no tensor is built)."""
    q, kv = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    block = args.dim * (2 * q + 2 * kv) + 3 * args.dim * args.ffn_hidden_dim + 2 * args.dim
    ends = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2) + args.dim
    return args.n_layers * block + ends
