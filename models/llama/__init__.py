"""The Llama family: the decoder (model.py), its Hugging Face layout (hf.py) and its spec."""

from models.llama.hf import LLAMA_HF
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
    parameter_count,
    rope_frequencies,
    tied_name,
)
from models.spec import ModelSpec

# Module path pattern -> TP style (models/spec.py's vocabulary; torch's ParallelStyles in
# parallel/tensor_parallel.py). Without sequence parallelism the hidden state between blocks
# is replicated across tp and each block ends in an all-reduce; with it (Megatron-style) the
# residual stream and the norms hold 1/tp of the sequence: each block starts with an
# all-gather and ends in a reduce-scatter.
TP_PLAN = {
    "tok_embeddings": "embedding",
    "layers.*.attention.wq": "colwise",
    "layers.*.attention.wk": "colwise",
    "layers.*.attention.wv": "colwise",
    "layers.*.feed_forward.w1": "colwise",
    "layers.*.feed_forward.w3": "colwise",
    "layers.*.attention.wo": "rowwise",
    "layers.*.feed_forward.w2": "rowwise",
    "output": "head",
}
SP_PLAN = {
    "layers.*.attention_norm": "sequence_norm",
    "layers.*.ffn_norm": "sequence_norm",
    "norm": "sequence_norm",
    "layers.*.attention": "gather_sequence",
    "layers.*.feed_forward": "gather_sequence",
}

SPEC = ModelSpec(
    family="llama",
    build=Transformer,
    initial_value=initial_value,
    parameter_count=parameter_count,
    tp_plan=TP_PLAN,
    sp_plan=SP_PLAN,
    hf=LLAMA_HF,
)

__all__ = [
    "SPEC",
    "SP_PLAN",
    "TIED_PARAMETERS",
    "TP_PLAN",
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
