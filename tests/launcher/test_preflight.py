"""launcher.preflight: the lower bound of a rank's model state, a MoE's experts counted where
they are (whole on every TP rank; split over ep and unsharded by FSDP under expert parallelism)."""

from __future__ import annotations

import pytest

from launcher.preflight import state_bytes_per_rank
from launcher.run.compose import compose_config
from models.registry import parameter_count
from parallel.plan.params import routed_expert_parameters


def test_dense_state_is_the_pp_tp_share() -> None:
    cfg = compose_config(["model=llama3_8b", "parallel.tp=2", "parallel.dp=4"])
    assert state_bytes_per_rank(cfg) == parameter_count(cfg.model) / 2 * (4 + 4 + 8 / 4)


@pytest.mark.parametrize("ep", [1, 8])
def test_moe_experts_are_divided_by_ep_not_tp(ep: int) -> None:
    cfg = compose_config(
        ["model=qwen3_moe_30b_a3b", "parallel.tp=2", "parallel.dp=8", f"parallel.ep={ep}"]
    )
    experts = routed_expert_parameters(cfg.model)
    assert experts == 48 * 128 * 3 * 2048 * 768
    rest = (parameter_count(cfg.model) - experts) / 2 * (4 + 4 + 8 / 8)
    held = experts / ep * (4 + 4 + (8 / 8 if ep == 1 else 8))
    assert state_bytes_per_rank(cfg) == pytest.approx(rest + held)
