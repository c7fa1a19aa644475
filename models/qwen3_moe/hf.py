"""The Hugging Face `Qwen3MoeForCausalLM` layout: Qwen3's attention names, the router as
`mlp.gate`, and each stacked expert projection as one tensor per expert (the hub's files).

transformers (5.x) fuses gate and up projections in memory (`mlp.experts.gate_up_proj`,
[E, 2 * moe_intermediate_size, hidden]) and splits them back per expert in `save_pretrained`;
import reads either form, export writes the per-expert one, which `from_pretrained` loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.args import ModelArgs
from models.hf import HFLayout, Stacked
from models.qwen3 import QWEN3_HF


def moe_config(args: ModelArgs) -> dict[str, Any]:
    """Qwen3MoeConfig's keys that shape the experts, compared on import: every block routed."""
    return {
        "num_experts": args.n_experts,
        "num_experts_per_tok": args.experts_per_token,
        "moe_intermediate_size": args.expert_hidden_dim,
        "norm_topk_prob": args.norm_topk_prob,  # changes the function, so compared too
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def moe_config_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """What Qwen3MoeConfig reads for a key config.json omits (`save_pretrained` writes
    num_experts under its alias num_local_experts)."""
    return {
        "num_experts": config.get("num_local_experts", 128),
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def moe_config_written(args: ModelArgs) -> dict[str, Any]:
    """Written, not compared: the dense width (no block uses it) and the balance loss weight."""
    return {
        "intermediate_size": args.ffn_hidden_dim,
        "router_aux_loss_coef": args.moe_aux_loss_coeff,
    }


QWEN3_MOE_HF = HFLayout(
    architecture="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    per_layer={
        **{k: v for k, v in QWEN3_HF.per_layer.items() if not k.startswith("feed_forward.")},
        "feed_forward.router": "mlp.gate",
    },
    rotary_vectors=QWEN3_HF.rotary_vectors,
    config_extra={**QWEN3_HF.config_extra, "output_router_logits": False},
    stacked={
        "feed_forward.experts.w1": Stacked(
            "mlp.experts.{e}.gate_proj.weight", "mlp.experts.gate_up_proj", part=0, parts=2
        ),
        "feed_forward.experts.w3": Stacked(
            "mlp.experts.{e}.up_proj.weight", "mlp.experts.gate_up_proj", part=1, parts=2
        ),
        "feed_forward.experts.w2": Stacked(
            "mlp.experts.{e}.down_proj.weight", "mlp.experts.down_proj"
        ),
    },
    config_compared=moe_config,
    config_written=moe_config_written,
    config_defaults=moe_config_defaults,
    unsupported={"shared_expert_ffn_dim": "no shared expert"},
)
