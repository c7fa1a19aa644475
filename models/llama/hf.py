"""The Hugging Face `LlamaForCausalLM` layout: tridist module names -> Hugging Face names."""

from __future__ import annotations

from models.hf import HFLayout

PER_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

LLAMA_HF = HFLayout(
    architecture="LlamaForCausalLM",
    model_type="llama",
    per_layer=PER_LAYER,
    config_extra={"mlp_bias": False},
)
