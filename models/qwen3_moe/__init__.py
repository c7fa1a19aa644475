"""The Qwen3-MoE family: the model (model.py) and its spec (TP plan, expert weights, HF layout)."""

from models.qwen3 import QWEN3_HF, SPEC as QWEN3_SPEC
from models.qwen3_moe.model import (
    Qwen3Moe,
    Qwen3MoeBlock,
    active_parameter_count,
    initial_value,
    parameter_count,
)
from models.spec import ModelSpec

# attention as Qwen3's; the router and the experts are replicated across tp (experts' TP: none),
# and expert parallelism (parallel.ep) splits the experts instead
TP_PLAN = {k: v for k, v in QWEN3_SPEC.tp_plan.items() if ".feed_forward." not in k}

SPEC = ModelSpec(
    family="qwen3_moe",
    build=Qwen3Moe,
    initial_value=initial_value,
    parameter_count=parameter_count,
    active_parameter_count=active_parameter_count,
    tp_plan=TP_PLAN,
    sp_plan={},
    hf=QWEN3_HF,  # TODO(hf): Qwen3MoeForCausalLM's layout
    block_feed_forward="moe",
    expert_parameters=(
        "layers.*.feed_forward.experts.w1",
        "layers.*.feed_forward.experts.w2",
        "layers.*.feed_forward.experts.w3",
    ),
)

__all__ = ["SPEC", "Qwen3Moe", "Qwen3MoeBlock"]
