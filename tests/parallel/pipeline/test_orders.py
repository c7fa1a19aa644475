"""tridist's zero-bubble orders: complete, within their memory, at the floor of a synchronous
step at equal costs, and the searched ones (zbv against torch's ZB-V order too) never slower
than the handcrafted at other costs."""

from __future__ import annotations

import pytest

from launcher.config import ConfigError
from launcher.run.compose import compose_config
from parallel.pipeline.costs import StageCosts
from parallel.pipeline.list_schedule import Order, peak_in_flight, step_time
from parallel.pipeline.orders import (
    h1_shaped,
    zb_1p_order,
    zb_2p_order,
    zb_h1_order,
    zb_h2_order,
    zbv_order,
)
from parallel.pipeline.registry import pipeline_layout
from parallel.pipeline.simulate import schedule_ops

ORDERS = {"zb_h1": zb_h1_order, "zb_h2": zb_h2_order, "zb_1p": zb_1p_order, "zb_2p": zb_2p_order}
LIMITS = {"zb_h1": 1.0, "zb_h2": 2.0, "zb_1p": 1.0, "zb_2p": 2.0}  # x p, 2p-1 for zb_h2
UNEQUAL = {
    "W = F/2": StageCosts((1.0,) * 4, (1.0,) * 4, (0.5,) * 4),
    "p2p = F/5": StageCosts((1.0,) * 4, (1.0,) * 4, (1.0,) * 4, 0.2),
    "I = 1.5F, W = F/2": StageCosts((1.0,) * 4, (1.5,) * 4, (0.5,) * 4),
    "last stage 1.5x": StageCosts((1, 1, 1, 1.5), (1, 1, 1, 1.5), (1, 1, 1, 1.5)),
}


@pytest.mark.parametrize("name", ORDERS)
@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_orders_are_complete_within_memory_and_at_the_floor(name: str, p: int, m: int) -> None:
    order = ORDERS[name](p, p, m, None)
    for r, actions in order.items():  # each F, I and W of every microbatch once, on its rank
        seen = sorted((a.computation_type.value, a.microbatch_index) for a in actions)
        assert seen == sorted((k, mb) for k in "FIW" for mb in range(m)), (name, r)
        assert {a.stage_index for a in actions} == {r}
    limit = 2 * p - 1 if name == "zb_h2" else LIMITS[name] * p
    assert max(peak_in_flight(order).values()) <= limit, name
    # the floor of a synchronous step: the last rank waits (p-1) F for its first input
    assert step_time(order, StageCosts.uniform(p, p)) == pytest.approx(3 * m + p - 1), name


def test_zb_h1_is_the_papers_pattern() -> None:
    order = h1_shaped(4, 8)
    assert [f"{a.computation_type.value}{a.microbatch_index}" for a in order[3][:9]] == [
        "F0", "I0", "F1", "I1", "F2", "I2", "F3", "I3", "W0",
    ]  # fmt: skip
    assert peak_in_flight(order) == {0: 4, 1: 4, 2: 4, 3: 4}  # 1F1B's first-stage peak


@pytest.mark.parametrize("label", UNEQUAL)
def test_searched_orders_never_lose_to_the_handcrafted(label: str) -> None:
    costs, p, m = UNEQUAL[label], 4, 8
    h1, h2 = (step_time(f(p, p, m, None), costs) for f in (zb_h1_order, zb_h2_order))
    one, two = (step_time(f(p, p, m, costs), costs) for f in (zb_1p_order, zb_2p_order))
    assert one <= h1 + 1e-9 and two <= min(h1, h2) + 1e-9, (label, h1, h2, one, two)


def test_searched_orders_beat_zb_h1_when_weight_gradients_are_cheap() -> None:
    costs = UNEQUAL["I = 1.5F, W = F/2"]
    assert step_time(zb_2p_order(4, 4, 8, costs), costs) < 0.95 * step_time(
        zb_h1_order(4, 4, 8, None), costs
    )


def _torch_zbv(p: int, m: int) -> Order:
    ops = schedule_ops(pipeline_layout("zbv_torch", p, 2, m))
    return {r: [a for (a,) in ops[r]] for r in range(p)}


def _v_costs(f: float, i: float, w: float, last: float = 1.0, p2p: float = 0.0) -> StageCosts:
    """p = 4 on the V: 8 chunks of half a rank's costs, the last stage `last` times slower."""
    scale = [0.5] * 7 + [0.5 * last]
    return StageCosts(
        tuple(f * x for x in scale), tuple(i * x for x in scale), tuple(w * x for x in scale), p2p
    )


V_COSTS = {
    "W = F/2": _v_costs(1, 1, 0.5),
    "p2p = F/5": _v_costs(1, 1, 1, p2p=0.2),
    "last stage 1.5x": _v_costs(1, 1, 1, last=1.5),
    "last 1.5x, W = F/2": _v_costs(1, 1, 0.5, last=1.5),
}


@pytest.mark.parametrize(("p", "m"), [(2, 2), (2, 4), (4, 4), (4, 8), (4, 16), (8, 16)])
def test_zbv_is_complete_on_the_v_within_2p_and_never_slower_than_torchs(p: int, m: int) -> None:
    order, costs = zbv_order(p, 2 * p, m, None), StageCosts.uniform(2 * p, p)
    for r, actions in order.items():
        seen = sorted(
            (a.stage_index, a.computation_type.value, a.microbatch_index) for a in actions
        )
        assert seen == sorted(
            (s, k, mb) for s in (r, 2 * p - 1 - r) for k in "FIW" for mb in range(m)
        )
    assert max(peak_in_flight(order).values()) <= 2 * p  # ZB-V's: p whole microbatches
    assert step_time(order, costs) <= step_time(_torch_zbv(p, m), costs) + 1e-9
    if (
        m >= 2 * p
    ):  # the floor of a synchronous step: (p-1) chunks of F/2 before the last rank starts
        assert step_time(order, costs) == pytest.approx(3 * m + (p - 1) / 2)


def test_zbv_beats_torchs_order_where_the_list_scheduler_finds_a_shorter_one() -> None:
    costs = StageCosts.uniform(8, 4)
    assert step_time(zbv_order(4, 8, 4, None), costs) == 13.5  # the floor; torch's order: 15
    assert step_time(_torch_zbv(4, 4), costs) == 15
    slow_last = V_COSTS["last stage 1.5x"]
    assert step_time(zbv_order(4, 8, 16, slow_last), slow_last) < 0.99 * step_time(
        _torch_zbv(4, 16), slow_last
    )


@pytest.mark.parametrize("label", V_COSTS)
def test_zbv_searched_at_other_costs_never_loses_to_torchs(label: str) -> None:
    costs = V_COSTS[label]
    for m in (4, 8):
        searched = step_time(zbv_order(4, 8, m, costs), costs)
        assert searched <= step_time(_torch_zbv(4, m), costs) + 1e-9, (label, m)


def test_stage_costs_are_validated() -> None:
    base = ["model=debug", "parallel.pp=2", "parallel.microbatches=4"]
    cfg = compose_config(
        base + ["parallel.schedule=zb_1p", "parallel.stage_costs=[[1.0,1.0,1.0],[2.0,2.0,1.0]]"], 2
    )
    assert cfg.parallel.stage_costs == [[1, 1, 1], [2, 2, 1]]
    with pytest.raises(ConfigError, match=r"parallel.stage_costs=.*one \[F, I, W\].*\(2\)"):
        compose_config(
            base + ["parallel.schedule=zb_2p", "parallel.stage_costs=[[1.0,1.0,1.0]]"], 2
        )
    with pytest.raises(ConfigError, match="parallel.p2p_ms=0.5: only read with"):
        compose_config(base + ["parallel.schedule=zb_2p", "parallel.p2p_ms=0.5"], 2)
    with pytest.raises(ConfigError, match="only zbv, zb_1p and zb_2p search an order"):
        compose_config(
            base
            + ["parallel.schedule=zb_h1", "parallel.stage_costs=[[1.0,1.0,1.0],[1.0,1.0,1.0]]"],
            2,
        )


def test_measured_costs_are_each_stages_median() -> None:
    from parallel.pipeline.timeline import Event
    from parallel.pipeline.tuning import SHORTEST_S, costs_from_events

    def event(kind: str, stage: int, ms: float) -> Event:
        return Event(stage, stage, kind, stage, 0, 0.0, ms / 1000)

    events = [event("F", 0, 1), event("F", 0, 3), event("F", 0, 2), event("W", 0, 4)]
    events += [event("F", 1, 2), event("B", 1, 6), event("I", 1, 2), event("wait", -1, 9)]
    costs = costs_from_events(events, 2)
    assert costs.forward == pytest.approx((0.002, 0.002))
    assert costs.input_grad == pytest.approx((SHORTEST_S, 0.0025))  # torch runs no I on stage 0
    assert costs.weight_grad == pytest.approx((0.004, 0.003))
