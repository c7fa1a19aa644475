"""The Llama family: the decoder (model.py), its Hugging Face layout (hf.py) and its spec."""

from models.llama.model import (
    TIED_PARAMETERS,
    Attention,
    CausalCore,
    FeedForward,
    ModelArgs,
    Transformer,
    TransformerBlock,
    apply_rope,
    initial_value,
    rope_frequencies,
    tied_name,
)

__all__ = [
    "TIED_PARAMETERS",
    "Attention",
    "CausalCore",
    "FeedForward",
    "ModelArgs",
    "Transformer",
    "TransformerBlock",
    "apply_rope",
    "initial_value",
    "rope_frequencies",
    "tied_name",
]
