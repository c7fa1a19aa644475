"""The Qwen3 dense family: the model (model.py) and its spec (TP plan, Hugging Face layout)."""

from models.hf import HFLayout
from models.llama import SP_PLAN, TP_PLAN
from models.llama.hf import PER_LAYER
from models.llama.model import initial_value
from models.qwen3.model import Qwen3, Qwen3Attention, Qwen3Block, parameter_count
from models.spec import ModelSpec

QWEN3_HF = HFLayout(
    architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    per_layer={
        **PER_LAYER,
        "attention.q_norm": "self_attn.q_norm",
        "attention.k_norm": "self_attn.k_norm",
    },
    # the per-head norms weigh q and k before RoPE: their elements move with the rows
    rotary_vectors=("attention.q_norm", "attention.k_norm"),
    config_extra={"use_sliding_window": False, "sliding_window": None, "max_window_layers": 0},
)

SPEC = ModelSpec(
    family="qwen3",
    build=Qwen3,
    initial_value=initial_value,  # Llama's: norms (QK-norms too) start at one
    parameter_count=parameter_count,
    # Llama's plan; q_norm/k_norm see the heads of this rank only (colwise wq/wk), so their
    # replicated weights get partial gradients that must be summed across tp
    tp_plan={
        **TP_PLAN,
        "layers.*.attention.q_norm": "per_head_norm",
        "layers.*.attention.k_norm": "per_head_norm",
    },
    sp_plan=SP_PLAN,
    hf=QWEN3_HF,
)

__all__ = ["QWEN3_HF", "SPEC", "Qwen3", "Qwen3Attention", "Qwen3Block"]
