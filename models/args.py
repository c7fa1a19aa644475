"""The architecture of a Llama-style decoder, shared by every family (models/<family>/).

One typed set of fields is what the config schema, the checkpoint manifest and the planner
read; `family` names the spec (models/registry.py) that builds, shards and maps the model.
A family that needs a field adds it here with a default that leaves the others unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ModelArgs:
    """Architecture of a Llama-style decoder (Llama 3, Qwen3, ...)."""

    family: str = "llama"  # the model spec: models/<family>/ (models/registry.py)
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None
    head_size: int | None = None  # width of one head; None: dim / n_heads (Qwen3: 128)
    vocab_size: int = 256
    multiple_of: int = 64
    ffn_dim_multiplier: float | None = None
    ffn_dim: int | None = None  # SwiGLU hidden width; None: sized the way Llama sizes it
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: bool = False  # Llama 3.1 long-context frequency scaling
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # Mixture-of-Experts feed-forwards (models/moe.py; family qwen3_moe): 0 experts is dense
    n_experts: int = 0
    experts_per_token: int = 2  # top-k routed experts per token
    moe_ffn_dim: int | None = None  # one expert's SwiGLU width; None: ffn_hidden_dim
    shared_expert_ffn_dim: int = 0  # a dense SwiGLU every token also goes through; 0: none
    norm_topk_prob: bool = True  # renormalize the k routing weights to sum to 1 (Qwen3-MoE)
    moe_aux_loss_coeff: float = 0.001  # sequence-wise load-balancing loss weight
    moe_z_loss_coeff: float = 0.0  # router z-loss weight (ST-MoE)

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (GQA); equals n_heads when unset."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.head_size or self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden width: ffn_dim, or sized the way Llama sizes it."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def expert_hidden_dim(self) -> int:
        """One routed expert's SwiGLU hidden width."""
        return self.moe_ffn_dim or self.ffn_hidden_dim
